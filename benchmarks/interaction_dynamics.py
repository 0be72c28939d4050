"""Figures and numbers of docs/interactions.md from tracked runs (`train.track_interactions`).

    python benchmarks/interaction_dynamics.py runs/interactions_mlp_yeast runs/interactions_cnn_mnist ...
        [--figures docs/figures]

For each run folder it redraws `interaction_dynamics.png` with the run's name as title into
`<figures>/interactions_<run>.png` and prints, per run and kind (AND, OR; training samples), the numbers that say
whether the two phases appear (`training.interaction_tracking.summarize`): the strength-weighted mean order of the
salient interactions at initialisation, its minimum after it (the end of phase 1) and at the end; the epoch of that
minimum and the epoch from which it rises again (phase 2) next to the epoch of the lowest validation loss (where the
train/test gap starts to widen); the share of salient strength at orders <= 2 and at the upper half of the orders
at those three points; the final train/test Jaccard similarity at order 1, 2 and the highest order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.interaction_tracking import RECORDS_FILE, plot_dynamics, read_records, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    lines = ["| run | kind | mean order: init -> min (epoch) -> end | order rising from epoch "
             "| lowest val loss at epoch | low-order share "
             "init / min / end | high-order share init / min / end | final Jaccard order 1 / 2 / top | final gap |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in args.runs:
        records = read_records(run / RECORDS_FILE)
        short = run.name.removeprefix("interactions_")
        figure = plot_dynamics(records, args.figures / f"interactions_{short}.png", title=run.name)
        print(f"{run.name}: {len(records)} records -> {figure}")
        for kind in ("and", "or"):
            if kind not in records[0]:
                continue
            s = summarize(records, kind)
            print(json.dumps({"run": run.name, **s}))
            jac = s["final_jaccard"]
            lines.append(
                f"| {run.name} | {kind.upper()} | {s['init_order']:.2f} -> {s['min_order']:.2f} "
                f"({s['min_order_epoch']}) -> {s['final_order']:.2f} | {s['rise_epoch']} | {s['best_val_epoch']} | "
                + " / ".join(f"{v:.2f}" for v in s["low_share"]) + " | "
                + " / ".join(f"{v:.2f}" for v in s["high_share"]) + " | "
                + f"{jac[0]:.2f} / {jac[1]:.2f} / {jac[-1]:.2f} | "
                + (f"{s['final_gap']:.2f}" if s["final_gap"] is not None else "n/a") + " |")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
