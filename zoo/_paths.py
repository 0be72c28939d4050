"""Where the zoo keeps its files: shipped weights and generated model cards, inside the package."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CARDS_ROOT", "CONFIG_NAME", "WEIGHTS_NAME", "WEIGHTS_ROOT", "card_path", "shipped_dir"]

PACKAGE_ROOT = Path(__file__).resolve().parent
WEIGHTS_ROOT = PACKAGE_ROOT / "weights"
CARDS_ROOT = PACKAGE_ROOT / "cards"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# Both helpers read the module globals at call time, so tests can point them at a temporary folder.
def shipped_dir(name: str) -> Path:
    """The folder holding a registered name's shipped weights (it may not exist)."""
    return WEIGHTS_ROOT / name


def card_path(name: str) -> Path:
    """Where a registered name's generated model card lives (it may not exist)."""
    return CARDS_ROOT / f"{name}.md"
