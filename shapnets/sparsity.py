"""How concentrated an explanation is: the numbers by which explanation regularizers are judged.

Each measure is taken per sample on one class's attribution map (the predicted class by default), on the
absolute attributions `|phi_i|` of its `N` players (pixels, features):

* **n90**: the fewest players that hold 90% of the map's absolute mass (`mass_count(share=0.9)`); smaller is
  sparser. Players at the reference have attribution 0 and never count.
* **peak share**: the largest `|phi_i|` over the total `sum_i |phi_i|`; smaller means importance is spread.
* **Gini index** of the `|phi_i|`: 0 when the mass is spread evenly over all `N` players, `1 - 1/N` when it
  sits on one.

An all-zero map (every player at the reference) has no mass: n90 is 0, peak share and Gini are NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .explanation import Explanation

__all__ = ["SPARSITY_MEASURES", "explanation_sparsity", "gini", "mass_count", "peak_share"]

SPARSITY_MEASURES = ("n90", "peak_share", "gini")


def _magnitudes(attributions: Tensor) -> Tensor:
    """`(B, *players)` -> `(B, N)` absolute values in float64 (sums over thousands of pixels stay exact)."""
    return attributions.detach().reshape(attributions.shape[0], -1).abs().double()


def mass_count(attributions: Tensor, share: float = 0.9) -> Tensor:
    """Per sample of `(B, *players)`, the fewest players holding `share` of the absolute mass, `(B,)` float."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must lie in (0, 1], got {share}")
    mag = _magnitudes(attributions)
    if mag.shape[1] == 0:
        return mag.new_zeros(mag.shape[0])
    cum = mag.sort(1, descending=True).values.cumsum(1)
    total = cum[:, -1:]
    # The count is the first index where the running sum reaches the share (a relative tolerance keeps
    # rounding from adding one player); all-zero maps count 0.
    reached = cum >= share * total * (1 - 1e-12)
    return torch.where(total[:, 0] > 0, reached.double().argmax(1).double() + 1, mag.new_zeros(mag.shape[0]))


def peak_share(attributions: Tensor) -> Tensor:
    """Per sample of `(B, *players)`, `max_i |phi_i| / sum_i |phi_i|` (NaN for an all-zero map), `(B,)`."""
    mag = _magnitudes(attributions)
    total = mag.sum(1)
    return torch.where(total > 0, mag.amax(1) / total, torch.full_like(total, math.nan))


def gini(attributions: Tensor) -> Tensor:
    """Per sample of `(B, *players)`, the Gini index of the `|phi_i|` (NaN for an all-zero map), `(B,)`."""
    mag = _magnitudes(attributions).sort(1).values
    n = mag.shape[1]
    total = mag.sum(1)
    ranks = torch.arange(1, n + 1, dtype=mag.dtype, device=mag.device)
    g = (2 * (ranks * mag).sum(1) / total.clamp_min(1e-300) - (n + 1)) / max(n, 1)
    return torch.where(total > 0, g, torch.full_like(total, math.nan))


def explanation_sparsity(explanation: Explanation, target: Tensor | None = None) -> dict[str, Tensor]:
    """n90, peak share and Gini of one class's map per sample.

    Args:
        explanation: attributions `(B, *players, C)`.
        target: `(B,)` classes whose maps are measured; default each sample's predicted class.

    Returns:
        `{"n90": (B,), "peak_share": (B,), "gini": (B,)}`, float64 on the explanation's device.
    """
    attributions = explanation.attributions
    classes = explanation.output.detach().argmax(1) if target is None else torch.as_tensor(target).long()
    if classes.shape != (attributions.shape[0],):
        raise ValueError(f"target must hold one class per sample, shape ({attributions.shape[0]},), "
                         f"got {tuple(classes.shape)}")
    maps = attributions.detach().movedim(-1, 1)[torch.arange(attributions.shape[0]), classes.to(attributions.device)]
    return {"n90": mass_count(maps, 0.9), "peak_share": peak_share(maps), "gini": gini(maps)}
