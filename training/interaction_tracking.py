"""Watch AND/OR interactions while a model trains (`train.track_interactions` in a config).

Once before the first step, after the last epoch, and in between every `every` epochs (or, with `every: auto`, the
default, whenever the tracking time stays within `budget` x the training time so far), `InteractionTracker`
computes the exact interactions of a fixed set of `samples` training and `samples` test samples over `players`
input players:

* tables: the `players` features that differ most from the reference on the training set (largest mean
  `|x - reference|`; the inputs are z-scored, so their variances are all 1); the other features stay at the
  reference;
* images: a coarse `gh x gw` grid of patches covering the image, `gh * gw = players` (`gh` the largest divisor of
  `players` not above its square root: 9 players give 3 x 3 patches of about 9 x 9 pixels on MNIST);
* the game of a sample is `v(S) = out(x_S ; reference_rest)` where `out` is the log-odds of the sample's true class,
  `z_y - logsumexp_{c != y} z_c` (`output: log_odds`, the papers' choice), or its logit (`output: logit`);
* a Shallow ShapNet gives its logits on every coalition of the players from its own modules' dividends (exact, no
  masked forward pass: restricting a game to some players keeps the dividends of their subsets), and the log-odds
  are computed from those logits; every other model goes through the oracle, `2^players` forward rows per sample.

Each evaluation appends one JSON line to `<run>/interactions.jsonl` (epoch, the trainer's training and validation
loss and their gap, per-order strengths and counts of salient interactions of the training and test samples, the
train/test Jaccard similarity per order, the largest universal-matching error, the cost in seconds);
`finish()` draws `<run>/interaction_dynamics.png`. The statistics are defined in `shapnets.interaction_stats`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shapnets import DeepShapNet, ShallowShapNet
from shapnets.and_or import and_or_interactions, or_inverse_transform, or_transform, zeta_transform
from shapnets.interaction_stats import jaccard_by_order, order_statistics
from shapnets.interactions import moebius_transform
from shapnets.oracle import coalition_values

from .config import TRACK_INTERACTIONS_DEFAULTS, UserError

__all__ = ["DYNAMICS_FIGURE", "RECORDS_FILE", "InteractionTracker", "grid_players", "mean_order", "plot_dynamics",
           "read_records", "summarize"]

log = logging.getLogger("training")

RECORDS_FILE = "interactions.jsonl"
DYNAMICS_FIGURE = "interaction_dynamics.png"
# Masked copies per forward pass: small enough to stay in cache (a 3-stage CNN on 28 x 28 images ran ~1.5x faster
# in chunks of 1024 than of 8192 on one CPU core), large enough for the per-call overhead not to matter.
_CHUNK = 1024


def grid_players(height: int, width: int, players: int) -> tuple[Tensor, tuple[int, int]]:
    """`(H, W)` map of pixels to `players` patches of a near-square grid, and the grid's `(gh, gw)`."""
    gh = max(d for d in range(1, math.isqrt(players) + 1) if players % d == 0)
    gw = players // gh
    if gh > height or gw > width:
        raise UserError(f"train.track_interactions.players={players}: a {gh} x {gw} grid of patches does not fit "
                        f"images of {height} x {width} pixels")
    rows = torch.div(torch.arange(height) * gh, height, rounding_mode="floor")
    cols = torch.div(torch.arange(width) * gw, width, rounding_mode="floor")
    return rows[:, None] * gw + cols[None, :], (gh, gw)


