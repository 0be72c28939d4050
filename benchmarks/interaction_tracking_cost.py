"""What `train.track_interactions` costs a training run: runs with and without it, interleaved in one process.

    SHAPNETS_DATA=/work/shared/data python benchmarks/interaction_tracking_cost.py [--epochs 10] [--rounds 1]
        [--configs configs/baseline_mlp_adult.yaml ...]

For each config (default: every tabular one) it trains `min(--epochs, the config's epochs)` epochs three times,
early stopping off, all in this process, the order rotated from round to round: without tracking, with the default
tracking (`{samples: 32, players: 10}`, players capped at the number of features; `every: auto`, budget 0.25), and
with `every: 1`. Printed per config:

* `run off` / `every: auto` / `every: 1`: the wall time of the whole run (`train()`: data already loaded; steps,
  validation, checkpoints and the tracking evaluations, the one before training included), and the ratios to the
  untracked run (the issue's budget: 2x);
* `evaluations (auto)`: how many of the `epochs + 1` records the budgeted schedule made;
* `steps`: the median training-step time of an untracked epoch (`epoch_time_s` in metrics.csv) and `tracking`:
  the median cost of one evaluation (`cost_s` in interactions.jsonl): with `every: 1`, a run costs about
  `1 + tracking / (steps + validation)` times the untracked one;
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
from typing import Any

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


def one_run(path: str, bundle, epochs: int, every: str | None, players: int, clock: EpochClock) -> dict[str, Any]:
    """Train `path` for `epochs` epochs (tracking off, or at `every`): wall times, step times, tracking costs."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"train.epochs={epochs}", "train.early_stopping_patience=null", "train.device=cpu",
                     f"output_dir={tmp}"]
        if every is not None:
            overrides.append(f"train.track_interactions={{players: {players}, every: {every}}}")
        cfg = load_config(path, overrides)
        clock.times.clear()
        t0 = time.perf_counter()
        train(cfg, data=bundle, overwrite=True)
        run_s = time.perf_counter() - t0
        with (Path(tmp) / "metrics.csv").open() as f:
            steps = [float(r["epoch_time_s"]) for r in csv.DictReader(f)]
        records = read_records(Path(tmp) / "interactions.jsonl") if every is not None else []
    return {"run_s": run_s, "walls": clock.intervals(), "steps": steps, "costs": [r["cost_s"] for r in records],
            "tracked_epochs": [r["epoch"] for r in records]}


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
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (at most the config's own)")
    parser.add_argument("--rounds", type=int, default=1, help="triples of runs (off, auto, every 1) per config")
    parser.add_argument("--structure", action="store_true", help="structure vs oracle per evaluation instead")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
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
    modes: list[str | None] = [None, "auto", "1"]  # off, the default schedule, every epoch
    for path in args.configs:
        cfg = load_config(path)
        bundle = load_data(cfg)
        epochs = min(args.epochs, cfg.train.epochs)
        players = min(10, bundle.info.input_shape[0])
        runs: dict[str | None, list[dict[str, Any]]] = {m: [] for m in modes}
        t0 = time.perf_counter()
        for r in range(args.rounds):
            for mode in modes[r % 3:] + modes[: r % 3]:  # rotate the order from round to round
                runs[mode].append(one_run(path, bundle, epochs, mode, players, clock))
        run_s = {m: statistics.median(x["run_s"] for x in v) for m, v in runs.items()}
        model = cfg.model.name
        row = {
            "config": Path(path).stem, "model": model, "train_rows": len(bundle.train), "players": players,
            "epochs": epochs, "via": "structure" if model in ("shapnet_shallow", "shapnet_deep") else "oracle",
            "run_off_s": run_s[None], "run_auto_s": run_s["auto"], "run_every1_s": run_s["1"],
            "auto_ratio": run_s["auto"] / run_s[None], "every1_ratio": run_s["1"] / run_s[None],
            "auto_tracked": len(runs["auto"][0]["tracked_epochs"]),
            "tracking_s": statistics.median(c for x in runs["1"] for c in x["costs"]),
            "steps_s": statistics.median(s for x in runs[None] for s in x["steps"]),
            "bench_s": time.perf_counter() - t0,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| config | train rows | players | via | epochs | run off (s) | every: auto (s) | auto / off | "
          "evaluations (auto) | every: 1 (s) | every 1 / off | steps (s/epoch) | tracking (s/eval) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['train_rows']} | {r['players']} | {r['via']} | {r['epochs']} | "
              f"{r['run_off_s']:.1f} | {r['run_auto_s']:.1f} | {r['auto_ratio']:.2f}x | "
              f"{r['auto_tracked']} of {r['epochs'] + 1} | {r['run_every1_s']:.1f} | {r['every1_ratio']:.2f}x | "
              f"{r['steps_s']:.2f} | {r['tracking_s']:.2f} |")


if __name__ == "__main__":
    main()
