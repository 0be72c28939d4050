"""Shallow ShapNet explain against captum KernelShap(1024): which inner makes it cheaper, and where time goes.

For a Shallow ShapNet on 12 features with all 66 pairs (and, with `--zoo`, the shipped
`shapnet_shallow_breast_cancer`: 30 features, 435 pairs, plus any `--zoo-run` checkpoints), several inners are timed
in one process, everything interleaved within every repeat (`training.bench.interleaved_medians`), so that load that
comes and goes on a shared machine hits all columns alike:

* `explain`: `model.explain(x)` under `torch.no_grad()` (the two-product path where every inner has one hidden
  layer: `ShallowShapNet.dense_limit`), at batch 64 and 256;
* `grouped`: the same model with that path switched off (`dense_limit = 0`): the grouped inference path,
  `ShapleyModuleBank.shapley_grouped`, which explain takes for other inners, and its per-bank forward (`forward`
  without autograd otherwise runs the two-product path's full coalitions);
* `previous`: the same Shapley values through the differentiable per-bank path (`ShapleyModuleBank.shapley` and a
  scatter), which `explain` used before the grouped path;
* `forward`: `model(x)` on the same batch (for explain / forward and its bound 1.2 x 2^k, k = 2 for pairs);
* `KernelShap`: captum KernelShap(1024 samples, all perturbations in one batch: its fastest setting) on one sample
  per repeat (a new sample each time), against the same network, so a cheaper inner makes KernelShap cheaper too;
  and the same with perturbations in batches of 256 (the setting of the speed goal's issue), interleaved with it.

Prints per inner: explain ms / sample, KernelShap ms / sample, the speed-up (median of KernelShap / median of
explain per sample), explain / forward, and one torch.profiler table of the default inner's explain.

With `--zoo`, the shipped weights' test accuracy on the trainer's breast-cancer split (the recipe's data seed and split)
is printed next to each model (`--zoo` needs scikit-learn for the data, nothing else).

Usage:
    python benchmarks/shallow_speed.py --threads 1               # 12 features, pairs (a few minutes on 2 cores)
    python benchmarks/shallow_speed.py --threads 1 --zoo         # also the shipped breast-cancer model
    python benchmarks/shallow_speed.py --zoo-run runs/x          # also a trained run folder (its best.pt)
    python benchmarks/shallow_speed.py --threads 1 --zoo --compiled   # and each model with compile_coalitions
    python benchmarks/shallow_speed.py --quick                   # smoke test
    python benchmarks/shallow_speed.py --zoo --baseline /tmp/base  # explain against an earlier checkout's code
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from shapnets import ShallowShapNet, compile_coalitions
from training.bench import interleaved_medians, limit_thread_pools, markdown_table

INNERS: dict[str, dict] = {
    "GELU, hidden 32 (default)": dict(hidden=(32,), act_layer=nn.GELU),
    "GELU tanh, hidden 32": dict(hidden=(32,), act_layer=lambda: nn.GELU(approximate="tanh")),
    "ReLU, hidden 32": dict(hidden=(32,), act_layer=nn.ReLU),
    "GELU, hidden 16": dict(hidden=(16,), act_layer=nn.GELU),
    "GELU, hidden 8": dict(hidden=(8,), act_layer=nn.GELU),
}


def previous_explain(net: ShallowShapNet, x: Tensor) -> Tensor:
    """The attributions through the per-bank differentiable path (`ShapleyModuleBank.shapley` + a scatter)."""
    x = x[..., None] if x.dim() == 2 else x
    delta = x - net.reference
    attributions = x.new_zeros(x.shape[0], net.in_features, net.num_classes)
    for k, bank in zip(net.arities, net.banks):
        index = torch.tensor([g for g in net.groups if len(g) == k], device=x.device)
        phi, _, _ = bank.shapley(delta[:, index], net.reference[index])
        attributions = attributions.index_add(1, index.flatten(), phi.flatten(1, 2))
    return attributions


def kernel_shap_call(net: nn.Module, inputs: Tensor, n_samples: int, per_eval: int | None = None
                     ) -> Callable[[], object]:
    """One captum KernelShap(n_samples) explanation (zero baseline, class 1) of the next row of `inputs` per call,
    `per_eval` perturbations per forward (default: all in one, KernelShap's fastest setting)."""
    from captum.attr import KernelShap

    explainer = KernelShap(net)
    baseline = torch.zeros(1, inputs.shape[1])
    rows = itertools.cycle(range(len(inputs)))

    def run() -> object:
        i = next(rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return explainer.attribute(inputs[i: i + 1], baselines=baseline, target=1, n_samples=n_samples,
                                       perturbations_per_eval=per_eval or n_samples)

    return run


def cpu_timed(fn: Callable[[], object], store: list[float]) -> Callable[[], object]:
    """`fn`, appending the CPU time of this process that each call took to `store`.

    On a machine with more runnable threads than cores, a call's wall time includes the time it waited for a core,
    which comes and goes with the other processes; its CPU time is the work it did (still inflated by caches and
    memory bandwidth shared with them). With `--threads 1` both sides of a ratio are single-threaded (`main` also
    caps the BLAS and OpenMP pools that KernelShap's regression uses through numpy/scipy, which otherwise take a
    second core and keep spinning into the next timed call), so CPU-time ratios compare work with work.
    """

    def run() -> object:
        start = time.process_time()
        result = fn()
        store.append(time.process_time() - start)
        return result

    return run


def measure(nets: dict[str, nn.Module], features: int, batches: list[int], repeats: int, kernel_inputs: int,
            n_samples: int, k: int = 2, calls: int = 20) -> list[dict[str, object]]:
    """Interleaved medians of forward, explain, the grouped and previous paths and KernelShap per inner (rows per
    batch).

    Forward, explain and the other paths are timed over `calls` back-to-back calls each (per-call time = total /
    calls); KernelShap over one sample.

    Every row has the speed-up in wall time and in CPU time (`cpu_timed`); the other columns are wall time.
    """
    torch.manual_seed(0)
    xs = {b: torch.randn(b, features) for b in batches}
    fns: dict[str, Callable[[], object]] = {}
    def repeated(fn: Callable[[], object]) -> Callable[[], object]:
        # Back-to-back calls, as when explaining a data set in batches: the first one absorbs the cold caches and
        # allocator state that the KernelShap call before it leaves (its own time is part of the total; a batch of
        # 64 right after a KernelShap call takes ~1.3x its time in a stream of calls, so 20 calls, not 5, keep that
        # artifact of the interleaving to a few percent).
        def run() -> object:
            for _ in range(calls):
                fn()
            return None

        return run

    for name, net in nets.items():
        grouped = copy.deepcopy(net)
        grouped.dense_limit = 0  # the grouped path, which explain takes where the two-product path does not apply
        for b, x in xs.items():
            fns[f"{name}|{b}|forward"] = repeated(lambda net=net, x=x: net(x))
            fns[f"{name}|{b}|explain"] = repeated(lambda net=net, x=x: net.explain(x))
            fns[f"{name}|{b}|grouped"] = repeated(lambda net=grouped, x=x: net.explain(x))
            fns[f"{name}|{b}|per-bank forward"] = repeated(lambda net=grouped, x=x: net(x))
            fns[f"{name}|{b}|previous"] = repeated(lambda net=net, x=x: previous_explain(net, x))
        fns[f"{name}|kernel"] = kernel_shap_call(net, torch.randn(kernel_inputs, features), n_samples)
        # The baseline: perturbations in batches of 256.
        fns[f"{name}|kernel256"] = kernel_shap_call(net, torch.randn(kernel_inputs, features), n_samples,
                                                    min(256, n_samples))
    cpu: dict[str, list[float]] = {key: [] for key in fns if "explain" in key or key.endswith("kernel")}
    fns = {key: cpu_timed(fn, cpu[key]) if key in cpu else fn for key, fn in fns.items()}
    with torch.no_grad():
        t = interleaved_medians(fns, repeats, warmup=1)
    cpu_median = {key: statistics.median(times[1:]) for key, times in cpu.items()}  # [0]: the warm-up
    rows = []
    for name in nets:
        kernel, kernel256 = 1e3 * t[f"{name}|kernel"], 1e3 * t[f"{name}|kernel256"]
        for b in batches:
            explain = 1e3 * t[f"{name}|{b}|explain"] / (b * calls)
            cpu_ratio = cpu_median[f"{name}|kernel"] / (cpu_median[f"{name}|{b}|explain"] / (b * calls))
            rows.append({"inner": name, "batch": b, "explain ms / sample": explain,
                         f"KernelShap({n_samples}) ms / sample": kernel, "speed-up": kernel / explain,
                         "speed-up (CPU time)": cpu_ratio,
                         "speed-up (KernelShap in batches of 256)": kernel256 / explain,
                         "grouped path / explain": t[f"{name}|{b}|grouped"] / t[f"{name}|{b}|explain"],
                         "previous path / explain": t[f"{name}|{b}|previous"] / t[f"{name}|{b}|explain"],
                         "explain / forward": t[f"{name}|{b}|explain"] / t[f"{name}|{b}|forward"],
                         "per-bank forward / forward": t[f"{name}|{b}|per-bank forward"] / t[f"{name}|{b}|forward"],
                         "bound 1.2 x 2^k": 1.2 * 2**k})
    return rows


def with_compiled(nets: dict[str, nn.Module], features: int, batches: list[int]) -> dict[str, nn.Module]:
    """`nets` and, after each, a copy using the compiled coalition kernels (compiled here, before any timing).

    The copy's two-product path is switched off (`dense_limit = 0`): it takes precedence over the compiled kernel.
    """
    out: dict[str, nn.Module] = {}
    for name, net in nets.items():
        twin = compile_coalitions(copy.deepcopy(net))
        twin.dense_limit = 0
        start = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                twin.explain(torch.randn(b, features))
        print(f"compiled {name}: {time.perf_counter() - start:.1f} s (first calls; cached on disk afterwards)",
              flush=True)
        out[name], out[f"{name}, compiled"] = net, twin
    return out


def profile_table(net: nn.Module, x: Tensor, rows: int = 12, calls: int = 10) -> str:
    """torch.profiler's table (self CPU time) of `calls` no-grad explains after one warm-up."""
    from torch.profiler import profile

    with torch.no_grad():
        net.explain(x)
        with profile() as prof:
            for _ in range(calls):
                net.explain(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def load_baseline(checkout: str) -> ModuleType:
    """The `shapnets` package of another checkout (e.g. `git worktree add /tmp/base <commit>`), imported under the
    name `shapnets_baseline` next to this one (its imports are relative, so it runs from its own files)."""
    init = Path(checkout) / "shapnets" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline {checkout}: no shapnets/__init__.py there")
    spec = importlib.util.spec_from_file_location("shapnets_baseline", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["shapnets_baseline"] = module
    spec.loader.exec_module(module)
    return module


def against_baseline(nets: dict[str, nn.Module], baseline: ModuleType, features: int, batches: list[int],
                     repeats: int, calls: int = 20) -> list[dict[str, object]]:
    """Explain time of each net against the same weights in the baseline package, interleaved in one process."""
    rows = []
    with torch.no_grad():
        for name, net in nets.items():
            bank = net.banks[0]
            old = baseline.ShallowShapNet(net.in_features, net.num_classes, net.groups,
                                          hidden=[w.shape[-1] for w in bank.weights[:-1]],
                                          reference=net.reference.clone()).eval()
            for old_bank, new_bank in zip(old.banks, net.banks):
                old_bank.act = copy.deepcopy(new_bank.act)  # the same activation, settings included
            old.load_state_dict(net.state_dict())
            for b in [1, *batches]:
                x = torch.randn(b, features)
                want, got = old.explain(x), net.explain(x)
                torch.testing.assert_close(got.attributions, want.attributions, rtol=1e-4, atol=1e-5)
                fns = {key: (lambda m=m, x=x: [m.explain(x) for _ in range(calls)]) for key, m in
                       (("baseline", old), ("this", net))}
                t = interleaved_medians(fns, repeats, warmup=1)
                rows.append({"model": name, "batch": b, "baseline ms / call": 1e3 * t["baseline"] / calls,
                             "this ms / call": 1e3 * t["this"] / calls, "baseline / this": t["baseline"] / t["this"]})
    return rows


def zoo_variants(runs: list[str]) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """The shipped breast-cancer model and the models of `runs` (run folders); their test accuracy."""
    import zoo
    from training.sources import load_source

    nets: dict[str, nn.Module] = {"shipped": zoo.create_model("shapnet_shallow_breast_cancer", pretrained=True)}
    for run in runs:  # a training run folder, or a zoo weights folder (config.json + model.safetensors)
        is_weights = (Path(run) / "config.json").is_file()
        model = zoo.load_pretrained(run) if is_weights else load_source(run, torch.device("cpu")).model
        bank = model.banks[0]
        nets[f"{Path(run).name} ({type(bank.act).__name__}, hidden {bank.weights[0].shape[-1]})"] = model
    nets = {name: net.eval() for name, net in nets.items()}
    return nets, accuracies(nets)


def accuracies(nets: dict[str, nn.Module]) -> dict[str, float]:
    """Test accuracy on the trainer's breast-cancer test split, preprocessed as in training: the data seed and
    validation share of configs/shallow_breast_cancer.yaml (the standardisation is fitted on the train part, so a
    different validation share shifts every test input; as on the shipped card)."""
    import yaml

    from training.data.registry import load_dataset

    recipe = Path(__file__).resolve().parents[1] / "configs" / "shallow_breast_cancer.yaml"
    data = yaml.safe_load(recipe.read_text())["data"]
    test = load_dataset("breast_cancer", seed=data.get("seed", 0), val_fraction=data.get("val_fraction", 0.1)).test
    x = torch.stack([test[i][0] for i in range(len(test))]).float()
    y = torch.stack([torch.as_tensor(test[i][1]) for i in range(len(test))])
    with torch.no_grad():
        return {n: (net(x).argmax(1) == y).float().mean().item() for n, net in nets.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", action="store_true", help="also the shipped shapnet_shallow_breast_cancer")
    parser.add_argument("--zoo-run", action="append", default=[],
                        help="also this breast-cancer run folder or zoo weights folder (repeatable)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the 12-feature inners")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compiled", action="store_true",
                        help="also each model with compile_coalitions (the fused two-layer kernel); compiles first")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="only time explain against the shapnets package of this checkout (same weights)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calls", type=int, default=20, help="back-to-back explain calls per timing (default 20)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    limit_thread_pools(args.threads)
    repeats, kernel_inputs, n_samples = (2, 2, 256) if args.quick else (args.repeats, 16, 1024)
    batches = [64] if args.quick else [64, 256]
    inners = dict(list(INNERS.items())[:2]) if args.quick else INNERS
    if args.baseline:
        baseline = load_baseline(args.baseline)
        torch.manual_seed(0)
        nets = {name: ShallowShapNet(12, 2, "pairs", **kw).eval() for name, kw in list(inners.items())[:1]}
        rows = against_baseline(nets, baseline, 12, batches, max(repeats, 21), args.calls)
        if args.zoo:
            rows += against_baseline(zoo_variants([])[0], baseline, 30, batches, max(repeats, 21), args.calls)
        print(f"explain against {args.baseline}, {args.threads} thread(s), interleaved\n")
        print(markdown_table(rows, list(rows[0])))
        return
    if not args.no_synthetic:
        torch.manual_seed(0)
        nets = {name: ShallowShapNet(12, 2, "pairs", **kw).eval() for name, kw in inners.items()}
        if args.compiled:
            nets = with_compiled(nets, 12, batches)
        rows = measure(nets, 12, batches, repeats, kernel_inputs, n_samples, calls=args.calls)
        print(f"Shallow ShapNet, 12 features, all 66 pairs, {args.threads} thread(s), {repeats} repeats\n")
        print(markdown_table(rows, list(rows[0])))
        print("\nProfile of the default inner's explain (batch 256, 10 calls):\n")
        print(profile_table(nets[next(iter(nets))], torch.randn(256, 12)))
    if args.zoo or args.zoo_run:
        zoo_nets, acc = zoo_variants(args.zoo_run)
        if args.compiled:
            zoo_nets = with_compiled(zoo_nets, 30, batches)
            acc = {name: acc[name.removesuffix(", compiled")] for name in zoo_nets}
        rows = measure(zoo_nets, 30, batches, repeats, kernel_inputs, n_samples, calls=args.calls)
        for row in rows:
            row["test accuracy (this split)"] = acc[row["inner"]]
        print(f"\nshapnet_shallow_breast_cancer, 30 features, 435 pairs, {args.threads} thread(s), {repeats} repeats\n")
        print(markdown_table(rows, list(rows[0])))
        for name, net in zoo_nets.items():
            print(f"\nProfile of {name}'s explain (batch 256, 10 calls):\n")
            print(profile_table(net, torch.randn(256, 30)))


if __name__ == "__main__":
    main()
