"""Conv ShapNet explain time: shapnets against the original ShapNets code, back to back.

The original is `DeepConvShapNet` of RuiWang1998/ShapleyExplanationNetworks @cab6644 (Wang, Wang, Inouye, ICLR
2021). It needs named tensors, i.e. torch <= 2.12 (2.5.1 is known to work), so it runs in its own virtual
environment, in a subprocess. The two implementations are timed in alternating rounds (one subprocess per round and
implementation, each: one warm-up, then the median of `--repeats` explains of the same batch), and the ratio is
taken per round, so that load from other processes on a shared machine hits both sides alike.

Setting (the original's README architecture, MNIST-sized): channels 1-16-32-32-32-10, 2x2 kernels, dilations
1, 2, 4, 8, 16, no residual, explaining random 28x28 images. Two shapnets models are timed:

* `matched`: `ConvShapNet(..., hidden=(), act_layer=nn.LeakyReLU, residual=False, output_act=True)`: inner =
  `Linear(4 C_in, C_out) + LeakyReLU`, as in the original, and the same 11,706 parameters.
* `compiled`: `matched` with `shapnets.compile_coalitions` (`--compiled`; the first run compiles for minutes on a
  small CPU, later runs read inductor's on-disk cache).
* `linear`: the same without `output_act` (what `hidden=()` means in shapnets: a single Linear, no bias, no
  activation, 11,584 parameters). Its inner is linear, so its exact Shapley values are `W_j (x_j - r_j)`, with
  no coalition to evaluate: it is NOT the original's function, and is listed only because earlier comparisons used it.

Usage:
    python benchmarks/vs_original.py --setup     # once: create the venv (pip install torch==2.5.1 numpy scipy)
                                                 # and a checkout of the original at cab6644 (git clone)
    python benchmarks/vs_original.py             # 64 images, 2 threads, 5 rounds
    python benchmarks/vs_original.py --batch 256 --threads 1 --rounds 3

Not run in CI (it needs the second environment and a network connection for `--setup`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ORIGINAL_REPO = "https://github.com/RuiWang1998/ShapleyExplanationNetworks"
ORIGINAL_COMMIT = "cab6644"
ROOT = Path(__file__).resolve().parents[1]
CHANNELS = [1, 16, 32, 32, 32, 10]
DILATIONS = [1, 2, 4, 8, 16]


# ------------------------------------------------------------------------------------------------ workers
def _time(fn, x, repeats: int) -> list[float]:
    import torch

    with torch.no_grad():
        fn(x[:2])
        fn(x)  # warm-up at full size (allocator, workspaces)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return times


def original_worker(args: argparse.Namespace) -> dict:
    """Time the original DeepConvShapNet (runs under the original's venv: torch 2.5.1, named tensors)."""
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(args.checkout))
    import numpy as np
    import torch
    from ShapNet import DeepConvShapNet, ShallowConvShapleyNetwork, ShapleyModule
    from ShapNet.utils import ModuleDimensions, process_list_sizes
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    layers = len(CHANNELS) - 1
    ks, dil = process_list_sizes([2] * layers), process_list_sizes(DILATIONS)
    pad, st = process_list_sizes([0] * layers), process_list_sizes([1] * layers)
    net = DeepConvShapNet(
        list_shapnets=[ShallowConvShapleyNetwork(
            shapley_module=ShapleyModule(
                inner_function=nn.Sequential(nn.Linear(int(np.prod(ks[i])) * CHANNELS[i], CHANNELS[i + 1]),
                                             nn.LeakyReLU()),
                dimensions=ModuleDimensions(features=int(np.prod(ks[i])), in_channel=CHANNELS[i],
                                            out_channel=CHANNELS[i + 1])),
            reference_values=None, kernel_size=ks[i], dilation=dil[i], padding=pad[i], stride=st[i])
            for i in range(layers)],
        reference_values=None, residual=False, named_output=False, pruning=[0.0] * layers)
    x = torch.randn(args.batch, 1, 28, 28)
    times = _time(lambda z: net(z, explain=True), x, args.repeats)
    return {"original": times, "params": {"original": sum(p.numel() for p in net.parameters())},
            "torch": torch.__version__}


