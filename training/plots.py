"""Pictures and text tables of explanations: bar charts for tabular models, heat maps for images.

matplotlib is optional (the `viz` extra): without it, `plot_explanation` writes the same content as
a text table next to the requested path and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from shapnets import Explanation

__all__ = ["explanation_table", "plot_explanation"]


def _target(expl: Explanation, index: int, target: int | None) -> int:
    return int(expl.output[index].argmax()) if target is None else int(target)


def _class_name(class_names: Sequence[str] | None, c: int) -> str:
    return str(class_names[c]) if class_names is not None and c < len(class_names) else f"class {c}"


def explanation_table(
    expl: Explanation,
    index: int = 0,
    target: int | None = None,
    feature_names: Sequence[str] | None = None,
    feature_values: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    top: int = 10,
) -> str:
    """A text table of one sample's largest attributions for one class (default: the predicted one)."""
    c = _target(expl, index, target)
    attr = expl.attributions[index, ..., c].detach().flatten().cpu()
    names = feature_names or expl.player_names
    if names is None:
        shape = expl.player_shape
        names = [str(tuple(int(i) for i in torch.unravel_index(torch.tensor(j), shape))) for j in range(attr.numel())]
        names = [n.strip("(,)") if len(shape) == 1 else n for n in names]
    order = attr.abs().argsort(descending=True)[:top]
    lines = [
        f"{_class_name(class_names or expl.class_names, c)}: output {expl.output[index, c].item():+.4f} = "
        f"base {expl.base[index, c].item():+.4f} + sum of {attr.numel()} attributions {attr.sum().item():+.4f}"
    ]
    width = max(len(str(names[int(j)])) for j in order) if len(order) else 8
    for j in order.tolist():
        value = f" = {feature_values[j]}" if feature_values is not None else ""
        lines.append(f"  {names[j]!s:<{width}}{value:<16} {attr[j].item():+.5f}")
    return "\n".join(lines)


def plot_explanation(
    expl: Explanation,
    index: int,
    out_path: str | Path,
    feature_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    image: Tensor | None = None,
    target: int | None = None,
    feature_values: Sequence[str] | None = None,
    top: int = 20,
) -> Path:
    """Write a picture of sample `index`'s explanation and return the file written.

    Tabular explanations (one player axis) become a bar chart of the `top` largest attributions for
    `target` (default: the predicted class), with feature names (and raw values if given). Image
    explanations (`height, width` players) become one heat map per class over the image, with the
    target class first; red pushes the class up, blue down, on a colour scale shared by all classes.

    Without matplotlib the text table is written to `out_path` with suffix `.txt` instead.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    c = _target(expl, index, target)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        txt = out_path.with_suffix(".txt")
        txt.write_text(explanation_table(expl, index, c, feature_names, feature_values, class_names, top) + "\n")
        return txt

    class_names = class_names or expl.class_names
    if len(expl.player_shape) == 1:
        attr = expl.attributions[index, :, c].detach().cpu()
        names = list(feature_names or expl.player_names or [f"x{i}" for i in range(attr.numel())])
        if feature_values is not None:
            names = [f"{n} = {v}" for n, v in zip(names, feature_values)]
        order = attr.abs().argsort(descending=True)[:top].flip(0)
        fig, ax = plt.subplots(figsize=(7, 0.32 * len(order) + 1.6))
        values = attr[order].numpy()
        ax.barh(range(len(order)), values, color=["#c0392b" if v > 0 else "#2e86c1" for v in values])
        ax.set_yticks(range(len(order)), [names[int(j)] for j in order], fontsize=8)
        ax.axvline(0, color="black", linewidth=0.6)
        kind = "exact Shapley values" if expl.exact else "Shapley representation"
        ax.set_xlabel(f"attribution to {_class_name(class_names, c)} ({kind})")
        ax.set_title(
            f"{_class_name(class_names, c)}: output {expl.output[index, c].item():+.3f} = base "
            f"{expl.base[index, c].item():+.3f} + {attr.sum().item():+.3f}",
            fontsize=9,
        )
    elif len(expl.player_shape) == 2:
        maps = expl.attributions[index].detach().cpu()  # (H, W, C_out)
        classes = [c] + [k for k in range(maps.shape[-1]) if k != c]
        limit = float(maps.abs().max()) or 1.0
        cols = min(5, len(classes))
        rows = -(-len(classes) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
        background = None
        if image is not None:
            img = image.detach().cpu().float()
            background = img.mean(0) if img.dim() == 3 else img
        for ax, k in zip(axes.flat, classes):
            if background is not None:
                ax.imshow(background.numpy(), cmap="gray", alpha=0.5)
            alpha = 0.75 if background is not None else 1.0
            ax.imshow(maps[..., k].numpy(), cmap="bwr", vmin=-limit, vmax=limit, alpha=alpha)
            ax.set_title(f"{_class_name(class_names, k)} {expl.output[index, k].item():+.2f}", fontsize=8)
        for ax in axes.flat:
            ax.axis("off")
        fig.suptitle(f"predicted {_class_name(class_names, c)}: per-pixel attributions per class", fontsize=9)
    else:
        raise ValueError(f"cannot plot attributions with player axes {expl.player_axes}")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
