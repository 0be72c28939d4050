"""Shapley-kernel fidelity: how far an explanation is from the Shapley values of the model's own game.

For a model `g`, an input `x` and a reference `r`, the game of a coalition `S` of players is
`v(S) = g(x_S ; r_rest)` (players outside `S` at the reference). Kernel SHAP (Lundberg & Lee 2017, after
Charnes et al. 1988) and FastSHAP (Jethani et al. 2022) characterise the Shapley values as the solution of a
weighted least-squares problem under the efficiency constraint:

    phi* = argmin_phi  E_{S ~ p} [ (v(S) - v(empty) - sum_{i in S} phi_i)^2 ]
           subject to  sum_i phi_i = v(N) - v(empty),

where `p` is the Shapley kernel distribution over the coalitions with `0 < |S| < n`:
`p(S) proportional to (n - 1) / (C(n, |S|) |S| (n - |S|))`. Sampling it is two draws: a size `k` with
probability proportional to `1 / (k (n - k))`, then a uniformly random subset of that size. A coalition and its
complement have the same weight, so *paired* sampling (every draw together with its complement, FastSHAP's
variance reduction) samples the same distribution.

A ShapNet's explanation satisfies the constraint by construction (local accuracy: it sums to
`g(x) - g(r)`), so the objective's only minimiser among explanations of this game is the Shapley value. The
functions here draw coalitions, build the masked inputs, and compute the gaps whose squares estimate the objective
without bias; `exact_fidelity_objective` enumerates every coalition instead (the ground truth of tests).

The Kernel SHAP objective has a floor: at the Shapley values it equals the game's non-additivity `R(v)`, which is
not 0 for a network with interactions. A second estimator has none: a random permutation's marginal
contributions `psi` are an unbiased estimate of the Shapley values, so for two *independent* estimates
`E[(phi - psi_1) . (phi - psi_2)] = ||phi - phi*||^2` exactly: the squared distance to the Shapley values, 0 exactly
at them (`permutation_estimates`, `sample_permutation_ranks`).

See docs/fidelity.md for the training term built on them (`training.losses.ExplanationFidelity`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor

from .modules import coalition_masks

__all__ = [
    "exact_fidelity_objective",
    "fidelity_gaps",
    "kernel_size_probabilities",
    "masked_inputs",
    "patch_players",
    "permutation_estimates",
    "player_sums",
    "prefix_coalitions",
    "sample_kernel_coalitions",
    "sample_permutation_ranks",
    "shapley_kernel_probabilities",
]


def kernel_size_probabilities(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """`(n + 1,)`: the probability that a Shapley-kernel coalition has `k` members (0 for `k = 0` and `k = n`).

    `C(n, k)` coalitions of size `k` each have weight `(n - 1) / (C(n, k) k (n - k))`, so the size has
    probability proportional to `1 / (k (n - k))`.

    Raises:
        ValueError: fewer than 2 players (then no coalition lies strictly between empty and full).
    """
    if n < 2:
        raise ValueError(f"the Shapley kernel needs at least 2 players, got {n}")
    k = torch.arange(1, n, dtype=dtype)
    weights = 1.0 / (k * (n - k))
    return torch.cat([weights.new_zeros(1), weights / weights.sum(), weights.new_zeros(1)])


def shapley_kernel_probabilities(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """`(2^n,)`: `p(S)` for every coalition, rows in `shapnets.coalition_masks(n)` order (0 for empty and full)."""
    sizes = coalition_masks(n, dtype=torch.long).sum(1)
    per_size = kernel_size_probabilities(n, dtype)
    counts = torch.tensor([math.comb(n, k) for k in range(n + 1)], dtype=dtype)
    return (per_size / counts)[sizes]


def sample_kernel_coalitions(batch: int, n: int, count: int, *, paired: bool = True,
                             generator: torch.Generator | None = None,
                             device: torch.device | str | None = None) -> Tensor:
    """Draw `count` coalitions per sample from the Shapley kernel distribution.

    Args:
        batch: samples (each gets its own draws).
        n: players.
        count: coalitions per sample; with `paired`, the second half are the complements of the first half, so
            `count` must be even.
        paired: draw `count // 2` coalitions and add their complements (same distribution, lower variance).
        generator: random generator (CPU); `None` uses torch's global one.
        device: where the result lives.

    Returns:
        `(batch, count, n)` bool: member players.

    Raises:
        ValueError: `count < 1`, an odd `count` with `paired`, or `n < 2`.
    """
    if count < 1:
        raise ValueError(f"coalitions per sample must be >= 1, got {count}")
    if paired and count % 2:
        raise ValueError(f"paired sampling draws coalitions with their complements: coalitions must be even, "
                         f"got {count}")
    draws = count // 2 if paired else count
    sizes = torch.multinomial(kernel_size_probabilities(n).float(), batch * draws, replacement=True,
                              generator=generator).view(batch, draws, 1)
    # A uniform subset of size k: the k players with the smallest of n i.i.d. uniform keys.
    keys = torch.rand(batch, draws, n, generator=generator)
    ranks = keys.argsort(-1).argsort(-1)
    members = ranks < sizes
    if paired:
        members = torch.cat([members, ~members], dim=1)
    return members.to(device) if device is not None else members


def patch_players(height: int, width: int, patch: int) -> Tensor:
    """`(height, width)` integer map of square `patch x patch` pixel patches, numbered row by row.

    Patches at the bottom and right edges are smaller when `patch` does not divide the size.
    """
    if patch < 1:
        raise ValueError(f"patch size must be >= 1, got {patch}")
    rows = torch.arange(height) // patch
    cols = torch.arange(width) // patch
    return rows[:, None] * math.ceil(width / patch) + cols[None, :]


def player_sums(attributions: Tensor, players: Tensor | None, n: int) -> Tensor:
    """Per-player attributions `(B, n, C)`: the sum over each player's elements.

    Args:
        attributions: `(B, *player_shape, C)` (a ShapNet's explanation: `(B, D, C)` or `(B, H, W, C)`).
        players: integer map of shape `player_shape` (player of every element); `None`: one player per element.
        n: the number of players.
    """
    flat = rearrange(attributions, "b ... c -> b (...) c")
    if players is None:
        return flat
    index = players.reshape(-1).to(flat.device)
    return flat.new_zeros(flat.shape[0], n, flat.shape[-1]).index_add(1, index, flat)


def masked_inputs(x: Tensor, reference: Tensor, coalitions: Tensor, element_players: Tensor) -> Tensor:
    """The inputs of the coalitions: elements of member players from `x`, the others from `reference`.

    Args:
        x: `(B, *S)` inputs.
        reference: broadcastable to one sample `S`.
        coalitions: `(B, m, n)` bool members.
        element_players: integer map of shape `S`: the player of every input element.

    Returns:
        `(B * m, *S)`, sample-major (`[b * m + j]` is sample `b` under coalition `j`).
    """
    B, m, _ = coalitions.shape
    present = coalitions[:, :, element_players.reshape(-1).to(coalitions.device)]  # (B, m, prod(S))
    present = present.view(B, m, *x.shape[1:])
    out = torch.where(present, x.unsqueeze(1), reference.to(x.dtype).expand(x.shape[1:]))
    return out.reshape(B * m, *x.shape[1:])


def fidelity_gaps(attributions: Tensor, values: Tensor, base: Tensor, coalitions: Tensor) -> Tensor:
    """`v(S) - v(empty) - sum_{i in S} phi_i` for every sampled coalition.

    Args:
        attributions: `(B, n, C)` per-player attributions `phi`.
        values: `(B, m, C)` the game's values `v(S)` on the coalitions.
        base: `(B, C)` or `(C,)` `v(empty)`.
        coalitions: `(B, m, n)` bool members.

    Returns:
        `(B, m, C)` gaps; the mean of their squares is an unbiased estimate of the Shapley-kernel objective when
        the coalitions are drawn by `sample_kernel_coalitions`.
    """
    explained = torch.einsum("bmn,bnc->bmc", coalitions.to(attributions.dtype), attributions)
    return values - base.unsqueeze(-2) - explained


@torch.no_grad()
def exact_fidelity_objective(attributions: Tensor, fn: Callable[[Tensor], Tensor], x: Tensor,
                             reference: Tensor | float | None = None, players: Tensor | None = None,
                             max_players: int = 16) -> Tensor:
    """The Shapley-kernel objective `E_{S ~ p}[gap(S)^2]` computed exactly, by enumerating every coalition.

    Args:
        attributions: `(B, n, C)` per-player attributions to score.
        fn: the model (`(N, *S) -> (N, C)`).
        x: `(B, *S)` inputs.
        reference: as in `shapnets.exact_shapley`.
        players: as in `shapnets.exact_shapley` (default: one player per index of axis 1).
        max_players: refuse larger games (2^n evaluations per sample).

    Returns:
        `(B, C)`: the objective per sample and output. At the exact Shapley values it is the game's irreducible
        non-additivity; any other explanation with the same total scores higher.
    """
    from .oracle import coalition_values  # the oracle's enumeration (same coalition order)

    values, _ = coalition_values(fn, x, reference, players, max_players, 8192, "exact_fidelity_objective")
    n = (values.shape[0] - 1).bit_length()
    masks = coalition_masks(n, device=x.device, dtype=attributions.dtype)
    probs = shapley_kernel_probabilities(n).to(device=x.device, dtype=attributions.dtype)
    gaps = values.to(attributions.dtype) - values[0].to(attributions.dtype) \
        - torch.einsum("tn,bnc->tbc", masks, attributions)
    return torch.einsum("t,tbc->bc", probs, gaps.square())


def sample_permutation_ranks(batch: int, n: int, count: int, *, active: Tensor | None = None,
                             antithetic: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Random orders of the players: `ranks[b, j, i]` is the position of player `i` in sample `b`'s order `j`.

    Args:
        batch: samples.
        n: players.
        count: orders per sample; with `antithetic`, the second half are the first half reversed (among the active
            players), which lowers the variance of the estimate; `count` must then be even.
        active: optional `(batch, n)` bool: the players of the game (the same number in every sample). Inactive
            players (null players, e.g. at the reference) get the last positions, so the prefixes up to the number
            of active players contain active players only.
        generator: random generator (CPU).

    Returns:
        `(batch, count, n)` long ranks.

    Raises:
        ValueError: `count < 1` or an odd `count` with `antithetic`.
    """
    if count < 1:
        raise ValueError(f"permutations per sample must be >= 1, got {count}")
    if antithetic and count % 2:
        raise ValueError(f"antithetic orders come in pairs (an order and its reverse): count must be even, got {count}")
    draws = count // 2 if antithetic else count
    keys = torch.rand(batch, draws, n, generator=generator)
    if active is not None:
        keys = torch.where(active.cpu()[:, None, :], keys, keys + 2.0)  # inactive players last
    ranks = keys.argsort(-1).argsort(-1)
    if antithetic:
        k = n if active is None else int(active[0].sum())
        reversed_ = torch.where(ranks < k, k - 1 - ranks, ranks)
        ranks = torch.cat([ranks, reversed_], dim=1)
    return ranks


def prefix_coalitions(ranks: Tensor, k: int) -> Tensor:
    """`(B, m, k - 1, n)` bool: the coalitions of the first `1 .. k - 1` players of every order.

    The empty prefix (`v(empty)`) and the prefix of all `k` active players (the input itself) are not listed: their
    values are the explanation's base and output.
    """
    sizes = torch.arange(1, k, device=ranks.device).view(1, 1, -1, 1)
    return ranks.unsqueeze(2) < sizes


def permutation_estimates(ranks: Tensor, prefix_values: Tensor, base: Tensor, output: Tensor) -> Tensor:
    """Marginal contributions `v(P_i + i) - v(P_i)` of every player in every order: unbiased Shapley estimates.

    Args:
        ranks: `(B, m, n)` from `sample_permutation_ranks` (active players first).
        prefix_values: `(B, m, k - 1, C)` the game on `prefix_coalitions(ranks, k)`.
        base: `(B, C)` `v(empty)`.
        output: `(B, C)` the game with all active players (the model's output on the input).

    Returns:
        `(B, m, n, C)`; every order's estimate sums to `output - base` (efficiency) and gives inactive players 0.
    """
    B, m, n = ranks.shape
    k = prefix_values.shape[2] + 1
    C = prefix_values.shape[-1]
    ends = [base.view(B, 1, 1, C).expand(B, m, 1, C), output.view(B, 1, 1, C).expand(B, m, n - k + 1, C)]
    values = torch.cat([ends[0], prefix_values, ends[1]], dim=2)  # (B, m, n + 1, C): v of the prefix of size j
    index = ranks.unsqueeze(-1).expand(B, m, n, C)
    return values.gather(2, index + 1) - values.gather(2, index)
