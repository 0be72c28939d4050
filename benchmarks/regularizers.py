"""Explanation regularizers, measured: fine-tune sweeps, accuracy against sparsity, and the curves.

For a family (`conv`: shapnet_conv_mnist on MNIST; `deep_yeast`: shapnet_deep_yeast on Yeast) and each
regularizer (`l1_final`: L1 on the final explanation; `l1_all`: L1 on every layer's representation; `linf`: L-inf
spreading of the final explanation), the shipped model is fine-tuned at several weights with the family's config
(`configs/finetune_*.yaml`, the same schedule for every weight), then every run and the unregularized start point
are measured on the test split:

* accuracy (the trainer's test accuracy of the run's best weights; the start point is evaluated here);
* on the first `--samples` test samples, the predicted class's attribution map of each: **n90** (fewest players
  holding 90% of the absolute mass), **peak share** (largest |attribution| / total) and **Gini** (see
  `shapnets.sparsity`), averaged over samples.

Usage:
    python benchmarks/regularizers.py sweep conv [--kinds l1_final linf] [--weights 0.005 0.02] [--parallel 3]
    python benchmarks/regularizers.py measure conv [--samples 1000]      # -> runs/regularizers/conv.json
    python benchmarks/regularizers.py plot conv --ship l1_final=0.02 linf=1 l1_all=0.001 --out docs/figures

`sweep` skips runs that have finished (their `summary.json` exists) and resumes interrupted ones, so it can be
called again after a kill. `plot` draws accuracy against n90 (L1 runs) and against peak share (L-inf runs), one
curve per regularizer, the start point and the shipped points marked, with the bars of issue 16 (n90 at most half
the start point's; peak share at most 0.6x; accuracy within 0.5 pt) as dashed lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "regularizers"

def _pruned_fine_tune(start: str, lr: float, epochs: int, seed: int, p: float, input_p: float = 0.0) -> tuple[str, ...]:
    """Overrides of a fine-tune over the whole training split from `start` with active pruning `p` after every hidden
    stage (and `input_p` of the input's pixels) on in training."""
    return (f"model.init_from={start}", "data.limit=null", f"optim.lr={lr}", f"train.epochs={epochs}",
            f"train.seed={seed}", f"model.args.prune=[{p},{p},{p},{p},0.0]", f"model.args.prune_input={input_p}",
            "model.args.prune_mode=active", "model.args.prune_during_training=true")


@dataclass(frozen=True)
class Kind:
    """One kind of sweep point: the loss term, where it applies, and how its fine-tune differs from the family's.

    `extra` holds `target=...` (which class map the term sees; `all` by default), `term.*=...` (more term arguments)
    and config overrides; `starts_from` names the `(kind, weight)` run a later fine-tune stage started from (the
    plot draws its curve from that point), the others start from the family's base model.
    """

    term: str
    layers: str
    label: str
    scaled: bool = False
    extra: tuple[str, ...] = ()
    starts_from: tuple[str, float] | None = None


def _continued(label: str, start: tuple[str, float], lr: float, epochs: int, seed: int, p: float,
               input_p: float = 0.0) -> Kind:
    """L1 on every layer, fine-tuned with pruning on (`_pruned_fine_tune`) from the conv family's run `start`."""
    path = f"runs/regularizers/conv_{start[0]}_{start[1]:g}/best.pt"
    return Kind("explanation_l1", "all", label, extra=_pruned_fine_tune(path, lr, epochs, seed, p, input_p),
                starts_from=start)


KIND_SPECS: dict[str, Kind] = {
    "l1_final": Kind("explanation_l1", "final", "L1 final"),
    "l1_all": Kind("explanation_l1", "all", "L1 all layers"),
    "linf": Kind("explanation_linf", "final", "L-inf"),
    "l1_final_scaled": Kind("explanation_l1", "final", "L1/L2 final", scaled=True),
    "linf_scaled": Kind("explanation_linf", "final", "L-inf/L1 final", scaled=True),
    # the scale-free terms on the map of each sample's label only (the one a user is shown), the others left free
    "l1_final_label": Kind("explanation_l1", "final", "L1/L2 final, label map", True, ("target=label",)),
    "linf_label": Kind("explanation_linf", "final", "L-inf/L1 final, label map", True, ("target=label",)),
    # a second fine-tune at a lower weight from the sparse but less accurate label-map run at 0.15: keep the
    # concentrated maps, win the accuracy back
    "l1_final_label_cont": Kind("explanation_l1", "final", "L1/L2 label map, 2nd fine-tune from 0.15", True, (
        "target=label", "model.init_from=runs/regularizers/conv_l1_final_label_0.15/best.pt", "train.seed=1"),
        starts_from=("l1_final_label", 0.15)),
    # ... and a third at a lower weight still, from that one
    "l1_final_label_cont2": Kind("explanation_l1", "final", "L1/L2 label map, 3rd fine-tune (0.15 -> 0.05 -> 0.02)",
                                 True, ("target=label",
                                        "model.init_from=runs/regularizers/conv_l1_final_label_cont_0.05/best.pt",
                                        "train.seed=2"), starts_from=("l1_final_label_cont", 0.05)),
    # L1 on every layer, trained with the pruning it is meant for: half of the active pixels after every hidden stage
    "l1_all_pruned": Kind("explanation_l1", "all", "L1 all layers + pruning (p=0.5) in training", extra=(
        "model.args.prune=[0.5,0.5,0.5,0.5,0.0]", "model.args.prune_mode=active",
        "model.args.prune_during_training=true")),
    "l1_all_pruned30": Kind("explanation_l1", "all", "L1 all layers + pruning (p=0.3) in training", extra=(
        "model.args.prune=[0.3,0.3,0.3,0.3,0.0]", "model.args.prune_mode=active",
        "model.args.prune_during_training=true")),
    # L1 on every hidden layer (not the final map: there L1 is |logit| and only shrinks the logits), trained with
    # threshold pruning (players under 5% of the sample's largest norm set to the reference): the small values the
    # penalty leaves are removed in training as they will be at inference
    "l1_all_thr": Kind("explanation_l1", "all", "L1 hidden layers + threshold pruning (0.05) in training", extra=(
        "term.layer_weights=[1,1,1,1,0]", "model.args.prune=[0.05,0.05,0.05,0.05,0.0]",
        "model.args.prune_mode=threshold", "model.args.prune_during_training=true")),
    # shapnet_conv_mnist_l1_all fine-tuned further with the same L1 term and the pruning it is meant for on, over the
    # whole training split at half the learning rate: a pruned model that keeps its accuracy
    "l1_all_pruned30_cont": Kind("explanation_l1", "all",
                                 "shapnet_conv_mnist_l1_all + pruning (p=0.3) in training, whole split",
                                 extra=_pruned_fine_tune("shapnet_conv_mnist_l1_all", 0.001, 1, 0, 0.3)),
    "l1_all_pruned40_cont": Kind("explanation_l1", "all",
                                 "shapnet_conv_mnist_l1_all + pruning (p=0.4) in training, whole split",
                                 extra=_pruned_fine_tune("shapnet_conv_mnist_l1_all", 0.001, 1, 0, 0.4)),
    # ... and two more epochs from that one at a quarter of the learning rate, at p = 0.3 or 0.35
    "l1_all_pruned30_cont2": _continued("the p=0.3 run + 2 epochs at p=0.3", ("l1_all_pruned30_cont", 0.0001),
                                        0.0005, 2, 1, 0.3),
    "l1_all_pruned35_cont2": _continued("the p=0.3 run + 2 epochs at p=0.35", ("l1_all_pruned30_cont", 0.0001),
                                        0.0005, 2, 1, 0.35),
    # from the p = 0.3 run (+2 epochs), with the input's pixels pruned too (prune_input) and lighter stage pruning
    "l1_all_in30_pruned20": _continued("the p=0.3 run + 2 epochs with input pruning 0.3 and p=0.2",
                                       ("l1_all_pruned30_cont2", 0.0001), 0.0005, 2, 3, 0.2, 0.3),
    "l1_all_in20_pruned20": _continued("the p=0.3 run + 2 epochs with input pruning 0.2 and p=0.2",
                                       ("l1_all_pruned30_cont2", 0.0001), 0.0005, 2, 3, 0.2, 0.2),
    # ... and two more epochs of the input-0.3 one at 0.0003
    "l1_all_in30_pruned20_cont": _continued("the input-0.3 run + 2 epochs at lr 0.0003",
                                            ("l1_all_in30_pruned20", 0.0001), 0.0003, 2, 4, 0.2, 0.3),
    # ... or two at 0.0002 with the pruning it is shipped near (p = 0.15 after every stage, 0.35 of the input)
    "l1_all_in35_pruned15_cont": _continued("the input-0.3 run + 2 epochs at lr 0.0002, input 0.35 and p=0.15",
                                            ("l1_all_in30_pruned20", 0.0001), 0.0002, 2, 5, 0.15, 0.35),
    # ... and two more from that one at p = 0.2
    "l1_all_in35_pruned20_cont2": _continued("that one + 2 epochs at lr 0.0002, input 0.35 and p=0.2",
                                             ("l1_all_in35_pruned15_cont", 0.0001), 0.0002, 2, 6, 0.2, 0.35),
    # The control for the authors' claim: the same pruning-aware fine-tune of shapnet_conv_mnist with L1 on every
    # layer (weight 0.0001) and without it (weight 0), so that L1's own share is separated from the training
    "l1_all_prune_control": Kind("explanation_l1", "all",
                                 "shapnet_conv_mnist + 2 epochs at p=0.15 and input 0.35, with or without L1",
                                 extra=_pruned_fine_tune("shapnet_conv_mnist", 0.0005, 2, 7, 0.15, 0.35)),
    # ... and three more from that one, still at p = 0.2
    "l1_all_in35_pruned20_cont3": _continued("the p=0.2 run + 3 epochs at lr 0.0002, input 0.35 and p=0.2",
                                             ("l1_all_in35_pruned20_cont2", 0.0001), 0.0002, 3, 8, 0.2, 0.35),
    # ... and two more from the shipped one (in35_pruned15_cont) with 0.45 of the input's pixels pruned (fewer stage-0
    # coalitions, the largest share of the work)
    "l1_all_in45_pruned15_cont": _continued("the shipped run + 2 epochs at lr 0.0002, input 0.45 and p=0.15",
                                            ("l1_all_in35_pruned15_cont", 0.0001), 0.0002, 2, 9, 0.15, 0.45),
}
KINDS = tuple(KIND_SPECS)


@dataclass(frozen=True)
class Family:
    """One model to regularize: its start point, fine-tune configs per regularizer and default weights (a kind
    without weights here is not swept for this family unless `--weights` is given)."""

    base: str
    configs: dict[str, str]
    weights: dict[str, list[float]]
    overrides: tuple[str, ...] = ()
    kind_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # after `overrides`


FAMILIES = {
    "conv": Family(
        base="shapnet_conv_mnist",
        configs={"l1_final": "finetune_conv_mnist_l1_final", "l1_all": "finetune_conv_mnist_l1_all",
                 "linf": "finetune_conv_mnist_linf"},
        weights={"l1_final": [0.005, 0.02], "l1_all": [0.0001, 0.0003, 0.003], "linf": [0.3, 1.0],
                 "l1_final_scaled": [0.005, 0.02], "linf_scaled": [1.0, 5.0], "l1_final_label": [0.05, 0.15, 0.3],
                 "linf_label": [10.0, 30.0], "l1_final_label_cont": [0.05], "l1_final_label_cont2": [0.02],
                 "l1_all_pruned": [0.001],
                 "l1_all_pruned30": [0.001], "l1_all_thr": [0.002], "l1_all_pruned30_cont": [0.0001],
                 "l1_all_pruned40_cont": [0.0001], "l1_all_pruned30_cont2": [0.0001],
                 "l1_all_pruned35_cont2": [0.0001],
                 "l1_all_in30_pruned20": [0.0001], "l1_all_in20_pruned20": [0.0001],
                 "l1_all_in30_pruned20_cont": [0.0001], "l1_all_in35_pruned15_cont": [0.0001],
                 "l1_all_in35_pruned20_cont2": [0.0001], "l1_all_prune_control": [0.0, 0.0001],
                 "l1_all_in35_pruned20_cont3": [0.0001], "l1_all_in45_pruned15_cont": [0.0001]},
        overrides=("data.limit=10000",),
        # 30,000 training images: at 10,000 the label-map runs reached the sparsity but not yet the accuracy
        kind_overrides={kind: ("data.limit=30000",) for kind in (
            "l1_final_label", "linf_label", "l1_final_label_cont", "l1_final_label_cont2", "l1_all", "l1_all_pruned",
            "l1_all_pruned30", "l1_all_thr")},
    ),
    "deep_yeast": Family(
        base="shapnet_deep_yeast",
        configs={kind: "finetune_deep_yeast_l1" for kind in KINDS},
        weights={"l1_final": [0.01, 0.03, 0.1, 0.3], "l1_all": [0.002, 0.01, 0.03], "linf": [0.1, 0.3, 1.0, 3.0],
                 "l1_final_scaled": [0.01, 0.03, 0.1], "linf_scaled": [0.3, 1.0, 3.0],
                 "l1_final_label": [0.1, 0.3, 1.0], "linf_label": [0.3, 1.0, 3.0]},
    ),
}


def run_dir(family: str, kind: str, weight: float) -> Path:
    return RUNS / f"{family}_{kind}_{weight:g}"


def train_command(family: str, kind: str, weight: float) -> list[str]:
    """The `shapnets train` command of one sweep point (resumes an interrupted run)."""
    spec = FAMILIES[family]
    kind_spec = KIND_SPECS[kind]
    term, layers, scaled, extra = kind_spec.term, kind_spec.layers, kind_spec.scaled, kind_spec.extra
    target = next((e.split("=", 1)[1] for e in extra if e.startswith("target=")), "all")
    term_args = "".join(f", {e[5:].replace('=', ': ', 1)}" for e in extra if e.startswith("term."))
    extra = tuple(e for e in extra if not e.startswith(("target=", "term.")))
    out = run_dir(family, kind, weight)
    config = spec.configs.get(kind, spec.configs["l1_all" if "all" in kind else "l1_final"])
    command = [sys.executable, "-m", "training", "train", str(ROOT / "configs" / f"{config}.yaml"),
               "--output", str(out), "--set", f"name={out.name}",
               "--set", f"loss.terms=[{{name: {term}, weight: {weight}, layers: {layers}, target: {target}, "
               f"normalize: {str(scaled).lower()}{term_args}}}]"]
    for override in (*spec.overrides, *spec.kind_overrides.get(kind, ()), *extra):
        command += ["--set", override]
    return command + (["--resume"] if (out / "last.pt").is_file() else ["--overwrite"])


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = FAMILIES[args.family]
    points = [(kind, w) for kind in args.kinds for w in (args.weights or spec.weights.get(kind, []))]
    todo = [(k, w) for k, w in points if not (run_dir(args.family, k, w) / "summary.json").is_file()]
    print(f"[sweep] {args.family}: {len(points)} points, {len(points) - len(todo)} done, {len(todo)} to run",
          flush=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    running: list[tuple[subprocess.Popen[bytes], str]] = []
    start = time.monotonic()
    while todo or running:
        while todo and len(running) < args.parallel:
            kind, weight = todo.pop(0)
            out = run_dir(args.family, kind, weight)
            log = open(RUNS / f"{out.name}.log", "ab")  # noqa: SIM115 - the child owns it
            running.append((subprocess.Popen(train_command(args.family, kind, weight), cwd=ROOT, env=env,
                                             stdout=log, stderr=subprocess.STDOUT), out.name))
        time.sleep(2)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                print(f"[sweep] {name}: exit {proc.returncode} after {time.monotonic() - start:.0f}s; "
                      f"{len(todo) + len(running)} left", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ measuring
def measure_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> dict[str, float]:
    """Accuracy on `(x, y)` and the mean sparsity of the predicted class's maps (`shapnets.sparsity`): the same
    measurement a fine-tune reports before and after (`training.trainer.explanation_effect`)."""
    from training.trainer import explanation_effect

    measured = explanation_effect(model, zip(x.split(batch), y.split(batch)), torch.device("cpu"),
                                  max_samples=len(y))
    return {k: v for k, v in measured.items() if k != "samples"}


def _test_tensors(loaded: Any, data_root: str | None, samples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from training.cli import load_split

    dataset = load_split(loaded, "test", data_root)
    n = len(dataset) if samples is None else min(samples, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([torch.as_tensor(i[0]) for i in items]), torch.tensor([int(i[1]) for i in items])


def cmd_measure(args: argparse.Namespace) -> int:
    from training.cli import load_source

    spec = FAMILIES[args.family]
    out_file = RUNS / f"{args.family}.json"
    previous = json.loads(out_file.read_text()) if out_file.is_file() else {}
    rows = {row["run"]: row for row in previous.get("rows", [])}
    base = load_source(spec.base, torch.device("cpu"))
    x, y = _test_tensors(base, args.data_root, args.samples)
    if spec.base not in rows:
        full_x, full_y = _test_tensors(base, args.data_root, None)
        with torch.no_grad():
            test_acc = float(torch.cat([base.model(b).argmax(1) for b in full_x.split(500)]).eq(full_y).float().mean())
        rows[spec.base] = {"run": spec.base, "kind": "none", "weight": 0.0, "test_acc": test_acc,
                           **measure_model(base.model, x, y)}
    for kind in KINDS:
        for folder in sorted(RUNS.glob(f"{args.family}_{kind}_*")):
            summary = folder / "summary.json"
            if folder.name.rsplit("_", 1)[0] != f"{args.family}_{kind}":
                continue  # another kind whose name starts with this one's
            if not folder.is_dir() or not summary.is_file() or (folder.name in rows and not args.remeasure):
                continue
            loaded = load_source(str(folder), torch.device("cpu"))
            weight = float(folder.name.rsplit("_", 1)[1])
            test_acc = json.loads(summary.read_text())["test"]["acc"]
            rows[folder.name] = {"run": folder.name, "kind": kind, "weight": weight, "test_acc": test_acc,
                                 **measure_model(loaded.model, x, y)}
            print(f"[measure] {folder.name}: {rows[folder.name]}", flush=True)
    ordered = sorted(rows.values(), key=lambda r: (KINDS.index(r["kind"]) if r["kind"] in KINDS else -1, r["weight"]))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps({"family": args.family, "base": spec.base, "samples": len(y), "rows": ordered},
                                   indent=2))
    print(table(ordered, rows[spec.base]))
    return 0


def table(rows: list[dict[str, Any]], base: dict[str, Any]) -> str:
    """Markdown: one row per model, with ratios to the start point."""
    lines = ["| run | regularizer | weight | test acc. | n90 | n90 / start | peak share | peak / start | Gini |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["run"], r["kind"], f"{r['weight']:g}", f"{100 * r['test_acc']:.2f}%", f"{r['n90']:.1f}",
                 f"{r['n90'] / base['n90']:.2f}", f"{r['peak_share']:.4f}",
                 f"{r['peak_share'] / base['peak_share']:.2f}", f"{r['gini']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plotting
def cmd_plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((RUNS / f"{args.family}.json").read_text())
    rows = data["rows"]
    base = next(r for r in rows if r["kind"] == "none")
    shipped = {}
    for item in args.ship or []:
        kind, weight = item.split("=")
        shipped[kind] = float(weight)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), layout="constrained")
    colors = {"l1_final": "#f1948a", "l1_all": "#85c1e9", "linf": "#82e0aa", "l1_final_scaled": "#c0392b",
              "linf_scaled": "#1e8449", "l1_final_label": "#7b241c", "linf_label": "#0b5345",
              "l1_final_label_cont": "#e67e22", "l1_final_label_cont2": "#f5b041",
              "l1_all_pruned": "#1f618d", "l1_all_pruned30": "#1f618d",
              "l1_all_thr": "#5dade2"}
    labels = {kind: spec.label for kind, spec in KIND_SPECS.items()}
    for ax, metric, kinds, bar, name in (
            (axes[0], "n90", ("l1_final", "l1_final_scaled", "l1_final_label", "l1_final_label_cont",
                              "l1_final_label_cont2", "l1_all", "l1_all_pruned30", "l1_all_thr"), 0.5,
             "n90: players holding 90% of |attribution| (fewer = sparser)"),
            (axes[1], "peak_share", ("linf", "linf_scaled", "linf_label"), 0.6,
             "peak share: largest |attribution| / total (lower = spread)")):
        for kind in kinds:
            pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["weight"])
            if not pts:
                continue
            # A later fine-tune stage starts from its predecessor's point, the others from the start model.
            start = next((r for r in rows if (r["kind"], r["weight"]) == KIND_SPECS[kind].starts_from), base)
            xs = [start[metric]] + [r[metric] for r in pts]
            ys = [100 * start["test_acc"]] + [100 * r["test_acc"] for r in pts]
            ax.plot(xs, ys, "o-", color=colors[kind], label=labels[kind])
            for r in pts:
                ax.annotate(f"{r['weight']:g}", (r[metric], 100 * r["test_acc"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
                if shipped.get(kind) == r["weight"]:
                    ax.plot(r[metric], 100 * r["test_acc"], "*", ms=16, color=colors[kind], mec="black",
                            label=f"shipped {labels[kind]}")
        ax.plot(base[metric], 100 * base["test_acc"], "s", ms=9, color="black", label=f"start: {data['base']}")
        ax.axvline(bar * base[metric], ls="--", color="grey", lw=1)
        ax.axhline(100 * base["test_acc"] - 0.5, ls=":", color="grey", lw=1)
        ax.text(bar * base[metric], ax.get_ylim()[0], f" {bar:g}x start", fontsize=7, color="grey", va="bottom")
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle(f"{data['base']}: fine-tuned with explanation regularizers at several weights (labels); "
                 f"sparsity on {data['samples']} test samples; dotted: -0.5 pt", fontsize=9)
    out = Path(args.out) / f"regularizers_{args.family}_sweep.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sweep", help="fine-tune at several weights (resumable)")
    p.add_argument("family", choices=sorted(FAMILIES))
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--weights", nargs="+", type=float, default=None, help="default: the family's grid")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("measure", help="accuracy and sparsity of every finished run and the start point")
    p.add_argument("family", choices=sorted(FAMILIES))
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--data-root", default=None)
    p.add_argument("--remeasure", action="store_true", help="measure runs already in the JSON again")
    p.set_defaults(fn=cmd_measure)
    p = sub.add_parser("plot", help="accuracy against sparsity, one curve per regularizer")
    p.add_argument("family", choices=sorted(FAMILIES))
    p.add_argument("--ship", nargs="*", metavar="KIND=WEIGHT", help="the shipped points to mark")
    p.add_argument("--out", default="docs/figures")
    p.set_defaults(fn=cmd_plot)
    args = parser.parse_args(argv)
    bad = [w for w in getattr(args, "weights", None) or [] if not w >= 0]
    if bad:
        parser.error(f"weights must be >= 0, got {bad}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
