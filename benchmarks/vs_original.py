"""Conv ShapNet explain time: shapnets against the original ShapNets code, back to back.

The original is `DeepConvShapNet` of RuiWang1998/ShapleyExplanationNetworks @cab6644 (Wang, Wang, Inouye, ICLR
2021). It needs named tensors, i.e. torch <= 2.12 (2.5.1 is known to work), so it runs in its own virtual
environment, in a subprocess; shapnets runs in another. Both stay loaded (built and warmed up once), and every repeat
times one explain of the same batch on every model in turn (the order rotating): the ratio is taken per repeat and
its median reported, so that load from other processes on a shared machine hits both sides alike.

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
    python benchmarks/vs_original.py             # 64 images, 2 threads, 7 interleaved repeats
    python benchmarks/vs_original.py --batch 256 --threads 1 --repeats 5 --compiled

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
def original_models(args: argparse.Namespace) -> tuple[dict, object, dict]:
    """The original DeepConvShapNet (runs under the original's venv: torch 2.5.1, named tensors)."""
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
    return ({"original": lambda z: net(z, explain=True)}, x,
            {"params": {"original": sum(p.numel() for p in net.parameters())}, "torch": torch.__version__})


def shapnets_models(args: argparse.Namespace) -> tuple[dict, object, dict]:
    """The shapnets ConvShapNets: `matched`, `linear` and (`--compiled`) `compiled` (this repository's environment)."""
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
    info = {"params": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
            "torch": torch.__version__}
    return {name: model.explain for name, model in models.items()}, x, info


def serve(args: argparse.Namespace) -> None:
    """Worker loop: build the models, warm them up, then time one explain per `run NAME` line read from stdin."""
    import torch

    fns, x, info = original_models(args) if args.worker == "original" else shapnets_models(args)
    with torch.no_grad():
        for fn in fns.values():  # warm-up: allocator, workspaces, compilation
            fn(x[:2])
            fn(x)
    print(json.dumps({**info, "names": list(fns)}), flush=True)
    for line in sys.stdin:
        name = line.split()[1]
        with torch.no_grad():
            start = time.perf_counter()
            fns[name](x)
            elapsed = time.perf_counter() - start
        print(json.dumps({"seconds": elapsed}), flush=True)


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


class _Worker:
    """One worker subprocess (`serve`): its models are built once and timed on request, one explain at a time."""

    def __init__(self, python: str, kind: str, args: argparse.Namespace) -> None:
        cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--checkout", str(args.checkout),
               "--batch", str(args.batch), "--threads", str(args.threads)]
        cmd += ["--compiled"] if args.compiled else []
        env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin",
               "HOME": str(Path.home())}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.proc.args[3]} exited with code {self.proc.wait()}")
        return json.loads(line)

    def time(self, name: str) -> float:
        self.proc.stdin.write(f"run {name}\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create the venv and the checkout if missing")
    parser.add_argument("--venv", type=Path, default=Path("/work/venv-orig"), help="the original's venv")
    parser.add_argument("--checkout", type=Path, default=ROOT / "bench_out" / "orig_shapnets",
                        help="a checkout of the original repository at cab6644")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed explains of every model")
    parser.add_argument("--compiled", action="store_true", help="also time the torch.compile'd coalition kernel")
    parser.add_argument("--worker", choices=("original", "shapnets"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve(args)
        return
    if args.setup:
        setup(args)
    python = args.venv / "bin" / "python"
    if not python.exists() or not (args.checkout / "ShapNet").is_dir():
        raise SystemExit(f"missing {python} or {args.checkout}/ShapNet: run with --setup first (see --help)")
    # Both implementations stay loaded in their own process; every repeat times each model once, in turn (the order
    # rotating), so that load coming and going on a shared machine hits all of them alike.
    workers = [_Worker(str(python), "original", args), _Worker(sys.executable, "shapnets", args)]
    try:
        jobs = [(w, name) for w in workers for name in w.info["names"]]
        times: dict[str, list[float]] = {name: [] for _, name in jobs}
        for r in range(args.repeats):
            shift = r % len(jobs)
            for worker, name in jobs[shift:] + jobs[:shift]:
                times[name].append(worker.time(name))
            ratios = {n: times["original"][-1] / t[-1] for n, t in times.items() if n != "original"}
            print(f"repeat {r + 1}: original {times['original'][-1] * 1e3:.0f} ms; "
                  + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms ({q:.1f}x)" for n, q in ratios.items()), flush=True)
    finally:
        for worker in workers:
            worker.close()
    params = {**workers[0].info["params"], **workers[1].info["params"]}
    print(f"\nbatch {args.batch} random 28x28 images, {args.threads} thread(s), {args.repeats} interleaved repeats; "
          f"torch {workers[0].info['torch']} (original) / {workers[1].info['torch']} (shapnets)")
    print("| model | params | explain ms (median) | speed-up over the original (median of per-repeat ratios) |")
    print("|---|---|---|---|")
    for name in [k for k in ("original", "matched", "compiled", "linear") if k in times]:
        ratios = [a / b for a, b in zip(times["original"], times[name])]
        print(f"| {name} | {params[name]:,} | {statistics.median(times[name]) * 1e3:.1f} | "
              f"{statistics.median(ratios):.1f}x (min {min(ratios):.1f}, max {max(ratios):.1f}) |")

if __name__ == "__main__":
    main()
