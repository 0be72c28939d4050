"""Throughput of the zoo's image models: images/s for forward and explain, CPU, by batch size and thread count.

For each model (default `shapnet_conv_mnist`, `icnn_vgg_small_mnist`, `capsnet_small_mnist`, shipped weights), each
thread count and each batch size, `forward` and `explain` are timed in one process, interleaved (median of
`--repeats` after a warm-up, `training.bench.interleaved_medians`), on random 28x28 inputs (throughput does not
depend on the pixel values, except through a ShapNet's skipping of pixels at the reference: random inputs have none,
so this is the dense cost). Prints a Markdown table: images/s and explain/forward.

Usage:
    python benchmarks/zoo_throughput.py                          # batches 1, 64, 256; threads 1, 2
    python benchmarks/zoo_throughput.py --batches 1 8 --threads 1 --repeats 2 --models shapnet_conv_mnist
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Sequence

import torch

import zoo
from training.bench import interleaved_medians, markdown_table

MODELS = ("shapnet_conv_mnist", "icnn_vgg_small_mnist", "capsnet_small_mnist")


def throughput(names: Sequence[str], batches: Sequence[int], threads: Sequence[int], repeats: int,
               pretrained: bool = True) -> list[dict[str, object]]:
    """One row per (model, threads, batch): forward and explain images/s (median of interleaved repeats)."""
    rows = []
    for name in names:
        model = zoo.create_model(name, pretrained=pretrained).eval()
        in_chans = getattr(model, "in_chans", 1)
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for batch in batches:
                x = torch.randn(batch, in_chans, 28, 28, generator=torch.Generator().manual_seed(batch))
                with torch.no_grad():
                    t = interleaved_medians({"forward": lambda x=x, m=model: m(x),
                                             "explain": lambda x=x, m=model: m.explain(x)}, repeats)
                rows.append({"model": name, "threads": n_threads, "batch": batch,
                             "forward img/s": batch / t["forward"], "explain img/s": batch / t["explain"],
                             "explain ms / img": 1e3 * t["explain"] / batch,
                             "explain / forward": t["explain"] / t["forward"]})
                print(f"{name} threads={n_threads} batch={batch}: forward {rows[-1]['forward img/s']:.1f} img/s, "
                      f"explain {rows[-1]['explain img/s']:.1f} img/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--random-init", action="store_true", help="do not load the shipped weights")
    args = parser.parse_args(argv)
    rows = throughput(args.models, args.batches, args.threads, args.repeats, pretrained=not args.random_init)
    print(f"\nCPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, float32, random 28x28 "
          f"inputs, median of {args.repeats} interleaved repeats\n")
    print(markdown_table(rows, ["model", "threads", "batch", "forward img/s", "explain img/s", "explain ms / img",
                                "explain / forward"]))


if __name__ == "__main__":
    main()
