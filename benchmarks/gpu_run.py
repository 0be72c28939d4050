"""Everything a lent GPU is for, in one run under one deadline (called by `benchmarks/gpu.sh`).

A GPU is lent to a session for minutes, once, so the work is one prepared script rather than experiments:

1. **Training, all at once** (small models do not fill an H200, so the runs share it as separate processes):
   * `capsnet_mnist`, the paper's CapsNet (configs/capsnet_mnist.yaml: differentiable routing, 2-pixel shifts),
     in bf16;
   * `conv_mnist_gpu`, the Conv ShapNet of `shapnet_conv_mnist` from scratch in bf16;
   * the explanation-regularizer sweep of `shapnet_conv_mnist` fine-tunes (`SWEEP`: none / L1 final / L-inf /
     L1 all layers, several weights; one with pruning during training), whose accuracy and sparsity are measured
     afterwards on the CPU (`benchmarks/regularizers.py`).
   Every run has `train.time_budget_s`: the trainer measures its step time and fits whole cosine schedules into it.
2. **The CUDA tests** (`tests/test_gpu.py`), beside the training.
3. **The GPU rows of the benchmarks**, after the training, on a quiet GPU: `shapnets bench scaling --device cuda`
   (explain time and peak memory against players and batch, fp32 and bf16) and `benchmarks/throughput.py`
   (images/s of the zoo's image models).
4. **Packing**: `--pack DIR` receives `results.tar.gz` (logs, metrics, summaries, small weights, benchmark
   tables), rewritten after every phase so that a run cut short still returns what it finished, and the
   CapsNet's best weights as float32 safetensors in parts of at most 15 MiB (`capsnet_mnist.safetensors.partN`;
   `cat` them back together).

Usage:
    python benchmarks/gpu_run.py --work /tmp/gpu --pack $OUT [--deadline 540] [--data-root DIR]
    python benchmarks/gpu_run.py --work /tmp/gpu --dry-run      # CPU, tiny settings: checks the whole path

Re-running on the same `--work` folder resumes: finished runs are skipped, interrupted ones continue from their
`last.pt` (`--resume`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PART_BYTES = 15 << 20


@dataclass
class Job:
    """One training run: a config, overrides, and the share of the deadline it may use."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    budget_s: float = 300.0


def _l1(weight: float, layers: str = "final") -> str:
    return f"loss.terms=[{{name: explanation_l1, weight: {weight}, layers: {layers}, target: all}}]"


def _linf(weight: float) -> str:
    return f"loss.terms=[{{name: explanation_linf, weight: {weight}, layers: final, target: all}}]"


# Fine-tunes of shapnet_conv_mnist: the whole training split, batch 128, 3 epochs at most (fitted to the budget).
# The weights bracket the CPU configs' (L1 final 5e-4, L1 all 3e-5, L-inf 0.02, which changed nothing) by 10-100x:
# a penalty moves the explanation only where its per-pixel pull outweighs the cross-entropy's (1 - p) on the logit.
FINETUNE = ["data.limit=null", "data.batch_size=128", "data.eval_batch_size=1000", "train.epochs=3",
            "train.checkpoint_every_steps=200"]
SWEEP: list[tuple[str, str, list[str]]] = [
    ("ft_none", "finetune_conv_mnist_l1_final", ["loss.terms=[]"]),
    ("ft_l1_final_0.005", "finetune_conv_mnist_l1_final", [_l1(0.005)]),
    ("ft_l1_final_0.02", "finetune_conv_mnist_l1_final", [_l1(0.02)]),
    ("ft_l1_final_0.05", "finetune_conv_mnist_l1_final", [_l1(0.05)]),
    ("ft_linf_0.3", "finetune_conv_mnist_linf", [_linf(0.3)]),
    ("ft_linf_1", "finetune_conv_mnist_linf", [_linf(1.0)]),
    ("ft_linf_3", "finetune_conv_mnist_linf", [_linf(3.0)]),
    ("ft_l1_all_0.0003", "finetune_conv_mnist_l1_all", [_l1(0.0003, "all")]),
    ("ft_l1_all_0.001", "finetune_conv_mnist_l1_all", [_l1(0.001, "all")]),
    ("ft_l1_all_0.003", "finetune_conv_mnist_l1_all", [_l1(0.003, "all")]),
    ("ft_l1_all_0.001_prune", "finetune_conv_mnist_l1_all",
     [_l1(0.001, "all"), "model.args.prune=[0.5,0.5,0.5,0.5,0.0]", "model.args.prune_mode=active",
      "model.args.prune_during_training=true"]),
]


def jobs(deadline: float, dry_run: bool) -> list[Job]:
    """The training runs, budgets as shares of the deadline (the benchmarks and packing need the rest)."""
    found = [Job("capsnet_mnist", "capsnet_mnist", [], 0.70 * deadline),
             Job("conv_mnist_gpu", "conv_mnist_gpu", [], 0.55 * deadline)]
    found += [Job(name, config, FINETUNE + extra, 0.45 * deadline) for name, config, extra in SWEEP]
    if dry_run:
        tiny = ["data.limit=64", "data.batch_size=16", "data.eval_batch_size=32", "train.epochs=1",
                "train.max_steps=2", "train.device=cpu"]
        for job in found:
            job.overrides = job.overrides + tiny
    return found


def _log(message: str, start: float) -> None:
    print(f"[{time.monotonic() - start:6.1f}s] {message}", flush=True)


def _environment() -> dict[str, object]:
    import torch

    env: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                              "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported())
    return env


