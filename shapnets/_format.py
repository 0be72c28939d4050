"""Small helpers the explanation and its figures share: optional imports and signed sums in text.

Kept apart from `explanation.py` so that `_plotting.py` (behind `Explanation.plot`) needs nothing from it: no
import circle.
"""

from __future__ import annotations

from typing import Any

__all__ = ["optional_import", "signed_sum"]


def optional_import(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency, or raise an `ImportError` that names the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs {module.split('.')[0]}, which is not installed: "
                          f'pip install "shapnets[{extra}]" (or pip install {module.split(".")[0]})') from e


def signed_sum(base: float, total: float, digits: int = 3) -> str:
    """`"base 1.037 + 10.908"` / `"base 1.037 - 2.100"`: one sign between the terms, never `+ +` or `+ -`."""
    sign = "-" if total < 0 else "+"
    return f"base {base:.{digits}f} {sign} {abs(total):.{digits}f}"
