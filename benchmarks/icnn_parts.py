"""Interpretable CNN vs the same network without the filter loss, on the synthetic parts data: accuracy,
location instability of the filters' inferred parts, and PNGs of where a few filters fire.

For every source (a run folder, a `.pt` checkpoint, a pretrained folder or a zoo name; by default
`runs/icnn_parts` and `runs/icnn_parts_baseline`, trained by `configs/icnn_parts*.yaml`), on the test split:

* test accuracy;
* the location instability of every top-layer filter (`shapnets.icnn.location_instability`, the paper's measure:
  the standard deviation over images of the distance from the filter's inferred part to each annotated landmark,
  averaged over landmarks, divided by the image diagonal; lower is better). A filter's inferred part is its peak
  cell's centre in input pixels. Its images are the `--top-k` test images *of its class* with the highest peak
  activation, where its class is the one on whose images it fires most on average (computed the same way for both
  models: the baseline has no assignment of its own). Only the images of one class count because the landmarks
  are that class's parts (a parts image has the three landmarks of its own object);
* the same number for "dead" filters excluded: filters whose peak activation is zero on all their top images have
  no location to speak of (their peak defaults to cell 0), and counting them as perfectly stable would flatter a
  model, so they are reported apart (`dead filters`).

PNG (`--out DIR`): for each model, `--filters` filters (the most stable live ones) x `--images` of their top images,
with the inferred part marked; a filter that tracks one part puts its mark on the same part in every image.

Usage:
    python benchmarks/icnn_parts.py [SOURCE ...] [--labels ...] [--top-k 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapnets.icnn import location_instability  # noqa: E402
from training.cli import load_source, load_split  # noqa: E402
from training.data.parts import PARTS_MEAN, PARTS_STD  # noqa: E402


@torch.no_grad()
def filter_parts(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 250) -> dict[str, torch.Tensor]:
    """Logits, each filter's inferred part location `(N, M, 2)` and peak activation `(N, M)` on `images`."""
    model.eval()
    logits, locations, peaks = [], [], []
    for chunk in images.split(batch_size):
        expl = model.explain(chunk)
        logits.append(expl.output)
        locations.append(expl.extras["part_locations"])
        peaks.append(expl.extras["peak_activations"])
    return {"logits": torch.cat(logits), "locations": torch.cat(locations), "peaks": torch.cat(peaks)}


