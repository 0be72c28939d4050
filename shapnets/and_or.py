"""OR interactions and the AND-OR decomposition of a game (Zhang et al.'s interaction theory).

For a game `v` on the players `N` (`v(S) = fn(x_S ; reference_rest)`):

* the **AND interaction** of `T` is its Harsanyi dividend `I_and(T) = sum_{L ⊆ T} (-1)^(|T|-|L|) v(L)`; it fires
  when *all* of `T` is present, `v(S) = v(∅) + sum_{∅ ≠ T ⊆ S} I_and(T)` (`shapnets.interactions`);
* the **OR interaction** of a non-empty `T` is `I_or(T) = -sum_{L ⊆ T} (-1)^(|T|-|L|) v(N \\ L)`; it fires when
  *any* of `T` is present, `v(S) = v(∅) + sum_{T ∩ S ≠ ∅} I_or(T)`. It is minus the Möbius transform of the
  complemented game `w(L) = v(N \\ L)`, so it costs one butterfly like the AND interactions;
* the **AND-OR split** `v = v_and + v_or` (Li & Zhang, ICML 2023; Zhang et al., arXiv 2405.10262) writes
  `v_and(S) = share * v(S) + gamma_S` and `v_or(S) = (1 - share) * v(S) - gamma_S` with `gamma_∅ = 0`, and
  explains `v_and` by AND and `v_or` by OR interactions: `v(S) = v(∅) + sum_{T ⊆ S} I_and(T) + sum_{T ∩ S ≠ ∅}
  I_or(T)` on *every* coalition `S` (universal matching), whatever `gamma`. `split="half"` takes `gamma = 0` and
  `share = 1/2` (the papers' default); `split="sparse"` chooses `gamma` to minimise the L1 norm of all AND and
  OR interactions, `sum_T |I_and(T)| + |I_or(T)|`, solved exactly as a linear program (scipy's HiGHS). The papers
  fit the same objective by gradient descent and also learn a small noise term on `v`, which is not done here.

Row order of coalition tensors: row `t` is the coalition of the players whose bits are set in `t` (as in
`coalition_masks`); the complement of row `t` is row `2^n - 1 - t`, hence `flip(0)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .interactions import (
    MAX_ORACLE_PLAYERS,
    DecompositionError,
    Interactions,
    _check_max_order,
    _subsets,
    moebius_transform,
)
from .oracle import coalition_values

__all__ = [
    "INTERACTION_KINDS",
    "AndOrInteractions",
    "and_or_interactions",
    "check_kind",
    "exact_interactions",
    "or_interactions_from_values",
    "or_inverse_transform",
    "or_transform",
    "zeta_transform",
]

#: The kinds `exact_interactions` accepts.
INTERACTION_KINDS = ("and", "or", "and_or")
#: The splits of `v` into `v_and + v_or` that `and_or_interactions` accepts.
SPLITS = ("half", "sparse")
#: The largest game the sparse split's linear program is set up for (3 (2^n - 1) variables per sample and output).
MAX_SPARSE_PLAYERS = 12


def check_kind(kind: str) -> str:
    """`kind` if it is one of `INTERACTION_KINDS`, else a `ValueError` naming the choices."""
    if kind not in INTERACTION_KINDS:
        raise ValueError(f"unknown interaction kind {kind!r}: expected one of {', '.join(INTERACTION_KINDS)}")
    return kind


def zeta_transform(dividends: Tensor, k: int) -> Tensor:
    """The inverse of `moebius_transform`: coalition values `v(S) = sum_{T ⊆ S} d_T` (row 0 holds `v(∅)`)."""
    values = dividends
    for i in range(k):
        pairs = values.reshape(2 ** (k - 1 - i), 2, 2**i, -1)
        values = torch.stack((pairs[:, 0], pairs[:, 1] + pairs[:, 0]), dim=1).reshape(dividends.shape)
    return values


def or_transform(values: Tensor, k: int) -> Tensor:
    """OR interactions of a game from its values on all `2^k` coalitions.

    Args:
        values: `(2^k, *batch)` coalition values (`coalition_masks` row order).
        k: number of players.

    Returns:
        `(2^k, *batch)`: row `t != 0` holds `I_or(T)` of the coalition `T` of row `t`; row 0 holds `v(∅)`, so that
        `v(S) = row_0 + sum_{T ∩ S ≠ ∅} row_T` and the rows sum to `v(N)` (as for AND dividends).
    """
    out = -moebius_transform(values.flip(0), k)  # minus the dividends of w(L) = v(N \ L)
    out[0] = values[0]
    return out


def or_inverse_transform(or_rows: Tensor, k: int) -> Tensor:
    """Coalition values from OR rows (`or_transform`'s output, row 0 the base): the inverse of `or_transform`."""
    m = -or_rows
    m[0] = or_rows.sum(0)  # the dividend of w at ∅ is w(∅) = v(N) = v(∅) + sum of all OR interactions
    return zeta_transform(m, k).flip(0)


def _record(rows: Tensor, and_record: Interactions, max_order: int | None, kind: str, method: str) -> Interactions:
    """An `Interactions` with `rows` (`(2^n, B, C)`, row 0 the base) as its listed values; the SII of the game."""
    k = and_record.num_players
    _, picked = _subsets(k, max_order)
    return Interactions(
        subsets=list(and_record.subsets), dividends=rows[picked.to(rows.device)].transpose(0, 1).contiguous(),
        sii=and_record.sii, base=rows[0], output=rows.sum(0), player_names=and_record.player_names,
        player_shape=and_record.player_shape, class_names=and_record.class_names, complete=and_record.complete,
        method=method, kind=kind,
    )


@dataclass
class AndOrInteractions:
    """The AND and OR interactions of a split `v = v_and + v_or`, and the game they decompose.

    Attributes:
        and_: AND interactions (Harsanyi dividends) of `v_and`; its `base` is `v_and(∅) = share * v(∅)`.
        or_: OR interactions of `v_or`; its `base` is `v_or(∅) = (1 - share) * v(∅)`.
        values: `(2^n, B, C_out)` the game on every coalition (row order of `coalition_masks`).
        gamma: `(2^n, B, C_out)` the split parameters (row 0, `gamma_∅`, is 0).
        share: the part of `v` given to `v_and` before `gamma`.
        split: `"half"` or `"sparse"`.
    """

    and_: Interactions
    or_: Interactions
    values: Tensor
    gamma: Tensor
    share: float
    split: str

    @property
    def num_players(self) -> int:
        return self.and_.num_players

    def reconstruct(self) -> Tensor:
        """`(2^n, B, C_out)`: `v(∅) + sum_{T ⊆ S} I_and(T) + sum_{T ∩ S ≠ ∅} I_or(T)` for every coalition `S`."""
        n = self.num_players
        and_rows, or_rows = self.coalition_rows(self.and_), self.coalition_rows(self.or_)
        return zeta_transform(and_rows, n) + or_inverse_transform(or_rows, n)

    def coalition_rows(self, record: Interactions) -> Tensor:
        """`(2^n, B, C_out)`: `record`'s base in row 0, its interactions in coalition row order (`or_transform`'s)."""
        if not record.complete:
            raise ValueError("reconstruct needs every interaction: compute them without max_order")
        n = self.num_players
        rows = record.base.new_zeros(2**n, *record.base.shape)
        rows[0] = record.base
        _, picked = _subsets(n, None)
        rows[picked.to(rows.device)] = record.dividends.transpose(0, 1)
        return rows

    def matching_error(self) -> float:
        """The largest `|v(S) - reconstruction(S)|` over all coalitions, samples and outputs."""
        return (self.reconstruct() - self.values).abs().max().item() if self.values.numel() else 0.0

    def check_decomposition(self, atol: float | None = None, rtol: float = 1e-4) -> None:
        """Raise `DecompositionError` unless universal matching holds on every coalition (see `matching_error`).

        Args:
            atol: absolute tolerance; default 1e-9 in float64 and 1e-4 otherwise.
            rtol: tolerance relative to the largest `|v(S)|`.
        """

        if atol is None:
            atol = 1e-9 if self.values.dtype == torch.float64 else 1e-4
        err = self.matching_error()
        scale = self.values.abs().max().item() if self.values.numel() else 0.0
        if not err <= atol + rtol * scale:
            raise DecompositionError(f"AND-OR universal matching violated: max |v(S) - v(∅) - AND - OR| = {err:.3e} "
                                     f"> atol {atol:.1e} + rtol {rtol:.1e} * {scale:.3e}")

    def l1(self) -> Tensor:
        """`(B, C_out)`: `sum_T |I_and(T)| + |I_or(T)|` over the listed subsets (what `split="sparse"` minimises)."""
        return self.and_.dividends.abs().sum(1) + self.or_.dividends.abs().sum(1)


def _sparse_gamma(values: Tensor, n: int, share: float) -> Tensor:
    """`gamma` minimising the L1 norm of all AND and OR interactions, one linear program per sample and output."""
    if n > MAX_SPARSE_PLAYERS:
        raise ValueError(f"split='sparse' solves a linear program with 3 (2^n - 1) variables; {n} players is above "
                         f"its limit of {MAX_SPARSE_PLAYERS}: use split='half'")
    try:
        import numpy as np
        from scipy import sparse
        from scipy.optimize import linprog
    except ImportError as e:  # pragma: no cover - scipy comes with scikit-learn, a dependency
        raise ImportError("split='sparse' needs scipy (pip install scipy)") from e

    one = sparse.csr_matrix(np.array([[1.0, 0.0], [-1.0, 1.0]]))
    mob = sparse.csr_matrix(np.ones((1, 1)))
    for _ in range(n):
        mob = sparse.kron(one, mob, format="csr")  # the Möbius matrix: d = mob @ v (3^n non-zeros)
    m = 2**n
    flip = sparse.csr_matrix((np.ones(m), (np.arange(m), np.arange(m)[::-1])), shape=(m, m))
    # I_and = mob (share v + gamma); I_or = -mob flip ((1 - share) v - gamma) = mob flip gamma - (1 - share) mob flip v
    a_mat = mob[1:, 1:]  # rows: non-empty T; columns: gamma of non-empty coalitions (gamma_∅ = 0)
    b_mat = (mob @ flip)[1:, 1:]
    r = m - 1
    eye = sparse.identity(r, format="csr")
    zero = sparse.csr_matrix((r, r))
    # Variables [gamma, t_and, t_or]; minimise sum t subject to |A gamma + a| <= t_and and |B gamma + b| <= t_or.
    upper = sparse.vstack([
        sparse.hstack([a_mat, -eye, zero]), sparse.hstack([-a_mat, -eye, zero]),
        sparse.hstack([b_mat, zero, -eye]), sparse.hstack([-b_mat, zero, -eye]),
    ], format="csr")
    cost = np.concatenate([np.zeros(r), np.ones(2 * r)])
    bounds = [(None, None)] * r + [(0, None)] * (2 * r)
    flat = values.detach().reshape(m, -1).double().cpu().numpy()
    gamma = np.zeros_like(flat)
    for j in range(flat.shape[1]):
        a = share * (mob @ flat[:, j])[1:]
        b = -(1 - share) * (mob @ flip @ flat[:, j])[1:]
        rhs = np.concatenate([-a, a, -b, b])
        res = linprog(cost, A_ub=upper, b_ub=rhs, bounds=bounds, method="highs")
        if not res.success:  # pragma: no cover - the program is always feasible and bounded
            raise RuntimeError(f"the sparse AND-OR split did not solve: {res.message}")
        gamma[1:, j] = res.x[:r]
    return torch.from_numpy(gamma).to(values).reshape(values.shape)


def and_or_interactions(
    values: Tensor,
    split: str = "half",
    share: float = 0.5,
    max_order: int | None = None,
    **meta,
) -> AndOrInteractions:
    """AND and OR interactions of a split `v = v_and + v_or` from the game's values on all `2^n` coalitions.

    Args:
        values: `(2^n, B, C_out)` coalition values (`coalition_values` order).
        split: `"half"` (`gamma = 0`: `v_and = share v`, `v_or = (1 - share) v`) or `"sparse"` (`gamma` minimising
            `sum_T |I_and(T)| + |I_or(T)|`, an exact linear program per sample and output; up to 12 players).
        share: the part of `v` given to `v_and` before `gamma`, in [0, 1].
        max_order: list only subsets of at most this many players.
        **meta: `player_names`, `player_shape`, `class_names`, `method` of both records.

    Returns:
        `AndOrInteractions`; `check_decomposition()` verifies universal matching on every coalition.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown AND-OR split {split!r}: expected one of {', '.join(SPLITS)}")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must lie in [0, 1], got {share}")
    if values.dim() != 3 or values.shape[0] != 2 ** (int(values.shape[0]).bit_length() - 1):
        raise ValueError(f"coalition values must be (2^n, B, C_out), got shape {tuple(values.shape)}")
    n = int(values.shape[0]).bit_length() - 1
    gamma = _sparse_gamma(values, n, share) if split == "sparse" else torch.zeros_like(values)
    v_and = share * values + gamma
    v_or = (1 - share) * values - gamma
    method = meta.pop("method", "and_or_interactions")
    and_record = Interactions.from_coalition_values(v_and, max_order, method=method, **meta)
    and_record.kind = "and"
    # The OR record carries the SII of v_or (the Shapley values of v_or on its diagonal).
    or_base = Interactions.from_coalition_values(v_or, max_order, method=method, **meta)
    or_record = _record(or_transform(v_or, n), or_base, max_order, "or", method)
    return AndOrInteractions(and_=and_record, or_=or_record, values=values, gamma=gamma, share=float(share),
                             split=split)


def or_interactions_from_values(values: Tensor, max_order: int | None = None, **meta) -> Interactions:
    """OR interactions of the whole game `v` (no split) from its values on all `2^n` coalitions `(2^n, B, C)`."""
    n = int(values.shape[0]).bit_length() - 1
    and_record = Interactions.from_coalition_values(values, max_order, **meta)
    return _record(or_transform(values, n), and_record, max_order, "or", meta.get("method", ""))


# ---------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def exact_interactions(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    reference: Tensor | float | None = None,
    players: Tensor | None = None,
    max_players: int = MAX_ORACLE_PLAYERS,
    max_order: int | None = None,
    max_batch: int = 8192,
    player_names: Sequence[str] | None = None,
    kind: str = "and",
    split: str = "half",
    share: float = 0.5,
) -> Interactions | AndOrInteractions:
    """Brute-force AND (Harsanyi), OR or AND-OR interactions of any callable (the oracle).

    Evaluates the baseline game `v(S) = fn(x_S ; reference_rest)` on all `2^n` coalitions (as `exact_shapley`
    does) and takes its Möbius transform (`kind="and"`), that of the complemented game (`kind="or"`, see
    `shapnets.and_or`), or splits `v = v_and + v_or` and gives both (`kind="and_or"`). Every subset is listed,
    also those a model's structure makes 0.

    Args:
        fn: maps a batch `(N, *S)` to `(N, C_out)` or `(N,)` (e.g. a model's `forward`).
        x: `(B, *S)` inputs.
        reference: `None` (zeros), a number, or a tensor broadcastable to one sample `S`.
        players: optional integer map of shape `S` assigning every element to a player `0..n-1`; default: each
            index of axis 1 is a player.
        max_players: refuse larger games (cost: `2^n` evaluations and dividends per sample).
        max_order: list only subsets of at most this many players (the SII still uses all of them).
        max_batch: the largest batch handed to `fn` at once.
        player_names: optional names of the `n` players.
        kind: `"and"` (Harsanyi dividends), `"or"` (OR interactions of `v`) or `"and_or"` (both, of a split).
        split: with `kind="and_or"`: `"half"` or `"sparse"` (the split minimising the L1 norm of all AND and OR
            interactions); see `shapnets.and_or.and_or_interactions`.
        share: with `kind="and_or"`: the part of `v` given to the AND game before the split parameters.

    Returns:
        `Interactions` (`kind="and"` or `"or"`) over all `2^n - 1` non-empty subsets (or those up to
        `max_order`), or `AndOrInteractions` (`kind="and_or"`), in `x`'s dtype: use float64 to verify.
    """
    check_kind(kind)
    max_order = _check_max_order(max_order)
    values, _ = coalition_values(fn, x, reference, players, max_players, max_batch, "exact_interactions")
    meta = dict(player_names=list(player_names) if player_names is not None else None,
                method=f"exact_interactions[{kind}]" if kind != "and" else "exact_interactions")
    if kind == "or":
        return or_interactions_from_values(values, max_order, **meta)
    if kind == "and_or":
        return and_or_interactions(values, split, share, max_order, **meta)
    return Interactions.from_coalition_values(values, max_order, **meta)
