"""Instance-based pruning of Shapley representations (Deep and Conv ShapNets).

After a stage, the players (features or pixels) of each sample whose representation has the
smallest channel-L1 norm are set to the reference of the next stage (0). Later modules whose players
all sit at the reference then output exactly 0 and are skipped, and modules with some players at the
reference evaluate fewer coalitions (`ShapleyModuleBank.shapley(skip_inactive=True)`), so pruning
saves real computation instead of only zeroing values.

What `p` counts (`mode`):

* `"all"` (the paper's rule): exactly `floor(p * N)` of all `N` players per sample are pruned. Players
  already at 0 have norm 0 and are pruned first, which changes nothing: on MNIST ~80% of the pixels are
  background, so any `p` below ~0.8 removes nothing that skipping did not already remove.
* `"active"`: exactly `floor(p * A)` of the `A` *active* players (non-zero norm) of each sample are pruned,
  so `p = 0.5` halves the work left after the exact skip of reference players, whatever the background.
* `"threshold"`: players whose norm is below `p` times the sample's largest norm are pruned (a relative
  magnitude threshold, scale-free; the count varies per sample).

Ties in the norm are broken by player index (lower index pruned first, a stable sort), so the counts of
`"all"` and `"active"` are exact even with ties. The original code pruned every player with norm <= the
k-th smallest, which prunes more than `floor(p * N)` on ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["PRUNE_MODES", "check_input_fraction", "configure_pruning", "prune_listed", "prune_players",
           "stage_fractions"]

PRUNE_MODES = ("all", "active", "threshold")
"""What a pruning fraction counts: see the module docstring."""


def prune_players(z: Tensor, fraction: float, rows: Tensor | None = None, mode: str = "all") -> Tensor:
    """Zero the players of smallest channel-L1 norm in every sample (how many: `mode`, module docstring).

    Args:
        z: a representation `(B, *players, C)`.
        fraction: `p`, in `[0, 1]` for `mode="all"` and in `[0, 1)` for `"active"` and `"threshold"`.
        rows: indices (into the flattened player axes) of the players that count; default all.
            Deep ShapNets pass the rows of their real features so that padding is not counted.
        mode: `"all"`, `"active"` or `"threshold"`.

    Returns:
        `z` with the pruned rows set to exactly 0 (gradients still flow to the kept rows).
    """
    _check_fraction(fraction, mode)
    if fraction == 0.0:
        return z
    flat = z.reshape(z.shape[0], -1, z.shape[-1])
    norms = flat.abs().sum(-1) if rows is None else flat.index_select(1, rows).abs().sum(-1)
    n = norms.shape[1]
    if mode == "threshold":
        # A player at 0 stays at 0 whether pruned or not; `<` keeps a sample's largest player always.
        pruned_mask = norms < fraction * norms.amax(1, keepdim=True)
    else:
        if mode == "all":
            count: int | Tensor = math.floor(fraction * n)
            if count == 0:
                return z
        else:  # "active": the zero-norm players come first in the sorted order and are pruned on top
            active = (norms > 0).sum(1, keepdim=True)
            count = (n - active) + torch.floor(fraction * active.double()).long()
        order = torch.sort(norms, dim=1, stable=True).indices
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=z.device).expand_as(order))
        pruned_mask = ranks < count
    if rows is None:
        keep = ~pruned_mask
    else:
        keep = torch.ones(flat.shape[:2], dtype=torch.bool, device=z.device)
        keep[:, rows] = ~pruned_mask
    return torch.where(keep[..., None], flat, torch.zeros((), dtype=z.dtype, device=z.device)).reshape(z.shape)


def prune_listed(norms: Tensor, sample: Tensor, num_samples: int, players: int, fraction: float,
                 mode: str = "all") -> Tensor:
    """`prune_players`' choice made on a list of the players that may be off the reference (the sparse form).

    A Conv ShapNet knows which pixels can be off the reference (by missingness, a pixel at the reference stays
    there through every stage): it lists those, and only those are ranked, instead of sorting every pixel of
    every image. The unlisted players must have norm 0; a listed player may have norm 0 too. The players pruned
    are those `prune_players` prunes on the dense map, up to zero-norm players (pruning one changes nothing).

    Args:
        norms: `(L,)` channel-L1 norms of the listed players.
        sample: `(L,)` long, the sample of each, non-decreasing; within a sample the list follows the player
            index (the order `nonzero()` gives), which breaks ties as the dense rule does.
        num_samples: `B`.
        players: `N`, players per sample (listed or not; `mode="all"` counts them all).
        fraction: `p`, as for `prune_players`.
        mode: `"all"`, `"active"` or `"threshold"`.

    Returns:
        `(L,)` bool, the listed players to prune.
    """
    _check_fraction(fraction, mode)
    if fraction == 0.0 or norms.numel() == 0:
        return torch.zeros_like(norms, dtype=torch.bool)
    if mode == "threshold":
        largest = norms.new_zeros(num_samples).scatter_reduce(0, sample, norms, "amax")
        return norms < fraction * largest.index_select(0, sample)
    listed = torch.bincount(sample, minlength=num_samples)
    positive = norms > 0
    all_positive = bool(positive.all())  # the usual case: a Conv ShapNet lists only pixels off the reference
    active = listed if all_positive else torch.bincount(sample, weights=positive.double(), minlength=num_samples).long()
    if mode == "all":
        # The dense rule prunes the floor(p N) smallest, zeros (listed or not) first: of the positive ones, what
        # is left after the N - active zeros.
        extra = (math.floor(fraction * players) - (players - active)).clamp_(min=0)
    else:
        extra = torch.floor(fraction * active.double()).long()
    count = extra if all_positive else listed - active + extra  # listed zeros rank first; pruning them is a no-op
    if not bool((count > 0).any()):
        return torch.zeros_like(norms, dtype=torch.bool)
    starts = torch.cumsum(listed, 0) - listed
    # Each player's place in its sample's list
    within = torch.arange(len(norms), device=norms.device) - starts.index_select(0, sample)
    width = int(listed.max())
    if norms.dtype in (torch.float32, torch.float16, torch.bfloat16) and width <= 2**32:
        # Distinct integer keys that order by norm, then list position (= player index): a non-negative float's bit
        # pattern orders like its value (NaN after inf), and 31 bits + the position fit in an int64. Each sample's
        # count-th smallest key, from a partial sort of a (B, longest list) grid padded with the largest key, is
        # the last one pruned: no ties, so no full sort.
        keys = (norms.float().view(torch.int32).long() << max(width - 1, 1).bit_length()) | within
        grid = keys.new_full((num_samples * width,), torch.iinfo(torch.int64).max)
        grid = grid.index_copy_(0, sample * width + within, keys).view(num_samples, width)
        smallest = torch.topk(grid, min(int(count.max()), width), dim=1, largest=False, sorted=True).values
        last = smallest.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0].masked_fill_(count == 0, -1)
        return keys <= last.index_select(0, sample)
    # Other dtypes: rank within the sample by norm, ties by list position (two stable sorts).
    by_norm = torch.sort(norms, stable=True).indices
    order = by_norm[torch.sort(sample[by_norm], stable=True).indices]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order), device=norms.device) - starts[sample[order]]
    return ranks < count.index_select(0, sample)


def _check_fraction(fraction: float, mode: str) -> None:
    if mode not in PRUNE_MODES:
        raise ValueError(f"unknown pruning mode {mode!r}: use one of {PRUNE_MODES}")
    if mode == "all":
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"pruning fraction must lie in [0, 1], got {fraction}")
    elif not 0.0 <= fraction < 1.0:
        what = "threshold (share of the largest norm)" if mode == "threshold" else "fraction of active players"
        raise ValueError(f"pruning {what} must lie in [0, 1), got {fraction}")


def configure_pruning(model: nn.Module, prune: float | Sequence[float], mode: str = "active",
                      input_fraction: float | None = None) -> nn.Module:
    """Set a Deep or Conv ShapNet's pruning in place (`prune`: one value or one per stage) and return it.

    Args:
        model: a Deep or Conv ShapNet.
        prune: the fraction pruned after each stage (one value for all, or one per stage).
        mode: what the fractions count (module docstring).
        input_fraction: Conv ShapNets: also prune the input's pixels before the first stage (`prune_input`);
            `None` keeps the model's setting.

    Raises:
        ValueError: a model without stages (e.g. a Shallow ShapNet: nothing follows its modules to skip), an
            unknown mode, values outside the mode's range, or `input_fraction` for a model without input pruning.
    """
    if not isinstance(getattr(model, "prune", None), list) or not hasattr(model, "num_stages"):
        raise ValueError(f"{type(model).__name__} has no stages to prune: pruning applies to Deep and Conv ShapNets")
    fractions = stage_fractions(prune, model.num_stages, mode)
    if input_fraction is not None and not hasattr(model, "prune_input"):
        raise ValueError(f"{type(model).__name__} has no input pruning (input_fraction): Conv ShapNets have")
    if hasattr(model, "prune_input"):
        model.prune_input = check_input_fraction(model.prune_input if input_fraction is None else input_fraction, mode)
    model.prune, model.prune_mode = fractions, mode
    return model


def check_input_fraction(fraction: float, mode: str) -> float:
    """The input's pruning fraction (`ConvShapNet(prune_input=...)`), checked for `mode`."""
    try:
        _check_fraction(float(fraction), mode)
    except ValueError as e:
        raise ValueError(f"prune_input: {e}") from None
    return float(fraction)


def stage_fractions(prune: float | Sequence[float], num_stages: int, mode: str = "all") -> list[float]:
    """One pruning fraction per stage from a float (all stages) or a per-stage sequence, checked for `mode`."""
    fractions = [float(prune)] * num_stages if isinstance(prune, (int, float)) else [float(p) for p in prune]
    if len(fractions) != num_stages:
        raise ValueError(f"{num_stages} stages need {num_stages} pruning fractions, got {len(fractions)}")
    for s, p in enumerate(fractions):
        try:
            _check_fraction(p, mode)
        except ValueError as e:
            raise ValueError(f"pruning fractions (stage {s}): {e}") from None
    return fractions
