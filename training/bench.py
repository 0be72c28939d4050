"""`shapnets bench`: fidelity against the exact Shapley oracle, post-hoc baselines, speed, scaling, accuracy and
the sparsity of exact interactions.

Five benchmarks. Each is a function that returns its rows and, given `out`, writes `<out>/<kind>.md`, `.json` and
`.png` (`training.bench_report`); `shapnets bench KIND... [--quick]` runs them. What each one measures, its
columns and its bars: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shapnets import ConvShapNet, DeepShapNet, ShallowShapNet, exact_shapley

from .bench_cases import Case, Game, _chunk_groups, _own_attributions, make_game, synthetic_cases, zoo_cases

# The cases' helpers lived here before bench_cases.py; tests and scripts still reach them as `bench.<name>`.
from .bench_cases import _family as _family
from .bench_cases import _for_target as _for_target
from .bench_cases import _tabular_case as _tabular_case
from .bench_report import Progress, Row, environment, markdown_table
from .bench_report import progress as _progress
from .bench_report import report_header as _header
from .bench_report import write_report as _write

__all__ = [
    "ANCHORS",
    "KERNEL_SHAP_SAMPLES",
    "KINDS",
    "Budgets",
    "Case",
    "Game",
    "Method",
    "Progress",
    "ScalingGrid",
    "accuracy",
    "captum_available",
    "captum_methods",
    "fidelity",
    "limit_thread_pools",
    "make_game",
    "markdown_table",
    "peak_memory",
    "run",
    "scaling",
    "speed",
    "synthetic_cases",
    "zoo_cases",
]


KINDS = ("fidelity", "speed", "scaling", "accuracy", "interactions")
KERNEL_SHAP_SAMPLES = (64, 256, 1024, 4096)
CAPTUM_MISSING = "captum is not installed: pip install 'shapnets[baselines]' (or pip install captum)"
OWN = "own explain()"
ORACLE = "exact_shapley (oracle)"

ANCHORS: list[Row] = [
    {"dataset": "mnist", "model": "HarsanyiNet (Harsanyi-CNN)", "test accuracy": 0.9879,
     "source": "Chen et al., ICML 2023; repo notebooks"},
    {"dataset": "adult", "model": "HarsanyiNet (Harsanyi-MLP, Census)", "test accuracy": 0.8485,
     "source": "Chen et al., ICML 2023; repo notebooks"},
    {"dataset": "mnist", "model": "CapsNet (3 routing iterations)", "test accuracy": 0.9975,
     "source": "Sabour et al., NeurIPS 2017 (0.25% error)"},
]
"""Published test accuracies the accuracy table shows next to ours (fractions)."""


# ------------------------------------------------------------------------------------------------ measurement helpers
def limit_thread_pools(threads: int) -> None:
    """Cap every BLAS / OpenMP pool of the process at `threads` (torch's own is set by `torch.set_num_threads`), for
    timings that compare single-threaded methods.

    captum's KernelShap fits its regression with scikit-learn, whose numpy/scipy BLAS runs multi-threaded by
    default: KernelShap then used ~1.5 cores (300 ms of CPU in 205 ms of wall time) and its idle BLAS threads spun
    through the next timed explain, doubling that call's CPU time. The pools are loaded here (scikit-learn imports
    them) so that the cap reaches them; without threadpoolctl (it comes with scikit-learn) nothing is capped.
    """
    try:
        import sklearn.linear_model  # noqa: F401  (loads the BLAS that KernelShap's regression uses)
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(threads)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median wall time (s) of each function after `warmup` untimed runs, timed in turn within every repeat.

    Interleaving makes the ratios between the functions robust to load that comes and goes on a shared machine.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines), restoring it even on errors."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated while `fn()` runs, above what was allocated before (see the module
    docstring: `torch.cuda.max_memory_allocated` on CUDA, the profiler's allocation events on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as folder, _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    # "[memory]" events carry the signed size of every allocation (+) and free (-), in time order once sorted.
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
                    key=lambda e: e["ts"])
    current = peak = 0
    for event in memory:
        current += int(event["args"]["Bytes"])
        peak = max(peak, current)
    return peak


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# ------------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """A post-hoc attribution method run on a game.

    Attributes:
        name: row label.
        budget: what it spends per sample (model evaluations, steps).
        attribute: `(fn, d (b, M), target (b,), mask (1, M)) -> (b, M)` per-element attributions, baseline 0.
        per_sample: captum runs it on one sample at a time (Lime, KernelShap).
        grouped: it gives every element of a player the player's value (perturbation methods with a mask).
    """

    name: str
    budget: str
    attribute: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
    per_sample: bool = False
    grouped: bool = False


def captum_available() -> bool:
    """Whether captum (the optional extra `baselines`) can be imported."""
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return False
    return True


def _captum() -> Any:
    import captum.attr  # imported when a method runs: captum is optional

    return captum.attr


@dataclass(frozen=True)
class Budgets:
    """The post-hoc methods' budgets: the full run's, or `Budgets.quick()` for CI."""

    kernel_samples: tuple[int, ...] = KERNEL_SHAP_SAMPLES
    lime_samples: int = 1024
    svs_permutations: int = 25
    ig_steps: int = 50
    gradient_shap_samples: int = 20

    @classmethod
    def quick(cls) -> Budgets:
        return cls(kernel_samples=(64,), lime_samples=64, svs_permutations=5, ig_steps=8, gradient_shap_samples=4)


def captum_methods(budgets: Budgets | None = None) -> list[Method]:
    """The post-hoc methods of the fidelity table, in its row order (captum is imported only when one runs)."""
    b = budgets or Budgets()

    def kernel_shap(n: int) -> Callable[..., Tensor]:
        return lambda fn, d, t, mask: _captum().KernelShap(fn).attribute(
            d, baselines=0.0, target=t, feature_mask=mask, n_samples=n, perturbations_per_eval=n)

    methods = [Method(f"KernelShap ({n})", f"{n} coalitions", kernel_shap(n), per_sample=True, grouped=True)
               for n in b.kernel_samples]
    methods += [
        Method(f"ShapleyValueSampling ({b.svs_permutations})", f"{b.svs_permutations} permutations x (K + 1)",
               lambda fn, d, t, mask: _captum().ShapleyValueSampling(fn).attribute(
                   d, baselines=0.0, target=t, feature_mask=mask, n_samples=b.svs_permutations,
                   perturbations_per_eval=int(mask.max()) + 1), grouped=True),
        Method(f"Lime ({b.lime_samples})", f"{b.lime_samples} samples",
               lambda fn, d, t, mask: _captum().Lime(fn).attribute(
                   d, baselines=0.0, target=t, feature_mask=mask, n_samples=b.lime_samples,
                   perturbations_per_eval=b.lime_samples), per_sample=True, grouped=True),
        Method("Occlusion", "M + 1 evaluations",
               lambda fn, d, t, mask: _captum().Occlusion(fn).attribute(
                   d, sliding_window_shapes=(1,), baselines=0.0, target=t, perturbations_per_eval=d.shape[1])),
        Method("Saliency", "1 gradient",
               lambda fn, d, t, mask: _captum().Saliency(fn).attribute(d, target=t, abs=False)),
        Method("Gradient x Input", "1 gradient",
               lambda fn, d, t, mask: _captum().InputXGradient(fn).attribute(d, target=t)),
        Method(f"IntegratedGradients ({b.ig_steps})", f"{b.ig_steps} gradients",
               lambda fn, d, t, mask: _captum().IntegratedGradients(fn).attribute(
                   d, baselines=0.0, target=t, n_steps=b.ig_steps)),
        Method("DeepLift", "1 modified gradient",
               lambda fn, d, t, mask: _captum().DeepLift(fn).attribute(d, baselines=torch.zeros_like(d[:1]),
                                                                       target=t)),
        Method("DeepLiftShap", "2 modified gradients",
               lambda fn, d, t, mask: _captum().DeepLiftShap(fn).attribute(
                   d, baselines=torch.zeros_like(d[:1]).expand(2, -1).contiguous(), target=t)),
        Method(f"GradientShap ({b.gradient_shap_samples})", f"{b.gradient_shap_samples} gradients",
               lambda fn, d, t, mask: _captum().GradientShap(fn).attribute(
                   d, baselines=torch.zeros_like(d[:1]), target=t, n_samples=b.gradient_shap_samples, stdevs=0.0)),
        Method("LRP", "1 modified gradient", lambda fn, d, t, mask: _captum().LRP(fn).attribute(d, target=t)),
    ]
    return methods


def _warm_up_captum() -> None:
    """Pay captum's one-time costs (its lazy imports of scikit-learn and friends: seconds) before any timing."""
    toy = nn.Linear(3, 2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for explainer in (_captum().KernelShap(toy), _captum().Lime(toy)):
            explainer.attribute(torch.randn(1, 3), baselines=0.0, target=0, n_samples=8, perturbations_per_eval=8)


def _run_method(method: Method, game: Game, indices: Sequence[int] | None = None) -> Tensor:
    """`(b, K)` attributions of the target class for the samples `indices` (all by default)."""
    rows = torch.arange(game.d.shape[0]) if indices is None else torch.as_tensor(list(indices))
    mask = game.element_player.view(1, -1)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DeepLift's hook notice, captum's "batch of 1" hints
        if method.per_sample:
            parts = [method.attribute(game.fn, game.d[i: i + 1].clone().requires_grad_(), game.target[i: i + 1],
                                      mask) for i in rows.tolist()]
            values = torch.cat(parts)
        else:
            values = method.attribute(game.fn, game.d[rows].clone().requires_grad_(), game.target[rows], mask)
    return game.per_player(values.detach().float(), method.grouped)


# ------------------------------------------------------------------------------------------------ fidelity metrics
def relative_l2(estimate: Tensor, exact: Tensor) -> float:
    """||estimate - exact||_F / ||exact||_F (float64)."""
    exact = exact.double()
    return float((estimate.double() - exact).norm() / exact.norm().clamp_min(1e-300))


def _ranks(values: Tensor) -> Tensor:
    return values.argsort(1).argsort(1).double()


def spearman(estimate: Tensor, exact: Tensor) -> float:
    """Mean over samples of the rank correlation over players (NaN for a sample whose values are all equal)."""
    a, b = _ranks(estimate), _ranks(exact)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    rho = (a * b).sum(1) / denominator
    rho = rho[(denominator > 0) & estimate.double().std(1).gt(0)]
    return float(rho.mean()) if rho.numel() else math.nan


def top_k_overlap(estimate: Tensor, exact: Tensor, k: int) -> float:
    """Mean share of the k players with the largest |exact| that are among the k largest |estimate|."""
    top_exact = exact.abs().topk(k, dim=1).indices
    top_estimate = estimate.abs().topk(k, dim=1).indices
    hits = (top_exact[:, :, None] == top_estimate[:, None, :]).any(2).double().mean(1)
    return float(hits.mean())


def _scores(estimate: Tensor, game: Game) -> Row:
    k = max(1, game.num_kept // 4)
    return {"rel. L2 error": relative_l2(estimate, game.exact), "Spearman": spearman(estimate, game.exact),
            "top-k": top_k_overlap(estimate, game.exact, k)}


# ------------------------------------------------------------------------------------------------ 1. fidelity
def compare(game: Game, methods: Sequence[Method], repeats: int = 5) -> list[Row]:
    """One row per method on one game (the own explanation and the oracle first): error, rank agreement, time per
    sample (see docs/benchmarks.md). A method that fails on the model (LRP without rules for its layers, captum
    not installed) gives a row with the reason in `status` and no numbers."""
    case = game.case
    samples = game.d.shape[0]
    base = {"model": case.name, "family": case.family, "players": f"{game.num_kept} of {case.num_players}"}
    rows: list[Row] = []
    own_s = math.nan
    if case.own_explanation:
        with torch.no_grad():
            estimate = _own_attributions(game)
            own_s = interleaved_medians({"own": lambda: case.model.explain(game.full)}, repeats)["own"] / samples
            exact = bool(case.model.explain(game.full[:1]).exact)
        rows.append({**base, "method": OWN, "budget": "1 forward pass", **_scores(estimate, game),
                     "ms / sample": 1e3 * own_s, "status": "exact by construction" if exact else
                     "not exact by construction (layer-wise Shapley)"})
    else:
        rows.append({**base, "method": OWN, "budget": "-",
                     "status": f"n/a: {type(case.model).__name__} has no explain()"})
    rows.append({**base, "method": ORACLE, "budget": f"2^{game.num_kept} coalitions (float64)",
                 **_scores(game.exact, game), "ms / sample": 1e3 * game.oracle_s / samples, "status": "ground truth"})
    have_captum = captum_available()
    if have_captum and methods:
        _warm_up_captum()
    for method in methods:
        row = {**base, "method": method.name, "budget": method.budget}
        if not have_captum:
            rows.append({**row, "status": CAPTUM_MISSING})
            continue
        try:
            if not method.per_sample:  # warm-up: first-call costs (hooks); per-sample methods amortize theirs
                _run_method(method, game, [0])
            start = time.perf_counter()
            estimate = _run_method(method, game)
            seconds = (time.perf_counter() - start) / samples
            rows.append({**row, **_scores(estimate, game), "ms / sample": 1e3 * seconds, "status": "ok"})
        except Exception as e:  # a method that cannot handle a model is a row, not a crash
            message = " ".join(str(e).split())[:140]
            rows.append({**row, "status": f"not supported: {type(e).__name__}: {message}"})
    for row in rows:
        row["x own"] = row["ms / sample"] / (1e3 * own_s) if "ms / sample" in row and own_s == own_s else None
    return rows


FIDELITY_COLUMNS = ["method", "budget", "rel. L2 error", "Spearman", "top-k", "ms / sample", "x own", "status"]


def _summary_row(rows: list[Row], kernel: str) -> Row:
    by_name = {r["method"]: r for r in rows}
    own, kernel_row = by_name.get(OWN, {}), by_name.get(kernel, {})
    posthoc = [r for r in rows if r["method"] not in (OWN, ORACLE) and r.get("rel. L2 error") is not None]
    best = min(posthoc, key=lambda r: r["rel. L2 error"], default={})
    return {"model": rows[0]["model"], "family": rows[0]["family"], "players": rows[0]["players"],
            "own rel. L2 error": own.get("rel. L2 error"), f"{kernel} rel. L2 error": kernel_row.get("rel. L2 error"),
            "best post-hoc": best.get("method"), "best post-hoc rel. L2 error": best.get("rel. L2 error"),
            "own ms / sample": own.get("ms / sample"), f"{kernel} ms / sample": kernel_row.get("ms / sample")}


def fidelity(
    cases: Sequence[Case] | None = None,
    *,
    out: str | Path | None = None,
    quick: bool = False,
    samples: int | None = None,
    max_players: int = 12,
    budgets: Budgets | None = None,
    zoo_models: Sequence[str] | None = None,
    data_root: str | None = None,
    command: str | None = None,
    verbose: bool = False,
) -> list[Row]:
    """The fidelity benchmark (docs/benchmarks.md): one row per case and method; writes `fidelity.md/.json/.png`.

    Args:
        cases: what to explain; default the synthetic cases and every shipped tabular zoo model, or only the zoo
            models `zoo_models` names (no synthetic ones then).
        out: the output folder (nothing written when None).
        quick: CI settings: 3 samples, D = 8 synthetic models, `Budgets.quick()`, no zoo models unless named.
        samples: samples per case (default 8, quick 3).
        max_players: the largest game (2^K oracle evaluations per sample).
        budgets: the post-hoc methods' budgets (default `Budgets()`, quick `Budgets.quick()`).
        data_root: where the zoo models' data sets are (default `$SHAPNETS_DATA`).
        verbose: progress lines on stderr.
    """
    samples = samples or (3 if quick else 8)
    budgets = budgets or (Budgets.quick() if quick else Budgets())
    if cases is None and zoo_models:
        # Only the named models (which may be image models: their game keeps `max_players` pixels).
        cases = zoo_cases(zoo_models, samples, data_root, tabular_only=False)
    elif cases is None:
        cases = synthetic_cases(samples, quick=quick) + ([] if quick else zoo_cases(None, samples, data_root))
    methods = captum_methods(budgets)
    kernel = f"KernelShap ({1024 if 1024 in budgets.kernel_samples else max(budgets.kernel_samples)})"
    env = environment(command=command)
    rows: list[Row] = []
    sections = [_header("Explanation fidelity against the exact Shapley values", env)]
    if not captum_available():
        print(f"fidelity: {CAPTUM_MISSING}; only the own explanations are compared", file=sys.stderr)
        sections.append(f"**{CAPTUM_MISSING}**: the post-hoc rows are empty.\n")
    per_case: list[list[Row]] = []
    progress = Progress("fidelity", len(cases), verbose)
    for case in cases:
        progress(case.name)
        game = make_game(case, case.max_players or max_players)
        case_rows = compare(game, methods)
        per_case.append(case_rows)
        rows += case_rows
        kept = "all players" if game.num_kept == case.num_players else (
            f"the {game.num_kept} players with the largest mean |x - reference|, the other "
            f"{case.num_players - game.num_kept} at the reference")
        sections += [f"### {case.name} ({case.family})\n",
                     f"{case.inputs}; {game.d.shape[0]} samples; game: {kept}; class: the predicted one; "
                     f"top-k with k = {max(1, game.num_kept // 4)}.\n",
                     markdown_table(case_rows, FIDELITY_COLUMNS) + "\n"]
    summary = [_summary_row(r, kernel) for r in per_case]
    summary_columns = ["model", "family", "players", "own rel. L2 error", f"{kernel} rel. L2 error", "best post-hoc",
                       "best post-hoc rel. L2 error", "own ms / sample", f"{kernel} ms / sample"]
    sections[1:1] = [
        "Relative L2 error against `exact_shapley` (float64) on the same samples, game and reference; Spearman and "
        "top-k: agreement of the players' ranking (see `training/bench.py`). Deep and Conv ShapNets are not exact "
        "by construction (Shapley values do not compose through non-linear layers): their `own` row measures how "
        "close the intrinsic explanation is to the network's exact values. Captum has no DeepLift rule for GELU (the "
        "ShapNets' activation): there DeepLift falls back to gradients and equals Gradient x Input.\n",
        markdown_table(summary, summary_columns) + "\n",
    ]
    report = "\n".join(sections)
    settings = {"samples": samples, "max_players": max_players, "budgets": budgets.__dict__, "quick": quick}
    _write(out, "fidelity", report, {"settings": settings, "environment": env, "summary": summary, "rows": rows},
           lambda path: _plot_fidelity(per_case, path))
    return rows


def _plot_fidelity(per_case: list[list[Row]], path: Path) -> None:
    import matplotlib.pyplot as plt

    columns = min(3, len(per_case))
    rows_ = math.ceil(len(per_case) / columns)
    fig, axes = plt.subplots(rows_, columns, figsize=(5.2 * columns, 3.8 * rows_), squeeze=False)
    from matplotlib.ticker import NullFormatter

    markers = "osD^v<>phX*P+xd"
    methods = list(dict.fromkeys(r["method"] for rows in per_case for r in rows if r["method"] != ORACLE))
    colors = plt.get_cmap("tab20").colors
    for ax, rows in zip(axes.flat, per_case):
        for row in rows:
            if row.get("rel. L2 error") is None or row["method"] == ORACLE:
                continue
            i = methods.index(row["method"])  # one marker and colour per method across the panels
            ax.scatter(row["ms / sample"], max(row["rel. L2 error"], 1e-12), marker=markers[i % len(markers)],
                       color=colors[i % len(colors)], label=row["method"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{rows[0]['model']}", fontsize=8)
        ax.set_xlabel("ms / sample")
        ax.set_ylabel("rel. L2 error vs exact")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(per_case):]:
        ax.axis("off")
    legend = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=6, fontsize=7)
    # Fixed margins: tight_layout's bounding-box search on log axes costs seconds per figure.
    fig.subplots_adjust(left=0.08, right=0.98, top=0.95, bottom=0.1 + 0.25 / rows_, hspace=0.45, wspace=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ 2. speed
BARS = {"Shallow ShapNet": (1e4, ">= 10^4 x faster"), "Deep ShapNet": (1.0, "faster")}
"""Family -> (the least batched speed-up over KernelShap, the bar's wording); the error must be lower too."""


def speed_columns(kernel: str) -> list[str]:
    """The speed table's columns for a KernelShap row label such as `KernelShap (1024)`."""
    return ["model", "family", "players", "batch", "forward ms / sample", "explain ms / sample", "explain / forward",
            "explain ms (batch 1)", f"{kernel} ms / sample", "speed-up (batched)", "speed-up (batch 1)",
            "own rel. L2 error", f"{kernel} rel. L2 error", "bar", "bar met"]


def _kernel_shap_full(case: Case, x: Tensor, n_samples: int) -> float:
    """Seconds per sample of KernelShap(n) on the case's full game (every player), one sample at a time."""
    reference = case.reference.float().expand(x.shape[1:])
    mask = case.players.reshape(1, *x.shape[1:])
    explainer = _captum().KernelShap(case.model)
    target = case.model(x).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer.attribute(x[:1], baselines=reference[None], target=target[:1], feature_mask=mask,
                            n_samples=n_samples, perturbations_per_eval=n_samples)  # warm-up
        start = time.perf_counter()
        for i in range(len(x)):
            explainer.attribute(x[i: i + 1], baselines=reference[None], target=target[i: i + 1], feature_mask=mask,
                                n_samples=n_samples, perturbations_per_eval=n_samples)
    return (time.perf_counter() - start) / len(x)


def speed(
    cases: Sequence[Case] | None = None,
    *,
    out: str | Path | None = None,
    quick: bool = False,
    batch: int | None = None,
    kernel_samples: int = 1024,
    kernel_inputs: int | None = None,
    error_samples: int | None = None,
    max_players: int = 12,
    repeats: int | None = None,
    data_root: str | None = None,
    command: str | None = None,
    verbose: bool = False,
) -> list[Row]:
    """The speed benchmark (docs/benchmarks.md): one row per model; writes `speed.md/.json/.png`.

    Args:
        cases: default every shipped zoo model with `explain()` (tabular and images); `quick`: the synthetic ones.
        batch: the batch of the forward / explain timings (default 256; quick 32).
        kernel_samples: KernelShap's coalitions per sample (the bars are stated for 1024).
        kernel_inputs: samples KernelShap is timed on (default 4; quick 2).
        error_samples: samples of the error columns (default 8; quick 3).
        repeats: timed repeats (median; default 7, quick 3).
    """
    batch = batch or (32 if quick else 256)
    kernel_inputs = kernel_inputs or (2 if quick else 4)
    error_samples = error_samples or (3 if quick else 8)
    repeats = repeats or (3 if quick else 7)
    if cases is None:
        cases = synthetic_cases(error_samples, quick=True) if quick else zoo_cases(
            None, max(error_samples, kernel_inputs), data_root, tabular_only=False)
    cases = [c for c in cases if c.own_explanation]
    kernel_method = captum_methods(Budgets(kernel_samples=(kernel_samples,)))[0]
    kernel = kernel_method.name
    have_captum = captum_available()
    if have_captum:
        _warm_up_captum()
    env = environment(command=command)
    rows: list[Row] = []
    progress = Progress("speed", len(cases), verbose)
    for case in cases:
        progress(case.name)
        model = case.model.eval()
        x = case.x.float()
        many = x.repeat(math.ceil(batch / len(x)), *([1] * (x.dim() - 1)))[:batch]
        with torch.no_grad():
            t = interleaved_medians({"forward": lambda model=model, many=many: model(many),
                                     "explain": lambda model=model, many=many: model.explain(many),
                                     "single": lambda model=model, x=x: model.explain(x[:1])}, repeats)
        row: Row = {"model": case.name, "family": case.family, "players": case.num_players, "batch": batch,
                    "forward ms / sample": 1e3 * t["forward"] / batch,
                    "explain ms / sample": 1e3 * t["explain"] / batch,
                    "explain / forward": t["explain"] / t["forward"], "explain ms (batch 1)": 1e3 * t["single"]}
        if have_captum:
            with torch.no_grad():
                kernel_s = _kernel_shap_full(case, x[:kernel_inputs], kernel_samples)
            row.update({f"{kernel} ms / sample": 1e3 * kernel_s,
                        "speed-up (batched)": kernel_s / (t["explain"] / batch),
                        "speed-up (batch 1)": kernel_s / t["single"]})
            if case.num_players <= max_players or case.players.dim() == 1:  # tabular: a subset game when large
                game = make_game(Case(case.name, case.family, model, x[:error_samples], case.reference, case.players,
                                      case.inputs), max_players)
                by_name = {r["method"]: r for r in compare(game, [kernel_method], repeats=1)}
                row["own rel. L2 error"] = by_name[OWN].get("rel. L2 error")
                row[f"{kernel} rel. L2 error"] = by_name[kernel].get("rel. L2 error")
        bar = BARS.get(case.family)
        if bar is not None:
            row["bar"] = f"{bar[1]} than {kernel}, lower error"
            if row.get("own rel. L2 error") is not None and row.get(f"{kernel} rel. L2 error") is not None:
                missed = [what for what, ok in [("speed", row["speed-up (batched)"] >= bar[0]),
                                                ("error", row["own rel. L2 error"] < row[f"{kernel} rel. L2 error"])]
                          if not ok]
                row["bar met"] = "yes" if not missed else f"no ({', '.join(missed)})"
        rows.append(row)
    sections = [
        _header("Explanation speed", env),
        f"Forward and explain: median of {repeats} interleaved repeats on a batch of {batch} (the samples repeated), "
        f"float32. {kernel}: all its coalitions in one batch, on {kernel_inputs} samples one at a time, on the "
        f"full game (every player). Errors: relative L2 against `exact_shapley` on the fidelity game "
        f"(<= {max_players} players) of {error_samples} samples; n/a for images (too many players). The bars "
        "are judged on the batched speed-up.\n",
    ]
    if not have_captum:
        sections.append(f"**{CAPTUM_MISSING}**: no KernelShap columns.\n")
    sections.append(markdown_table(rows, speed_columns(kernel)))
    report = "\n".join(sections)
    settings = {"batch": batch, "kernel_samples": kernel_samples, "kernel_inputs": kernel_inputs,
                "error_samples": error_samples, "repeats": repeats, "max_players": max_players, "quick": quick}
    _write(out, "speed", report, {"settings": settings, "environment": env, "rows": rows},
           lambda path: _plot_speed(rows, kernel, path))
    return rows


def _plot_speed(rows: list[Row], kernel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.0))
    labels = [r["model"] for r in rows]
    positions = range(len(rows))
    for offset, (key, label) in enumerate([("forward ms / sample", "forward"), ("explain ms / sample", "explain"),
                                           (f"{kernel} ms / sample", kernel)]):
        values = [r.get(key) or math.nan for r in rows]
        ax.bar([p + 0.27 * (offset - 1) for p in positions], values, width=0.27, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("ms / sample")
    ax.set_xticks(list(positions))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ 3. scaling
SCALING_COLUMNS = ["family", "setting", "players", "batch", "device", "precision", "forward ms / sample",
                   "explain ms / sample", "peak MB", "peak KB / sample"]


@dataclass(frozen=True)
class ScalingGrid:
    """What `scaling` measures. `ScalingGrid.default()` is the full run's, `.quick()` CI's.

    Attributes:
        shallow_k: group sizes of the Shallow ShapNets, on `shallow_features` features.
        deep_features: feature counts of the Deep ShapNets.
        conv_sizes: image sides of the Conv ShapNet.
        batches: batch sizes of the Deep ShapNet's batch-growth rows (on `growth_features` features).
        conv_batches: batch sizes of the Conv ShapNet's (on `growth_side` x `growth_side` images).
        growth_budget: the models' `memory_budget` in the batch-growth rows (bytes): batches whose estimated
            working memory exceeds it stream in chunks, so the peak stops growing there.
        oracle_batches: batch sizes of `exact_shapley` on a Shallow ShapNet with `oracle_features` features.
        tabular_batch, conv_batch: the batch of the players-growth rows.
        repeats: timed repeats (median).
    """

    shallow_k: tuple[int, ...]
    shallow_features: int
    deep_features: tuple[int, ...]
    conv_sizes: tuple[int, ...]
    batches: tuple[int, ...]
    conv_batches: tuple[int, ...]
    oracle_batches: tuple[int, ...]
    tabular_batch: int
    conv_batch: int
    repeats: int
    growth_features: int = 64
    growth_side: int = 28
    oracle_features: int = 12
    growth_budget: int = 64 << 20

    @classmethod
    def default(cls) -> ScalingGrid:
        return cls(tuple(range(1, 11)), 20, (8, 32, 128, 512, 1024), (28, 56, 112, 224), (1, 16, 256, 1024, 4096),
                   (1, 16, 128, 512), (1, 16, 256), 128, 2, 3)

    @classmethod
    def quick(cls) -> ScalingGrid:
        return cls((1, 2, 3), 6, (8, 32), (12, 28), (1, 16), (1, 4), (1, 4), 16, 2, 1)


def _scaling_row(family: str, setting: str, players: int, model: Callable[[Tensor], Tensor] | None,
                 explain: Callable[[Tensor], object], x: Tensor, device: torch.device, precision: str,
                 repeats: int) -> Row:
    """Time (forward, explain) and peak explain memory of one configuration."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    batch = x.shape[0]
    with torch.no_grad(), autocast:
        fns: dict[str, Callable[[], object]] = {"explain": lambda: explain(x)}
        if model is not None:
            fns["forward"] = lambda: model(x)
        t = interleaved_medians(fns, repeats, sync=_sync(device))
        peak = peak_memory(lambda: explain(x), device)
    return {"family": family, "setting": setting, "players": players, "batch": batch, "device": device.type,
            "precision": precision, "forward ms / sample": 1e3 * t["forward"] / batch if "forward" in t else None,
            "explain ms / sample": 1e3 * t["explain"] / batch, "peak MB": peak / 2**20,
            "peak KB / sample": peak / 2**10 / batch}


def scaling(
    *,
    out: str | Path | None = None,
    quick: bool = False,
    device: str | torch.device = "cpu",
    precisions: Sequence[str] | None = None,
    grid: ScalingGrid | None = None,
    command: str | None = None,
    verbose: bool = False,
) -> list[Row]:
    """The scaling benchmark (docs/benchmarks.md): time and peak memory as players and batch grow; writes
    `scaling.md/.json/.png`.

    Args:
        device: `cpu` or `cuda`.
        precisions: `fp32` and, on CUDA, `bf16` (autocast) by default.
        grid: what to measure (default `ScalingGrid.default()`, quick `ScalingGrid.quick()`).

    Raises:
        ValueError: bf16 asked for on the CPU.
    """
    device = torch.device(device)
    precisions = tuple(precisions or (("fp32", "bf16") if device.type == "cuda" else ("fp32",)))
    if "bf16" in precisions and device.type != "cuda":
        raise ValueError(f"scaling: bf16 runs on CUDA only, got device {device}")
    grid = grid or (ScalingGrid.quick() if quick else ScalingGrid.default())
    generator = torch.Generator().manual_seed(0)
    env = environment(device, command)
    rows: list[Row] = []

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    torch.manual_seed(0)
    progress = Progress(f"scaling ({device})", 4 * len(precisions), verbose)
    for precision in precisions:
        progress(f"{precision}, Shallow ShapNets, k = {grid.shallow_k}")
        D = grid.shallow_features
        for k in grid.shallow_k:
            net = ShallowShapNet(D, 2, _chunk_groups(D, k)).to(device).eval()
            rows.append(_scaling_row("Shallow ShapNet", f"groups of k={k} (D={D})", D, net, net.explain,
                                     randn(grid.tabular_batch, D), device, precision, grid.repeats))
        progress(f"{precision}, Deep ShapNets, D = {grid.deep_features}")
        for D in grid.deep_features:
            net = DeepShapNet(D, 2, channels=16).to(device).eval()
            rows.append(_scaling_row("Deep ShapNet", f"D={D}", D, net, net.explain, randn(grid.tabular_batch, D),
                                     device, precision, grid.repeats))
        progress(f"{precision}, Conv ShapNets, sizes {grid.conv_sizes}")
        conv = ConvShapNet(1, 10, channels=(16, 16, 16, 16)).to(device).eval()
        for side in grid.conv_sizes:
            rows.append(_scaling_row("Conv ShapNet", f"{side}x{side}", side * side, conv, conv.explain,
                                     randn(grid.conv_batch, 1, side, side), device, precision, grid.repeats))
        progress(f"{precision}, batch growth {grid.batches} and the oracle")
        D, side = grid.growth_features, grid.growth_side
        deep = DeepShapNet(D, 2, channels=16).to(device).eval()
        deep.memory_budget = conv.memory_budget = grid.growth_budget
        for b in grid.batches:
            rows.append(_scaling_row("Deep ShapNet", f"batch growth (D={D})", D, deep, deep.explain, randn(b, D),
                                     device, precision, grid.repeats))
        for b in grid.conv_batches:
            rows.append(_scaling_row("Conv ShapNet", f"batch growth ({side}x{side})", side * side, conv, conv.explain,
                                     randn(b, 1, side, side), device, precision, grid.repeats))
        D = grid.oracle_features
        small = ShallowShapNet(D, 2, _chunk_groups(D, 3)).to(device).eval()
        for b in grid.oracle_batches:
            rows.append(_scaling_row("exact_shapley", f"batch growth (Shallow, D={D}, max_batch=8192)", D, None,
                                     lambda x, small=small: exact_shapley(small, x), randn(b, D), device, precision,
                                     1))
    sections = [
        _header("Scaling: time and peak memory", env),
        "Peak MB: tensor memory allocated during one explain call above what existed before "
        + ("(`torch.cuda.max_memory_allocated`)" if device.type == "cuda" else
           "(CPU: the allocator events of `torch.profiler`, replayed)")
        + f". Times: median of {grid.repeats}. Random weights and N(0, 1) inputs (no input sits at the reference, "
        "so nothing is skipped). A constant `peak KB / sample` as the batch grows would mean explain materializes "
        f"the whole batch; in the batch-growth rows the models' `memory_budget` is {grid.growth_budget >> 20} MiB, "
        "so larger batches stream in chunks and the peak stops growing beyond the returned explanation itself "
        "(attributions: players x classes per sample); `exact_shapley` streams coalitions in chunks of "
        "`max_batch`.\n",
    ]
    for family in ("Shallow ShapNet", "Deep ShapNet", "Conv ShapNet", "exact_shapley"):
        family_rows = [r for r in rows if r["family"] == family]
        if family_rows:
            sections += [f"### {family}\n", markdown_table(family_rows, SCALING_COLUMNS) + "\n"]
    report = "\n".join(sections)
    settings = {"grid": grid.__dict__, "device": str(device), "precisions": list(precisions), "quick": quick}
    _write(out, "scaling", report, {"settings": settings, "environment": env, "rows": rows},
           lambda path: _plot_scaling(rows, path))
    return rows


def _plot_scaling(rows: list[Row], path: Path) -> None:
    import matplotlib.pyplot as plt

    panels = [("Shallow ShapNet", "groups", "players per group k", lambda r: int(r["setting"].split("k=")[1][:2]
                                                                                .rstrip(" ("))),
              ("Deep ShapNet", "D=", "features D", lambda r: r["players"]),
              ("Conv ShapNet", "x", "pixels H x W", lambda r: r["players"]),
              (None, "batch growth", "batch", lambda r: r["batch"])]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for column, (family, marker, xlabel, xvalue) in enumerate(panels):
        for (precision, device), style in zip(sorted({(r["precision"], r["device"]) for r in rows}), "o^sD"):
            if family is None:
                groups: dict[str, list[Row]] = {}
                for r in rows:
                    if "batch growth" in r["setting"] and r["precision"] == precision:
                        groups.setdefault(f"{r['family']} ({precision})", []).append(r)
            else:
                selected = [r for r in rows if r["family"] == family and marker in r["setting"]
                            and "batch growth" not in r["setting"] and r["precision"] == precision]
                groups = {f"{device} {precision}": selected}
            for label, selected in groups.items():
                if not selected:
                    continue
                xs = [xvalue(r) for r in selected]
                axes[0, column].plot(xs, [r["explain ms / sample"] for r in selected], marker=style, label=label)
                axes[1, column].plot(xs, [r["peak KB / sample"] for r in selected], marker=style, label=label)
        axes[0, column].set_title(family or "batch growth", fontsize=9)
        for ax, ylabel in zip(axes[:, column], ["explain ms / sample", "peak KB / sample"]):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_yscale("log")
            if column:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ 4. accuracy
ACCURACY_COLUMNS = ["dataset", "model", "kind", "params", "test accuracy (%)", "source"]


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _zoo_accuracy_rows() -> list[Row]:
    import zoo
    from zoo import shipped_dir

    rows = []
    for name in zoo.list_models(pretrained=True):
        config = zoo.read_config(shipped_dir(name))
        dataset = (config.get("data_info") or {}).get("name") or config.get("dataset")
        if isinstance(dataset, dict):
            dataset = dataset.get("name")
        metrics = config.get("metrics") or {}
        rows.append({"dataset": str(dataset), "model": name, "kind": "zoo (ours)", "params": config.get("num_params"),
                     "test accuracy": metrics.get("test_accuracy"),
                     "source": f"zoo/weights/{name}/config.json ({metrics.get('test_samples', '?')} test samples)"})
    return rows


def _baseline_rows(configs_dir: Path, runs_root: Path) -> list[Row]:
    from .config import load_config

    rows = []
    for path in sorted(configs_dir.glob("baseline_*.yaml")):
        cfg = load_config(path)
        run = Path(cfg.output_dir or f"runs/{cfg.name}")
        run = run if run.is_absolute() else runs_root / run
        summary_path = run / "summary.json"
        row: Row = {"dataset": cfg.data.name, "model": cfg.name, "kind": "plain baseline"}
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            row.update({"params": summary.get("trainable_params"), "test accuracy": (summary.get("test") or {}).get(
                "acc"), "source": f"{os.path.relpath(summary_path, runs_root)}"})
        else:
            row["source"] = f"not trained: shapnets train configs/{path.name}"
        rows.append(row)
    return rows


def accuracy(
    *,
    out: str | Path | None = None,
    quick: bool = False,
    configs_dir: str | Path | None = None,
    runs_root: str | Path | None = None,
    zoo_models: Sequence[str] | None = None,
    command: str | None = None,
    verbose: bool = False,
) -> list[Row]:
    """The accuracy table (docs/benchmarks.md); writes `accuracy.md/.json/.png`.

    Args:
        configs_dir: where `baseline_*.yaml` are (default the repository's `configs/`).
        runs_root: what the configs' relative `output_dir` is relative to (default the folder holding
            `configs_dir`: `shapnets train configs/x.yaml` run from the repository root writes `runs/x`).
        quick: accepted for symmetry with the other benchmarks (reading recorded numbers is fast already).
        zoo_models: only these zoo models' rows (default every shipped one); baselines and anchors stay.
    """
    del quick, verbose
    configs_dir = Path(configs_dir) if configs_dir is not None else _repo_root() / "configs"
    runs_root = Path(runs_root) if runs_root is not None else configs_dir.resolve().parent
    env = environment(command=command)
    rows = [r for r in _zoo_accuracy_rows() if not zoo_models or r["model"] in zoo_models]
    rows += [{**anchor, "kind": "published anchor", "params": None} for anchor in ANCHORS]
    rows += _baseline_rows(configs_dir, runs_root) if configs_dir.is_dir() else []
    order = {"zoo (ours)": 0, "plain baseline": 1, "published anchor": 2}
    rows.sort(key=lambda r: (r["dataset"], order[r["kind"]], r["model"]))
    for row in rows:  # shown with two decimals; the fraction stays in the JSON
        row["test accuracy (%)"] = None if row.get("test accuracy") is None else f"{100 * row['test accuracy']:.2f}"
    notes = [] if configs_dir.is_dir() else [f"No baseline configs: {configs_dir} does not exist.\n"]
    report = "\n".join([
        _header("Test accuracy", env),
        "Zoo models: as recorded at export (`config.json`); plain baselines: the same trainer, data split, optimizer "
        "and seed as the ShapNets (`configs/baseline_*.yaml`, about the same parameter count), from their run's "
        "`summary.json`; published anchors: the papers' numbers (other training recipes). Census = Adult.\n",
        *notes,
        markdown_table(rows, ACCURACY_COLUMNS),
    ])
    _write(out, "accuracy", report, {"environment": env, "rows": rows}, lambda path: _plot_accuracy(rows, path))
    return rows


def _plot_accuracy(rows: list[Row], path: Path) -> None:
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 4.2), squeeze=False)
    colors = {"zoo (ours)": "tab:blue", "plain baseline": "tab:gray", "published anchor": "tab:orange"}
    for ax, dataset in zip(axes[0], datasets):
        selected = [r for r in rows if r["dataset"] == dataset and r.get("test accuracy") is not None]
        ax.barh(range(len(selected)), [100 * r["test accuracy"] for r in selected],
                color=[colors[r["kind"]] for r in selected])
        ax.set_yticks(range(len(selected)))
        ax.set_yticklabels([r["model"] for r in selected], fontsize=7)
        low = min((100 * r["test accuracy"] for r in selected), default=0.0)
        ax.set_xlim(max(0.0, low - 5), 100)
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ entry point
def run(kinds: Sequence[str], *, out: str | Path | None = None, quick: bool = False, device: str = "cpu",
        data_root: str | None = None, samples: int | None = None, zoo_models: Sequence[str] | None = None,
        command: str | None = None, verbose: bool = True) -> dict[str, list[Row]]:
    """Run the named benchmarks (all when `kinds` is empty) and return their rows by kind.

    Args:
        kinds: names from `KINDS`.
        out: the output folder.
        quick: CI settings.
        device: the scaling benchmark's device.
        data_root: where the zoo models' data sets are.
        samples: samples per model (fidelity; speed's error columns; interactions).
        zoo_models: the zoo models of fidelity, speed and interactions (default: every shipped one; interactions:
            every shipped tabular ShapNet).
        command: the command line printed in the reports (default `sys.argv`).
        verbose: progress lines on stderr.

    Raises:
        ValueError: an unknown kind, naming the known ones.
    """
    kinds = list(kinds) or list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(KINDS)}")
    results: dict[str, list[Row]] = {}
    for number, kind in enumerate(kinds, start=1):
        start = time.perf_counter()
        _progress(f"benchmark {number}/{len(kinds)}: {kind}"
                  + (f" (models: {', '.join(zoo_models)})" if zoo_models else ""), verbose)
        if kind == "fidelity":
            results[kind] = fidelity(out=out, quick=quick, samples=samples, zoo_models=zoo_models,
                                     data_root=data_root, command=command, verbose=verbose)
        elif kind == "speed":
            cases = zoo_cases(zoo_models, samples or 8, data_root, tabular_only=False) if zoo_models else None
            results[kind] = speed(cases, out=out, quick=quick, error_samples=samples, data_root=data_root,
                                  command=command, verbose=verbose)
        elif kind == "scaling":
            results[kind] = scaling(out=out, quick=quick, device=device, command=command, verbose=verbose)
        elif kind == "accuracy":
            results[kind] = accuracy(out=out, zoo_models=zoo_models, command=command)
        else:
            from .interactions_bench import interactions  # it builds on this module's cases and reports

            results[kind] = interactions(out=out, quick=quick, samples=samples, zoo_models=zoo_models,
                                         data_root=data_root, command=command, verbose=verbose)
        _progress(f"{kind}: {len(results[kind])} rows in {time.perf_counter() - start:.0f} s"
                  + (f" -> {Path(out) / kind}.md" if out is not None else ""), verbose)
    return results
