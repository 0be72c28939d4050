"""Interpretable CNN vs the same network without the filter loss, on the synthetic parts data: accuracy, where the
filters fire (a part-specific measure and the paper's location instability), reference rows, and PNGs.

For every source (a run folder, a `.pt` checkpoint, a pretrained folder or a zoo name; by default
`runs/icnn_parts` and `runs/icnn_parts_baseline`, trained by `configs/icnn_parts*.yaml`), on one split (`--split`,
default test; use `val` for choices):

* accuracy;
* every top-layer filter's class: the one on whose images its mean peak activation is highest (computed the same
  way for both models: the baseline has no assignment of its own; for the ICNN it is reported next to the
  running assignment it trained with, which follows the authors' released code). A filter's images are the
  `--top-k` images *of its class* with the highest peak activation (a parts image carries the landmarks of its own
  object only); its inferred part is its peak cell's centre in input pixels;
* dead filters: those whose peak activation is zero on all their top images (their "location" is an arbitrary
  default, cell 0); the summaries below count the live filters;
* the **part measure** (`shapnets.icnn.part_localization`): per filter, the distance from its part to the landmark
  nearest to it on average over its top images; the mean of the per-filter means, the median of the per-filter
  medians, the mean share of top images within one top-map cell, the share of filters whose median distance is
  within one cell (**localised**), and the share nearer their landmark than the object centre (the landmarks'
  centroid);
* the paper's **location instability** (`shapnets.icnn.location_instability`), lower is better.

Reference rows (computed the same way, on the first model's filters, classes and top images): a *perfect part
tracker* (every filter at its landmark, quantised to the centre of the top-map cell holding it), a *centre
detector* (at the landmarks' centroid, quantised the same way), a *dead filter* (always at cell 0). They show
what each number means: e.g. a centre detector's instability is close to a part tracker's.

PNG (`--out DIR`): for each model, `--filters` live filters (the nearest to their landmark) x `--images` of their
top images, with the inferred part (circle) and the landmark it is measured against (cross).

Usage:
    python benchmarks/icnn_parts.py [SOURCE ...] [--labels ...] [--split test] [--top-k 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapnets.icnn import feature_to_pixel, location_instability, part_localization  # noqa: E402
from training.cli import load_source, load_split  # noqa: E402


@torch.no_grad()
def filter_parts(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 250) -> dict[str, torch.Tensor]:
    """Logits, each filter's inferred part location `(N, M, 2)`, peak activation `(N, M)` and the top-map size."""
    model.eval()
    logits, locations, peaks = [], [], []
    map_size = None
    for chunk in images.split(batch_size):
        expl = model.explain(chunk)
        logits.append(expl.output)
        locations.append(expl.extras["part_locations"])
        peaks.append(expl.extras["peak_activations"])
        map_size = tuple(expl.extras["masked_maps"].shape[-2:])
    return {"logits": torch.cat(logits), "locations": torch.cat(locations), "peaks": torch.cat(peaks),
            "map_size": map_size}


