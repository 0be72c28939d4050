"""`shapnets bench interactions`: how sparse are the exact interactions (Harsanyi dividends) of tabular ShapNets?

For every case (default: every shipped `shapnet_shallow_*` and `shapnet_deep_*`, on its first test samples, or
N(0, 1) draws when the data are not found) and the class each sample is predicted as:

* **Shallow ShapNets, "network (exact)"**: `model.interactions(x)`, the exact dividends of the whole network on
  the subsets of its groups (every other subset's dividend is 0 by construction, so it is not counted). Where the
  model has at most `ORACLE_LIMIT` features, `oracle diff` is the largest difference from `exact_interactions` on
  the model in float64 over all `2^D - 1` subsets (cross-group dividends included) and the SII, on the first
  `oracle_samples`: exactness, measured (ours in the model's float32).
* **Deep ShapNets, "last layer (per-layer game)"**: `model.interactions(x, -1)`, the game of the last stage with
  respect to its own inputs (singletons and butterfly pairs only; see `DeepShapNet.interactions`).
* **Deep ShapNets, "network (oracle)"**: `exact_interactions(model, x, model.reference)` in float64, the
  dividends of the whole network on all `2^D - 1` subsets (only for D <= `ORACLE_LIMIT`, on the first
  `oracle_samples`: 2^D evaluations per sample).

Columns: `subsets` listed (S), `top subsets` = `ceil(share * S)`, `mass in top` = the share of `sum_T |d_T|` they
hold (mean over samples), the share of `|d|` mass by order (1, 2, >= 3), `decomposition error` (base + sum of
dividends vs the output) and `oracle diff`. A game whose mass sits in few subsets is explained by few terms.

Writes `interactions.md`, `interactions.json`, `interactions.png` (mass in top and by order per row) and one bar
chart of the top-10 dividends of the first sample per row (`interactions_<model>_<game>_top10.png`, named in the
row's `chart`); `conv_pictures` draws the pixel-pair interactions of every stage of a Conv ShapNet.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from shapnets import DeepShapNet, Interactions, ShallowShapNet, exact_interactions

from .bench_cases import Case, zoo_cases
from .bench_report import Progress, Row, environment, markdown_table, report_header, write_report
from .config import UserError

__all__ = ["COLUMNS", "ORACLE_LIMIT", "benchmark_model", "conv_pictures", "default_models", "interactions",
           "largest_difference", "oracle_of", "sparsity_row"]

ORACLE_LIMIT = 16
"""The most features the float64 oracle enumerates (2^D network evaluations per sample)."""
COLUMNS = ["model", "game", "inputs", "players", "samples", "subsets", "top subsets", "mass in top", "order 1",
           "order 2", "order >= 3", "decomposition error", "oracle diff"]


def default_models() -> list[str]:
    """Every shipped tabular ShapNet (`shapnet_shallow_*`, `shapnet_deep_*`) with weights."""
    import zoo

    return [n for n in zoo.list_models("shapnet_*", pretrained=True)
            if n.startswith(("shapnet_shallow_", "shapnet_deep_"))]


def sparsity_row(found: Interactions, target: Tensor, share: float) -> Row:
    """Mass in the top `share` of the listed subsets and mass by order, per sample, averaged over samples."""
    picked = found.select(target)
    magnitudes = picked.dividends[..., 0].abs().double()  # (B, S)
    total = magnitudes.sum(1, keepdim=True)
    orders = found.orders
    by_order = {name: float((magnitudes[:, keep].sum(1, keepdim=True) / total).nanmean())
                for name, keep in (("order 1", orders == 1), ("order 2", orders == 2), ("order >= 3", orders >= 3))}
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
    """The whole network's dividends on all subsets, in float64 (on a copy of the model)."""
    exact = copy.deepcopy(model).double().eval()
    if hasattr(exact, "skip_inactive"):
        exact.skip_inactive = False  # the oracle has every pattern of inactive players: dense is 2x faster here
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
    """The rows (and the interactions they summarise) of one model; the oracle sees the first `oracle_samples`.

    Raises:
        UserError: `model` is not a tabular Shallow or Deep ShapNet.
    """
    predicted = model(x).argmax(1)
    results = []
    if isinstance(model, ShallowShapNet):
        found = model.interactions(x)
        row = {"model": name, "game": "network (exact)", **sparsity_row(found, predicted, share)}
        row["oracle diff"] = (largest_difference(found[:oracle_samples], oracle_of(model, x[:oracle_samples]))
                              if model.in_features <= ORACLE_LIMIT else math.nan)
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
        raise UserError(f"interactions benchmark: {name} is a {type(model).__name__}, not a tabular Shallow or Deep "
                        "ShapNet (for a Conv ShapNet: shapnets interactions NAME --out PNG)")
    info = getattr(model, "data_info", None)
    class_names = info.get("class_names") if isinstance(info, dict) else getattr(info, "class_names", None)
    for _, found in results:
        found.class_names = list(class_names) if class_names else None
    return results


def _chart_name(row: Row) -> str:
    game = row["game"].split(" ")[0] + ("_oracle" if "oracle" in row["game"] else "")
    return f"interactions_{row['model']}_{game}_top10.png"


