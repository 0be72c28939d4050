"""The exact Shapley oracle: brute-force enumeration of all coalitions, for any callable.

Used by the tests to verify every ShapNet and by users to audit any model on small games
(up to ~16-20 players: cost 2^n evaluations per sample, evaluated in bounded chunks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._validation import check_reference
from .coalitions import shapley_from_values
from .explanation import Explanation

__all__ = ["coalition_values", "exact_shapley", "pixel_players"]


def pixel_players(channels: int, height: int, width: int) -> Tensor:
    """A player map for images `(C, H, W)` where every pixel (all its channels) is one player."""
    return torch.arange(height * width).view(1, height, width).expand(channels, height, width)


@torch.no_grad()
def exact_shapley(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    reference: Tensor | float | None = None,
    players: Tensor | None = None,
    max_players: int = 20,
    max_batch: int = 8192,
) -> Explanation:
    """Exact Shapley values of `fn` at `x` under the baseline game `v(S) = fn(x_S ; reference_rest)`.

    Args:
        fn: maps a batch `(N, *S)` to `(N, C_out)` or `(N,)` (e.g. a model's `forward`).
        x: `(B, *S)` inputs.
        reference: `None` (zeros), a number, or a tensor broadcastable to one sample `S`.
        players: optional integer map of shape `S` assigning every element to a player
            `0..n-1` (like captum's `feature_mask`); default: each index of axis 1 is a player
            (tabular `(B, D)` or `(B, D, C)`: D players).
        max_players: refuse games larger than this (the cost is `2^n` evaluations per sample).
        max_batch: the largest batch handed to `fn` at once (memory stays bounded).

    Returns:
        `Explanation` with attributions `(B, n, C_out)`, base `fn(reference)`, output `fn(x)`,
        `exact=True`. Computed in `x`'s dtype: use float64 for verification.
    """
    v, ref = coalition_values(fn, x, reference, players, max_players, max_batch, "exact_shapley")
    n = (v.shape[0] - 1).bit_length()
    return Explanation(
        attributions=shapley_from_values(v, n),
        base=v[0],
        output=v[-1],
        reference=ref,
        player_axes=("player",),
        exact=True,
        method="exact_shapley",
    )


def coalition_values(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    reference: Tensor | float | None,
    players: Tensor | None,
    max_players: int,
    max_batch: int,
    who: str,
) -> tuple[Tensor, Tensor]:
    """`fn` on every coalition of the players of every sample, under `v(S) = fn(x_S ; reference_rest)`.

    The enumeration behind `exact_shapley` and `shapnets.exact_interactions` (arguments as in `exact_shapley`;
    `who` names the caller in errors).

    Returns:
        `(values, reference)`: values `(2^n, B, C_out)` with rows in `coalition_masks` order, and the reference
        as one sample.
    """
    if x.dim() < 2:
        raise ValueError(f"{who} expects a batch (B, ...), got shape {tuple(x.shape)}")
    sample_shape = tuple(x.shape[1:])
    if players is None:
        players = torch.arange(sample_shape[0]).view(-1, *([1] * (len(sample_shape) - 1))).expand(sample_shape)
    players = torch.as_tensor(players, device=x.device)
    if players.is_floating_point() or players.dtype == torch.bool or players.is_complex():
        raise TypeError(f"players must be an integer map (player id per element), got dtype {players.dtype}")
    players = players.long()
    if tuple(players.shape) != sample_shape:
        raise ValueError(f"players map has shape {tuple(players.shape)}, expected one sample's shape {sample_shape}")
    n = int(players.max()) + 1
    if set(players.unique().tolist()) != set(range(n)):
        raise ValueError(f"players must number the players 0..{n - 1} without gaps")
    if n > max_players:
        raise ValueError(f"{who}: {n} players need 2^{n} evaluations per sample; the limit is "
                         f"max_players={max_players}")
    ref = check_reference(reference, sample_shape, who, x.dtype).to(x.device)

    bits = 1 << torch.arange(n, device=x.device)
    batch_values = []
    # Bounded memory: at most `max_batch` hybrids exist at once, whatever B and n are.
    for sub in x.split(max(1, max_batch)):
        b = sub.shape[0]
        per_chunk = max(1, max_batch // b)
        chunks = []
        for start in range(0, 2**n, per_chunk):
            rows = torch.arange(start, min(start + per_chunk, 2**n), device=x.device)
            present = (rows[:, None] & bits) != 0  # (t, n), row order as in coalition_masks
            element_masks = present[:, players]  # (t, *S): which elements come from x
            hybrids = torch.where(element_masks[:, None], sub[None], ref[None, None])  # (t, b, *S)
            out = fn(hybrids.reshape(-1, *sample_shape))
            if not isinstance(out, Tensor) or out.dim() not in (1, 2) or out.shape[0] != hybrids.shape[0] * b:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"fn must map a batch of {hybrids.shape[0] * b} inputs to ({hybrids.shape[0] * b},) or "
                    f"({hybrids.shape[0] * b}, C_out), got {got}"
                )
            chunks.append(out.reshape(rows.shape[0], b, -1))
        batch_values.append(torch.cat(chunks))
    return torch.cat(batch_values, dim=1), ref
