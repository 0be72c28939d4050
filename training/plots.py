"""Pictures and text tables of explanations: bar charts for tabular models, heat maps for images.

matplotlib is optional (the `viz` extra): without it, `plot_explanation` writes the same content as
a text table next to the requested path and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from shapnets import Explanation, Interactions
from shapnets.explanation import signed_sum

__all__ = [
    "explanation_table",
    "interactions_table",
    "pixel_pairs",
    "plot_explanation",
    "plot_interactions",
    "plot_pixel_interactions",
]


def _target(expl: Explanation, index: int, target: int | None) -> int:
    return int(expl.output[index].argmax()) if target is None else int(target)


def _class_name(class_names: Sequence[str] | None, c: int) -> str:
    return str(class_names[c]) if class_names is not None and c < len(class_names) else f"class {c}"


def _named(expl: Explanation, feature_names: Sequence[str] | None, class_names: Sequence[str] | None) -> Explanation:
    """`expl` with the given names (the model's own are kept where none are given)."""
    return replace(
        expl,
        player_names=list(feature_names) if feature_names is not None else expl.player_names,
        class_names=list(class_names) if class_names is not None else expl.class_names,
    )


def explanation_table(
    expl: Explanation,
    index: int = 0,
    target: int | None = None,
    feature_names: Sequence[str] | None = None,
    feature_values: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    top: int = 10,
) -> str:
    """A text table of one sample's `top` largest attributions for one class (default: the predicted one); a last
    line says how many players are left out and what they add up to."""
    expl = _named(expl, feature_names, class_names)
    c = _target(expl, index, target)
    attr = expl.attributions[index, ..., c].detach().flatten().cpu()
    ranked = expl.top(max(top, 1), index, c)
    lines = [
        f"{_class_name(expl.class_names, c)}: output {expl.output[index, c].item():.4f} = "
        f"{signed_sum(expl.base[index, c].item(), attr.sum().item(), 4)} (sum of {attr.numel()} attributions)"
    ]
    width = max(len(r.name) for r in ranked)
    for r in ranked:
        j = int(np.ravel_multi_index(r.player, expl.player_shape))
        value = f" = {feature_values[j]}" if feature_values is not None else ""
        lines.append(f"  {r.name:<{width}}{value:<16} {r.value:+.5f}")
    left_out = attr.numel() - len(ranked)
    if left_out:
        rest = attr.sum().item() - sum(r.value for r in ranked)
        lines.append(f"  ({left_out} of {attr.numel()} not shown, their sum {rest:+.5f})")
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
    sample_id: str | None = None,
    label: int | str | None = None,
    kind: str = "waterfall",
) -> Path:
    """Write a picture of sample `index`'s explanation (`Explanation.plot`) and return the file written.

    Tabular explanations (one player axis) become a waterfall (or, `kind="bar"`, a bar chart) of the `top` largest
    attributions for `target` (default: the predicted class), with feature names and values if given; the
    features left out are summed into one bar and counted in a note. Image explanations (`height, width` players)
    become one heat map per class over the image, with the target class first and its `top` strongest pixels
    ringed; red pushes the class up, blue down, on a colour scale shared by all classes. The title carries
    `sample_id`, the predicted and (`label`) the true class, and `output = base + sum`.

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
    named = _named(expl, feature_names, class_names)
    if len(expl.player_shape) > 2:
        raise ValueError(f"cannot plot attributions with player axes {expl.player_axes}")
    fig = named.plot(index, top=top, target=c, kind=kind, feature_values=feature_values, sample_id=sample_id,
                     label=label, image=image, all_classes=len(expl.player_shape) == 2)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


# ------------------------------------------------------------------------------------------------ interactions
def _subset_label(names: Sequence[str]) -> str:
    return " × ".join(names)


def interactions_table(
    interactions: Interactions, index: int = 0, target: int | None = None, k: int = 10, min_order: int = 1
) -> str:
    """A text table of one sample's `k` largest Harsanyi dividends for one output (default: the largest)."""
    c = int(interactions.output[index].argmax()) if target is None else int(target)
    top = interactions.top(k, target=c, sample=index, min_order=min_order)
    lines = [
        f"{_class_name(interactions.class_names, c)}: output {interactions.output[index, c].item():.4f} = "
        f"{signed_sum(interactions.base[index, c].item(), interactions.dividends[index, :, c].sum().item(), 4)} "
        f"(sum of {len(interactions.subsets)} dividends, {interactions.method})"
    ]
    labels = [_subset_label(r.names) for r in top]
    width = max(map(len, labels), default=8)
    lines += [f"  {label:<{width}}  order {len(r.subset)}  {r.value:+.5f}" for label, r in zip(labels, top)]
    return "\n".join(lines)