def interactions(
    cases: Sequence[Case] | None = None,
    *,
    out: str | Path | None = None,
    quick: bool = False,
    samples: int | None = None,
    oracle_samples: int | None = None,
    share: float = 0.05,
    zoo_models: Sequence[str] | None = None,
    data_root: str | None = None,
    command: str | None = None,
    verbose: bool = False,
) -> list[Row]:
    """The interactions sparsity table (docs/benchmarks.md); writes `interactions.md/.json/.png` and the charts.

    Args:
        cases: tabular Shallow or Deep ShapNets and their samples; default the zoo models `zoo_models` names
            (default: every shipped tabular ShapNet, `default_models()`).
        out: the output folder (nothing written when None).
        quick: CI settings: 8 samples, 2 oracle samples.
        samples: samples per zoo model (default 200, quick 8); given `cases` are used as they are.
        oracle_samples: samples the float64 oracle sees (default 20, quick 2; 2^D evaluations each).
        share: the top share of the listed subsets (0.05: the top 5%).
        data_root: where the zoo models' data sets are (default `$SHAPNETS_DATA`).
        command: the command line printed in the report (default `sys.argv`).
        verbose: progress lines on stderr.

    Raises:
        UserError: a case that is not a tabular Shallow or Deep ShapNet, or settings out of range.
    """
    samples = samples or (8 if quick else 200)
    oracle_samples = oracle_samples or (2 if quick else 20)
    if not 0 < share <= 1:
        raise UserError(f"share must lie in (0, 1], got {share}")
    if samples < 1 or oracle_samples < 1:
        raise UserError(f"samples and oracle samples must be >= 1, got {samples} and {oracle_samples}")
    if cases is None:
        cases = zoo_cases(list(zoo_models) if zoo_models else default_models(), samples, data_root,
                          tabular_only=False)
    env = environment(command=command)
    rows: list[Row] = []
    found_by_row: list[Interactions] = []
    progress = Progress("interactions", len(cases), verbose)
    for case in cases:
        progress(case.name)
        label = Path(case.name).name
        for row, found in benchmark_model(label, case.model, case.x, share, oracle_samples):
            row["inputs"] = case.inputs
            rows.append(row)
            found_by_row.append(found)
    report = "\n".join([
        report_header("Sparsity of exact interactions (Harsanyi dividends), predicted class", env),
        f"First {samples} samples per zoo model (`inputs`); means over samples. `mass in top`: share of sum |d_T| "
        f"held by the `top subsets` = ceil({share:g} S) largest |d_T| of the S listed subsets; `order k`: share of "
        "|d| mass on subsets of k players. Shallow: the network's own subsets (others are 0 by construction; "
        f"`oracle diff` = max |ours - exact_interactions| over all 2^D - 1 subsets and the SII, float64 oracle on "
        f"the first {oracle_samples} samples, D <= {ORACLE_LIMIT}). Deep: the last stage's own game, and the whole "
        f"network by the oracle (D <= {ORACLE_LIMIT}, first {oracle_samples} samples).\n",
        markdown_table(rows, COLUMNS),
    ])
    if out is not None:
        from .plots import plot_interactions

        for row, found in zip(rows, found_by_row):  # the first sample's predicted class
            row["chart"] = plot_interactions(found, Path(out) / _chart_name(row), k=10).name
    settings = {"samples": samples, "oracle_samples": oracle_samples, "share": share, "quick": quick}
    write_report(out, "interactions", report, {"settings": settings, "environment": env, "rows": rows},
           lambda path: _plot_sparsity(rows, path))
    return rows


def _plot_sparsity(rows: list[Row], path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['game']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8), sharey=True, squeeze=False)
    positions = range(len(rows))
    axes[0, 0].barh(positions, [r["mass in top"] for r in rows], color="tab:blue")
    axes[0, 0].set_xlabel("share of |dividend| mass in the top subsets")
    axes[0, 0].set_xlim(0, 1)
    left = [0.0] * len(rows)
    for name, color in (("order 1", "tab:gray"), ("order 2", "tab:orange"), ("order >= 3", "tab:red")):
        values = [0.0 if math.isnan(r[name]) else r[name] for r in rows]
        axes[0, 1].barh(positions, values, left=left, color=color, label=name)
        left = [a + b for a, b in zip(left, values)]
    axes[0, 1].set_xlabel("share of |dividend| mass by order")
    axes[0, 1].set_xlim(0, 1)
    axes[0, 1].legend(fontsize=7, loc="lower right")
    axes[0, 0].set_yticks(list(positions), labels, fontsize=7)
    axes[0, 0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def conv_pictures(source: str, data_root: str | None, out: str | Path) -> list[Path]:
    """Pixel-pair interactions of every stage of a Conv ShapNet on the first test image (needs its data).

    Returns:
        The pictures written, `<out>/<name>_layer<L>_pixel_pairs.png` per stage.
    """
    from .plots import plot_pixel_interactions
    from .sources import load_source, load_split

    loaded = load_source(source, torch.device("cpu"))
    model = loaded.model
    x = torch.as_tensor(load_split(loaded, "test", data_root)[0][0])[None]
    written = []
    with torch.no_grad():
        predicted = int(model(x).argmax(1))
        for stage in range(model.num_stages):
            found = model.interactions(x, stage)
            # The last stage's channels are the classes; a hidden stage's most moved channel is shown.
            last = stage == model.num_stages - 1
            target = predicted if last else int((found.output - found.base)[0].abs().argmax())
            path = Path(out) / f"{Path(source).name}_layer{stage}_pixel_pairs.png"
            written.append(plot_pixel_interactions(found, path, image=x[0], k=20, target=target))
    return written

