"""Instance-based pruning of Deep and Conv ShapNets: accuracy, skipped work and real speed-up, per fraction.

For every source (a run folder, a `.pt` checkpoint, a pretrained folder or a zoo name) and every pruning
fraction `p`, on the first `--samples` test samples:

* test accuracy with pruning `p` (eval mode);
* the share of players (pixels, features) whose representation is non-zero after the pruned stages ("players
  kept", mean over samples and pruned stages). `p` counts *all* players, including those already at the
  reference: by missingness a background pixel of an MNIST digit is exactly 0 at every layer, so
  `p` below the background share (~0.8 on MNIST) removes nothing more, and this column shows it;
* the fraction of module evaluations and of coalition evaluations skipped, from `model.evaluation_stats()`
  (a module whose players all sit at the reference is skipped; one with `z` such players evaluates
  `2^(k-z)` of its `2^k` coalitions; see `ShapleyModuleBank.shapley(skip_inactive=True)`);
* the wall time of `model.explain` with skipping and of the *same pruned computation* with
  `skip_inactive=False` (pruned players are zeroed but everything is still evaluated: "masked"), timed in
  turn in one process (median of `--repeats` after a warm-up), and their ratio (the speed-up);
* whether the skip path predicts what the masked path predicts (it must: skipping is exact up to rounding),
  with the largest logit difference.

And, at `p = 0`, how sparse the explanations are: for each sample the predicted class's attribution map,
the share of its |attribution| mass held by the top 10% of players (pixels or features; `ceil(0.1 * N)`,
at least one) and its Gini index (0: mass spread evenly, -> 1: all on one player), averaged over samples.

Which stages are pruned: every stage but the last, with the same fraction. The last stage's output is the
class map whose spatial (or feature) sum *is* the logits: pruning it would drop terms of the logit sum
itself (changing the prediction without saving any later work, since no stage follows), whereas pruning a
hidden representation sets players to the next stage's reference, which is what lets that stage skip them.

Usage:
    python benchmarks/pruning.py RUN_OR_NAME [RUN_OR_NAME ...] [--labels ...] [--data-root DIR]
        [--samples 1000] [--fractions 0 0.1 ... 0.9] [--time-samples 256] [--repeats 3] [--out DIR]

Prints Markdown tables; `--out DIR` also writes `DIR/pruning.md`, `DIR/pruning.json` and the curves
`DIR/pruning.png` (accuracy, coalitions skipped and speed-up against `p`). On 2 CPU cores a Conv ShapNet on
MNIST takes ~1 minute per fraction with the defaults (most of it the masked pass over all samples).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shapnets.pruning import PRUNE_MODES, configure_pruning, stage_fractions
from shapnets.sparsity import gini, mass_count, peak_share
from training.bench import interleaved_medians, markdown_table
from training.bench_report import write_report

Row = dict[str, Any]

DEFAULT_FRACTIONS = [round(0.1 * i, 1) for i in range(10)]
TOP_SHARE = 0.1
ROW_COLUMNS = ["p", "accuracy", "players kept", "modules skipped", "coalitions skipped", "coalition evals / sample",
               "skip ms", "masked ms", "explain ms (interleaved)",
               "speed-up (masked / skip)", "same predictions (share)", "max logit diff / max |logit|"]
SPARSITY_COLUMNS = ["model", "architecture", "players", "non-zero players", "samples", "accuracy", "top-10% mass",
                    "Gini", "n90", "peak share"]


class BenchmarkError(ValueError):
    """A source that cannot be benchmarked (not a prunable ShapNet, bad fractions, labels that do not match)."""


# ---------------------------------------------------------------------------------------------
# Sparsity of explanations
# ---------------------------------------------------------------------------------------------
def top_share(magnitudes: Tensor, share: float = TOP_SHARE) -> Tensor:
    """Per row of `(B, N)` non-negative values, the fraction of the row's total held by its `ceil(share * N)`
    largest entries (at least one); NaN for an all-zero row."""
    count = max(1, math.ceil(share * magnitudes.shape[1]))
    top = magnitudes.topk(count, dim=1).values.sum(1)
    total = magnitudes.sum(1)
    return torch.where(total > 0, top / total, torch.full_like(total, math.nan))


def _nanmean(values: Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else math.nan


def explanation_sparsity(maps: Tensor, accuracy: float) -> Row:
    """Mean top-10% mass share and Gini index of `(B, players)` predicted-class attribution maps."""
    magnitudes = maps.abs().double()
    return {"accuracy": accuracy, "players": maps.shape[1], "samples": maps.shape[0],
            "non-zero players": float(magnitudes.ne(0).sum(1).double().mean()),
            "top-10% mass": _nanmean(top_share(magnitudes)), "Gini": _nanmean(gini(magnitudes)),
            "n90": _nanmean(mass_count(magnitudes)), "peak share": _nanmean(peak_share(magnitudes))}


# ---------------------------------------------------------------------------------------------
# Running a pruned model
# ---------------------------------------------------------------------------------------------
def check_prunable(model: nn.Module, source: str) -> None:
    """Raise `BenchmarkError` unless `model` is a Deep or Conv ShapNet (per-stage `prune`, `skip_inactive`)."""
    needed = ("prune", "skip_inactive", "num_stages", "evaluation_stats", "explain")
    missing = [a for a in needed if not hasattr(model, a)]
    if missing:
        raise BenchmarkError(
            f"{source}: {type(model).__name__} has no instance-based pruning (lacks {', '.join(missing)}); "
            "expected a DeepShapNet or ConvShapNet"
        )
    if model.num_stages < 2:
        raise BenchmarkError(f"{source}: {type(model).__name__} has {model.num_stages} stage; pruning needs a "
                             "hidden stage before the last one")


def pruned_stages(p: float, num_stages: int, mode: str = "all") -> list[float]:
    """`p` for every stage but the last (see the module docstring), validated like the constructors do."""
    return stage_fractions([p] * (num_stages - 1) + [0.0], num_stages, mode)


def apply_pruning(model: nn.Module, p: float, mode: str, input_fraction: float = 0.0) -> None:
    """Pruning `p` after every stage but the last and, for `p > 0`, `input_fraction` of the input's pixels
    (Conv ShapNets' `prune_input`; p = 0 is the unpruned model)."""
    extra = {"input_fraction": input_fraction if p else 0.0} if hasattr(model, "prune_input") else {}
    if input_fraction and not extra:
        raise BenchmarkError(f"--input-fraction: {type(model).__name__} has no input pruning (Conv ShapNets have)")
    configure_pruning(model, pruned_stages(p, model.num_stages, mode), mode, **extra)


@torch.no_grad()
def explain_all(
    model: nn.Module, x: Tensor, batch_size: int, kept: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Logits `(B, C)`, the predicted class's attributions `(B, players)` and, with `kept`, each sample's share of
    players whose representation is non-zero after the pruned stages (mean over those stages), in batches."""
    logits, maps, shares = [], [], []
    for chunk in x.split(batch_size):
        expl = model.explain(chunk, layers=True) if kept else model.explain(chunk)
        predicted = expl.output.argmax(1)
        attributions = expl.attributions.reshape(len(chunk), -1, expl.attributions.shape[-1])
        logits.append(expl.output)
        maps.append(attributions.gather(2, predicted.view(-1, 1, 1).expand(-1, attributions.shape[1], 1))[..., 0])
        if kept:  # every stage but the last one is pruned
            hidden = [z.reshape(len(chunk), -1, z.shape[-1]).ne(0).any(-1).double().mean(1) for z in expl.layers[:-1]]
            shares.append(torch.stack(hidden).mean(0))
    return torch.cat(logits), torch.cat(maps), torch.cat(shares) if kept else None


def benchmark_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    fractions: Sequence[float],
    *,
    time_samples: int,
    repeats: int,
    warmup: int,
    batch_size: int,
    source: str = "model",
    mode: str = "all",
    masked: bool = True,
    input_fraction: float = 0.0,
) -> tuple[list[Row], Row]:
    """One row per fraction and the sparsity of the unpruned explanations (see the module docstring).

    With `masked=False` the masked pass (everything evaluated, pruned players zeroed) is left out: no speed-up or
    same-prediction columns, half the time. The model's `prune`, `prune_mode` and `skip_inactive` are restored.
    """
    check_prunable(model, source)
    saved = (list(model.prune), model.skip_inactive, model.training, getattr(model, "prune_mode", "all"),
             getattr(model, "prune_input", None))
    model.eval()
    rows: list[Row] = []
    sparsity: Row = {}
    timed = x[:time_samples]
    try:
        for p in fractions:
            apply_pruning(model, p, mode, input_fraction)
            model.skip_inactive = True
            model.evaluation_stats(reset=True)
            logits, maps, kept = explain_all(model, x, batch_size, kept=True)
            stats = model.evaluation_stats(reset=True)

            def run(skip: bool) -> None:
                model.skip_inactive = skip
                explain_all(model, timed, batch_size)

            # Skip against masked, in turn per fraction; without masked, the interleaved timing of every model at
            # every p (`interleaved_explain_times`) is the only one needed.
            times = interleaved_medians({"skip": lambda: run(True), "masked": lambda: run(False)}, repeats,
                                        warmup) if masked else {}
            model.evaluation_stats(reset=True)  # the timing runs are not part of the counts
            predicted = logits.argmax(1)
            rows.append({
                "p": float(p),
                "accuracy": float((predicted == y).double().mean()),
                "players kept": float(kept.mean()),
                "modules skipped": stats["module_evals_skipped"] / max(stats["module_evals"], 1),
                "coalitions skipped": stats["coalition_evals_skipped"] / max(stats["coalition_evals"], 1),
                "coalition evals / sample": (stats["coalition_evals"] - stats["coalition_evals_skipped"]) / len(x),
                "evaluation_stats": stats,
            })
            if masked:
                model.skip_inactive = False
                masked_logits, _, _ = explain_all(model, x, batch_size)
                rows[-1].update({
                    "skip ms": 1e3 * times["skip"],
                    "masked ms": 1e3 * times["masked"],
                    "speed-up (masked / skip)": times["masked"] / times["skip"],
                    # Skipping is exact, but the two paths round differently, and a pruning decision between players
                    # whose norms tie exactly (symmetric inputs) can then fall either way: a share, not a bool.
                    "same predictions (share)": float(predicted.eq(masked_logits.argmax(1)).double().mean()),
                    # relative: the two paths sum the same float32 terms in different orders
                    "max logit diff / max |logit|": float((logits - masked_logits).abs().max()
                                                          / masked_logits.abs().max().clamp_min(1e-30)),
                })
            if p == 0:
                sparsity = explanation_sparsity(maps, rows[-1]["accuracy"])
        if not sparsity:  # p = 0 was not asked for: one unpruned pass for the sparsity numbers
            apply_pruning(model, 0.0, mode)
            model.skip_inactive = True
            logits, maps, _ = explain_all(model, x, batch_size)
            sparsity = explanation_sparsity(maps, float((logits.argmax(1) == y).double().mean()))
    finally:
        model.prune, model.skip_inactive, model.prune_mode = saved[0], saved[1], saved[3]
        if saved[4] is not None:
            model.prune_input = saved[4]
        model.train(saved[2])
        model.evaluation_stats(reset=True)
    return rows, sparsity


# ---------------------------------------------------------------------------------------------
# Sources, report, command line
# ---------------------------------------------------------------------------------------------
def default_label(source: str) -> str:
    path = Path(source)
    if path.suffix in (".pt", ".pth"):
        return path.parent.name or path.stem
    return path.name or source


def load_test_samples(
    source: str, data_root: str | None, samples: int, device: torch.device
) -> tuple[Any, Tensor, Tensor]:
    """The loaded source (`training.cli.load_source`) and its first `samples` test samples."""
    from training.cli import load_source, load_split

    loaded = load_source(source, device)
    check_prunable(loaded.model, source)
    dataset = load_split(loaded, "test", data_root)
    count = min(samples, len(dataset))
    items = [dataset[i] for i in range(count)]
    x = torch.stack([torch.as_tensor(item[0]) for item in items]).to(device)
    y = torch.tensor([int(item[1]) for item in items], device=device)
    return loaded, x, y


HEADLINE_COLUMNS = ["model", "p", "accuracy", "accuracy - start", "coalition evals / sample", "explain ms",
                    "start ms", "speed-up (start / this)"]


def explain_runner(model: nn.Module, x: Tensor, p: float, mode: str, batch_size: int,
                   input_fraction: float = 0.0) -> Any:
    """A timing closure: `model.explain` on `x` at pruning `p` (every stage but the last), skipping on."""
    def run() -> None:
        apply_pruning(model, p, mode, input_fraction)
        model.skip_inactive = True
        explain_all(model, x, batch_size)
    return run


def saved_pruning(model: nn.Module) -> tuple[Any, ...]:
    return list(model.prune), model.prune_mode, model.skip_inactive, getattr(model, "prune_input", None)


def restore_pruning(model: nn.Module, saved: tuple[Any, ...]) -> None:
    model.prune, model.prune_mode, model.skip_inactive = saved[0], saved[1], saved[2]
    if saved[3] is not None:
        model.prune_input = saved[3]


def headline(loaded: dict[str, tuple[nn.Module, Tensor, list[Row]]], start: str, *, mode: str, tolerance: float,
             time_samples: int, repeats: int, warmup: int, batch_size: int, input_fraction: float = 0.0) -> list[Row]:
    """Every model at its largest `p` whose accuracy stays within `tolerance` of `start` at p = 0, timed
    interleaved with `start` at p = 0 in one process on the same `time_samples` samples.

    Args:
        loaded: label -> (model, samples, rows of `benchmark_model`), all on the same data.
        start: the label of the reference model (the unregularized one).
    """
    reference = next(r for r in loaded[start][2] if r["p"] == 0.0)
    chosen: dict[str, Row] = {}
    for label, (_, _, rows) in loaded.items():
        ok = [r for r in rows if r["accuracy"] >= reference["accuracy"] - tolerance]
        if ok:
            chosen[label] = max(ok, key=lambda r: r["p"])
    saved = {label: saved_pruning(m) for label, (m, _, _) in loaded.items()}

    def runner(label: str, p: float) -> Any:
        model, x, _ = loaded[label]
        return explain_runner(model, x[:time_samples], p, mode, batch_size, input_fraction)

    fns = {"start": runner(start, 0.0)}
    fns.update({label: runner(label, row["p"]) for label, row in chosen.items()})
    try:
        times = interleaved_medians(fns, repeats, warmup)
    finally:
        for label, (m, _, _) in loaded.items():
            restore_pruning(m, saved[label])
    return [{"model": label, "p": row["p"], "accuracy": row["accuracy"],
             "accuracy - start": row["accuracy"] - reference["accuracy"],
             "coalition evals / sample": row["coalition evals / sample"], "explain ms": 1e3 * times[label],
             "start ms": 1e3 * times["start"], "speed-up (start / this)": times["start"] / times[label]}
            for label, row in chosen.items()]


def interleaved_explain_times(loaded: dict[str, tuple[nn.Module, Tensor, list[Row]]], *, mode: str,
                              time_samples: int, repeats: int, warmup: int, batch_size: int,
                              input_fraction: float = 0.0) -> None:
    """Time `explain` for every model at every `p` of its rows in one interleaved loop and store it in each row as
    `"explain ms (interleaved)"`: the curves against wall time then compare configurations measured under the same
    load (timed fraction by fraction, a shared machine's changing load bends them)."""
    saved = {label: saved_pruning(m) for label, (m, _, _) in loaded.items()}

    fns = {f"{label} {r['p']}": explain_runner(model, x[:time_samples], r["p"], mode, batch_size, input_fraction)
           for label, (model, x, rows) in loaded.items() for r in rows}
    try:
        times = interleaved_medians(fns, repeats, warmup)
    finally:
        for label, (m, _, _) in loaded.items():
            restore_pruning(m, saved[label])
    for label, (_, _, rows) in loaded.items():
        for r in rows:
            r["explain ms (interleaved)"] = 1e3 * times[f"{label} {r['p']}"]


def plot_curves(results: dict[str, list[Row]], out: Path, bound: float | None = None,
                chosen: dict[str, float] | None = None) -> Path | None:
    """Accuracy against `p`, against coalition evaluations done and against explain time, one line per model
    (None without matplotlib); `bound` (accuracy, 0-1) draws the tolerance line, `chosen` (label -> p) stars each
    model's headline point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curve written", file=sys.stderr)
        return None
    panels = [("p", "pruning fraction p (every stage but the last)"),
              ("coalition evals / sample", "coalition evaluations done per sample"),
              ("explain ms (interleaved)", "explain time (ms, all configurations timed interleaved)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6))
    for label, rows in results.items():
        accuracy = [100 * r["accuracy"] for r in rows]
        for ax, (key, _) in zip(axes, panels):
            line = ax.plot([r[key] for r in rows], accuracy, marker="o", markersize=3, label=label)[0]
            star = [r for r in rows if chosen and r["p"] == chosen.get(label)]
            if star:
                ax.plot([star[0][key]], [100 * star[0]["accuracy"]], marker="*", markersize=13,
                        color=line.get_color(), markeredgecolor="black", linestyle="none",
                        label=f"{label}: largest p within the bound" if ax is axes[0] else None)
    for ax, (_, xlabel) in zip(axes, panels):
        if bound is not None:
            ax.axhline(100 * bound, color="gray", linestyle=":", linewidth=1,
                       label="bound (first model at p = 0, minus the tolerance)" if ax is axes[0] else None)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", metavar="RUN_OR_NAME",
                        help="run folders, .pt checkpoints, pretrained folders or zoo names (Deep / Conv ShapNets)")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per source for the tables")
    parser.add_argument("--data-root", default=None, help="folder holding the raw data (default: $SHAPNETS_DATA)")
    parser.add_argument("--samples", type=int, default=1000, help="test samples (the first ones of the split)")
    parser.add_argument("--fractions", type=float, nargs="+", default=DEFAULT_FRACTIONS,
                        help="pruning fractions p (default 0, 0.1, ..., 0.9)")
    parser.add_argument("--time-samples", type=int, default=256, help="samples per timed explain (of --samples)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="samples per explain call (a model may split a call further by its memory budget)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (1: stable timings on a shared machine; 0: torch default)")
    parser.add_argument("--mode", default="active", choices=PRUNE_MODES,
                        help="what p counts: all players (the paper), the active ones (default), or a threshold")
    parser.add_argument("--input-fraction", type=float, default=0.0,
                        help="Conv ShapNets: rows with p > 0 also prune this fraction of the input's pixels")
    parser.add_argument("--no-masked", action="store_true", help="leave out the masked pass (half the time)")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="headline: largest p whose accuracy is within this of the first model's at p = 0")
    parser.add_argument("--out", type=Path, default=None, help="also write pruning.md / .json / .png here")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.sources):
        parser.error(f"--labels: {len(args.sources)} sources need {len(args.sources)} labels, got {len(args.labels)}")
    upper = 1.0 if args.mode == "all" else 1.0 - 1e-12
    bad = [p for p in args.fractions if not 0.0 <= p <= upper]
    if bad:
        parser.error(f"--fractions must lie in [0, 1{']' if args.mode == 'all' else ')'} for --mode {args.mode}, "
                     f"got {bad}")
    if not 0.0 <= args.input_fraction <= upper:
        parser.error(f"--input-fraction must lie in [0, 1{']' if args.mode == 'all' else ')'} for --mode {args.mode}, "
                     f"got {args.input_fraction}")
    for name in ("samples", "time_samples", "repeats", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def runs_info(models: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The per-model entries of the result (not the headline)."""
    return [(label, m) for label, m in models.items() if label != "headline"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the report; returns `{"models": {label: {...rows, sparsity...}}, "report": str}`."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    labels = args.labels or [default_label(s) for s in args.sources]
    if len(set(labels)) != len(labels):
        raise BenchmarkError(f"labels must be distinct, got {labels}: pass --labels")
    models: dict[str, Any] = {}
    runs: dict[str, tuple[nn.Module, Tensor, list[Row]]] = {}
    sections = [
        "## Instance-based pruning: accuracy and skipped work\n",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {device}, float32. p prunes every stage but "
        f"the last; p counts `{args.mode}` players (see `shapnets.pruning`)"
        + (f"; every p > 0 also prunes {args.input_fraction:g} of the input's pixels (`prune_input`)"
           if args.input_fraction else "") + ". Times: `explain` on "
        f"{args.time_samples} samples (batches of {args.batch_size}), median of "
        f"{args.repeats} after {args.warmup} warm-up: `skip ms` and `masked ms` (unless --no-masked) timed in turn per "
        "fraction, "
        "`explain ms (interleaved)` every model at every p timed in one interleaved loop (compare these across p and "
        "models); skipped fractions and predictions on all samples.\n",
    ]
    for label, source in zip(labels, args.sources):
        loaded, x, y = load_test_samples(source, args.data_root, args.samples, device)
        model = loaded.model
        rows, sparsity = benchmark_model(model, x, y, args.fractions, time_samples=args.time_samples,
                                         repeats=args.repeats, warmup=args.warmup, batch_size=args.batch_size,
                                         source=source, mode=args.mode, masked=not args.no_masked,
                                         input_fraction=args.input_fraction)
        runs[label] = (model, x, rows)
        architecture = type(model).__name__
        models[label] = {"source": source, "architecture": architecture, "dataset": loaded.info.name,
                         "stages": model.num_stages, "rows": rows, "sparsity": sparsity}
        print(f"[{label}] done", file=sys.stderr)
    interleaved_explain_times(runs, mode=args.mode, time_samples=args.time_samples, repeats=args.repeats,
                              warmup=args.warmup, batch_size=args.batch_size, input_fraction=args.input_fraction)
    for label, (model, x, rows) in runs.items():
        m = models[label]
        sections += [f"### {label} ({m['architecture']}, {m['dataset']}, {len(x)} test samples, "
                     f"{model.num_stages} stages)\n",
                     markdown_table(rows, [c for c in ROW_COLUMNS if c in rows[0]]) + "\n"]
    sparsity_rows = [{"model": label, "architecture": m["architecture"], **m["sparsity"]}
                     for label, m in runs_info(models) if m["sparsity"]]
    if sparsity_rows:
        sections += [
            "### Sparsity of the explanations at p = 0\n",
            "Predicted class's attribution map per sample: share of |attribution| mass in the top 10% of players "
            "(ceil(0.1 N)) and Gini index of |attribution| (0 = even, -> 1 = concentrated), averaged over samples. "
            "Players at the reference (an image's background) count, with attribution exactly 0: compare models "
            "on the same data, and see `non-zero players` (mean per sample).\n",
            markdown_table(sparsity_rows, SPARSITY_COLUMNS),
        ]
    bound = None
    if 0.0 in args.fractions:
        bound = next(r for r in runs[labels[0]][2] if r["p"] == 0.0)["accuracy"] - args.tolerance
        best = headline(runs, labels[0], mode=args.mode, tolerance=args.tolerance, time_samples=args.time_samples,
                        repeats=args.repeats, warmup=args.warmup, batch_size=args.batch_size,
                        input_fraction=args.input_fraction)
        models["headline"] = best
        sections += [
            f"### Largest p within {100 * args.tolerance:g} pt of {labels[0]} at p = 0, timed against it\n",
            f"Each model at its largest p whose accuracy stays within {100 * args.tolerance:g} pt of `{labels[0]}` "
            f"unpruned; `explain` on {args.time_samples} samples, every configuration timed in turn with "
            f"`{labels[0]}` at p = 0 (median of {args.repeats}).\n",
            markdown_table(best, HEADLINE_COLUMNS) + "\n",
        ]
    report = "\n".join(sections)
    print(report)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_report(args.out, "pruning", report, {"settings": settings, "models": models},
                 plot=lambda path: plot_curves(
                     {label: m["rows"] for label, m in models.items() if label != "headline"}, path,
                     bound=bound, chosen={r["model"]: r["p"] for r in models.get("headline", [])}))
    return {"models": models, "report": report}


if __name__ == "__main__":
    from training.config import UserError

    try:
        main()
    except (BenchmarkError, UserError) as e:  # a mistake in what was asked: one line and status 2, like `shapnets`
        print(f"pruning benchmark: error: {e}", file=sys.stderr)
        sys.exit(2)
