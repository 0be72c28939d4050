"""Throughput of the zoo's image models: images/s of `forward` and `explain` per batch size, thread count, device.

For every model (`--models`, default the zoo's image models) and batch size (`--batches`, default 1, 64, 256), on
MNIST-like inputs (a real digit's statistics are not needed for timing, but the input matters to ShapNets, which
skip reference pixels: the images are random strokes on the reference background, ~20% of the pixels lit, as in
MNIST), forward and explain are timed in turn within every repeat (`training.bench.interleaved_medians`) in
`eval()` mode without gradients. On CPU each thread count of `--threads` is a row; on CUDA each precision (fp32,
bf16 autocast) is a row.

Usage:
    python benchmarks/throughput.py [--device cpu|cuda] [--threads 1 2] [--batches 1 64 256] [--out DIR] [--quick]

Prints a Markdown table; `--out DIR` also writes `DIR/throughput.md` and `DIR/throughput.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

import zoo
from training.bench import environment, interleaved_medians, markdown_table

MODELS = ["shapnet_conv_mnist", "icnn_vgg_small_mnist", "capsnet_small_mnist", "capsnet_mnist"]
COLUMNS = ["model", "params", "device", "threads", "precision", "batch", "forward img/s", "explain img/s",
           "explain / forward time"]


def mnist_like(batch: int, model: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
    """`(batch, 1, 28, 28)` images: the model's reference (normalised black) with ~20% of pixels lit."""
    reference = getattr(model, "reference", None)
    black = float(reference.flatten()[0]) if isinstance(reference, torch.Tensor) else -0.4242
    lit = torch.rand(batch, 1, 28, 28, generator=generator) < 0.2
    values = black + torch.rand(batch, 1, 28, 28, generator=generator) * (2.8215 - black)
    return torch.where(lit, values, torch.full_like(values, black))


def measure(name: str, batches: list[int], device: torch.device, threads: int | None, precision: str,
            repeats: int) -> list[dict[str, Any]]:
    """One row per batch size for model `name` (pretrained weights where the zoo ships them)."""
    pretrained = name in zoo.list_models(pretrained=True)  # capsnet_mnist: random weights until trained
    model = zoo.create_model(name, pretrained=pretrained).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        x = mnist_like(batch, model, generator).to(device)

        def forward(x: torch.Tensor = x) -> object:
            with torch.no_grad(), autocast():
                return model(x)

        def explain(x: torch.Tensor = x) -> object:
            with torch.no_grad(), autocast():
                return model.explain(x)

        t = interleaved_medians({"forward": forward, "explain": explain}, repeats, sync=sync)
        rows.append({"model": name, "params": params, "device": device.type, "threads": threads or "-",
                     "precision": precision, "batch": batch, "forward img/s": batch / t["forward"],
                     "explain img/s": batch / t["explain"], "explain / forward time": t["explain"] / t["forward"]})
        print(f"[throughput] {name} {device.type} threads={threads} {precision} batch {batch}: "
              f"forward {rows[-1]['forward img/s']:.0f} img/s, explain {rows[-1]['explain img/s']:.0f} img/s",
              file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="CPU thread counts")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 4, one repeat (a check of the path)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = [1, 4], 1
    unknown = [m for m in args.models if m not in zoo.list_models()]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; image models: {MODELS}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    rows: list[dict[str, Any]] = []
    settings = ([(None, p) for p in ("fp32", "bf16")] if device.type == "cuda"
                else [(t, "fp32") for t in args.threads])
    for threads, precision in settings:
        if threads is not None:
            torch.set_num_threads(threads)
        for name in args.models:
            rows += measure(name, args.batches, device, threads, precision, args.repeats)
    env = environment(device)
    table = markdown_table(rows, COLUMNS)
    print(f"Throughput ({env['hardware']}, torch {env['torch']})\n\n{table}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput.md").write_text(f"# Throughput\n\n{env}\n\n{table}\n")
        (args.out / "throughput.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2,
                                                             default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
