"""What `train.track_interactions` costs a training epoch: runs with and without it, interleaved in one process.

    SHAPNETS_DATA=/work/shared/data python benchmarks/interaction_tracking_cost.py [--epochs 3] [--rounds 1]
        [--configs configs/baseline_mlp_adult.yaml ...]

For each config (default: every tabular one) it trains `--epochs` epochs without tracking and `--epochs` with the
default tracking (`{samples: 32, players: 10, every: 1}`, players capped at the number of features), early stopping
off, alternating the order from round to round, all in this process. An epoch's wall time is the interval between
the trainer's consecutive "epoch k/E" log records: training steps, validation, checkpoint and (when on) the
tracking evaluation, so `--epochs E` gives `E - 1` intervals per run. Printed per config:

* `wall off` / `wall on`: median epoch wall time without and with tracking, and their ratio (the issue's budget:
  2x);
* `steps`: the median training-step time of an epoch (`epoch_time_s` in metrics.csv), `tracking`: the median
  cost of one evaluation (`cost_s` in interactions.jsonl), and `(steps + tracking) / steps`, the slow-down
  against the optimisation steps alone (an upper bound: validation left out);
* `via`: the model's own structure (Shallow and Deep ShapNets) or the oracle's masked forward passes.

`--structure` instead times one tracking evaluation of each ShapNet config's freshly built model through its own
structure and through the oracle, alternating, in this process (`--repeats` times each), and prints the speed-up.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from training.config import load_config, track_interactions_options
from training.interaction_tracking import InteractionTracker, read_records
from training.trainer import build_model, load_data, train

DEFAULT_CONFIGS = ["configs/baseline_mlp_yeast.yaml", "configs/shallow_yeast.yaml", "configs/deep_yeast.yaml",
                   "configs/baseline_mlp_breast_cancer.yaml", "configs/shallow_breast_cancer.yaml",
                   "configs/deep_breast_cancer.yaml", "configs/baseline_mlp_adult.yaml",
                   "configs/shallow_adult.yaml", "configs/deep_adult.yaml"]


class EpochClock(logging.Handler):
    """Collects the time of every "epoch k/E" record of the trainer's logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("epoch %d/%d"):
            self.times.append(record.created)

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def one_run(path: str, bundle, epochs: int, tracked: bool, players: int, clock: EpochClock) -> dict[str, list[float]]:
    """Train `path` for `epochs` epochs; the epoch wall intervals, step times and (tracked) evaluation costs."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"train.epochs={epochs}", "train.early_stopping_patience=null", "train.device=cpu",
                     f"output_dir={tmp}"]
        if tracked:
            overrides.append(f"train.track_interactions={{players: {players}}}")
        cfg = load_config(path, overrides)
        clock.times.clear()
        train(cfg, data=bundle, overwrite=True)
        with (Path(tmp) / "metrics.csv").open() as f:
            steps = [float(r["epoch_time_s"]) for r in csv.DictReader(f)]
        costs = [r["cost_s"] for r in read_records(Path(tmp) / "interactions.jsonl") if r["epoch"] > 0] \
            if tracked else []
    return {"walls": clock.intervals(), "steps": steps, "costs": costs}


def structure_vs_oracle(path: str, repeats: int) -> dict[str, float | str]:
    """Median time of one tracking evaluation through the model's structure and through the oracle, alternated."""
    cfg = load_config(path, ["train.device=cpu"])
    bundle = load_data(cfg)
    model = build_model(cfg.model, bundle.info).eval()
    options = track_interactions_options({"players": min(10, bundle.info.input_shape[0])})
    times: dict[str, list[float]] = {"structure": [], "oracle": []}
    with tempfile.TemporaryDirectory() as tmp:
        tracker = InteractionTracker(options, model, bundle, torch.device("cpu"), Path(tmp))
        structural = tracker.structural
        if structural is None:
            raise SystemExit(f"{path}: the model has no structural path (only Shallow and Deep ShapNets)")
        for _ in range(repeats):
            for via in ("structure", "oracle"):
                tracker.structural = structural if via == "structure" else None
                times[via].append(tracker.evaluate(model, 0)["cost_s"])
    row = {"config": Path(path).stem, **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
    row["speedup"] = row["oracle_s"] / row["structure_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (>= 2: E - 1 wall intervals)")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs (off, on) per config")
    parser.add_argument("--structure", action="store_true", help="structure vs oracle per evaluation instead")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (an epoch's wall time is the interval between two epoch records)")
    torch.set_num_threads(1)
    if args.structure:
        paths = [p for p in args.configs if load_config(p).model.name in ("shapnet_shallow", "shapnet_deep")]
        found = [structure_vs_oracle(p, args.repeats) for p in paths]
        print("| config | structure (s/eval) | oracle (s/eval) | speed-up |\n|---|---|---|---|")
        for r in found:
            print(f"| {r['config']} | {r['structure_s']:.2f} | {r['oracle_s']:.2f} | {r['speedup']:.1f}x |", flush=True)
        return
    logger = logging.getLogger("training")
    logger.setLevel(logging.INFO)
    clock = EpochClock()
    logger.addHandler(clock)
    rows = []
    for path in args.configs:
        bundle = load_data(load_config(path))
        features = bundle.info.input_shape[0]
        players = min(10, features)
        found: dict[bool, dict[str, list[float]]] = {False: {}, True: {}}
        t0 = time.perf_counter()
        for r in range(args.rounds):
            for tracked in ((False, True) if r % 2 == 0 else (True, False)):
                run = one_run(path, bundle, args.epochs, tracked, players, clock)
                for key, values in run.items():
                    found[tracked].setdefault(key, []).extend(values)
        off, on = found[False], found[True]
        model = load_config(path).model.name
        row = {
            "config": Path(path).stem, "model": model, "train_rows": len(bundle.train), "players": players,
            "via": "structure" if model in ("shapnet_shallow", "shapnet_deep") else "oracle",
            "wall_off_s": statistics.median(off["walls"]), "wall_on_s": statistics.median(on["walls"]),
            "steps_s": statistics.median(off["steps"] + on["steps"]), "tracking_s": statistics.median(on["costs"]),
            "bench_s": time.perf_counter() - t0,
        }
        row["ratio"] = row["wall_on_s"] / row["wall_off_s"]
        row["steps_ratio"] = (row["steps_s"] + row["tracking_s"]) / row["steps_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| config | train rows | players | via | wall off (s/epoch) | wall on (s/epoch) | on / off | "
          "steps (s/epoch) | tracking (s/eval) | (steps + tracking) / steps |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['train_rows']} | {r['players']} | {r['via']} | {r['wall_off_s']:.2f} | "
              f"{r['wall_on_s']:.2f} | {r['ratio']:.2f}x | {r['steps_s']:.2f} | {r['tracking_s']:.2f} | "
              f"{r['steps_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
