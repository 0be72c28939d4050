"""Learning curves of a run: `curves.png` drawn from its `metrics.csv` (loss, accuracy and regularizer terms).

`shapnets train` writes the figure at the end of every run (also a stopped or diverged one); `plot_curves` redraws
it from any run folder's `metrics.csv`. matplotlib is optional (the `viz` extra): without it nothing is drawn.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

__all__ = ["curves_figure", "format_duration", "plot_curves", "read_metrics"]

_NOT_TERMS = {"loss", "ce"}  # the train_* parts that are not regularizer terms


def format_duration(seconds: float) -> str:
    """`"42s"`, `"3m07s"`, `"2h05m"`: short enough for a progress line."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 59.5:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def read_metrics(path: str | Path) -> dict[str, list[float]]:
    """The columns of a `metrics.csv` as floats (empty cells -> NaN), by column name.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file without an `epoch` column.
    """
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if "epoch" not in (reader.fieldnames or []):
            raise ValueError(f"{path} has no 'epoch' column: not a metrics.csv written by `shapnets train`")
        columns: dict[str, list[float]] = {name: [] for name in reader.fieldnames or []}
        for row in reader:
            for name in columns:
                text = (row.get(name) or "").strip()
                try:
                    columns[name].append(float(text) if text else math.nan)
                except ValueError:
                    columns[name].append(math.nan)
    return columns


def curves_figure(columns: dict[str, list[float]], title: str = "") -> Any:
    """The learning-curve figure of `read_metrics` columns (needs matplotlib).

    Panels: the training loss (total, and cross-entropy when it differs) with the validation loss; validation
    accuracy (micro and macro, %); one curve per regularizer term (`train_<term>` columns other than loss and ce),
    a panel left out when the run had none.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = columns["epoch"]
    terms = [name for name in columns if name.startswith("train_") and name[len("train_"):] not in _NOT_TERMS]
    panels = ["loss", "accuracy"] + (["terms"] if terms else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    marker = "o" if len(epochs) <= 30 else None

    def draw(ax, name: str, label: str, scale: float = 1.0) -> None:
        points = [(e, scale * v) for e, v in zip(epochs, columns.get(name, [])) if v == v]  # NaN: not evaluated
        if points:
            ax.plot(*zip(*points), label=label, marker=marker, markersize=3, linewidth=1.2)

    ax = axes[0, 0]
    draw(ax, "train_loss", "train (total)")
    if any(a != b for a, b in zip(columns.get("train_loss", []), columns.get("train_ce", [])) if a == a and b == b):
        draw(ax, "train_ce", "train cross-entropy")
    draw(ax, "val_loss", "validation")
    ax.set_title("loss", fontsize=9)
    ax = axes[0, 1]
    draw(ax, "val_acc", "validation", 100.0)
    draw(ax, "val_acc_macro", "validation, macro", 100.0)
    ax.set_title("accuracy (%)", fontsize=9)
    if terms:
        ax = axes[0, 2]
        for name in terms:
            draw(ax, name, name[len("train_"):])
        ax.set_title("regularizer terms (unweighted, train)", fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=10)
    # Fixed margins instead of tight_layout: the figure is drawn at the end of every run, tests included.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.16, top=0.82, wspace=0.28)
    return fig


def plot_curves(metrics_csv: str | Path, out_png: str | Path | None = None, title: str | None = None) -> Path | None:
    """Draw loss, accuracy and regularizer terms against the epoch (`curves_figure`) into a PNG.

    Args:
        metrics_csv: a run's `metrics.csv`.
        out_png: the figure to write (default `curves.png` next to the CSV).
        title: the figure's title (default the run folder's name).

    Returns:
        The file written, or None when there is nothing to draw (no rows) or matplotlib is missing.
    """
    metrics_csv = Path(metrics_csv)
    out_png = Path(out_png) if out_png is not None else metrics_csv.with_name("curves.png")
    columns = read_metrics(metrics_csv)
    if not columns["epoch"]:
        return None
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = curves_figure(columns, title if title is not None else metrics_csv.parent.name)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