def _balanced_indices(labels: Tensor, count: int, seed: int) -> Tensor:
    """`count` indices (fewer if the split is smaller) taking the classes in turn, each in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    queues = [idx[torch.randperm(len(idx), generator=g)].tolist()
              for c in labels.unique().tolist() if len(idx := (labels == c).nonzero().flatten())]
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for q in queues:
            if q and len(picked) < count:
                picked.append(q.pop(0))
    return torch.tensor(sorted(picked), dtype=torch.long)


def _structural_kind(model: nn.Module) -> str | None:
    """`"shallow"` / `"deep"` where the model's own structure gives its outputs on every coalition, else None.

    A Deep ShapNet with pruning in eval mode is left to the oracle: pruning couples all rows of a sample.
    """
    if isinstance(model, ShallowShapNet):
        return "shallow"
    if isinstance(model, DeepShapNet) and not any(model.prune):
        return "deep"
    return None


def _split_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    if hasattr(dataset, "features") and hasattr(dataset, "labels"):
        return dataset.features, dataset.labels
    xs, ys = zip(*[dataset[i] for i in range(len(dataset))])
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long)


class InteractionTracker:
    """The `train.track_interactions` hook: checked when built (before training), then run by the trainer.

    Args:
        options: the validated `train.track_interactions` mapping (`training.config.track_interactions_options`).
        model: the model being trained (its `reference`, when it has one, is the masking reference).
        bundle: the `DataBundle`; samples come from `train` and from `test` (`val` if the test split is empty).
        device: where the model lives.
        out: the run folder.

    Raises:
        UserError: the inputs have fewer players than asked, or an input layout the tracker cannot split.
    """

    def __init__(self, options: dict[str, Any], model: nn.Module, bundle: Any, device: torch.device,
                 out: Path) -> None:
        self.options = dict(options)
        self.samples, self.players, self.every = options["samples"], options["players"], options["every"]
        self.kind, self.split, self.tau, self.output = options["kind"], options["split"], options["tau"], \
            options["output"]
        self.device, self.path, self.figure = device, Path(out) / RECORDS_FILE, Path(out) / DYNAMICS_FIGURE
        info = bundle.info
        shape = tuple(info.input_shape)
        train_x, train_y = _split_tensors(bundle.train)
        test_set = bundle.test if bundle.test is not None and len(bundle.test) else bundle.val
        if test_set is None or not len(test_set):
            raise UserError("train.track_interactions needs test (or validation) samples: the data set has none")
        test_x, test_y = _split_tensors(test_set)

        reference = getattr(model, "reference", None)
        if not isinstance(reference, Tensor):
            reference = torch.tensor(info.reference) if info.reference is not None else torch.zeros(shape[0])
        reference = reference.detach().float().cpu()
        if reference.numel() == math.prod(shape):
            reference = reference.reshape(shape)  # e.g. a ShapNet's (D, 1): one value per feature and channel
        elif len(shape) == 3 and reference.dim() == 1:
            reference = reference.view(-1, 1, 1)  # one value per channel
        try:
            self.reference = torch.broadcast_to(reference, shape).clone()
        except RuntimeError as e:
            raise UserError(f"train.track_interactions: the reference of shape {tuple(reference.shape)} does not fit "
                            f"inputs of shape {shape}") from e

        self.chosen: Tensor | None = None  # tabular: the tracked features
        self.player_map: Tensor | None = None  # images: pixel -> patch
        if len(shape) == 1:
            if shape[0] < self.players:
                raise UserError(f"train.track_interactions.players={self.players}, but the inputs of {info.name} have "
                                f"only {shape[0]} features: ask for at most {shape[0]}")
            spread = (train_x - self.reference).abs().mean(0)
            self.chosen = spread.argsort(descending=True, stable=True)[: self.players].sort().values
            names = info.feature_names
            self.player_names = [names[i] for i in self.chosen.tolist()] if names else None
            self.layout = f"{self.players} features with the largest mean |x - reference|"
        elif len(shape) == 3:
            _, H, W = shape
            if self.players > H * W:
                raise UserError(f"train.track_interactions.players={self.players}, but the images of {info.name} have "
                                f"only {H * W} pixels")
            pixel_map, (gh, gw) = grid_players(H, W, self.players)
            self.player_map = pixel_map.expand(shape[0], H, W)
            self.player_names = None
            self.layout = f"a {gh} x {gw} grid of patches"
        else:
            raise UserError(f"train.track_interactions supports tables (D,) and images (C, H, W), got inputs of shape "
                            f"{shape}")
        # Shallow and Deep ShapNets give their logits on every coalition from their own structure (any output is a
        # function of them); every other model goes through the oracle's masked forward passes.
        self.structural = _structural_kind(model) if self.chosen is not None else None
        seed = 0
        i_train, i_test = _balanced_indices(train_y, self.samples, seed), _balanced_indices(test_y, self.samples, seed)
        self.train_x, self.train_y = train_x[i_train].float(), train_y[i_train]
        self.test_x, self.test_y = test_x[i_test].float(), test_y[i_test]
        self.budget = float(options.get("budget", TRACK_INTERACTIONS_DEFAULTS["budget"]))
        self.total_cost = 0.0
        self._last_cost = 0.0
        self._clock = 0.0
        self._tracked_since_clock = 0.0
        self.skipped = 0
        self.epoch_costs: list[tuple[float, float]] = []  # (tracking s, the epoch's training-step s) per evaluation

    # ------------------------------------------------------------------ the games
    def _values(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """`(2^players, B, 1)`: the tracked output of every sample on every coalition of the players."""
        x = x.to(self.device)
        ref = self.reference.to(self.device, x.dtype)
        if self.structural == "shallow":
            logits = self._structural_values(model, x)
        elif self.structural == "deep":
            logits = model.coalition_outputs(x, self.chosen)
        elif self.chosen is not None:
            chosen = self.chosen.to(self.device)

            def fn(z: Tensor) -> Tensor:  # the chosen features from z, every other one at the reference
                return model(ref.expand(z.shape[0], -1).index_copy(1, chosen, z))

            logits, _ = coalition_values(fn, x[:, chosen], ref[chosen], None, self.players, _CHUNK,
                                         "track_interactions")
        else:
            logits, _ = coalition_values(model, x, ref, self.player_map.to(self.device),
                                         self.players, _CHUNK, "track_interactions")
        logits = logits.double()
        target = y.to(self.device).view(1, -1, 1).expand(logits.shape[0], -1, 1)
        true = logits.gather(2, target)
        if self.output == "logit":
            return true
        others = logits.scatter(2, target, -math.inf).logsumexp(2, keepdim=True)
        return true - others

    def _structural_values(self, model: nn.Module, x: Tensor) -> Tensor:
        """A Shallow ShapNet's logits on every coalition of the chosen features, from its own dividends."""
        full = model.interactions(x)  # dividends of every subset of every module, no masking
        position = {f: j for j, f in enumerate(self.chosen.tolist())}
        rows = [sum(1 << position[f] for f in s) if all(f in position for f in s) else -1 for s in full.subsets]
        keep = torch.tensor([t for t, r in enumerate(rows) if r >= 0], dtype=torch.long, device=x.device)
        target = torch.tensor([r for r in rows if r >= 0], dtype=torch.long, device=x.device)
        dividends = full.base.new_zeros(2**self.players, *full.base.shape)
        dividends[0] = full.base
        dividends.index_add_(0, target, full.dividends[:, keep].transpose(0, 1))
        return zeta_transform(dividends, self.players)

    def _records(self, values: Tensor) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
        """`(values (B, S), orders (S,))` of each tracked kind, and the largest universal-matching error.

        The half split is done here on plain tensors (the records' Shapley interaction indices are not needed);
        the sparse split goes through `shapnets.and_or.and_or_interactions`.
        """
        n = self.players
        orders = torch.tensor([bin(t).count("1") for t in range(1, 2**n)], device=values.device)
        if self.kind == "and_or" and self.split == "sparse":
            both = and_or_interactions(values, "sparse")
            and_rows, or_rows = both.coalition_rows(both.and_), both.coalition_rows(both.or_)
        else:
            share = {"and": 1.0, "or": 0.0, "and_or": 0.5}[self.kind]
            and_rows = moebius_transform(share * values, n)
            or_rows = or_transform((1 - share) * values, n)
        err = (zeta_transform(and_rows, n) + or_inverse_transform(or_rows, n) - values).abs().max().item()
        found = {"and": (and_rows[1:, :, 0].T, orders), "or": (or_rows[1:, :, 0].T, orders)}
        if self.kind == "and_or":
            found["and_or"] = (torch.cat([found["and"][0], found["or"][0]], 1), torch.cat([orders, orders]))
        else:
            found = {self.kind: found[self.kind]}
        return found, err

    # ------------------------------------------------------------------ the hook
    @torch.no_grad()
    def evaluate(self, model: nn.Module, epoch: int, row: dict[str, Any] | None = None) -> dict[str, Any]:
        """Compute, append and return the record of `epoch` (0: before training); `row` is the trainer's."""
        t0 = time.perf_counter()
        was_training = model.training
        # Deep and Conv ShapNets skip modules whose players all sit at the reference (exact either way). On masked
        # copies the activity pattern changes from row to row and the grouping costs more than it saves: a Deep
        # ShapNet's masked forward passes ran 2.5-3x faster without it (yeast, adult; one CPU core).
        skip = getattr(model, "skip_inactive", None)
        model.eval()
        try:
            if isinstance(skip, bool):
                model.skip_inactive = False
            # Training and test samples in one evaluation: one pass of per-call costs instead of two.
            values = self._values(model, torch.cat([self.train_x, self.test_x]), torch.cat([self.train_y,
                                                                                            self.test_y]))
            split = len(self.train_y)
            train_records, train_err = self._records(values[:, :split])
            test_records, test_err = self._records(values[:, split:])
        finally:
            model.train(was_training)
            if isinstance(skip, bool):
                model.skip_inactive = skip
        record: dict[str, Any] = {"epoch": epoch}
        row = row or {}
        train_loss, val_loss = row.get("train_ce", row.get("train_loss")), row.get("val_loss")
        record.update(train_loss=train_loss, val_loss=val_loss,
                      loss_gap=val_loss - train_loss if train_loss is not None and val_loss is not None
                      and not math.isnan(val_loss) else None,
                      val_acc=row.get("val_acc"))
        for name in train_records:
            record[name] = {
                "train": order_statistics(train_records[name], self.tau, self.players).to_dict(),
                "test": order_statistics(test_records[name], self.tau, self.players).to_dict(),
                "jaccard": jaccard_by_order(train_records[name], self.train_y, test_records[name], self.test_y,
                                            self.players)["mean"],
            }
        record["matching_error"] = max(train_err, test_err)
        cost = time.perf_counter() - t0
        record["cost_s"] = cost
        self._last_cost = cost
        self.total_cost += cost
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def start(self, model: nn.Module, resume: bool) -> None:
        """A fresh run: empty `interactions.jsonl` and record the initial model (epoch 0)."""
        when = (f"whenever the tracking time stays within {self.budget:g}x the training time (every: auto)"
                if self.every == "auto" else f"every {self.every} epoch(s)")
        log.info("tracking %s interactions of %d train + %d test samples over %s (%s), %s, via %s",
                 self.kind, len(self.train_y), len(self.test_y), self.layout, self.output, when,
                 f"the {self.structural} ShapNet's own structure" if self.structural else
                 f"the oracle (2^{self.players} forward rows each)")
        if not (resume and self.path.is_file()):
            self.path.write_text("")
            rec = self.evaluate(model, 0)
            log.info("interactions at init: %.2fs", rec["cost_s"])
        self._clock = time.perf_counter()  # training time = wall time since here minus tracking time since here
        self._tracked_since_clock = 0.0

    def _due(self, epoch: int, is_last: bool) -> bool:
        """Whether epoch `epoch` is tracked: the last one always; else by `every`, or by the budget (`auto`)."""
        if is_last:
            return True
        if self.every != "auto":
            return epoch % self.every == 0
        trained = time.perf_counter() - self._clock - self._tracked_since_clock
        # The next evaluation is assumed to cost what the last one did (same samples, same model size).
        return self.total_cost + self._last_cost <= self.budget * trained

    def after_epoch(self, model: nn.Module, epoch: int, row: dict[str, Any], is_last: bool) -> None:
        """Record epoch `epoch` (1-based, completed) when it is due (`every` or the budget), and the last one."""
        if not self._due(epoch, is_last):
            self.skipped += 1
            return
        rec = self.evaluate(model, epoch, row)
        self._tracked_since_clock += rec["cost_s"]
        epoch_time = row.get("epoch_time_s")
        if epoch_time:
            self.epoch_costs.append((rec["cost_s"], epoch_time))
        log.info("interactions at epoch %d: %.2fs%s, matching error %.1e", epoch, rec["cost_s"],
                 f" ({rec['cost_s'] / epoch_time:.2f}x the epoch's {epoch_time:.2f}s)" if epoch_time else "",
                 rec["matching_error"])

    def finish(self) -> Path | None:
        """Draw `interaction_dynamics.png` from the records; None (and a log line) without matplotlib."""
        trained = time.perf_counter() - self._clock - self._tracked_since_clock if self._clock else math.nan
        log.info("interaction tracking: %.1fs in all (%.2fx the %.1fs of training since the first record), "
                 "%d epoch(s) not tracked%s", self.total_cost, self.total_cost / trained if trained > 0 else math.nan,
                 trained, self.skipped, f" to stay within budget {self.budget:g}" if self.every == "auto" else "")
        if self.epoch_costs:
            # The slow-down of a tracked epoch over its training steps alone (validation left out: an upper bound).
            ratios = sorted((cost + steps) / steps for cost, steps in self.epoch_costs)
            log.info("interaction tracking cost: median %.2fs per evaluation, a tracked epoch takes %.2fx its "
                     "training steps' time (median over %d epochs; worst %.2fx)",
                     sorted(c for c, _ in self.epoch_costs)[len(ratios) // 2], ratios[len(ratios) // 2],
                     len(ratios), ratios[-1])
        try:
            return plot_dynamics(read_records(self.path), self.figure)
        except ImportError:
            log.warning("matplotlib is not installed: %s not drawn", self.figure)
            return None


# ------------------------------------------------------------------ reading and drawing
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of an `interactions.jsonl`, in file order (the last one wins for a repeated epoch)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def mean_order(stats: dict[str, Any]) -> float:
    """Strength-weighted mean order of the salient interactions of one record's statistics (`OrderStatistics`)."""
    shares = [p - n for p, n in zip(stats["relative_positive"], stats["relative_negative"])]
    total = sum(shares)
    return sum((k + 1) * w for k, w in enumerate(shares)) / total if total > 0 else math.nan


def summarize(records: list[dict[str, Any]], kind: str = "and", split: str = "train") -> dict[str, Any]:
    """Numbers that say whether the two phases appear: mean order at init, its minimum and the end; loss turn.

    Returns:
        `init_order`, `min_order` and `min_order_epoch` (the end of phase 1: the lowest strength-weighted mean order
        after initialisation), `rise_epoch` (the first later epoch whose mean order has climbed 10% of the way from
        that minimum to the end: phase 2 under way), `final_order`, `best_val_epoch` (lowest validation loss: where
        the gap starts to widen), `low_share` / `high_share` (share of salient strength at orders <= 2 / >= n/2 + 1)
        at init, at the phase-1 minimum and at the end, and the final train/test Jaccard per order.
    """
    orders = [mean_order(r[kind][split]) for r in records]
    K = len(records[0][kind][split]["positive"])
    later = [(o, r["epoch"]) for o, r in zip(orders, records) if r["epoch"] > 0 and not math.isnan(o)]
    low_order, low_epoch = min(later) if later else (math.nan, None)
    with_val = [(r["val_loss"], r["epoch"]) for r in records if r.get("val_loss") is not None]

    def shares(rec: dict[str, Any]) -> tuple[float, float]:
        st = rec[kind][split]
        w = [p - n for p, n in zip(st["relative_positive"], st["relative_negative"])]
        total = sum(w) or math.nan
        return sum(w[:2]) / total, sum(w[K // 2:]) / total

    at_min = next(r for r in records if r["epoch"] == low_epoch) if low_epoch is not None else records[-1]
    # Phase 2 visibly under way: the first epoch after the minimum whose mean order has climbed 10% of the way
    # from the minimum to the final value (the minimum itself sits on a flat, noisy bottom).
    rise_epoch = None
    if low_epoch is not None and orders[-1] > low_order:
        bar = low_order + 0.1 * (orders[-1] - low_order)
        rise_epoch = next((r["epoch"] for o, r in zip(orders, records) if r["epoch"] > low_epoch and o >= bar), None)
    return {
        "kind": kind, "split": split, "orders": K,
        "init_order": orders[0], "min_order": low_order, "min_order_epoch": low_epoch, "rise_epoch": rise_epoch,
        "final_order": orders[-1],
        "best_val_epoch": min(with_val)[1] if with_val else None,
        "low_share": [shares(records[0])[0], shares(at_min)[0], shares(records[-1])[0]],
        "high_share": [shares(records[0])[1], shares(at_min)[1], shares(records[-1])[1]],
        "final_jaccard": records[-1][kind]["jaccard"],
        "final_gap": records[-1].get("loss_gap"),
    }


def plot_dynamics(records: list[dict[str, Any]], path: str | Path, title: str | None = None,
                  split: str = "train") -> Path:
    """Interaction dynamics against epoch (symlog axis: most of the change is early), one column per kind.

    Rows: the strength-weighted mean order of the salient interactions (training and test samples); the relative
    strength of the salient positive (above 0) and negative (below 0) interactions of each order of the `split`
    samples; the train/test Jaccard similarity per order; the trainer's training and validation loss and their gap.
    A dotted line marks the epoch of the lowest validation loss.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("and", "or") if records and k in records[0]]
    epochs = [r["epoch"] for r in records]
    K = len(records[0][kinds[0]][split]["positive"])
    colors = plt.get_cmap("viridis")(torch.linspace(0, 1, K).tolist())
    with_val = [(r["val_loss"], r["epoch"]) for r in records if r.get("val_loss") is not None]
    turn = min(with_val)[1] if with_val else None
    fig, axes = plt.subplots(4, len(kinds), figsize=(5.5 * len(kinds), 11), sharex=True, squeeze=False)
    for col, kind in enumerate(kinds):
        ax = axes[0, col]
        for which, style in (("train", "-"), ("test", "--")):
            ax.plot(epochs, [mean_order(r[kind][which]) for r in records], style, color="black",
                    label=f"{which} samples")
        ax.set_title(f"{kind.upper()} interactions")
        ax.set_ylabel("mean order of salient |I|")
        ax.legend(fontsize=7)
        ax = axes[1, col]
        for k in range(K):
            ax.plot(epochs, [r[kind][split]["relative_positive"][k] for r in records], color=colors[k],
                    label=f"order {k + 1}")
            ax.plot(epochs, [r[kind][split]["relative_negative"][k] for r in records], color=colors[k],
                    linestyle="--")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_ylabel(f"share of salient |I| ({split})\n+ solid, - dashed")
        if col == len(kinds) - 1:
            ax.legend(fontsize=7, ncol=2)
        ax = axes[2, col]
        for k in range(K):
            ax.plot(epochs, [r[kind]["jaccard"][k] for r in records], color=colors[k])
        ax.set_ylabel("train/test Jaccard per order")
        ax.set_ylim(0, 1)
        ax = axes[3, col]
        pts = [(r["epoch"], r["train_loss"], r["val_loss"], r["loss_gap"]) for r in records
               if r.get("loss_gap") is not None]
        if pts:
            e, tr, va, gap = zip(*pts)
            ax.plot(e, tr, label="train loss")
            ax.plot(e, va, label="val loss")
            ax.plot(e, gap, label="gap (val - train)", color="black")
            ax.legend(fontsize=7)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy")
        for row in axes[:, col]:
            if turn is not None:
                row.axvline(turn, color="red", linestyle=":", linewidth=1)
            if max(epochs) > 20:
                row.set_xscale("symlog", linthresh=1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
