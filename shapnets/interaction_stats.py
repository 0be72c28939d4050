"""Order statistics of interactions over a batch (Zhang et al.'s measures of what a network has learned).

For a batch of games over the same players (one scalar output per sample, e.g. the log-odds of the true class):

* **salient** interactions: `|I(T)| > tau * max_T' |I(T')|`, the maximum taken per sample over every listed
  subset of every record passed together (AND and OR interactions share one threshold, as in the papers).
  `tau = 0.05` by default: the papers keep the interactions above a small fraction of the largest one; 0.05 is the
  value we use throughout (pass another to compare);
* **strength per order** `k`: per sample, the sum of the salient positive interactions of order `k`, and
  separately the sum of the salient negative ones (a negative number), averaged over the batch; `relative_*`
  divides each sample's sums by its total salient `|I|` first, so that the growth of the logits during training
  does not hide a shift between orders;
* **order distribution**: the mean number of salient interactions of each order, and its normalised form;
* **generalisation** (Zhang et al., arXiv 2405.10262): for each class `c` and order `k`, the order-`k`
  interaction vector averaged over the training samples of class `c` and over the test samples of class `c`, each
  made non-negative as `[max(I, 0), max(-I, 0)]`, compared by the Jaccard similarity
  `sum min(a, b) / sum max(a, b)`; 1 means the test samples use the same interactions as the training ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .interactions import Interactions

__all__ = ["DEFAULT_TAU", "OrderStatistics", "interaction_matrix", "jaccard_by_order", "order_statistics"]

#: Default salience threshold, as a fraction of each sample's largest `|I(T)|`.
DEFAULT_TAU = 0.05


Records = Interactions | Sequence[Interactions] | tuple[Tensor, Tensor]


def interaction_matrix(records: Records) -> tuple[Tensor, Tensor]:
    """`(B, S_total)` values and `(S_total,)` orders of one or several single-output records, side by side.

    Args:
        records: one `Interactions` or several over the same samples, or directly a pair `(values (B, S),
            orders (S,))` (what this function returns).

    Raises:
        ValueError: a record has several outputs (pick one with `Interactions.select`), or the records disagree on
            the batch size.
    """
    if isinstance(records, tuple) and len(records) == 2 and isinstance(records[0], Tensor):
        values, orders = records
        if values.dim() != 2 or orders.shape != (values.shape[1],):
            raise ValueError(f"expected values (B, S) and orders (S,), got {tuple(values.shape)} and "
                             f"{tuple(orders.shape)}")
        return values, orders.to(values.device)
    records = [records] if isinstance(records, Interactions) else list(records)
    if not records:
        raise ValueError("need at least one Interactions record")
    for r in records:
        if r.num_outputs != 1:
            raise ValueError(f"order statistics need one output per sample, got {r.num_outputs}: use "
                             f"record.select(target) first")
    if len({r.batch_size for r in records}) != 1:
        raise ValueError(f"records of different batch sizes: {[r.batch_size for r in records]}")
    values = torch.cat([r.dividends[..., 0] for r in records], dim=1)
    orders = torch.cat([r.orders for r in records]).to(values.device)
    return values, orders


@dataclass
class OrderStatistics:
    """Per-order statistics of salient interactions, averaged over a batch (index `k - 1` is order `k`).

    Attributes:
        tau: the salience threshold used.
        positive: `(K,)` mean over samples of the sum of salient positive interactions of each order.
        negative: `(K,)` the same for the negative ones (values <= 0).
        relative_positive: `(K,)` as `positive`, each sample divided by its total salient `|I|` first.
        relative_negative: `(K,)` as `negative`, likewise.
        count: `(K,)` mean number of salient interactions of each order.
        distribution: `(K,)` `count` normalised to sum to 1 (all zeros if nothing is salient).
    """

    tau: float
    positive: Tensor
    negative: Tensor
    relative_positive: Tensor
    relative_negative: Tensor
    count: Tensor
    distribution: Tensor

    def to_dict(self) -> dict[str, list[float] | float]:
        """Plain lists of floats (JSON-safe)."""
        return {"tau": self.tau, **{name: [float(v) for v in getattr(self, name).tolist()] for name in
                                    ("positive", "negative", "relative_positive", "relative_negative", "count",
                                     "distribution")}}


def _check_tau(tau: float) -> float:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0.0 <= tau < 1.0:
        raise ValueError(f"tau must be a fraction in [0, 1) of the largest |I|, got {tau!r}")
    return float(tau)


def order_statistics(records: Records, tau: float = DEFAULT_TAU,
                     max_order: int | None = None) -> OrderStatistics:
    """Strength (positive and negative) and count of salient interactions per order over a batch.

    Args:
        records: one single-output `Interactions`, or several (AND and OR) over the same samples: their
            interactions are pooled (one threshold per sample) and counted per order together; or a pair
            `(values (B, S), orders (S,))`.
        tau: salient means `|I(T)| > tau * max |I|` of the sample (`DEFAULT_TAU` = 0.05).
        max_order: the number of orders reported (default the largest listed order).

    Returns:
        `OrderStatistics`; a sample whose interactions are all 0 contributes zeros.
    """
    tau = _check_tau(tau)
    values, orders = interaction_matrix(records)
    K = int(orders.max()) if max_order is None else int(max_order)
    magnitude = values.abs()
    threshold = tau * magnitude.amax(1, keepdim=True)
    salient = (magnitude > threshold) & (magnitude > 0)
    pos = torch.where(salient & (values > 0), values, torch.zeros_like(values))
    neg = torch.where(salient & (values < 0), values, torch.zeros_like(values))
    total = (pos - neg).sum(1, keepdim=True)
    scale = torch.where(total > 0, total, torch.ones_like(total))
    one_hot = torch.nn.functional.one_hot((orders - 1).clamp(max=K - 1), K).to(values.dtype)  # (S, K)
    keep = (orders <= K).to(values.dtype)[:, None]
    one_hot = one_hot * keep

    def per_order(t: Tensor) -> Tensor:
        return (t @ one_hot).mean(0) if t.shape[0] else t.new_zeros(K)

    count = per_order(salient.to(values.dtype))
    denominator = count.sum()
    return OrderStatistics(
        tau=tau,
        positive=per_order(pos),
        negative=per_order(neg),
        relative_positive=per_order(pos / scale),
        relative_negative=per_order(neg / scale),
        count=count,
        distribution=count / denominator if denominator > 0 else torch.zeros_like(count),
    )


def _nonnegative(v: Tensor) -> Tensor:
    return torch.cat([v.clamp(min=0), (-v).clamp(min=0)], dim=-1)


def jaccard_by_order(
    train: Records,
    train_labels: Tensor,
    test: Records,
    test_labels: Tensor,
    max_order: int | None = None,
) -> dict[str, list[float] | dict[int, list[float]]]:
    """Jaccard similarity of the class-average interaction vectors of training and test samples, per order.

    Args:
        train: single-output records (AND, or AND and OR side by side) of the training samples.
        train_labels: `(B_train,)` their classes.
        test: the same records of the test samples (same players and subsets).
        test_labels: `(B_test,)` their classes.
        max_order: the number of orders reported (default the largest listed order).

    Returns:
        `{"mean": [K floats], "per_class": {c: [K floats]}}`: the per-order similarity averaged over the classes
        present in both sets, and each class's; NaN where both vectors are 0 (nothing to compare).
    """
    a, orders = interaction_matrix(train)
    b, orders_b = interaction_matrix(test)
    if a.shape[1] != b.shape[1] or not torch.equal(orders, orders_b):
        raise ValueError("the training and test records must list the same subsets")
    if train_labels.shape != (a.shape[0],) or test_labels.shape != (b.shape[0],):
        raise ValueError(f"labels must be ({a.shape[0]},) and ({b.shape[0]},), got {tuple(train_labels.shape)} and "
                         f"{tuple(test_labels.shape)}")
    K = int(orders.max()) if max_order is None else int(max_order)
    classes = sorted(set(train_labels.tolist()) & set(test_labels.tolist()))
    if not classes:
        return {"mean": [math.nan] * K, "per_class": {}}
    # All classes and orders at once: class means by one product, then the summed min / max of each order's
    # entries by one product with the order indicator (the non-negative halves of an entry share its order).
    wanted = torch.tensor(classes, device=a.device)

    def class_means(v: Tensor, labels: Tensor) -> Tensor:
        member = (labels.to(v.device)[None, :] == wanted[:, None]).to(v.dtype)  # (classes, B)
        return (member @ v) / member.sum(1, keepdim=True)

    u, w = _nonnegative(class_means(a, train_labels)), _nonnegative(class_means(b, test_labels))
    in_order = (orders[:, None] == torch.arange(1, K + 1, device=orders.device)[None, :]).to(a.dtype)  # (S, K)
    in_order = torch.cat([in_order, in_order])
    numerator, denominator = torch.minimum(u, w) @ in_order, torch.maximum(u, w) @ in_order  # (classes, K)
    sims = torch.where(denominator > 0, numerator / denominator.clamp(min=torch.finfo(a.dtype).tiny),
                       torch.full_like(numerator, math.nan))
    per_class: dict[int, list[float]] = {int(c): row for c, row in zip(classes, sims.tolist())}
    mean = []
    for k in range(K):
        column = [s[k] for s in per_class.values() if not math.isnan(s[k])]
        mean.append(sum(column) / len(column) if column else math.nan)
    return {"mean": mean, "per_class": per_class}
