"""Shallow ShapNet explain against captum KernelShap(1024): which inner makes it cheaper, and where time goes.

For a Shallow ShapNet on 12 features with all 66 pairs (and, with `--zoo`, the shipped
`shapnet_shallow_breast_cancer`: 30 features, 435 pairs), several inners are timed in one process: forward and
explain at batch 64 and 256 (interleaved, median of repeats) and captum's KernelShap(1024 samples, all perturbations
in one batch) on a few samples one at a time, against the same network (a cheaper inner makes KernelShap cheaper
too). Prints per inner: explain ms / sample, KernelShap ms / sample, the speed-up, explain / forward against the
bound 1.2 x 2^k (k = 2 for pairs), and one torch.profiler table of the default inner's explain.

The zoo variants keep the shipped weights and swap the activation (exact GELU -> tanh-approximate GELU): a
different function, so their test accuracy is printed next to the shipped one (`--zoo` needs SHAPNETS_DATA).

Usage:
    python benchmarks/shallow_speed.py                 # 12 features, pairs (a few minutes on 2 cores)
    python benchmarks/shallow_speed.py --zoo           # also the shipped breast-cancer model
    python benchmarks/shallow_speed.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from shapnets import ShallowShapNet
from training.bench import interleaved_medians, markdown_table

INNERS: dict[str, dict] = {
    "GELU, hidden 32 (default)": dict(hidden=(32,), act_layer=nn.GELU),
    "GELU tanh, hidden 32": dict(hidden=(32,), act_layer=lambda: nn.GELU(approximate="tanh")),
    "ReLU, hidden 32": dict(hidden=(32,), act_layer=nn.ReLU),
    "GELU, hidden 16": dict(hidden=(16,), act_layer=nn.GELU),
    "GELU tanh, hidden 16": dict(hidden=(16,), act_layer=lambda: nn.GELU(approximate="tanh")),
    "GELU, hidden 8": dict(hidden=(8,), act_layer=nn.GELU),
}


def kernel_shap_ms(net: nn.Module, x: Tensor, n_samples: int) -> float:
    """ms per sample of captum KernelShap(n_samples) on `net` (zero baseline, class 1), one sample at a time."""
    from captum.attr import KernelShap

    explainer = KernelShap(net)
    baseline = torch.zeros(1, x.shape[1])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        run = lambda s: explainer.attribute(s, baselines=baseline, target=1, n_samples=n_samples,  # noqa: E731
                                            perturbations_per_eval=n_samples)
        run(x[:1])
        start = time.perf_counter()
        for i in range(len(x)):
            run(x[i: i + 1])
    return 1e3 * (time.perf_counter() - start) / len(x)


def measure(nets: dict[str, nn.Module], features: int, batches: list[int], repeats: int, kernel_inputs: int,
            n_samples: int, k: int = 2) -> list[dict[str, object]]:
    torch.manual_seed(0)
    xs = {b: torch.randn(b, features) for b in batches}
    fns: dict[str, Callable[[], object]] = {}
    for name, net in nets.items():
        for b, x in xs.items():
            fns[f"{name}|{b}|forward"] = lambda net=net, x=x: net(x)
            fns[f"{name}|{b}|explain"] = lambda net=net, x=x: net.explain(x)
    with torch.no_grad():
        t = interleaved_medians(fns, repeats, warmup=1)
    rows = []
    for name, net in nets.items():
        kernel = kernel_shap_ms(net, torch.randn(kernel_inputs, features), n_samples)
        for b in batches:
            explain = 1e3 * t[f"{name}|{b}|explain"] / b
            ratio = t[f"{name}|{b}|explain"] / t[f"{name}|{b}|forward"]
            rows.append({"inner": name, "batch": b, "explain ms / sample": explain,
                         f"KernelShap({n_samples}) ms / sample": kernel, "speed-up": kernel / explain,
                         "explain / forward": ratio, "bound 1.2 x 2^k": 1.2 * 2**k})
    return rows


def profile_table(net: nn.Module, x: Tensor, rows: int = 10) -> str:
    from torch.profiler import profile

    with torch.no_grad():
        net.explain(x)
        with profile() as prof:
            for _ in range(3):
                net.explain(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def zoo_variants() -> tuple[dict[str, nn.Module], dict[str, float]]:
    """The shipped breast-cancer model, and the same weights with tanh-approximate GELU; their test accuracy."""
    import zoo

    shipped = zoo.create_model("shapnet_shallow_breast_cancer", pretrained=True).eval()
    tanh = copy.deepcopy(shipped)
    for bank in tanh.banks:
        bank.act = nn.GELU(approximate="tanh")
    nets = {"shipped (exact GELU)": shipped, "shipped weights, tanh GELU": tanh}
    return nets, accuracies(nets)


def accuracies(nets: dict[str, nn.Module]) -> dict[str, float]:
    """Test accuracy on the trainer's breast-cancer test split (data seed 0, as in the shipped card)."""
    from training.data.registry import load_dataset

    test = load_dataset("breast_cancer", seed=0).test
    x = torch.stack([test[i][0] for i in range(len(test))]).float()
    y = torch.stack([torch.as_tensor(test[i][1]) for i in range(len(test))])
    with torch.no_grad():
        return {n: (net(x).argmax(1) == y).float().mean().item() for n, net in nets.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", action="store_true", help="also the shipped shapnet_shallow_breast_cancer")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats, kernel_inputs, n_samples = (2, 2, 256) if args.quick else (5, 4, 1024)
    batches = [64] if args.quick else [64, 256]
    inners = dict(list(INNERS.items())[:2]) if args.quick else INNERS
    torch.manual_seed(0)
    nets = {name: ShallowShapNet(12, 2, "pairs", **kw).eval() for name, kw in inners.items()}
    rows = measure(nets, 12, batches, repeats, kernel_inputs, n_samples)
    columns = list(rows[0])
    print(f"Shallow ShapNet, 12 features, all 66 pairs, {args.threads} thread(s)\n")
    print(markdown_table(rows, columns))
    print("\nProfile of the default inner's explain (batch 256, 3 calls):\n")
    print(profile_table(nets[next(iter(nets))], torch.randn(256, 12)))
    if args.zoo:
        zoo_nets, acc = zoo_variants()
        rows = measure(zoo_nets, 30, batches, repeats, kernel_inputs, n_samples)
        for row in rows:
            row["test accuracy (this split)"] = acc[row["inner"]]
        print("\nshapnet_shallow_breast_cancer, 30 features, 435 pairs\n")
        print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
