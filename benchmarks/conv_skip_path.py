"""The Conv ShapNet's skip path: gathering only the active patches against skipping inside the full im2col.

`ShapleyConv2d(skip_inactive=True)` builds only the patches with a pixel off the reference and sums each player's
Shapley values back onto its pixel (`ShapleyModuleBank.shapley_sums`). The previous path unfolded every patch of
the image, let the bank sort out and skip the inactive ones, and folded all of them back. Both are timed here in
one process, interleaved, on the same images and pruning levels, and checked to agree with the dense computation.

Usage:
    python benchmarks/conv_skip_path.py [--source shapnet_conv_mnist] [--samples 256] [--fractions 0 0.3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pruning import load_test_samples

from shapnets.conv import ShapleyConv2d
from shapnets.pruning import configure_pruning
from training.bench import interleaved_medians, markdown_table

ACTIVE_PATCHES = ShapleyConv2d.forward


def full_unfold_forward(self: ShapleyConv2d, delta, reference=None, skip_inactive: bool = False):
    """The previous skip path: every patch unfolded, the bank skips the inactive ones, every patch folded back."""
    if not skip_inactive or len(self.bank.weights) == 1:
        return ACTIVE_PATCHES(self, delta, reference, skip_inactive)
    ref = None if reference is None else reference.expand(1, len(self.offsets), reference.shape[-1])
    phi, _, _ = self.bank.shapley(self.patches(delta)[..., None, :, :], ref, skip_inactive=True)
    return self.fold(phi[..., 0, :, :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="shapnet_conv_mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded, x, _ = load_test_samples(args.source, args.data_root, args.samples, torch.device("cpu"))
    model = loaded.model.eval()
    paths = {"active patches": ACTIVE_PATCHES, "full unfold": full_unfold_forward}

    def explain(path: str, p: float) -> torch.Tensor:
        ShapleyConv2d.forward = paths[path]
        configure_pruning(model, [p] * (model.num_stages - 1) + [0.0], "active")
        with torch.no_grad():
            return torch.cat([model.explain(b).attributions for b in x.split(args.batch_size)])

    rows = []
    try:
        for p in args.fractions:
            model.skip_inactive = False
            dense = explain("active patches", p)
            model.skip_inactive = True
            for path in paths:
                diff = float((explain(path, p) - dense).abs().max())
                rows.append({"p": p, "path": path, "max abs. diff vs dense": diff})
        times = interleaved_medians({f"{r['path']} {r['p']}": (lambda r=r: explain(r["path"], r["p"])) for r in rows},
                                    repeats=args.repeats)
    finally:
        ShapleyConv2d.forward = ACTIVE_PATCHES
    for r in rows:
        r["explain s"] = times[f"{r['path']} {r['p']}"]
        r["speed-up vs full unfold"] = times[f"full unfold {r['p']}"] / r["explain s"]
    print(f"{args.source}: explain on {len(x)} test images, {torch.get_num_threads()} thread(s), median of "
          f"{args.repeats} interleaved; p counts active players, every stage but the last\n")
    print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