def filter_classes_by_activation(peaks: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`(M,)`: the class on whose images each filter's mean peak activation is highest."""
    per_class = torch.stack([peaks[labels == c].mean(dim=0) for c in range(num_classes)])  # (C, M)
    return per_class.argmax(dim=0)


def evaluate_source(source: str, data_root: str | None, top_k: int) -> dict:
    loaded = load_source(source, torch.device("cpu"))
    test = load_split(loaded, "test", data_root)
    images, labels = test.features, test.labels
    landmarks = getattr(test, "landmarks", None)
    if landmarks is None:
        raise SystemExit(f"{source}: its test split has no landmarks (not the parts data set)")
    out = filter_parts(loaded.model, images)
    classes = filter_classes_by_activation(out["peaks"], labels, loaded.info.num_classes)
    valid = labels[:, None] == classes[None, :]                                        # (N, M)
    size = tuple(images.shape[-2:])
    per_filter = location_instability(out["locations"], landmarks, size, out["peaks"], top_k=top_k, valid=valid,
                                      reduction="none")
    # A filter is dead when it never fires on its top images: its "location" is then an arbitrary default.
    masked_peaks = out["peaks"].masked_fill(~valid, float("-inf"))
    top_peaks = masked_peaks.topk(min(top_k, len(labels)), dim=0).values
    dead = ~(top_peaks > 0).any(dim=0)
    live = per_filter[~dead]
    accuracy = (out["logits"].argmax(1) == labels).float().mean().item()
    return {
        "source": source,
        "test_accuracy": accuracy,
        "test_images": len(labels),
        "filters": int(per_filter.numel()),
        "dead_filters": int(dead.sum()),
        "location_instability_live": live.nanmean().item() if live.numel() else float("nan"),
        "location_instability_all": per_filter.nanmean().item(),
        "_per_filter": per_filter, "_dead": dead, "_classes": classes, "_out": out, "_images": images,
        "_labels": labels, "_valid": valid, "_class_names": loaded.info.class_names,
    }


def plot_filters(result: dict, label: str, path: Path, filters: int, images: int, dpi: int = 110) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_filter = result["_per_filter"].masked_fill(result["_dead"], float("inf")).nan_to_num(float("inf"))
    chosen = per_filter.argsort()[:filters].tolist()
    peaks = result["_out"]["peaks"].masked_fill(~result["_valid"], float("-inf"))
    mean = torch.as_tensor(PARTS_MEAN).reshape(-1, 1, 1)
    std = torch.as_tensor(PARTS_STD).reshape(-1, 1, 1)
    fig, axes = plt.subplots(len(chosen), images, figsize=(1.6 * images, 1.7 * len(chosen)), squeeze=False)
    for row, f in enumerate(chosen):
        top = peaks[:, f].topk(images).indices.tolist()
        for col, n in enumerate(top):
            ax = axes[row][col]
            picture = (result["_images"][n] * std + mean).clamp(0, 1).permute(1, 2, 0)
            ax.imshow(picture)
            r, c = result["_out"]["locations"][n, f].tolist()
            ax.scatter([c], [r], s=140, facecolors="none", edgecolors="white", linewidths=2.0)
            ax.scatter([c], [r], s=14, color="black")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                name = result["_class_names"][int(result["_classes"][f])]
                ax.set_ylabel(f"filter {f}\n{name}\ninst. {per_filter[f]:.3f}", fontsize=7)
    fig.suptitle(f"{label}: inferred part (circle) of its most stable filters on their top images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", default=["runs/icnn_parts", "runs/icnn_parts_baseline"])
    parser.add_argument("--labels", nargs="*", default=None, help="one label per source (default: the source)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--top-k", type=int, default=100, help="top images per filter (the paper: 100)")
    parser.add_argument("--filters", type=int, default=6, help="filters per PNG")
    parser.add_argument("--images", type=int, default=8, help="images per filter in the PNG")
    parser.add_argument("--dpi", type=int, default=110, help="PNG resolution")
    parser.add_argument("--out", type=Path, default=None, help="folder for icnn_parts.md/.json and the PNGs")
    args = parser.parse_args(argv)
    labels = args.labels or args.sources
    if len(labels) != len(args.sources):
        parser.error(f"{len(args.sources)} sources but {len(labels)} labels")

    results = [evaluate_source(s, args.data_root, args.top_k) for s in args.sources]
    lines = ["| model | test acc | location instability (live filters) | all filters | dead filters |",
             "|---|---|---|---|---|"]
    for label, r in zip(labels, results):
        lines.append(f"| {label} | {100 * r['test_accuracy']:.2f}% | {r['location_instability_live']:.4f} | "
                     f"{r['location_instability_all']:.4f} | {r['dead_filters']} / {r['filters']} |")
    if len(results) == 2:
        a, b = results
        lines.append("")
        lines.append(f"accuracy difference {100 * (a['test_accuracy'] - b['test_accuracy']):+.2f} points; "
                     f"instability ratio (live) {a['location_instability_live'] / b['location_instability_live']:.3f}")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "icnn_parts.md").write_text(table + "\n")
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        (args.out / "icnn_parts.json").write_text(json.dumps(public, indent=2))
        for label, r in zip(labels, results):
            slug = "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")
            plot_filters(r, label, args.out / f"icnn_parts_filters_{slug}.png", args.filters, args.images,
                         args.dpi)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
