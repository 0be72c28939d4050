"""Figures of one sample's explanation, behind `Explanation.plot` (matplotlib is imported only when called).

Features: a waterfall from the base value to the output, or bars, for the `top` largest attributions, with the
left-out players summed ("N other features") so that nothing is silently dropped. Pixels: the attributions as a
heat map over the image, the strongest pixels marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._format import optional_import, signed_sum

# `Explanation` is the type of every `expl` below. It is not imported, not even for type checking: explanation.py
# imports this module (lazily, in `Explanation.plot`), and the package keeps its import graph free of circles.
Explanation = Any

__all__ = ["features_figure", "pixels_figure"]

_UP, _DOWN = "#c0392b", "#2e86c1"  # red raises the output, blue lowers it (as in shap)


def _name(names: Sequence[str] | None, c: int) -> str:
    return str(names[c]) if names is not None and 0 <= c < len(names) else f"class {c}"


def _header(expl: Explanation, index: int, c: int, sample_id: str | None, label: int | str | None) -> str:
    """First title line: the sample, what was predicted and (when known) the truth."""
    predicted = int(expl.output[index].argmax())
    parts = [sample_id] if sample_id else [f"sample {index % expl.batch_size}"]
    parts.append(f"predicted {_name(expl.class_names, predicted)}")
    if label is not None:
        parts.append(f"true {label if isinstance(label, str) else _name(expl.class_names, int(label))}")
    if c != predicted:
        parts.append(f"explaining {_name(expl.class_names, c)}")
    return ", ".join(parts)


def _equation(expl: Explanation, index: int, c: int) -> str:
    out = expl.output[index, c].item()
    base = expl.base[index, c].item()
    total = expl.attributions[index, ..., c].sum().item()
    return f"{_name(expl.class_names, c)}: output {out:.3f} = {signed_sum(base, total)}"


def _pyplot() -> Any:
    optional_import("matplotlib", "viz", "Explanation.plot()")
    import matplotlib.pyplot as plt

    return plt


def _value_strings(expl: Explanation, data: Any, feature_values: Sequence[str] | None, index: int) -> list[str] | None:
    if feature_values is not None:
        if len(feature_values) != expl.num_players:
            raise ValueError(f"{len(feature_values)} feature values for {expl.num_players} features")
        return [str(v) for v in feature_values]
    if data is None:
        return None
    values = torch.as_tensor(data).detach().cpu().double()
    if values.numel() != expl.num_players and values.dim() >= 2 and values.shape[0] == expl.batch_size:
        values = values[index]  # a batch: the plotted sample (`(D,)`, or `(D, 1)` measurements)
    if values.numel() != expl.num_players:
        raise ValueError(f"data has {values.numel()} values for {expl.num_players} features")
    return [f"{float(v):.4g}" for v in values.flatten()]


def features_figure(expl: Explanation, index: int, c: int, top: int, kind: str, data: Any,
                    feature_values: Sequence[str] | None, sample_id: str | None, label: int | str | None) -> Any:
    """A waterfall or bar figure of sample `index`'s attributions to output `c` (one player axis)."""
    plt = _pyplot()
    phi = expl.attributions[index, :, c].detach().cpu().double()
    ranked = expl.top(top, index, c)
    shown = [r.player[0] for r in ranked]
    left_out = expl.num_players - len(shown)
    rest = float(phi.sum() - phi[shown].sum()) if left_out else 0.0
    values = _value_strings(expl, data, feature_values, index)
    labels = [r.name if values is None else f"{r.name} = {values[r.player[0]]}" for r in ranked]
    note = (f"{left_out} of {expl.num_players} features not shown (their sum {rest:+.3f})" if left_out
            else f"all {expl.num_players} features shown")
    base, out = expl.base[index, c].item(), expl.output[index, c].item()

    rows = len(ranked) + (1 if left_out and kind == "waterfall" else 0)
    fig, ax = plt.subplots(figsize=(7.5, 0.34 * rows + 1.9))
    if kind == "waterfall":
        # Bottom to top: the left-out players first (from the base), then the shown ones, smallest to largest, so
        # the bars walk from the base value to the output and the largest attribution ends at the top.
        steps = ([(f"{left_out} other features", rest)] if left_out else []) + \
            [(name, r.value) for name, r in zip(labels[::-1], ranked[::-1])]
        start = base
        for y, (_, v) in enumerate(steps):
            ax.barh(y, v, left=start, color=_UP if v > 0 else _DOWN, height=0.7)
            ax.text(start + v, y, f" {v:+.3f} " if v else " 0 ", va="center", ha="left" if v >= 0 else "right",
                    fontsize=7)
            start += v
        ax.axvline(base, color="grey", linewidth=0.7, linestyle=":")
        ax.axvline(out, color="black", linewidth=0.7, linestyle="--")
        ax.set_yticks(range(len(steps)), [name for name, _ in steps], fontsize=8)
        ax.set_xlabel(f"output for {_name(expl.class_names, c)}: base {base:.3f} (dotted) -> {out:.3f} (dashed)")
        # Keep the value labels inside the axes.
        xs = [base, out, *torch.tensor([v for _, v in steps], dtype=torch.float64).cumsum(0).add(base).tolist()]
        pad = 0.15 * ((max(xs) - min(xs)) or 1.0)
        ax.set_xlim(min(xs) - pad, max(xs) + pad)
    else:
        bars = [r.value for r in ranked[::-1]]
        ax.barh(range(len(bars)), bars, color=[_UP if v > 0 else _DOWN for v in bars], height=0.7)
        ax.set_yticks(range(len(bars)), labels[::-1], fontsize=8)
        ax.axvline(0, color="black", linewidth=0.6)
        kind_text = "exact Shapley values" if expl.exact else "Shapley representation"
        ax.set_xlabel(f"attribution to {_name(expl.class_names, c)} ({kind_text})")
    ax.set_title(f"{_header(expl, index, c, sample_id, label)}\n{_equation(expl, index, c)}", fontsize=9)
    fig.text(0.99, 0.005, note, ha="right", va="bottom", fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def pixels_figure(expl: Explanation, index: int, c: int, top: int, background: Any, sample_id: str | None,
                  label: int | str | None, all_classes: bool) -> Any:
    """Heat maps of sample `index`'s attributions over the image `background` (two player axes)."""
    plt = _pyplot()
    maps = expl.attributions[index].detach().cpu().double()  # (H, W, C_out)
    classes = [c] + ([k for k in range(maps.shape[-1]) if k != c] if all_classes else [])
    limit = float(maps[..., classes].abs().max()) or 1.0  # one colour scale for every panel
    img = None
    if background is not None:
        img = torch.as_tensor(background).detach().cpu().double()
        if img.dim() == 4:  # a batch: this sample
            img = img[index]
        img = img.mean(0) if img.dim() == 3 else img  # channels -> grey
        if tuple(img.shape) != tuple(maps.shape[:2]):
            raise ValueError(f"image of shape {tuple(img.shape)} does not match the pixel players "
                             f"{tuple(maps.shape[:2])}")
    cols = min(5, len(classes))
    rows = -(-len(classes) // cols)
    size = 3.6 if len(classes) == 1 else 2.3
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.8, size * rows + 0.9), squeeze=False)
    ranked = expl.top(top, index, c)
    shown = None
    for ax, k in zip(axes.flat, classes):
        if img is not None:
            ax.imshow(img.numpy(), cmap="gray")
        shown = ax.imshow(maps[..., k].numpy(), cmap="bwr", vmin=-limit, vmax=limit,
                          alpha=0.65 if img is not None else 1.0)
        if k == c:  # the strongest pixels of the explained class, ringed
            ax.scatter([r.player[1] for r in ranked], [r.player[0] for r in ranked], s=22, facecolors="none",
                       edgecolors="black", linewidths=0.8)
        ax.set_title(f"{_name(expl.class_names, k)}: output {expl.output[index, k].item():.2f}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes.flat), shrink=0.8, label="attribution")
    fig.suptitle(f"{_header(expl, index, c, sample_id, label)}\n{_equation(expl, index, c)}; "
                 f"{len(ranked)} of {expl.num_players} pixels ringed", fontsize=9)
    return fig