def _start(job: Job, work: Path, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    out = work / "runs" / job.name
    if (out / "summary.json").is_file():
        return None  # finished in an earlier call
    command = [sys.executable, "-m", "training", "train", str(ROOT / "configs" / f"{job.config}.yaml"),
               "--output", str(out), "--set", f"name={job.name}", "--set", f"train.time_budget_s={job.budget_s:.0f}"]
    for override in job.overrides:
        command += ["--set", override]
    command.append("--resume" if (out / "last.pt").is_file() else "--overwrite")
    log = open(work / "logs" / f"{job.name}.log", "ab")  # noqa: SIM115 - the child process owns it
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def _run(command: list[str], log: Path, timeout: float, env: dict[str, str]) -> int:
    with open(log, "ab") as f:
        try:
            return subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                  timeout=max(timeout, 1)).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_run] stopped after {timeout:.0f}s\n".encode())
            return 124


def _pack(work: Path, pack: Path | None) -> None:
    """Write `results.tar.gz` (everything small) and the CapsNet weights in parts into `pack`."""
    if pack is None:
        return
    pack.mkdir(parents=True, exist_ok=True)
    tmp = pack / "results.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if not path.is_file() or path.name == "last.pt" or path.suffix == ".safetensors":
                continue
            if path.name == "best.pt" and path.stat().st_size > (4 << 20):
                continue  # large weights travel as safetensors parts
            tar.add(path, arcname=str(path.relative_to(work)))
    tmp.replace(pack / "results.tar.gz")
    weights = work / "capsnet_mnist.safetensors"
    if weights.is_file():
        data = weights.read_bytes()
        for i in range(0, len(data), PART_BYTES):
            (pack / f"capsnet_mnist.safetensors.part{i // PART_BYTES}").write_bytes(data[i:i + PART_BYTES])


def _capsnet_weights(work: Path) -> None:
    """The best CapsNet weights (EMA) as float32 safetensors, for the zoo's export."""
    import torch
    from safetensors.torch import save_file

    best = work / "runs" / "capsnet_mnist" / "best.pt"
    if best.is_file():
        state = torch.load(best, map_location="cpu", weights_only=True)["model"]
        tensors = {k.removeprefix("module."): v.float().contiguous() for k, v in state.items()
                   if isinstance(v, torch.Tensor) and k != "n_averaged"}
        save_file(tensors, str(work / "capsnet_mnist.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="work folder (resumable)")
    parser.add_argument("--pack", type=Path, default=None, help="folder that receives the packed results")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds for everything (default 540)")
    parser.add_argument("--data-root", default=None, help="folder with mnist/ (default: $SHAPNETS_DATA)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny settings: check the whole path")
    parser.add_argument("--jobs", nargs="+", default=None, metavar="NAME", help="only these training runs")
    parser.add_argument("--skip", nargs="+", default=[], choices=["tests", "bench"], help="leave out these phases")
    args = parser.parse_args(argv)
    start = time.monotonic()
    work = args.work
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.data_root:
        env["SHAPNETS_DATA"] = str(Path(args.data_root).resolve())
    deadline = args.deadline
    selected = jobs(deadline, args.dry_run)
    if args.jobs is not None:
        unknown = sorted(set(args.jobs) - {job.name for job in selected})
        if unknown:
            parser.error(f"unknown job(s) {unknown}; known: {[job.name for job in selected]}")
        selected = [job for job in selected if job.name in args.jobs]
    (work / "env.json").write_text(json.dumps(_environment(), indent=2))

    # ---- 1 + 2: training runs and the CUDA tests, side by side
    running = {}
    for job in selected:
        proc = _start(job, work, env)
        if proc is not None:
            running[job.name] = (proc, job)
    _log(f"started {len(running)} training runs: {', '.join(running)}", start)
    tests = None if "tests" in args.skip else subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"], cwd=ROOT, env=env,
        stdout=open(work / "logs" / "tests.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    packed_after: set[str] = set()
    while running:
        time.sleep(2)
        for name, (proc, job) in list(running.items()):
            overdue = time.monotonic() - start > job.budget_s + 0.15 * deadline
            if proc.poll() is None and not overdue:
                continue
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
                _log(f"{name}: stopped at its hard limit", start)
            else:
                _log(f"{name}: exit {proc.returncode}", start)
            del running[name]
            if name == "capsnet_mnist":
                _capsnet_weights(work)
        if not running or (len(packed_after) < 1 and time.monotonic() - start > 0.5 * deadline):
            packed_after.add("training")
            _pack(work, args.pack)
    if tests is not None:
        try:
            tests.wait(max(1, 0.8 * deadline - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            tests.kill()
            _log("CUDA tests stopped: out of time", start)
    _capsnet_weights(work)
    _pack(work, args.pack)
    _log("training done; packed", start)

    # ---- 3: benchmarks on a quiet GPU
    if "bench" in args.skip:
        return 0
    device = "cpu" if args.dry_run else "cuda"
    left = deadline - (time.monotonic() - start)
    bench = [sys.executable, "-m", "training", "bench", "scaling", "--device", device, "--out", str(work / "bench")]
    _run(bench + (["--quick"] if args.dry_run else []), work / "logs" / "bench_scaling.log", 0.55 * left, env)
    _pack(work, args.pack)
    left = deadline - (time.monotonic() - start)
    throughput = [sys.executable, "benchmarks/throughput.py", "--device", device, "--out", str(work / "bench")]
    _run(throughput + (["--quick"] if args.dry_run else []), work / "logs" / "throughput.log", left - 15, env)
    _pack(work, args.pack)
    _log("done", start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