def plot_interactions(
    interactions: Interactions,
    path: str | Path,
    k: int = 10,
    target: int | None = None,
    index: int = 0,
    min_order: int = 1,
) -> Path:
    """Bar chart of one sample's `k` largest Harsanyi dividends (by magnitude), each labelled by its players.

    Args:
        interactions: e.g. `ShallowShapNet.interactions(x)` (tabular: named features).
        path: the picture to write.
        k: how many subsets.
        target: the output channel; default the sample's largest output (the predicted class).
        index: which sample of the batch.
        min_order: only subsets of at least this many players (2 hides the main effects).

    Returns:
        The file written: `path`, or `path` with suffix `.txt` (the text table) without matplotlib.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c = int(interactions.output[index].argmax()) if target is None else int(target)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        txt = path.with_suffix(".txt")
        txt.write_text(interactions_table(interactions, index, c, k, min_order) + "\n")
        return txt
    top = interactions.top(k, target=c, sample=index, min_order=min_order)[::-1]  # largest at the top
    values = [r.value for r in top]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(top) + 1.6))
    ax.barh(range(len(top)), values, color=["#c0392b" if v > 0 else "#2e86c1" for v in values])
    ax.set_yticks(range(len(top)), [_subset_label(r.names) for r in top], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.6)
    name = _class_name(interactions.class_names, c)
    ax.set_xlabel(f"Harsanyi dividend for {name}")
    total = interactions.dividends[index, :, c].sum().item()
    ax.set_title(
        f"{interactions.method}, {name}: output {interactions.output[index, c].item():.3f} = "
        f"{signed_sum(interactions.base[index, c].item(), total)} ({len(interactions.subsets)} subsets)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pixel_pairs(
    interactions: Interactions, k: int = 20, target: int | None = None, index: int = 0, kind: str = "sii"
) -> list[tuple[tuple[int, int], tuple[int, int], float]]:
    """The `k` strongest pixel pairs `((h1, w1), (h2, w2), value)` of one sample, largest magnitude first.

    `kind="sii"`: the pairwise Shapley interaction index (every dividend of a subset holding both pixels,
    shared among its pairs); `kind="harsanyi"`: the pair's own dividend. Pairs whose value is exactly 0 (no
    interaction, e.g. pixels at the reference or in no common patch) are left out, so fewer than `k` may come back.
    """
    if interactions.player_shape is None or len(interactions.player_shape) != 2:
        raise ValueError(f"pixel pairs need pixel players (player_shape (H, W)), got {interactions.player_shape}")
    width = interactions.player_shape[1]
    c = int(interactions.output[index].argmax()) if target is None else int(target)
    if kind == "sii":
        matrix = interactions.sii[index, :, :, c].detach()
        first, second = torch.triu_indices(matrix.shape[0], matrix.shape[1], offset=1, device=matrix.device)
        values = matrix[first, second]
        order = values.abs().argsort(descending=True)[:k]
        pairs = [(int(first[t]), int(second[t]), float(values[t])) for t in order if values[t] != 0]
    elif kind == "harsanyi":
        pairs = [(r.subset[0], r.subset[1], r.value)
                 for r in interactions.top(k, target=c, sample=index, min_order=2, max_order=2) if r.value != 0]
    else:
        raise ValueError(f'kind must be "sii" or "harsanyi", got {kind!r}')
    return [((i // width, i % width), (j // width, j % width), v) for i, j, v in pairs]


def plot_pixel_interactions(
    interactions: Interactions,
    path: str | Path,
    image: Tensor | None = None,
    k: int = 20,
    target: int | None = None,
    index: int = 0,
    kind: str = "sii",
) -> Path:
    """The strongest pixel-pair interactions of a Conv ShapNet layer, as lines drawn over the image.

    Left: the image (if given) with a line between the pixels of each of the `k` strongest pairs (red: the
    pair raises the output, blue: lowers it; width by magnitude). Right: the layer's per-pixel Shapley values
    (the diagonal of the interaction index) with the same lines.

    Args:
        interactions: `ConvShapNet.interactions(x, layer)` (players `(H, W)`).
        path: the picture to write.
        image: `(C, H, W)` or `(H, W)` background.
        k: how many pairs.
        target: the layer's output channel (the class for the last layer); default the largest output.
        index: which sample of the batch.
        kind: `"sii"` (pairwise Shapley interaction index) or `"harsanyi"` (the pair's own dividend).

    Returns:
        The file written: `path`, or `path` with suffix `.txt` (the list of pairs) without matplotlib.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c = int(interactions.output[index].argmax()) if target is None else int(target)
    pairs = pixel_pairs(interactions, k, c, index, kind)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        txt = path.with_suffix(".txt")
        txt.write_text("\n".join(f"{a} {b} {v:+.5f}" for a, b, v in pairs) + "\n")
        return txt
    height, width = interactions.player_shape
    shapley = interactions.sii[index, :, :, c].detach().diagonal().reshape(height, width).cpu()
    limit = max((abs(v) for _, _, v in pairs), default=0.0) or 1.0
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    if image is not None:
        img = image.detach().cpu().float()
        axes[0].imshow((img.mean(0) if img.dim() == 3 else img).numpy(), cmap="gray")
    else:
        axes[0].imshow(torch.zeros(height, width).numpy(), cmap="gray", vmin=0, vmax=1)
    bound = float(shapley.abs().max()) or 1.0
    axes[1].imshow(shapley.numpy(), cmap="bwr", vmin=-bound, vmax=bound)
    for ax in axes:
        for (h1, w1), (h2, w2), v in pairs:
            ax.plot([w1, w2], [h1, h2], color="#c0392b" if v > 0 else "#2e86c1", linewidth=0.6 + 2.4 * abs(v) / limit,
                    marker="o", markersize=2, alpha=0.85)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.axis("off")
    name = interactions.class_names[c] if interactions.class_names is not None else f"output channel {c}"
    measure = "Shapley interaction index" if kind == "sii" else "dividends"
    axes[0].set_title(f"{len(pairs)} strongest pixel pairs ({measure})", fontsize=8)
    axes[1].set_title("per-pixel Shapley values of the layer", fontsize=8)
    fig.suptitle(f"{interactions.method}, {name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

