"""Explanation regularizers: penalties on the Shapley representations of the same forward pass.

ShapNets compute their explanations as they predict, so an explanation can be shaped during
training like any activation. The authors' code ships no regularizer; their reply on the issue
tracker says the paper's figure used L1 on the final explanation (before the sum to logits) and L1
on every layer's representation. The exact normalization of the paper is not known to us, so we
choose and document ours:

* **L1 sparsity** `R_1(Z) = mean_b sum_{i, c} |Z[b, i, c]|`: sums over players `i` and channels `c`,
  averages over the batch, so the weight does not depend on the batch size. Pushes attributions (and
  whole players) to exactly the reference, which instance-based pruning then skips.
* **L-infinity spreading** `R_inf(Z) = mean_b sum_c max_i |Z[b, i, c]|`: the largest attribution of
  every output channel, summed over channels. Penalizing the peak spreads importance over more
  players (smoother explanations) without pushing the total, which local accuracy ties to the output.

**Scale-free versions** (`normalize=True`). A Conv ShapNet's logit is the sum of its map, and cross-entropy does not
need large logits once a sample is classified, so both penalties above can be met by shrinking every map by a common
factor: the explanation keeps its shape and only its scale moves (measured on MNIST: L1 at 40x the default weight
cut R_1 by a third and left n90, the pixels holding 90% of the map's mass, unchanged). Dividing by another norm of
the same map removes that escape, so only the *shape* can lower the penalty:

* `R_1 / R_2`: `mean_b sum_c ||Z[b, :, c]||_1 / ||Z[b, :, c]||_2` (Hoyer's sparsity ratio, between 1 for one
  non-zero player and `sqrt(N)` for a flat map); lowered by concentrating the mass on fewer players.
* `R_inf / R_1`: `mean_b sum_c max_i |Z[b, i, c]| / ||Z[b, :, c]||_1` (the peak's share of the mass); lowered by
  spreading it.

With `target`, the final layer's penalty is taken only on each sample's target channel (the class
whose explanation is shown); hidden layers have no class channels, so `target` does not apply there.
With `layers="all"`, the penalty of layer `l` is multiplied by `layer_weights[l]` (default 1) and
summed over layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .explanation import Explanation

__all__ = ["explanation_penalty", "l1_sparsity", "linf_spreading"]

Kind = Literal["l1", "linf"]


def _per_channel(z: Tensor, target: Tensor | None) -> Tensor:
    """`(B, *players, C)` -> `(B, N, C')`: players flattened, channels restricted to the target."""
    flat = z.reshape(z.shape[0], -1, z.shape[-1])
    if target is None:
        return flat
    index = target.long().view(-1, 1, 1).expand(-1, flat.shape[1], 1)
    return flat.gather(2, index)


# Keeps the scale-free ratios finite (and their gradients defined) on a map that is exactly zero.
_TINY = 1e-12


def l1_sparsity(z: Tensor, target: Tensor | None = None, normalize: bool = False) -> Tensor:
    """`mean_b sum_{i,c} |z[b,i,c]|` over a representation `(B, *players, C)` (see the module docstring); with
    `normalize`, each map's L1 norm is divided by its L2 norm."""
    if z.shape[0] == 0:
        return z.sum()
    flat = _per_channel(z, target)
    l1 = flat.abs().sum(1)
    if normalize:
        l1 = l1 / flat.square().sum(1).add(_TINY).sqrt()
    return l1.sum(1).mean()


def linf_spreading(z: Tensor, target: Tensor | None = None, normalize: bool = False) -> Tensor:
    """`mean_b sum_c max_i |z[b,i,c]|` over a representation `(B, *players, C)`; with `normalize`, each map's
    peak is divided by its L1 norm (the peak's share of the mass)."""
    if z.shape[0] == 0:
        return z.sum()
    magnitudes = _per_channel(z, target).abs()
    peak = magnitudes.amax(1)
    if normalize:
        peak = peak / magnitudes.sum(1).add(_TINY)
    return peak.sum(1).mean()


_PENALTIES = {"l1": l1_sparsity, "linf": linf_spreading}


def explanation_penalty(
    explanation: Explanation,
    kind: Kind = "l1",
    layers: Literal["final", "all"] = "final",
    target: Tensor | None = None,
    layer_weights: Sequence[float] | None = None,
    normalize: bool = False,
) -> Tensor:
    """A regularizer on an explanation from the forward pass.

    Args:
        explanation: the model's explanation (with `layers` filled when `layers="all"`).
        kind: `"l1"` (sparsity) or `"linf"` (spreading).
        layers: `"final"` (the attributions) or `"all"` (every layer's representation).
        target: optional `(B,)` classes: the final layer's penalty only on those channels.
        layer_weights: with `layers="all"`, one weight per layer.
        normalize: the scale-free version (`R_1 / R_2`, `R_inf / R_1`; see the module docstring).

    Raises:
        ValueError: unknown kind or layers, missing per-layer representations, wrong number of weights.
    """
    if kind not in _PENALTIES:
        raise ValueError(f"unknown penalty kind {kind!r}: use one of {sorted(_PENALTIES)}")
    penalty = _PENALTIES[kind]
    if layers == "final":
        return penalty(explanation.attributions, target, normalize)
    if layers != "all":
        raise ValueError(f'layers must be "final" or "all", got {layers!r}')
    if not explanation.layers:
        raise ValueError('layers="all" needs per-layer representations: call explain(x, layers=True)')
    reps = explanation.layers
    weights = [1.0] * len(reps) if layer_weights is None else [float(w) for w in layer_weights]
    if len(weights) != len(reps):
        raise ValueError(f"{len(reps)} layers but {len(weights)} layer_weights")
    total = torch.zeros((), dtype=reps[-1].dtype, device=reps[-1].device)
    for i, (z, w) in enumerate(zip(reps, weights)):
        if w:
            total = total + w * penalty(z, target if i == len(reps) - 1 else None, normalize)
    return total
