"""`shapnets bench` as a script: fidelity vs the exact Shapley values, speed, scaling and accuracy tables.

    python benchmarks/bench.py [fidelity|speed|scaling|accuracy]... [--out DIR] [--quick] [--models NAME...]

The engine is `training/bench.py` (its module docstring explains every table and column); this file only forwards
its command line to `shapnets bench`, so the benchmark lives in one place. Writes `<out>/<kind>.md`, `.json` and
`.png` (default `bench_out/`). A full run of all four takes ~20-30 minutes on 2 CPU cores; `--quick` a minute.
"""

from __future__ import annotations

import sys

from training.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
