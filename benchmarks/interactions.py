"""How sparse are the exact interactions of the zoo's tabular ShapNets? Harsanyi dividends, test split.

    python benchmarks/interactions.py [NAME ...] [--data-root DIR] [--samples 200] [--oracle-samples 20]
        [--share 0.05] [--out DIR] [--conv shapnet_conv_mnist] [--threads 1]

The engine is `training/interactions_bench.py` (its module docstring explains every row and column; also
`shapnets bench interactions`); this file only adds the knobs `shapnets bench` does not have (`--oracle-samples`,
`--share`) and, with `--out`, the pixel-pair pictures of every stage of `--conv` (default `shapnet_conv_mnist`,
needs the MNIST data; `--conv ''` for none). Prints the table; `--out DIR` writes `interactions.md/.json/.png` and
the top-10 dividend charts.

About 1-2 minutes on 2 CPU cores with the defaults (most of it the float64 oracle of the Deep ShapNet on Adult's
12 features: 4096 network evaluations per sample).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training.bench import markdown_table
from training.interactions_bench import COLUMNS, conv_pictures, interactions


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", metavar="NAME",
                        help="zoo names, pretrained folders or run folders (default: every shipped tabular ShapNet)")
    parser.add_argument("--data-root", default=None, help="folder holding the raw data (default: $SHAPNETS_DATA)")
    parser.add_argument("--samples", type=int, default=200, help="test samples (the first ones of the split)")
    parser.add_argument("--oracle-samples", type=int, default=20,
                        help="samples the float64 oracle sees (2^D evaluations each: ~2 s per Adult sample)")
    parser.add_argument("--share", type=float, default=0.05, help="the top share of subsets (0.05: top 5%%)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch default)")
    parser.add_argument("--conv", default="shapnet_conv_mnist",
                        help="Conv ShapNet whose pixel-pair pictures --out gets ('' for none)")
    parser.add_argument("--out", type=Path, default=None, help="write interactions.md / .json and PNGs here")
    args = parser.parse_args(argv)
    for name in ("samples", "oracle_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.share <= 1:
        parser.error(f"--share must lie in (0, 1], got {args.share}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print the table; returns `{"rows": [...], "report": str, "pictures": [...]}`."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = interactions(out=args.out, samples=args.samples, oracle_samples=args.oracle_samples, share=args.share,
                        zoo_models=args.sources or None, data_root=args.data_root, verbose=True)
    report = markdown_table(rows, COLUMNS)
    print(report)
    pictures: list[Path] = []
    if args.out is not None:
        pictures = [args.out / row["chart"] for row in rows]
        if args.conv:
            pictures += conv_pictures(args.conv, args.data_root, args.out)
        print("wrote " + ", ".join(str(p) for p in [args.out / "interactions.md", *pictures]), file=sys.stderr)
    return {"rows": rows, "report": report, "pictures": pictures}


if __name__ == "__main__":
    from training.config import UserError

    try:
        main()
    except UserError as e:
        print(f"interactions benchmark: error: {e}", file=sys.stderr)
        sys.exit(2)
