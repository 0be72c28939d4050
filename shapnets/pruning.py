"""Instance-based pruning of Shapley representations (Deep and Conv ShapNets).

After a stage, the players (features or pixels) of each sample whose representation has the
smallest channel-L1 norm are set to the reference of the next stage (0). Later modules whose players
all sit at the reference then output exactly 0 and are skipped, and modules with some players at the
reference evaluate fewer coalitions (`ShapleyModuleBank.shapley(skip_inactive=True)`), so pruning
saves real computation instead of only zeroing values.

Rule: for a fraction `p` and `N` players, exactly `floor(p * N)` players per sample are pruned.
Ties in the norm are broken by player index (lower index pruned first, a stable sort), so the count
is exact even with ties; players already at 0 have norm 0 and are among the first pruned (pruning
them changes nothing). The original code pruned every player with norm <= the k-th smallest, which
prunes more than `floor(p * N)` on ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["prune_players", "stage_fractions"]


def prune_players(z: Tensor, fraction: float, rows: Tensor | None = None) -> Tensor:
    """Zero the `floor(fraction * N)` players of smallest channel-L1 norm in every sample.

    Args:
        z: a representation `(B, *players, C)`.
        fraction: `p` in `[0, 1]`.
        rows: indices (into the flattened player axes) of the players that count; default all.
            Deep ShapNets pass the rows of their real features so that padding is not counted.

    Returns:
        `z` with the pruned rows set to exactly 0 (gradients still flow to the kept rows).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"pruning fraction must lie in [0, 1], got {fraction}")
    flat = z.reshape(z.shape[0], -1, z.shape[-1])
    n = flat.shape[1] if rows is None else rows.numel()
    count = math.floor(fraction * n)
    if count == 0:
        return z
    norms = flat.abs().sum(-1) if rows is None else flat.index_select(1, rows).abs().sum(-1)
    pruned = torch.sort(norms, dim=1, stable=True).indices[:, :count]
    if rows is not None:
        pruned = rows[pruned]
    keep = torch.ones(flat.shape[:2], dtype=torch.bool, device=z.device).scatter(1, pruned, False)
    return torch.where(keep[..., None], flat, torch.zeros((), dtype=z.dtype, device=z.device)).reshape(z.shape)


def stage_fractions(prune: float | Sequence[float], num_stages: int) -> list[float]:
    """One pruning fraction per stage from a float (all stages) or a per-stage sequence."""
    fractions = [float(prune)] * num_stages if isinstance(prune, (int, float)) else [float(p) for p in prune]
    if len(fractions) != num_stages:
        raise ValueError(f"{num_stages} stages need {num_stages} pruning fractions, got {len(fractions)}")
    bad = [p for p in fractions if not 0.0 <= p <= 1.0]
    if bad:
        raise ValueError(f"pruning fractions must lie in [0, 1], got {bad}")
    return fractions
