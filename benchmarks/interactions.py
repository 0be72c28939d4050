"""How sparse are the exact interactions of the zoo's tabular ShapNets? Harsanyi dividends, test split.

For every tabular zoo model (default: every shipped `shapnet_shallow_*` and `shapnet_deep_*`) and its first
`--samples` test samples, for the predicted class of each sample:

* **Shallow ShapNets, "network"**: `model.interactions(x)`, the exact dividends of the whole network on the
  subsets of its groups (every other subset's dividend is 0 by construction, so it is not counted). Where the
  model has at most 16 features, the `oracle diff` column is the largest difference from `exact_interactions`
  on the model in float64 over all `2^D - 1` subsets (cross-group dividends included) and the SII, on the first
  `--oracle-samples`: exactness, measured (ours in the model's float32).
* **Deep ShapNets, "last layer"**: `model.interactions(x, -1)`, the game of the last stage with respect to its
  own inputs (singletons and butterfly pairs only; see `DeepShapNet.interactions`).
* **Deep ShapNets, "network (oracle)"**: `exact_interactions(model, x, model.reference)` in float64, the
  dividends of the whole network on all `2^D - 1` subsets (only for D <= 16, on the first `--oracle-samples`:
  2^D evaluations per sample).

Columns: `subsets` listed (S), `top subsets` = `ceil(0.05 S)` (`--share`), `mass in top` = the share of
`sum_T |d_T|` they hold (mean over samples), and the share of `|d|` mass by order (1, 2, >= 3). A game whose
mass sits in few subsets is explained by few (interaction) terms.

`--out DIR` writes `interactions.md`, `interactions.json`, one bar chart of the top-10 dividends of the first
test sample per model and game, and, unless `--conv ''`, the strongest pixel-pair interactions of every stage of
`--conv` (default `shapnet_conv_mnist`, needs the MNIST data) on the first MNIST test image.

Usage:
    python benchmarks/interactions.py [NAME ...] [--data-root DIR] [--samples 200] [--oracle-samples 20]
        [--share 0.05] [--out DIR] [--conv shapnet_conv_mnist]

About 1-2 minutes on 2 CPU cores with the defaults (most of it the float64 oracle of the Deep ShapNet on Adult's
12 features: 4096 network evaluations per sample).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shapnets import DeepShapNet, Interactions, ShallowShapNet, exact_interactions

# benchmarks/ is a folder of scripts, not a package: share the table helper of its sibling.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from explain_cost import markdown_table

Row = dict[str, Any]

ORACLE_LIMIT = 16
COLUMNS = ["model", "game", "players", "samples", "subsets", "top subsets", "mass in top", "order 1", "order 2",
           "order >= 3", "decomposition error", "oracle diff"]


class BenchmarkError(ValueError):
    """A source that cannot be benchmarked (not a tabular Shallow or Deep ShapNet)."""


def default_models() -> list[str]:
    import zoo

    return [n for n in zoo.list_models("shapnet_*", pretrained=True) if n.startswith(("shapnet_shallow_",
                                                                                       "shapnet_deep_"))]


def sparsity_row(found: Interactions, target: Tensor, share: float) -> Row:
    """Mass in the top `share` of the listed subsets and mass by order, per sample, averaged."""
    picked = found.select(target)
    magnitudes = picked.dividends[..., 0].abs().double()  # (B, S)
    total = magnitudes.sum(1, keepdim=True)
    by_order = {}
    orders = found.orders
    for name, keep in (("order 1", orders == 1), ("order 2", orders == 2), ("order >= 3", orders >= 3)):
        by_order[name] = float((magnitudes[:, keep].sum(1, keepdim=True) / total).nanmean())
    return {
        "players": found.num_players,
        "samples": found.batch_size,
        "subsets": len(found.subsets),
        "top subsets": max(1, math.ceil(share * len(found.subsets))),
        "mass in top": float(picked.mass_in_top(share, 0).nanmean()),
        **by_order,
        "decomposition error": found.decomposition_error() if found.complete else math.nan,
    }


def oracle_of(model: nn.Module, x: Tensor) -> Interactions:
    """The whole network's dividends on all subsets, in float64 (a copy of the model)."""
    exact = copy.deepcopy(model).double().eval()
    if hasattr(exact, "skip_inactive"):
        exact.skip_inactive = False  # the hybrids have every pattern of inactive players: dense is 2x faster here
    with torch.no_grad():
        return exact_interactions(exact, x.double(), exact.reference, player_names=model.feature_names)


def largest_difference(found: Interactions, oracle: Interactions) -> float:
    """Max |dividend difference| over every oracle subset (unlisted subsets of `found` count as 0), and SII."""
    listed = {s: t for t, s in enumerate(found.subsets)}
    ours = torch.zeros_like(oracle.dividends)
    rows = [t for t, s in enumerate(oracle.subsets) if s in listed]
    ours[:, rows] = found.dividends[:, [listed[oracle.subsets[t]] for t in rows]].double()
    return max(float((ours - oracle.dividends).abs().max()), float((found.sii.double() - oracle.sii).abs().max()))