def filter_classes_by_activation(peaks: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`(M,)`: the class on whose images each filter's mean peak activation is highest."""
    per_class = torch.stack([peaks[labels == c].mean(dim=0) for c in range(num_classes)])  # (C, M)
    return per_class.argmax(dim=0)


def quantised(points: torch.Tensor, map_size: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """Pixel points -> the centre of the top-map cell that holds them (what a perfect peak can report)."""
    cell = torch.tensor([image_size[0] / map_size[0], image_size[1] / map_size[1]])
    index = (points + 0.5).div(cell).floor()
    index = torch.minimum(index.clamp(min=0), torch.tensor([map_size[0] - 1, map_size[1] - 1]))
    return feature_to_pixel(index, map_size, image_size)


def measure(locations: torch.Tensor, landmarks: torch.Tensor, peaks: torch.Tensor, valid: torch.Tensor,
            live: torch.Tensor, cell: tuple[float, float], size: tuple[int, int], top_k: int) -> dict:
    """Part measure (live filters) and location instability (live and all) of one set of locations."""
    parts = part_localization(locations, landmarks, cell, peaks, image_size=size, top_k=top_k, valid=valid)
    instability = location_instability(locations, landmarks, size, peaks, top_k=max(top_k, 2), valid=valid,
                                       reduction="none")
    return {
        **parts.summary(live),
        "location_instability_live": instability[live].nanmean().item() if bool(live.any()) else float("nan"),
        "location_instability_all": instability.nanmean().item(),
        "_parts": parts, "_instability": instability,
    }


def evaluate_source(source: str, data_root: str | None, top_k: int, split: str) -> dict:
    loaded = load_source(source, torch.device("cpu"))
    data = load_split(loaded, split, data_root)
    images, labels = data.features, data.labels
    landmarks = getattr(data, "landmarks", None)
    if landmarks is None:
        raise SystemExit(f"{source}: its data set {loaded.info.name!r} has no landmarks (the {split} split has no "
                         ".landmarks), so the part measure cannot run; use a parts data set ('parts', 'parts_hard')")
    out = filter_parts(loaded.model, images)
    classes = filter_classes_by_activation(out["peaks"], labels, loaded.info.num_classes)
    valid = labels[:, None] == classes[None, :]                                        # (N, M)
    size = tuple(images.shape[-2:])
    cell = (size[0] / out["map_size"][0], size[1] / out["map_size"][1])
    # A filter is dead when it never fires on its top images: its "location" is then an arbitrary default.
    masked_peaks = out["peaks"].masked_fill(~valid, float("-inf"))
    top_peaks = masked_peaks.topk(min(top_k, len(labels)), dim=0).values
    dead = ~(top_peaks > 0).any(dim=0)
    result = measure(out["locations"], landmarks, out["peaks"], valid, ~dead, cell, size, top_k)
    accuracy = (out["logits"].argmax(1) == labels).float().mean().item()
    own = getattr(loaded.model, "filter_classes", None)
    trained = getattr(getattr(loaded.model, "interpretable_layer", None), "interpretable", False)
    agreement = (own.cpu() == classes).float().mean().item() if own is not None and trained else None
    return {
        "source": source,
        "split": split,
        "accuracy": accuracy,
        "images": len(labels),
        "map_size": list(out["map_size"]),
        "cell_px": cell,
        "top_k": top_k,
        "assignment_agreement": agreement,
        **{k: v for k, v in result.items() if not k.startswith("_")},
        "live_filters": int((~dead).sum()),  # the summaries' "filters": live filters with images
        "all_filters": int(dead.numel()),
        "dead_filters": int(dead.sum()),
        "per_filter": {
            "class": classes.tolist(),
            "dead": dead.tolist(),
            "landmark": result["_parts"].landmark.tolist(),
            "median_distance": result["_parts"].median_distance.tolist(),
            "mean_distance": result["_parts"].mean_distance.tolist(),
            "within_cell": result["_parts"].within_cell.tolist(),
            "location_instability": result["_instability"].tolist(),
        },
        "_parts": result["_parts"], "_dead": dead, "_classes": classes, "_out": out, "_images": images,
        "_labels": labels, "_valid": valid, "_landmarks": landmarks, "_info": loaded.info, "_cell": cell,
        "_size": size,
    }


def references(result: dict) -> dict[str, dict]:
    """Perfect part tracker, centre detector and dead filter on `result`'s filters, classes and top images."""
    out, landmarks, size = result["_out"], result["_landmarks"], result["_size"]
    n, m = out["peaks"].shape
    # Each reference filter tracks the landmark the model's filter is nearest to (landmark f mod K if it has none).
    chosen = result["_parts"].landmark.clone()
    fallback = torch.arange(m) % landmarks.shape[1]
    chosen = torch.where(chosen >= 0, chosen, fallback)
    tracked = landmarks[:, chosen]                                                     # (N, M, 2)
    centre = landmarks.nanmean(dim=1)[:, None, :].expand(n, m, 2)
    corner = feature_to_pixel(torch.zeros(2, dtype=torch.long), out["map_size"], size).expand(n, m, 2)
    everyone = torch.ones(m, dtype=torch.bool)
    rows = {}
    for name, locations, filters in (("perfect part tracker", quantised(tracked, out["map_size"], size), everyone),
                                     ("centre detector", quantised(centre, out["map_size"], size), everyone),
                                     ("dead filter", corner, everyone)):
        row = measure(locations, landmarks, out["peaks"], result["_valid"], filters, result["_cell"], size,
                      result["top_k"])
        rows[name] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows


def plot_filters(result: dict, label: str, path: Path, filters: int, images: int, dpi: int = 110) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = result["_info"]
    mean = torch.as_tensor(info.preprocessing["normalize"]["mean"]).reshape(-1, 1, 1)
    std = torch.as_tensor(info.preprocessing["normalize"]["std"]).reshape(-1, 1, 1)
    parts = result["_parts"]
    distance = parts.median_distance.masked_fill(result["_dead"], float("inf")).nan_to_num(float("inf"))
    chosen = distance.argsort()[:filters].tolist()
    peaks = result["_out"]["peaks"].masked_fill(~result["_valid"], float("-inf"))
    fig, axes = plt.subplots(len(chosen), images, figsize=(1.6 * images, 1.7 * len(chosen)), squeeze=False)
    for row, f in enumerate(chosen):
        top = peaks[:, f].topk(images).indices.tolist()
        k = int(parts.landmark[f])
        for col, n in enumerate(top):
            ax = axes[row][col]
            ax.imshow((result["_images"][n] * std + mean).clamp(0, 1).permute(1, 2, 0))
            r, c = result["_out"]["locations"][n, f].tolist()
            ax.scatter([c], [r], s=140, facecolors="none", edgecolors="white", linewidths=2.0)
            if k >= 0:
                lr, lc = result["_landmarks"][n, k].tolist()
                ax.scatter([lc], [lr], s=40, marker="x", color="black", linewidths=1.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                cls = int(result["_classes"][f])
                name = info.class_names[cls]
                part = info.preprocessing["landmarks"]["per_class"][name][k] if k >= 0 else "-"
                ax.set_ylabel(f"filter {f}\n{name}: {part}\nmedian {parts.median_distance[f]:.1f} px", fontsize=7)
    fig.suptitle(f"{label}: inferred part (circle) vs its landmark (x), nearest filters, top images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _row(label: str, r: dict, accuracy: bool = True) -> str:
    acc = f"{100 * r['accuracy']:.2f}%" if accuracy else "-"
    dead = f"{r['dead_filters']} / {r['all_filters']}" if accuracy else "-"
    return (f"| {label} | {acc} | {dead} | {r['mean_distance']:.2f} | {r['median_distance']:.2f} | "
            f"{100 * r['share_within_cell']:.1f}% | {100 * r['share_localized']:.1f}% | "
            f"{100 * r['share_nearer_landmark_than_centre']:.1f}% | {100 * r['share_localized_up_to_offset']:.1f}% | "
            f"{r['location_instability_live']:.4f} | "
            f"{r['location_instability_all']:.4f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", default=["runs/icnn_parts", "runs/icnn_parts_baseline"])
    parser.add_argument("--labels", nargs="*", default=None, help="one label per source (default: the source)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"),
                        help="split to measure on (val for choices, test for the reported numbers)")
    parser.add_argument("--top-k", type=int, default=100, help="top images per filter (the paper: 100)")
    parser.add_argument("--filters", type=int, default=6, help="filters per PNG")
    parser.add_argument("--images", type=int, default=8, help="images per filter in the PNG")
    parser.add_argument("--dpi", type=int, default=110, help="PNG resolution")
    parser.add_argument("--out", type=Path, default=None, help="folder for icnn_parts.md/.json and the PNGs")
    args = parser.parse_args(argv)
    labels = args.labels or args.sources
    if len(labels) != len(args.sources):
        parser.error(f"{len(args.sources)} sources but {len(labels)} labels")

    results = [evaluate_source(s, args.data_root, args.top_k, args.split) for s in args.sources]
    first = results[0]
    refs = references(first)
    cell = max(first["cell_px"])
    lines = [
        f"{args.split} split, {first['images']} images; top map {first['map_size'][0]}x{first['map_size'][1]} "
        f"({cell:g}-pixel cells); each filter's top-{args.top_k} images of its class; distances in pixels to the "
        "landmark nearest on average; summaries over live filters.",
        "",
        "| model | accuracy | dead filters | mean distance | median distance | top images within 1 cell | "
        "filters localised (median within 1 cell) | nearer landmark than centre | localised up to a fixed offset | "
        "location instability (live) | (all) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(label, r) for label, r in zip(labels, results)]
    lines += [_row(f"*reference: {name}*", r, accuracy=False) for name, r in refs.items()]
    if len(results) == 2:
        a, b = results
        lines.append("")
        lines.append(f"accuracy difference {100 * (a['accuracy'] - b['accuracy']):+.2f} points; localised filters "
                     f"{100 * a['share_localized']:.1f}% vs {100 * b['share_localized']:.1f}%; instability ratio "
                     f"(live) {a['location_instability_live'] / b['location_instability_live']:.3f}")
    for label, r in zip(labels, results):
        if r["assignment_agreement"] is not None:
            lines.append(f"{label}: the activation-based filter classes agree with its trained (running, as in the "
                         f"authors' code) assignment for {100 * r['assignment_agreement']:.0f}% of the filters")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "icnn_parts.md").write_text(table + "\n")
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        (args.out / "icnn_parts.json").write_text(json.dumps({"models": public, "references": refs}, indent=2))
        for label, r in zip(labels, results):
            slug = "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")
            plot_filters(r, label, args.out / f"icnn_parts_filters_{slug}.png", args.filters, args.images,
                         args.dpi)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
