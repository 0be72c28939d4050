"""Why can 2 CPU threads be slower than 1? Per-op cost at 1 and 2 threads, interleaved in one process.

`torch.set_num_threads` is switched inside every timed call, so the 1- and 2-thread timings of each item alternate
within every repeat (`training.bench.interleaved_medians`) and see the same machine load. Items:

* elementwise ops (`add`, exact `gelu`) and a matrix product at sizes from 4k to 4M elements: the cost of one
  parallel region against its work;
* the Conv ShapNet of `benchmarks/vs_original.py` (`matched`: the original's architecture and inner) explaining 64
  random 28x28 images, and the shipped `shapnet_conv_mnist` explaining 8 MNIST-like images.

A ratio `2 threads / 1 thread` above 1 means the second thread costs more than it brings. On a machine with more
runnable threads than cores, every OpenMP region of the 2-thread run ends in a barrier that waits for a descheduled
thread, so small ops (many regions, little work each) lose most; the load average printed with the table says
how oversubscribed the machine was.

Usage:
    python benchmarks/thread_overhead.py [--repeats 15] [--quick]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from torch import nn

from training.bench import interleaved_medians, markdown_table


def at_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` run with `n` torch threads (restoring nothing: every timed call sets its own count)."""

    def run() -> object:
        torch.set_num_threads(n)
        return fn()

    return run


def op_items(sizes: list[int]) -> dict[str, Callable[[], object]]:
    """Elementwise ops and a product per size: `add`, `gelu` on `n` elements, `mm` with an `(n/64, 64)` operand."""
    items: dict[str, Callable[[], object]] = {}
    for n in sizes:
        a, out = torch.randn(n), torch.empty(n)
        m, w = torch.randn(n // 64, 64), torch.randn(64, 64)
        items[f"add, {n} elements"] = lambda a=a, out=out: torch.add(a, 1.0, out=out)
        items[f"gelu, {n} elements"] = lambda a=a, out=out: torch.ops.aten.gelu.out(a, out=out)
        items[f"mm ({n // 64} x 64) x (64 x 64)"] = lambda m=m, w=w: m @ w
    return items


def model_items(quick: bool) -> dict[str, Callable[[], object]]:
    """The Conv ShapNets' explain (random weights for `matched`, shipped weights for `shapnet_conv_mnist`)."""
    from shapnets import ConvShapNet

    torch.manual_seed(0)
    matched = ConvShapNet(1, 10, channels=(16, 32, 32, 32), kernel_size=2, dilations=(1, 2, 4, 8, 16), hidden=(),
                          act_layer=nn.LeakyReLU, residual=False, output_act=True).eval()
    x = torch.randn(8 if quick else 64, 1, 28, 28)
    items: dict[str, Callable[[], object]] = {f"ConvShapNet matched, explain batch {len(x)}": lambda: matched(x)}
    try:
        import zoo

        shipped = zoo.create_model("shapnet_conv_mnist", pretrained=True).eval()
    except Exception:  # no weights: the op rows and the matched model still say what they say
        return items
    lit = torch.rand(8, 1, 28, 28) < 0.2
    images = torch.where(lit, torch.rand(8, 1, 28, 28) * 3 - 0.42, torch.full((8, 1, 28, 28), -0.4242))
    items["shapnet_conv_mnist, explain batch 8"] = lambda: shipped.explain(images)
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small sizes and batches, 2 repeats")
    parser.add_argument("--no-models", action="store_true", help="only the op rows")
    args = parser.parse_args(argv)
    sizes = [1 << 12, 1 << 16] if args.quick else [1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22]
    items = op_items(sizes)
    if not args.no_models:
        items.update(model_items(args.quick))
    fns = {f"{name}|{n}": at_threads(n, fn) for name, fn in items.items() for n in (1, 2)}
    load_before = os.getloadavg()
    with torch.no_grad():
        t = interleaved_medians(fns, 2 if args.quick else args.repeats, warmup=1)
    load_after = os.getloadavg()
    rows = [{"item": name, "1 thread ms": 1e3 * t[f"{name}|1"], "2 threads ms": 1e3 * t[f"{name}|2"],
             "2 threads / 1 thread": t[f"{name}|2"] / t[f"{name}|1"]} for name in items]
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs\n")
    print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
