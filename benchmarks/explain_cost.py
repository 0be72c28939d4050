"""What does a ShapNet explanation cost, and how does it compare with Kernel SHAP?

Two Markdown tables, measured in one process on the CPU (median of repeats after a warm-up):

1. Explanation cost over a plain forward pass.
   * Shallow ShapNets (singles, all pairs, disjoint groups of 3..6 features): `forward` evaluates every
     module's inner network once, `explain` evaluates it on all 2^k coalitions, so the inherent
     factor is 2^k (the first-layer fast path makes the first linear layer cost k projections, not 2^k).
   * Deep ShapNets (butterfly, D = 8..64): `forward` already IS the explanation (the logits are the sum
     of the last Shapley representation), so explain/forward is ~1. The inherent cost is 4 coalitions
     per pairwise module, measured here against the same modules each evaluated once.
2. Shallow ShapNet explanation vs captum's Kernel SHAP (1024 samples, zero baseline, perturbations
   batched) on the same model with 12 features, both scored against `exact_shapley` in float64:
   relative L2 error and time per sample.

Usage:
    python benchmarks/explain_cost.py            # < 2 minutes on 2 CPU cores
    python benchmarks/explain_cost.py --quick    # a few seconds, for smoke tests
    python benchmarks/explain_cost.py --out DIR  # also write DIR/explain_cost.{md,json}

Writes nothing unless `--out` is given.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from shapnets import DeepShapNet, ShallowShapNet, butterfly_pairs, exact_shapley
from training.bench import interleaved_medians, limit_thread_pools, markdown_table
from training.bench_report import write_report

Row = dict[str, object]


def chunk_groups(in_features: int, size: int) -> list[tuple[int, ...]]:
    """Disjoint groups of consecutive features (the last one shorter if `size` does not divide D)."""
    return [tuple(range(a, min(a + size, in_features))) for a in range(0, in_features, size)]


def relative_l2(estimate: Tensor, exact: Tensor) -> float:
    return ((estimate.double() - exact).norm() / exact.norm()).item()


# ---------------------------------------------------------------------------------------------
# 1. Explanation cost over forward
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def shallow_cost(args: argparse.Namespace) -> list[Row]:
    D = args.features
    specs: list[tuple[str, object]] = [("singles", "singles"), ("pairs", "pairs")]
    specs += [(f"groups of {k}", chunk_groups(D, k)) for k in range(3, 7)]
    x = torch.randn(args.batch, D)
    rows = []
    for label, groups in specs:
        net = ShallowShapNet(D, args.classes, groups, hidden=(args.hidden,)).eval()
        timed = {"forward": lambda net=net: net(x), "explain": lambda net=net: net.explain(x)}
        t = interleaved_medians(timed, args.repeats, warmup=2)
        forward, explain = t["forward"], t["explain"]
        arities = [len(g) for g in net.groups]
        rows.append(
            {
                "model": f"Shallow, {label}",
                "D": D,
                "modules": len(arities),
                "k": "/".join(str(k) for k in sorted(set(arities))),
                "forward ms": forward * 1e3,
                "explain ms": explain * 1e3,
                "explain / forward": explain / forward,
                # Inner evaluations of explain over those of forward: sum 2^k over modules / modules.
                "inherent factor": sum(2**k for k in arities) / len(arities),
            }
        )
    return rows


@torch.no_grad()
def deep_cost(args: argparse.Namespace) -> list[Row]:
    rows = []
    for D in args.deep_features:
        net = DeepShapNet(D, args.classes, channels=args.channels, hidden=(args.hidden,)).eval()
        x = torch.randn(args.batch, D)

        # The same pairwise modules, each evaluated once per layer (no coalitions): what a plain
        # butterfly network of these MLPs would cost.
        pairs = [torch.tensor(butterfly_pairs(net.num_padded, s)) for s in range(net.num_stages)]
        inputs = [torch.randn(args.batch, net.num_padded, c) for c in net.stage_channels[:-1]]

        def once(net=net, pairs=pairs, inputs=inputs) -> None:
            for stage, index, z in zip(net.stages, pairs, inputs):
                stage(z[:, index])

        t = interleaved_medians(
            {"forward": lambda net=net, x=x: net(x), "explain": lambda net=net, x=x: net.explain(x), "once": once},
            args.repeats,
            warmup=2,
        )
        forward, explain, plain = t["forward"], t["explain"], t["once"]
        rows.append(
            {
                "model": "Deep, butterfly",
                "D": D,
                "modules": net.num_stages * net.num_padded // 2,
                "k": 2,
                "forward ms": forward * 1e3,
                "explain ms": explain * 1e3,
                "explain / forward": explain / forward,
                "modules once ms": plain * 1e3,
                "forward / modules once": forward / plain,
                "inherent factor": 4,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# 2. Shallow ShapNet vs Kernel SHAP
# ---------------------------------------------------------------------------------------------
def kernel_shap_comparison(args: argparse.Namespace) -> list[Row]:
    from captum.attr import KernelShap  # optional dependency of the benchmark only

    D, target = 12, 1
    rows = []
    for label, groups in [("groups of 3", chunk_groups(D, 3)), ("pairs", "pairs")]:
        torch.manual_seed(0)
        net = ShallowShapNet(D, 2, groups, hidden=(args.hidden,)).eval()  # reference 0
        x = torch.randn(args.kernel_samples, D)
        net64 = ShallowShapNet(D, 2, groups, hidden=(args.hidden,)).double().eval()
        net64.load_state_dict(net.state_dict())
        exact = exact_shapley(net64, x.double()).attributions[..., target]  # (N, D), 2^12 coalitions

        with torch.no_grad():
            ours = net.explain(x).attributions[..., target]
            # Throughput on a full batch (the Kernel SHAP inputs are too few to fill one).
            many = torch.randn(args.batch, D)
            timed = {
                "batch": lambda net=net, many=many: net.explain(many),
                "one": lambda net=net, x=x: net.explain(x[:1]),
            }
            t = interleaved_medians(timed, args.repeats, warmup=2)
            batched, single = t["batch"] / args.batch, t["one"]

        explainer = KernelShap(net)
        baseline = torch.zeros(1, D)  # the same game as the ShapNet's zero reference

        def kernel_shap(sample: Tensor, explainer=explainer, baseline=baseline) -> Tensor:
            return explainer.attribute(
                sample,
                baselines=baseline,
                target=target,
                n_samples=args.n_samples,
                perturbations_per_eval=args.n_samples,
            )

        torch.manual_seed(0)
        kernel_shap(x[:1])  # warm-up
        start = time.perf_counter()
        theirs = torch.cat([kernel_shap(x[i : i + 1]) for i in range(len(x))])
        kernel_time = (time.perf_counter() - start) / len(x)

        model = f"Shallow ({label}, {len(net.groups)} modules)"
        rows.append(
            {
                "model": model,
                "method": f"ShapNet explain (batch of {args.batch})",
                "rel. L2 error": relative_l2(ours, exact),
                "ms / sample": batched * 1e3,
                "speed-up vs Kernel SHAP": kernel_time / batched,
            }
        )
        rows.append(
            {
                "model": model,
                "method": "ShapNet explain (batch of 1)",
                "rel. L2 error": relative_l2(ours, exact),
                "ms / sample": single * 1e3,
                "speed-up vs Kernel SHAP": kernel_time / single,
            }
        )
        rows.append(
            {
                "model": model,
                "method": f"captum KernelShap ({args.n_samples} samples)",
                "rel. L2 error": relative_l2(theirs, exact),
                "ms / sample": kernel_time * 1e3,
                "speed-up vs Kernel SHAP": 1.0,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples (a few seconds)")
    parser.add_argument("--out", type=Path, default=None, help="also write explain_cost.md/.json here")
    parser.add_argument("--features", type=int, default=24, help="D of the Shallow nets")
    parser.add_argument("--deep-features", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32, help="hidden width of every inner MLP")
    parser.add_argument("--channels", type=int, default=16, help="Deep ShapNet hidden channels")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--kernel-samples", type=int, default=16, help="inputs explained by Kernel SHAP")
    parser.add_argument("--n-samples", type=int, default=1024, help="Kernel SHAP coalitions per input")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1: stable on a shared machine; 0: torch default)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.kernel_samples, args.batch = 3, 4, 64
        args.deep_features = [8, 32]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        # KernelShap's regression runs in scikit-learn, whose BLAS/OpenMP pools are not torch's: capped too, or they
        # spin on the other core into the timed explains (docs/performance.md, section 2).
        limit_thread_pools(args.threads)
    torch.manual_seed(0)
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, float32, batch {args.batch}, "
        f"inner MLP hidden width {args.hidden}, median of {args.repeats}"
    )
    cost = shallow_cost(args) + deep_cost(args)
    cost_columns = ["model", "D", "modules", "k", "forward ms", "explain ms", "explain / forward", "inherent factor"]
    deep_columns = ["model", "D", "modules", "modules once ms", "forward ms", "forward / modules once"]
    deep_columns.append("inherent factor")
    comparison = kernel_shap_comparison(args)
    comparison_columns = ["model", "method", "rel. L2 error", "ms / sample", "speed-up vs Kernel SHAP"]

    sections = [
        "## Explanation cost over a forward pass\n",
        header + "\n",
        markdown_table(cost, cost_columns),
        "\nInherent factor: inner-network evaluations of `explain` per evaluation of `forward` (2^k per "
        "module). For Deep ShapNets `forward` already computes the explanation (explain / forward ~ 1); "
        "their inherent cost is 4 coalitions per pairwise module, against the same modules evaluated once:\n",
        markdown_table([r for r in cost if r["model"].startswith("Deep")], deep_columns),
        "\n## Shallow ShapNet vs Kernel SHAP (12 features, zero reference / baseline)\n",
        f"Errors against `exact_shapley` in float64 (2^12 coalitions), class 1 of 2, "
        f"{args.kernel_samples} inputs; Kernel SHAP one input at a time with all its coalitions in one "
        "batch.\n",
        markdown_table(comparison, comparison_columns),
    ]
    report = "\n".join(sections)
    print(report)
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "cost": cost, "kernel_shap": comparison}
    write_report(args.out, "explain_cost", report, results, plot=None)


if __name__ == "__main__":
    main()