@torch.no_grad()
def benchmark_model(
    name: str, model: nn.Module, x: Tensor, share: float, oracle_samples: int
) -> list[tuple[Row, Interactions]]:
    """The rows (and the interactions they summarise) of one model; the oracle sees the first `oracle_samples`."""
    predicted = model(x).argmax(1)
    results = []
    if isinstance(model, ShallowShapNet):
        found = model.interactions(x)
        row = {"model": name, "game": "network (exact)", **sparsity_row(found, predicted, share)}
        if model.in_features <= ORACLE_LIMIT:
            row["oracle diff"] = largest_difference(found[:oracle_samples], oracle_of(model, x[:oracle_samples]))
        else:
            row["oracle diff"] = math.nan
        results.append((row, found))
    elif isinstance(model, DeepShapNet):
        last = model.interactions(x, -1)
        results.append(({"model": name, "game": "last layer (per-layer game)", **sparsity_row(last, predicted, share),
                         "oracle diff": math.nan}, last))
        if model.in_features <= ORACLE_LIMIT:
            oracle = oracle_of(model, x[:oracle_samples])
            results.append(({"model": name, "game": "network (oracle)",
                             **sparsity_row(oracle, predicted[:oracle_samples], share),
                             "oracle diff": math.nan}, oracle))
    else:
        raise BenchmarkError(f"{name}: a {type(model).__name__}, not a tabular Shallow or Deep ShapNet")
    info = getattr(model, "data_info", None)
    class_names = info.get("class_names") if isinstance(info, dict) else getattr(info, "class_names", None)
    for _, found in results:
        found.class_names = list(class_names) if class_names else None
    return results


def load_test(source: str, data_root: str | None, samples: int) -> tuple[Any, Tensor, Tensor]:
    from training.cli import load_source, load_split

    loaded = load_source(source, torch.device("cpu"))
    dataset = load_split(loaded, "test", data_root)
    items = [dataset[i] for i in range(min(samples, len(dataset)))]
    x = torch.stack([torch.as_tensor(item[0]) for item in items])
    y = torch.tensor([int(item[1]) for item in items])
    return loaded, x, y


def conv_pictures(source: str, data_root: str | None, out: Path) -> list[Path]:
    """Pixel-pair interactions of every stage of a Conv ShapNet on the first test image."""
    from training.plots import plot_pixel_interactions

    loaded, x, _ = load_test(source, data_root, 1)
    model = loaded.model
    written = []
    with torch.no_grad():
        predicted = int(model(x).argmax(1))
        for stage in range(model.num_stages):
            found = model.interactions(x, stage)
            # The last stage's channels are the classes; a hidden stage's most moved channel is shown.
            last = stage == model.num_stages - 1
            target = predicted if last else int((found.output - found.base)[0].abs().argmax())
            written.append(plot_pixel_interactions(found, out / f"{Path(source).name}_layer{stage}_pixel_pairs.png",
                                                   image=x[0], k=20, target=target))
    return written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", metavar="NAME",
                        help="zoo names, pretrained folders or run folders (default: every shipped tabular ShapNet)")
    parser.add_argument("--data-root", default=None, help="folder holding the raw data (default: $SHAPNETS_DATA)")
    parser.add_argument("--samples", type=int, default=200, help="test samples (the first ones of the split)")
    parser.add_argument("--oracle-samples", type=int, default=20,
                        help="samples the float64 oracle sees (2^D evaluations each: ~2 s per Adult sample)")
    parser.add_argument("--share", type=float, default=0.05, help="the top share of subsets (0.05: top 5%%)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch default)")
    parser.add_argument("--conv", default="shapnet_conv_mnist",
                        help="Conv ShapNet whose pixel-pair pictures --out gets ('' for none)")
    parser.add_argument("--out", type=Path, default=None, help="write interactions.md / .json and PNGs here")
    args = parser.parse_args(argv)
    for name in ("samples", "oracle_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.share <= 1:
        parser.error(f"--share must lie in (0, 1], got {args.share}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print the table; returns `{"rows": [...], "report": str, "pictures": [...]}`."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sources = args.sources or default_models()
    rows: list[Row] = []
    pictures: list[Path] = []
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    for source in sources:
        loaded, x, _ = load_test(source, args.data_root, args.samples)
        label = Path(source).name
        for row, found in benchmark_model(label, loaded.model, x, args.share, args.oracle_samples):
            rows.append(row)
            if args.out is not None:
                from training.plots import plot_interactions

                game = row["game"].split(" ")[0] + ("_oracle" if "oracle" in row["game"] else "")
                pictures.append(plot_interactions(found, args.out / f"{label}_{game}_top10.png", k=10,
                                                  target=int(loaded.model(x[:1]).argmax(1))))
        print(f"[{label}] done", file=sys.stderr)
    report = "\n".join([
        "## Sparsity of exact interactions (Harsanyi dividends), predicted class\n",
        f"First {args.samples} test samples per model (fewer if the split is smaller); means over samples. "
        f"`mass in top`: share of sum |d_T| held by the `top subsets` = ceil({args.share:g} S) largest |d_T| of "
        "the S listed subsets; `order k`: share of |d| mass on subsets of k players. Shallow: the network's own "
        "subsets (others are 0 by construction; `oracle diff` = max |ours - exact_interactions| over all 2^D - 1 "
        "subsets and the SII, float64 oracle). Deep: the last stage's own game, and the whole network by the "
        "oracle (D <= 16).\n",
        markdown_table(rows, COLUMNS),
    ])
    print(report)
    if args.out is not None and args.conv:
        pictures += conv_pictures(args.conv, args.data_root, args.out)
    if args.out is not None:
        (args.out / "interactions.md").write_text(report + "\n")
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        (args.out / "interactions.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
        print("wrote " + ", ".join(str(p) for p in pictures), file=sys.stderr)
    return {"rows": rows, "report": report, "pictures": pictures}


if __name__ == "__main__":
    from training.config import UserError

    try:
        main()
    except (BenchmarkError, UserError) as e:
        print(f"interactions benchmark: error: {e}", file=sys.stderr)
        sys.exit(2)
