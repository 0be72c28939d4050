"""What every `shapnets bench` report shares: Markdown tables, the environment header and the files written.

Each benchmark (`training.bench`, `training.interactions_bench`) writes `<out>/<kind>.md` (tables headed by the
date, the hardware and the command), `<out>/<kind>.json` (settings, environment, rows) and `<out>/<kind>.png`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from zoo import jsonable

from .curves import format_duration

__all__ = ["Progress", "Row", "environment", "markdown_table", "progress", "report_header", "write_report"]

Row = dict[str, Any]
"""One table row: column name -> value."""


def markdown_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """A Markdown table of `rows` (missing keys and None print as `n/a`, floats with 3 significant digits)."""

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.3g}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.2e}"
        return str(value).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """Rows -> strict JSON: NaN / inf become null, tensors lists, paths strings."""
    return jsonable(value, nonfinite=lambda _: None)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} CPU"


def environment(device: torch.device | None = None, command: str | None = None) -> dict[str, Any]:
    """Date, hardware, library versions and the command line (default `sys.argv`): the header of every report."""
    device = device or torch.device("cpu")
    hardware = f"{_cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s)"
    if device.type == "cuda":
        hardware += f"; {torch.cuda.get_device_name(device)}"
    try:
        import captum

        captum_version = captum.__version__
    except ImportError:
        captum_version = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hardware": hardware,
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "captum": captum_version,
        "command": command or " ".join(sys.argv),
    }


def report_header(title: str, env: dict[str, Any]) -> str:
    """The Markdown heading of a report: its title, then the date, the hardware, the versions and the command."""
    return (f"## {title}\n\n{env['date'][:10]}, {env['hardware']}, torch {env['torch']}"
            + (f", captum {env['captum']}" if env["captum"] else "") + f". Command: `{env['command']}`\n")


def write_report(out: str | Path | None, kind: str, report: str, payload: dict[str, Any],
                 plot: Callable[[Path], None] | None) -> None:
    """`<out>/<kind>.md`, `.json` and (with matplotlib) `.png`; nothing when `out` is None.

    Args:
        out: the report folder (created), or None.
        kind: the file stem (`fidelity`, `speed` ...).
        report: the Markdown text.
        payload: the settings, environment and rows, written as strict JSON (NaN / inf -> null).
        plot: draws the figure into the path it is given.
    """
    if out is None:
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{kind}.md").write_text(report + "\n")
    (folder / f"{kind}.json").write_text(json.dumps(_json_safe(payload), indent=2))
    if plot is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print(f"matplotlib is not installed: no {kind}.png written", file=sys.stderr)
        return
    plot(folder / f"{kind}.png")


def progress(message: str, verbose: bool) -> None:
    """`[bench] message` on stderr, when `verbose`."""
    if verbose:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


class Progress:
    """One stderr line as each of `total` items starts: `[bench] speed 2/7: name (elapsed 1m03s, ETA 2m10s)`.

    The ETA is the mean time of the finished items times the items left (the current one included): a guess that
    is `?` until one item has finished.
    """

    def __init__(self, label: str, total: int, verbose: bool) -> None:
        self.label, self.total, self.verbose = label, total, verbose
        self.done = 0
        self.start = time.perf_counter()

    def __call__(self, name: str) -> None:
        """Announce the next item (the previous one, if any, has finished)."""
        elapsed = time.perf_counter() - self.start
        eta = format_duration(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        progress(f"{self.label} {self.done + 1}/{self.total}: {name} (elapsed {format_duration(elapsed)}, "
                 f"ETA {eta})", self.verbose)
        self.done += 1
