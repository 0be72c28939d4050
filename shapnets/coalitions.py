"""Coalition machinery shared by Shapley modules, the oracle and interactions: masks, weights, values -> Shapley.

Every game here enumerates the `2^k` coalitions of `k` players in one fixed order (row `t`: the players whose
bits are set in `t`), so coalition values computed anywhere in the package combine with the same weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["cached_table", "coalition_masks", "coalition_table", "shapley_from_values", "signed_weights"]

_F = TypeVar("_F", bound=Callable[..., object])


def cached_table(maxsize: int) -> Callable[[_F], _F]:
    """`functools.lru_cache` for functions that build constant tensors (masks, weights, index tables).

    The tensors are built outside inference mode whatever the caller's mode: made first under
    `torch.inference_mode()`, a cached table would be an inference tensor, which autograd refuses to save, so every
    later differentiable call using it would fail.
    """

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def build(*args: object) -> object:
            with torch.inference_mode(False):
                return fn(*args)

        return functools.lru_cache(maxsize=maxsize)(build)  # type: ignore[return-value]

    return wrap


@cached_table(maxsize=64)
def coalition_table(k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Masks and Shapley weights for `k` players, in float64 on the CPU (cached).

    Row `t` of the mask is the coalition whose members are the set bits of `t`: row 0 is the empty
    coalition (all players at the reference), row `2^k - 1` the grand coalition (the input itself).

    Returns:
        masks `(2^k, k)`; `with_i`, `without_i` `(k, 2^(k-1))`: the rows containing player i and the
        same rows with i removed; `weights` `(k, 2^(k-1))`: `|S|! (k-|S|-1)! / k!` for each such S.
    """
    rows = torch.arange(2**k)
    masks = ((rows[:, None] >> torch.arange(k)) & 1).to(torch.float64)
    without = torch.stack([rows[(rows >> i) & 1 == 0] for i in range(k)])  # (k, 2^(k-1))
    with_ = without + (1 << torch.arange(k))[:, None]
    sizes = masks.sum(1)[without].long()  # |S| for the coalitions without i
    # Exact rationals, rounded once to float64.
    by_size = [math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k) for s in range(k)]
    weights = torch.tensor(by_size, dtype=torch.float64)[sizes]
    return masks, with_, without, weights


def coalition_masks(k: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The `(2^k, k)` 0/1 matrix of all coalitions of `k` players (row t: members = set bits of t)."""
    return coalition_table(k)[0].to(device=device, dtype=dtype)


def signed_weights(k: int) -> Tensor:
    """`(2^k, k)`: `phi = W^T v`, i.e. `+w(|S|-1)` on rows with player i, `-w(|S|)` on rows without.

    A fresh float64 CPU tensor (a copy of a cached one: callers may modify it).
    """
    return _signed_weights(k).clone()


@cached_table(maxsize=64)
def _signed_weights(k: int) -> Tensor:
    _, with_, without, weights = coalition_table(k)
    signed = torch.zeros(2**k, k, dtype=torch.float64)
    for i in range(k):
        signed[with_[i], i] = weights[i]
        signed[without[i], i] = -weights[i]
    return signed



class _ShapleyCombine(torch.autograd.Function):
    """The linear map from coalition values to Shapley values, exact zeros forward, one matmul backward.

    Forward takes differences `v(S + i) - v(S)` before weighting (bit-identical values give exactly 0.0);
    the map is linear with the fixed matrix `W`, so the backward pass is the single product `W g`, far
    cheaper than differentiating through the strided differences.
    """

    @staticmethod
    def forward(ctx, values: Tensor, k: int) -> Tensor:  # type: ignore[override]
        ctx.k = k
        weights = coalition_table(k)[3].to(device=values.device, dtype=values.dtype)
        batch = values.shape[1:]
        phis = []
        for i in range(k):
            # Rows t = hi * 2^(i+1) + bit_i * 2^i + lo: slicing bit_i pairs each coalition without i
            # with the same coalition plus i; the hi-major order matches the table's rows.
            pairs = values.reshape(2 ** (k - 1 - i), 2, 2**i, -1)
            diff = (pairs[:, 1] - pairs[:, 0]).reshape(2 ** (k - 1), -1)
            phis.append((weights[i] @ diff).reshape(batch))
        return torch.stack(phis, dim=-2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        k = ctx.k
        signed = signed_weights(k).to(device=grad.device, dtype=grad.dtype)
        per_player = grad.movedim(-2, 0)  # (k, *batch, C)
        return (signed @ per_player.reshape(k, -1)).reshape(2**k, *per_player.shape[1:]), None


def shapley_from_values(values: Tensor, k: int) -> Tensor:
    """Exact Shapley values from the values of all `2^k` coalitions.

    `phi_i = sum_{S not containing i} w(|S|) * (v(S + i) - v(S))`. The differences are taken before
    the weighted sum, so a player whose input equals the reference (identical coalition values with
    and without it) gets 0 up to the rounding of the batched products that produced the values
    (exactly 0.0 whenever those values are bit-identical, ~1e-17 otherwise in float64).

    Args:
        values: `(2^k, *batch, C)` coalition values, rows ordered as in `coalition_masks`.
        k: number of players.

    Returns:
        `(*batch, k, C)` Shapley values.
    """
    if values.shape[0] != 2**k:
        raise ValueError(f"expected 2^{k} = {2**k} coalition values along dim 0, got {values.shape[0]}")
    return _ShapleyCombine.apply(values, k)