def shapnets_worker(args: argparse.Namespace) -> dict:
    """Time the shapnets ConvShapNet in the `matched` and `linear` settings (this repository's environment)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from torch import nn

    from shapnets import ConvShapNet, compile_coalitions

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    common = dict(channels=tuple(CHANNELS[1:-1]), kernel_size=2, dilations=tuple(DILATIONS), hidden=(),
                  act_layer=nn.LeakyReLU, residual=False)
    models = {"matched": ConvShapNet(1, 10, output_act=True, **common).eval(),
              "linear": ConvShapNet(1, 10, **common).eval()}
    if args.compiled:
        # The same weights through the torch.compile'd coalition kernel (compiled in the warm-up, cached on disk).
        models["compiled"] = compile_coalitions(ConvShapNet(1, 10, output_act=True, **common).eval())
        models["compiled"].load_state_dict(models["matched"].state_dict())
    x = torch.randn(args.batch, 1, 28, 28)
    out = {name: _time(model.explain, x, args.repeats) for name, model in models.items()}
    out["params"] = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    out["torch"] = torch.__version__
    return out


# ------------------------------------------------------------------------------------------------ driver
def setup(args: argparse.Namespace) -> None:
    """Create the original's venv and checkout where missing (needs network access to PyPI and GitHub)."""
    python = args.venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(args.venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "torch==2.5.1", "numpy", "scipy"], check=True)
    if not (args.checkout / "ShapNet").is_dir():
        subprocess.run(["git", "clone", "--quiet", ORIGINAL_REPO, str(args.checkout)], check=True)
        subprocess.run(["git", "-C", str(args.checkout), "checkout", "--quiet", ORIGINAL_COMMIT], check=True)


def _run_worker(python: str, kind: str, args: argparse.Namespace) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--checkout", str(args.checkout),
           "--batch", str(args.batch), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    cmd += ["--compiled"] if args.compiled else []
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin",
           "HOME": str(Path.home())}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create the venv and the checkout if missing")
    parser.add_argument("--venv", type=Path, default=Path("/work/venv-orig"), help="the original's venv")
    parser.add_argument("--checkout", type=Path, default=ROOT / "bench_out" / "orig_shapnets",
                        help="a checkout of the original repository at cab6644")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (one subprocess per side each)")
    parser.add_argument("--repeats", type=int, default=3, help="timed explains per subprocess (median)")
    parser.add_argument("--compiled", action="store_true", help="also time the torch.compile'd coalition kernel")
    parser.add_argument("--worker", choices=("original", "shapnets"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = original_worker(args) if args.worker == "original" else shapnets_worker(args)
        print(json.dumps(result))
        return
    if args.setup:
        setup(args)
    python = args.venv / "bin" / "python"
    if not python.exists() or not (args.checkout / "ShapNet").is_dir():
        raise SystemExit(f"missing {python} or {args.checkout}/ShapNet: run with --setup first (see --help)")
    rounds = []
    for r in range(args.rounds):
        # Alternate which side goes first, so that drifting load does not favour one.
        order = ["original", "shapnets"] if r % 2 == 0 else ["shapnets", "original"]
        result: dict = {}
        for kind in order:
            got = _run_worker(str(python) if kind == "original" else sys.executable, kind, args)
            result.update({k: v for k, v in got.items() if k not in ("params", "torch")})
            result.setdefault("params", {}).update(got["params"])
            result.setdefault("torch", {})[kind] = got["torch"]
        rounds.append(result)
        med = {k: statistics.median(v) * 1e3 for k, v in result.items() if k not in ("params", "torch")}
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} ms ({med['original'] / v:.1f}x)" for k, v in med.items()),
              flush=True)
    params, versions = rounds[0]["params"], rounds[0]["torch"]
    print(f"\nbatch {args.batch} random 28x28 images, {args.threads} thread(s), {args.rounds} rounds x "
          f"{args.repeats} repeats; torch {versions['original']} (original) / {versions['shapnets']} (shapnets)")
    print("| model | params | explain ms (median of rounds) | speed-up over the original "
          "(median of per-round ratios) |")
    print("|---|---|---|---|")
    for name in [k for k in ("original", "matched", "compiled", "linear") if k in rounds[0]]:
        per_round = [statistics.median(r[name]) for r in rounds]
        ratios = [statistics.median(r["original"]) / statistics.median(r[name]) for r in rounds]
        print(f"| {name} | {params[name]:,} | {statistics.median(per_round) * 1e3:.1f} | "
              f"{statistics.median(ratios):.1f}x (min {min(ratios):.1f}, max {max(ratios):.1f}) |")


if __name__ == "__main__":
    main()
