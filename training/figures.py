"""Figures that compare the explanations of several trained models.

    python -m training.figures regularizers --models NONE L1_FINAL L1_ALL LINF [--labels ...]
        [--data-root DIR] --out fig.png [--samples 8] [--indices I ...] [--split test]

    python -m training.figures capsule-poses --model RUN_OR_NAME --out fig.png [--index 0] [--dims 0 1 ...]

`regularizers`: one row per model (run folder, `.pt` checkpoint, pretrained folder or zoo name of an image
ShapNet), the same test images in the columns, each cell the explanation map of the class that row's model
predicts, in red (pushes the class up) and blue (pushes it down) over the faded image; the colour scale is
symmetric and shared along a row (one model), so a row shows how that model spreads its attribution, as in the
ShapNets paper's figure of unregularized / L1 on the final layer / L1 on all layers / L-infinity explanations.
By default the columns are the first test image of each class in turn (distinct digits on MNIST).

`capsule-poses`: the CapsNet paper's figure of what the dimensions of a class capsule encode: for one test image,
the predicted class's 16-D pose is shifted along one dimension at a time (-0.25 to 0.25 in steps of 0.05) and
decoded; one row per dimension, with the input and its unperturbed reconstruction on the left.

Mistakes in what was asked (a tabular model, models trained on different data, bad indices) print one line
and exit with status 2, like the `shapnets` command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shapnets.sparsity import explanation_sparsity

from .config import UserError

__all__ = ["add_figure_commands", "build_parser", "capsule_poses_figure", "main", "pick_columns",
           "regularizers_figure"]

EXIT_USER_ERROR = 2


def pick_columns(labels: Sequence[int], count: int) -> list[int]:
    """`count` sample indices: the first sample of each class in class order, then the next of each, ...

    Args:
        labels: the labels of the candidate samples, in split order.
        count: how many indices to return (fewer if there are fewer samples).
    """
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < min(count, len(labels)):
        for c in sorted(by_class):
            if depth < len(by_class[c]) and len(picked) < count:
                picked.append(by_class[c][depth])
        depth += 1
    return picked


def _require_image_model(loaded: Any, source: str) -> None:
    info = loaded.info
    if len(info.input_shape) != 3 or not hasattr(loaded.model, "explain"):
        raise UserError(
            f"{source}: the regularizers figure draws per-pixel explanation maps of image ShapNets (ConvShapNet), "
            f"but this is a {type(loaded.model).__name__} on {info.name} with inputs of shape {tuple(info.input_shape)}"
        )


def _matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UserError(f"figures need matplotlib (pip install 'shapnets[viz]'): {e}") from e
    return plt


def _save(plt: Any, fig: Any, out: str | Path, dpi: int) -> Path:
    """Write `fig` to the PNG `out` (its folder made as needed), close it and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _overlay(ax: Any, image: Tensor, attribution: Tensor, limit: float, cmap: Any) -> None:
    """The faded image, then the attribution map whose opacity is |value| / limit (0 is transparent).

    Opacity is linear in |value|: a square root (as before) lifted weak attributions until a map spread over the
    whole digit and one concentrated on a few pixels looked alike, which hid exactly what regularizers change.
    """
    background = image.float().mean(0).numpy()  # channels averaged: the image only gives orientation
    ax.imshow(background, cmap="gray_r", alpha=0.35)
    scaled = (attribution / limit).clamp(-1, 1)
    rgba = torch.as_tensor(cmap(((scaled + 1) / 2).numpy()))
    rgba[..., 3] = scaled.abs()
    ax.imshow(rgba.numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def regularizers_figure(
    sources: Sequence[str],
    out: str | Path,
    labels: Sequence[str] | None = None,
    data_root: str | None = None,
    samples: int = 8,
    indices: Sequence[int] | None = None,
    split: str = "test",
    device: str | torch.device = "cpu",
) -> Path:
    """Draw the predicted-class explanation maps of several image ShapNets on the same images (one row each).

    Args:
        sources: run folders, checkpoints, pretrained folders or zoo names (image models of one data set).
        out: the PNG to write.
        labels: one row label per source (default: the sources).
        data_root: folder of the raw data (default `$SHAPNETS_DATA`).
        samples: columns, when `indices` is not given.
        indices: explicit sample indices of `split`.
        split: `test`, `val` or `train`.
        device: where the models run.

    Returns:
        The path written.

    Raises:
        UserError: a non-image model, models of different data sets, bad labels or indices, no matplotlib.
    """
    from .sources import load_source, load_split

    if not sources:
        raise UserError("regularizers figure: give at least one model")
    labels = list(labels) if labels is not None else list(sources)
    if len(labels) != len(sources):
        raise UserError(f"regularizers figure: {len(sources)} models need {len(sources)} labels, got {len(labels)}")
    if samples < 1:
        raise UserError(f"regularizers figure: --samples must be >= 1, got {samples}")
    plt = _matplotlib()
    device = torch.device(device)
    loaded = []
    for source in sources:
        model = load_source(source, device)
        _require_image_model(model, source)
        loaded.append(model)
    first = loaded[0].info
    for source, model in zip(sources[1:], loaded[1:]):
        if (model.info.name, model.info.input_shape) != (first.name, first.input_shape):
            raise UserError(f"regularizers figure: {source} was trained on {model.info.name} "
                            f"{tuple(model.info.input_shape)}, but {sources[0]} on {first.name} "
                            f"{tuple(first.input_shape)}: the rows must explain the same images")
    dataset = load_split(loaded[0], split, data_root)
    if indices is None:
        # Labels of a prefix are enough to find the first images of every class (MNIST: ~30 of 10,000).
        prefix = min(len(dataset), max(50 * first.num_classes, 4 * samples))
        indices = pick_columns([int(dataset[i][1]) for i in range(prefix)], samples)
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise UserError(f"regularizers figure: indices {bad} out of range: the {split} split has {len(dataset)} "
                        "samples")
    items = [dataset[i] for i in indices]
    x = torch.stack([torch.as_tensor(item[0]) for item in items]).to(device)
    truth = [int(item[1]) for item in items]
    class_names = list(first.class_names)

    rows, cols = len(loaded), len(indices)
    fig, axes = plt.subplots(rows, cols, figsize=(1.45 * cols + 1.6, 1.55 * rows + 0.7), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("bwr")
    for r, (label, model) in enumerate(zip(labels, loaded)):
        with torch.no_grad():
            expl = model.model.eval().explain(x).detach().cpu()
        predicted = expl.output.argmax(1)
        maps = expl.attributions[torch.arange(cols), ..., predicted]  # (cols, H, W)
        sparsity = explanation_sparsity(expl)
        for c in range(cols):
            ax = axes[r, c]
            # Each panel on its own symmetric scale (its largest |attribution|): models whose logits differ in size
            # stay comparable, and what differs between rows is how the mass is distributed over the pixels.
            _overlay(ax, x[c].cpu(), maps[c], float(maps[c].abs().max()) or 1.0, cmap)
            name = class_names[int(predicted[c])]
            ax.set_title(f"true {class_names[truth[c]]}\npred {name}" if r == 0 else f"pred {name}", fontsize=7,
                         color="black" if int(predicted[c]) == truth[c] else "#b03a2e")
            ax.text(0.02, 0.02, f"n90 {float(sparsity['n90'][c]):.0f}", transform=ax.transAxes, fontsize=6,
                    va="bottom", bbox=dict(facecolor="white", alpha=0.7, pad=1, lw=0))
        axes[r, 0].set_ylabel(f"{label}\nn90 {float(sparsity['n90'].mean()):.0f}, peak "
                              f"{float(sparsity['peak_share'].nanmean()):.3f}", fontsize=7)
    scale = plt.cm.ScalarMappable(norm=plt.Normalize(-1, 1), cmap=cmap)
    bar = fig.colorbar(scale, ax=list(axes[:, -1]), fraction=0.05, pad=0.02)
    bar.set_label("attribution / the panel's largest |attribution|", fontsize=6)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle("explanation of the predicted class (red: for, blue: against; opacity linear in |attribution|); "
                 "n90: pixels holding 90% of the map's |attribution|, peak: largest share of one pixel", fontsize=8)
    return _save(plt, fig, out, dpi=130)


def capsule_poses_figure(
    source: str,
    out: str | Path,
    index: int = 0,
    dims: Sequence[int] | None = None,
    steps: Sequence[float] | None = None,
    data_root: str | None = None,
    split: str = "test",
    device: str | torch.device = "cpu",
) -> Path:
    """Decode a CapsNet's predicted-class pose with one dimension shifted at a time (one row per dimension).

    Args:
        source: a run folder, checkpoint, pretrained folder or zoo name of a CapsNet with a decoder.
        out: the PNG to write.
        index: the sample of `split` to perturb.
        dims: pose dimensions (rows); default all.
        steps: shifts (columns); default -0.25 to 0.25 in steps of 0.05, as in the paper.
        data_root: folder of the raw data (default `$SHAPNETS_DATA`).
        split: `test`, `val` or `train`.
        device: where the model runs.

    Returns:
        The path written.

    Raises:
        UserError: not a CapsNet with a decoder, a bad index or dimension, no matplotlib.
    """
    from .sources import load_source, load_split

    loaded = load_source(source, torch.device(device))
    model = loaded.model.eval()
    if not callable(getattr(model, "perturb_poses", None)):
        raise UserError(f"capsule-poses figure: {source} is a {type(model).__name__}, not a CapsNet")
    dataset = load_split(loaded, split, data_root)
    if not 0 <= index < len(dataset):
        raise UserError(f"capsule-poses figure: index {index} out of range: the {split} split has {len(dataset)} "
                        "samples")
    plt = _matplotlib()
    image, label = dataset[index]
    x = torch.as_tensor(image)[None].to(device)
    shifts = torch.linspace(-0.25, 0.25, 11) if steps is None else torch.as_tensor(list(steps), dtype=torch.float32)
    try:
        with torch.no_grad():
            grid = model.perturb_poses(x, dims=dims, steps=shifts)[0].cpu()      # (dims, steps, C, H, W)
            reconstruction = model.reconstruct(x)[0].cpu()
            predicted = int(model(x).argmax(1))
    except (ValueError, RuntimeError) as e:
        raise UserError(f"capsule-poses figure: {e}") from e
    dims = list(range(grid.shape[0])) if dims is None else list(dims)
    rows, cols = grid.shape[0], grid.shape[1] + 2
    fig, axes = plt.subplots(rows, cols, figsize=(0.75 * cols, 0.8 * rows + 0.6), squeeze=False,
                             layout="constrained")

    def show(ax: Any, picture: Tensor) -> None:
        ax.imshow(picture.permute(1, 2, 0).squeeze(-1).clamp(0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])

    original = model.unnormalize(x)[0].cpu()
    names = list(loaded.info.class_names)
    for r in range(rows):
        show(axes[r, 0], original)
        show(axes[r, 1], reconstruction)
        for c in range(grid.shape[1]):
            show(axes[r, c + 2], grid[r, c])
            if r == 0:
                axes[r, c + 2].set_title(f"{float(shifts[c]):+.2f}", fontsize=6)
        axes[r, 0].set_ylabel(f"dim {dims[r]}", fontsize=7)
    axes[0, 0].set_title("input", fontsize=6)
    axes[0, 1].set_title("recon.", fontsize=6)
    fig.suptitle(f"{source}: {split} sample {index} (true {names[int(label)]}, predicted {names[predicted]}); "
                 "one pose dimension shifted per row", fontsize=8)
    return _save(plt, fig, out, dpi=110)


# ------------------------------------------------------------------------------------------------ command line
def _cmd_capsule_poses(args: argparse.Namespace) -> int:
    out = capsule_poses_figure(args.model, args.out, index=args.index, dims=args.dims, data_root=args.data_root,
                               split=args.split, device=args.device)
    print(f"wrote {out}")
    return 0


def _cmd_regularizers(args: argparse.Namespace) -> int:
    out = regularizers_figure(args.models, args.out, labels=args.labels, data_root=args.data_root,
                              samples=args.samples, indices=args.indices, split=args.split, device=args.device)
    print(f"wrote {out}")
    return 0


def add_figure_commands(commands: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add the figure subcommands (`regularizers`, `capsule-poses`) to an argparse subparsers object (sets `func`)."""
    p = commands.add_parser("regularizers", parents=list(parents),
                            help="explanation maps of several image models on the same images, one row each")
    p.add_argument("--models", nargs="+", required=True, metavar="RUN_OR_NAME",
                   help="run folders, .pt checkpoints, pretrained folders or zoo names of image ShapNets")
    p.add_argument("--labels", nargs="+", default=None, help="one row label per model (default: the sources)")
    p.add_argument("--data-root", default=None, help="folder holding the raw data (default: $SHAPNETS_DATA)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--samples", type=int, default=8, help="images (columns): the first of each class in turn")
    p.add_argument("--indices", type=int, nargs="+", default=None, help="explicit sample indices instead")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--device", default="cpu", help="torch device")
    p.set_defaults(func=_cmd_regularizers)

    p = commands.add_parser("capsule-poses", parents=list(parents),
                            help="a CapsNet class pose shifted one dimension at a time, decoded (paper Fig. 4)")
    p.add_argument("--model", required=True, metavar="RUN_OR_NAME", help="run folder, checkpoint or zoo name")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--index", type=int, default=0, help="sample index in the split")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="pose dimensions (default: all)")
    p.add_argument("--data-root", default=None, help="folder holding the raw data (default: $SHAPNETS_DATA)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--device", default="cpu", help="torch device")
    p.set_defaults(func=_cmd_capsule_poses)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m training.figures`."""
    parser = argparse.ArgumentParser(prog="python -m training.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    add_figure_commands(parser.add_subparsers(dest="figure", required=True, metavar="FIGURE"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Draw a figure; returns the exit status (0 ok, 2 a mistake in what was asked, reported in one line)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"figures {args.figure}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
