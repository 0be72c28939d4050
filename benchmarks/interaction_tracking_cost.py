"""What `train.track_interactions` costs next to a training epoch, timed in the same run.

    SHAPNETS_DATA=/work/shared/data python benchmarks/interaction_tracking_cost.py [--epochs 3]
        [--configs configs/baseline_mlp_adult.yaml ...]

For each config (default: the tabular ones) it trains `--epochs` epochs with the default tracking
(`{samples: 32, players: 10, every: 1}`, players capped at the number of features; early stopping off) and reads the
run's own timers: the training time of each epoch (`epoch_time_s` in metrics.csv: the optimisation steps only,
without validation) and the time of each tracking evaluation (`cost_s` in interactions.jsonl, the evaluation at
initialisation left out). The slow-down is `(epoch + tracking) / epoch` with medians; leaving validation out of the
epoch makes it an upper bound. The issue's budget is 2x.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
from pathlib import Path

import torch

from training.config import load_config
from training.interaction_tracking import read_records
from training.trainer import load_data, train

DEFAULT_CONFIGS = ["configs/baseline_mlp_adult.yaml", "configs/shallow_adult.yaml", "configs/deep_adult.yaml",
                   "configs/baseline_mlp_yeast.yaml", "configs/shallow_yeast.yaml", "configs/deep_yeast.yaml"]


def tracked_run(path: str, epochs: int, tmp: Path) -> dict[str, float | str | int]:
    """Train `path` with the default tracking and return the median epoch time, tracking time and slow-down."""
    cfg = load_config(path)
    bundle = load_data(cfg)
    features = bundle.info.input_shape[0]
    cfg = load_config(path, [f"train.epochs={epochs}", "train.early_stopping_patience=null", "train.device=cpu",
                             f"output_dir={tmp}", f"train.track_interactions={{players: {min(10, features)}}}"])
    train(cfg, data=bundle, overwrite=True)
    with (tmp / "metrics.csv").open() as f:
        epoch_s = statistics.median(float(r["epoch_time_s"]) for r in csv.DictReader(f))
    tracking_s = statistics.median(r["cost_s"] for r in read_records(tmp / "interactions.jsonl") if r["epoch"] > 0)
    return {"config": Path(path).stem, "model": cfg.model.name, "train_rows": len(bundle.train),
            "players": min(10, features), "epoch_s": epoch_s, "tracking_s": tracking_s,
            "slowdown": (epoch_s + tracking_s) / epoch_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for path in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            row = tracked_run(path, args.epochs, Path(tmp))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| config | train rows | players | s/epoch (steps) | s/tracking evaluation | slow-down |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['train_rows']} | {r['players']} | {r['epoch_s']:.2f} | {r['tracking_s']:.2f} | "
              f"{r['slowdown']:.2f}x |")


if __name__ == "__main__":
    main()
