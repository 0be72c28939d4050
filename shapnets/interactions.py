"""Exact interactions: Harsanyi dividends and pairwise Shapley interaction indices from coalition values.

A Shapley module already evaluates its inner function on all `2^k` coalitions of its players. The same values
give, by fixed linear maps and at no extra forward cost:

* the **Harsanyi dividends** (the Möbius transform of the game; the "AND" interactions of Zhang's interaction
  theory), `d_T = sum_{S ⊆ T} (-1)^(|T| - |S|) v(S)`. They decompose the game exactly,
  `v(N) = v(∅) + sum_{T ≠ ∅} d_T`, and split evenly among their members they give the Shapley values,
  `phi_i = sum_{T ∋ i} d_T / |T|`;
* the **Shapley interaction index** (Grabisch & Roubens 1999) of every pair,
  `I_ij = sum_{T ⊇ {i, j}} d_T / (|T| - 1)`. On the diagonal we store the same index of the singleton,
  `I_ii = sum_{T ∋ i} d_T / |T| = phi_i` (the general formula `I_S = sum_{T ⊇ S} d_T / (|T| - |S| + 1)` at
  `|S| = 1`, as in shapiq's `"SII"`), so the matrix carries the Shapley values and the pairwise interactions.

Games that are sums of module games over groups of players (Shallow ShapNets, and every layer of a Deep or Conv
ShapNet with respect to its own inputs) have dividends only on subsets of a group: the dividends of a subset
shared by several groups add up, and every other subset's dividend is exactly 0. `Interactions.from_module_games`
builds that sparse decomposition from each module's coalition values;
`shapnets.and_or.exact_interactions` is the brute-force
oracle for any callable (all `2^n` coalitions of `n <= 16` players).

Conventions: players are numbered `0..P-1` (for images, pixel `(h, w)` is player `h * W + w`); subsets are
sorted tuples of players, listed by size, then lexicographically; the empty subset is not listed (its dividend
is `base`, the value of the empty coalition).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from .coalitions import cached_table, coalition_table
from .explanation import LocalAccuracyError, TensorFields, class_indices

__all__ = [
    "DecompositionError",
    "Interactions",
    "RankedInteraction",
    "moebius_transform",
    "shapley_interaction_index",
]

#: Largest game `exact_interactions` accepts by default: 2^16 coalitions (and dividends) per sample.
MAX_ORACLE_PLAYERS = 16


class DecompositionError(LocalAccuracyError):
    """Raised by `Interactions.check_decomposition` when base + sum of dividends != output."""


class RankedInteraction(NamedTuple):
    """One entry of `Interactions.top`: the subset (player indices), its players' names and its dividend."""

    subset: tuple[int, ...]
    names: tuple[str, ...]
    value: float


# ---------------------------------------------------------------------------------------------
# The linear maps
# ---------------------------------------------------------------------------------------------
def _check_arity(values: Tensor, k: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive number of players, got {k!r}")
    if values.dim() < 1 or values.shape[0] != 2**k:
        got = values.shape[0] if values.dim() else "a 0-d tensor"
        raise ValueError(f"expected 2^{k} = {2**k} {what} along dim 0, got {got}")


def moebius_transform(values: Tensor, k: int) -> Tensor:
    """Harsanyi dividends (Möbius transform) of a game from its values on all `2^k` coalitions.

    `d_T = sum_{S ⊆ T} (-1)^(|T| - |S|) v(S)`, computed by the fast (butterfly) Möbius transform: one
    subtraction per player and coalition, `k 2^k` in all, exact on integers, differentiable. (The dense
    `2^k x 2^k` matrix would hold 2^32 entries at k = 16.) Row 0 of the result is `v(∅)` and the rows sum
    to `v(N)`, the last value.

    Args:
        values: `(2^k, *batch)` coalition values, rows ordered as in `coalition_masks` (row t: the players
            whose bits are set in t).
        k: number of players.

    Returns:
        `(2^k, *batch)` dividends, in the same row order.
    """
    _check_arity(values, k, "coalition values")
    dividends = values
    for i in range(k):
        # Rows t = hi * 2^(i+1) + bit_i * 2^i + lo: the coalitions with player i minus those without it.
        pairs = dividends.reshape(2 ** (k - 1 - i), 2, 2**i, -1)
        dividends = torch.stack((pairs[:, 0], pairs[:, 1] - pairs[:, 0]), dim=1).reshape(values.shape)
    return dividends


def shapley_interaction_index(dividends: Tensor, k: int) -> Tensor:
    """Pairwise Shapley interaction index from the Harsanyi dividends of a `k`-player game.

    Off the diagonal `I_ij = sum_{T ⊇ {i, j}} d_T / (|T| - 1)`; on it the Shapley value
    `I_ii = sum_{T ∋ i} d_T / |T|` (the same index of the singleton `{i}`).

    Args:
        dividends: `(2^k, *batch, C)` dividends in coalition order (`moebius_transform`'s output).
        k: number of players.

    Returns:
        `(*batch, k, k, C)`, symmetric in the two player axes.
    """
    _check_arity(dividends, k, "dividends")
    if dividends.dim() < 2:
        raise ValueError(f"dividends must be (2^k, *batch, C), got shape {tuple(dividends.shape)}")
    masks, with_, _, _ = coalition_table(k)
    masks = masks.to(device=dividends.device, dtype=dividends.dtype)
    sizes = masks.sum(1)
    flat = dividends.reshape(2**k, -1)
    rows = []
    for i in range(k):
        containing = with_[i].to(dividends.device)  # the 2^(k-1) subsets T that contain i
        size = sizes[containing]
        # Column j of T's weights: 1 / (|T| - 1) if j is in T too (|T| >= 2 then); row i itself: 1 / |T|.
        weights = masks[containing].T / (size - 1).clamp(min=1)
        weights[i] = 1.0 / size
        rows.append(weights @ flat[containing])
    index = torch.stack(rows)  # (k, k, N)
    return rearrange(index.reshape(k, k, *dividends.shape[1:]), "i j ... c -> ... i j c")


@cached_table(maxsize=64)
def _subsets(k: int, max_order: int | None) -> tuple[tuple[tuple[int, ...], ...], Tensor]:
    """Non-empty subsets of `k` players of size <= max_order (by size, then lexicographic) and their rows."""
    top = k if max_order is None else min(k, max_order)
    subsets = tuple(s for size in range(1, top + 1) for s in itertools.combinations(range(k), size))
    rows = torch.tensor([sum(1 << j for j in s) for s in subsets], dtype=torch.long)
    return subsets, rows


def _check_max_order(max_order: int | None) -> int | None:
    if max_order is None:
        return None
    if isinstance(max_order, bool) or not isinstance(max_order, numbers.Integral) or max_order < 1:
        raise ValueError(f"max_order must be a positive integer (the largest subset size kept) or None, "
                         f"got {max_order!r}")
    return int(max_order)


def check_module_kind(kind: str, who: str) -> str:
    """`kind` for a model's own `interactions`: `"and"` or `"or"`; `"and_or"` and unknown kinds get a clear error."""
    if kind == "and_or":
        raise ValueError(f"{who}: kind='and_or' splits the game on every coalition of all its players, which the "
                         f"model's modules do not give; use shapnets.exact_interactions(fn, x, reference, "
                         f"kind='and_or') (up to {MAX_ORACLE_PLAYERS} players)")
    if kind not in ("and", "or"):
        raise ValueError(f"{who}: unknown interaction kind {kind!r}: expected 'and' or 'or' ('and_or' through "
                         f"shapnets.exact_interactions)")
    return kind


def _or_rows(values: Tensor, k: int) -> Tensor:
    """OR interactions in coalition row order (row 0: `v(∅)`), as `shapnets.and_or.or_transform` (no import circle).

    `I_or(T) = -sum_{L ⊆ T} (-1)^(|T|-|L|) v(N \\ L)`: minus the Möbius transform of the complemented game.
    """
    rows = -moebius_transform(values.flip(0), k)
    rows[0] = values[0]
    return rows


def check_layer(layer: int, num_layers: int, who: str) -> int:
    """`layer` as an index in `[0, num_layers)` (negative counts from the end), or a clear error."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"{who}: layer must be an integer stage index, got {type(layer).__name__}")
    if not -num_layers <= layer < num_layers:
        raise IndexError(f"{who}: layer {layer} out of range: the model has {num_layers} stages "
                         f"(0..{num_layers - 1}, or -{num_layers}..-1)")
    return int(layer) % num_layers


# ---------------------------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------------------------
@dataclass
class Interactions(TensorFields):
    """Harsanyi dividends and pairwise Shapley interaction indices of a batch of games.

    Every sample of the batch is a game over the same `P` players with the same listed subsets; the values
    differ per sample.

    Attributes:
        subsets: the `S` listed subsets, sorted tuples of player indices (by size, then lexicographic): every
            subset whose dividend can be non-zero (all of them for the oracle; the subsets of the groups for
            module games), up to `max_order` if one was given.
        dividends: `(B, S, C_out)`: the Harsanyi dividend of every listed subset for every output.
        sii: `(B, P, P, C_out)`: the pairwise Shapley interaction index, the Shapley values on the diagonal.
            Always computed from all dividends, whatever `max_order` kept. Dense: `B P^2 C_out` numbers.
        base: `(B, C_out)`: the value of the empty coalition (the output at the reference).
        output: `(B, C_out)`: the value of the grand coalition (the explained output).
        player_names: optional names of the `P` players.
        player_shape: the players' layout: `(P,)`, or `(H, W)` for pixels (player `h * W + w`).
        class_names: optional names of the outputs.
        complete: True when no subset whose dividend can be non-zero was left out (no `max_order`, or one at
            least the largest group): then `base + sum(dividends) == output` and the Shapley values follow.
        method: what produced the record and which game it describes.
        kind: `"and"` (Harsanyi dividends, the default) or `"or"` (OR interactions, `shapnets.and_or`): an OR
            record lists `I_or(T)` in `dividends`; `base + sum == output` and the even split giving the Shapley
            values hold for both, and `sii` is the game's in both.
    """

    subsets: list[tuple[int, ...]]
    dividends: Tensor
    sii: Tensor
    base: Tensor
    output: Tensor
    player_names: list[str] | None = None
    player_shape: tuple[int, ...] | None = None
    class_names: list[str] | None = None
    complete: bool = True
    method: str = ""
    kind: str = "and"

    def __post_init__(self) -> None:
        d, o = self.dividends, self.output
        if o.dim() != 2 or self.base.shape != o.shape:
            raise ValueError(f"Interactions.output and base must both be (B, C_out), got {tuple(o.shape)} and "
                             f"{tuple(self.base.shape)}")
        B, C = o.shape
        if d.dim() != 3 or d.shape[0] != B or d.shape[2] != C or d.shape[1] != len(self.subsets):
            raise ValueError(f"Interactions.dividends must be (B, S, C_out) = ({B}, {len(self.subsets)}, {C}), "
                             f"got {tuple(d.shape)}")
        if self.sii.dim() != 4 or self.sii.shape[0] != B or self.sii.shape[1] != self.sii.shape[2] \
                or self.sii.shape[3] != C:
            raise ValueError(f"Interactions.sii must be (B, P, P, C_out) with B = {B}, C_out = {C}, "
                             f"got {tuple(self.sii.shape)}")
        P = self.sii.shape[1]
        if self.player_shape is None:
            self.player_shape = (P,)
        if math.prod(self.player_shape) != P:
            raise ValueError(f"player_shape {self.player_shape} holds {math.prod(self.player_shape)} players, "
                             f"sii has {P}")
        if self.player_names is not None and len(self.player_names) != P:
            raise ValueError(f"{len(self.player_names)} player names for {P} players")
        bad = [s for s in self.subsets if not s or list(s) != sorted(set(s)) or s[0] < 0 or s[-1] >= P]
        if bad:
            raise ValueError(f"subsets must be non-empty sorted tuples of distinct players in [0, {P}), got "
                             f"{bad[:3]}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module_games(
        cls,
        games: Sequence[tuple[Tensor, Tensor]],
        num_players: int,
        max_order: int | None = None,
        kind: str = "and",
        **meta,
    ) -> Interactions:
        """Interactions of a sum of module games from each module's coalition values.

        The game is `v(S) = sum_m f_m(S ∩ A_m)`: module `m` plays on its group `A_m`. By linearity of the
        Möbius transform its dividends are the modules' own, summed where groups share a subset, and 0 on every
        subset that lies in no group; the Shapley interaction index adds up the same way. The OR interactions
        are linear in the game too, and a player outside `A_m` is a dummy of `f_m`, whose OR interactions vanish
        on every subset holding it: they add up from the modules' own in the same way (`kind="or"`).

        Args:
            games: pairs `(values, members)`, one per arity: `values` `(2^k, B, M, C_out)` the coalition values
                of `M` modules of `k` players (`coalition_masks` order), `members` `(M, k)` the player index of
                each module's players; `-1` marks a slot that is not a player (padding at the reference: a
                dummy, whose subsets' dividends are 0 and are not listed).
            num_players: `P`.
            max_order: list only subsets of at most this many players (the SII still uses all dividends).
            kind: `"and"` (Harsanyi dividends) or `"or"` (OR interactions; the SII stays the game's).
            **meta: `player_names`, `player_shape`, `class_names`, `method`.
        """
        max_order = _check_max_order(max_order)
        kind = check_module_kind(kind, "Interactions.from_module_games")
        if not games:
            raise ValueError("from_module_games needs at least one (values, members) pair")
        position: dict[tuple[int, ...], int] = {}
        pieces: list[tuple[Tensor, list[int]]] = []
        sii = base = output = None
        largest = 0
        for values, members in games:
            if members.dim() != 2 or values.dim() != 4 or values.shape[2] != members.shape[0]:
                raise ValueError(f"module values must be (2^k, B, M, C_out) and members (M, k) with the same M, "
                                 f"got {tuple(values.shape)} and {tuple(members.shape)}")
            k = members.shape[1]
            if int(members.max()) >= num_players or int(members.min()) < -1:
                raise ValueError(f"members must be player indices in [0, {num_players}) or -1, got range "
                                 f"[{int(members.min())}, {int(members.max())}]")
            largest = max(largest, k)
            dividends = moebius_transform(values, k)  # (2^k, B, M, C)
            listed = dividends if kind == "and" else _or_rows(values, k)
            local, rows = _subsets(k, max_order)
            module_players = members.tolist()
            source, target = [], []
            for s, subset in enumerate(local):
                for m, players in enumerate(module_players):
                    chosen = [players[j] for j in subset]
                    if min(chosen) < 0:
                        continue  # a padding slot: a dummy, its dividends are exactly 0
                    source.append(s * len(module_players) + m)
                    target.append(position.setdefault(tuple(sorted(chosen)), len(position)))
            picked = rearrange(listed[rows.to(values.device)], "s b m c -> b (s m) c")
            pieces.append((picked[:, torch.tensor(source, dtype=torch.long, device=values.device)], target))

            # SII: every module's own matrix, added at its players' pairs (slots that are not players dropped).
            B, C = values.shape[1], values.shape[3]
            if sii is None:
                sii = values.new_zeros(B, num_players * num_players, C)
                base, output = values.new_zeros(B, C), values.new_zeros(B, C)
            module_sii = shapley_interaction_index(dividends, k)  # (B, M, k, k, C)
            members = members.to(values.device)
            real = members >= 0
            both = real[:, :, None] & real[:, None, :]
            pair = members[:, :, None] * num_players + members[:, None, :]
            sii = sii.index_add(1, pair[both], module_sii[:, both])
            base = base + values[0].sum(1)
            output = output + values[-1].sum(1)

        # List the subsets by size, then lexicographically, whatever order the modules found them in.
        order = sorted(position, key=lambda t: (len(t), t))
        rank = torch.empty(len(order), dtype=torch.long)
        rank[torch.tensor([position[t] for t in order], dtype=torch.long)] = torch.arange(len(order))
        total = base.new_zeros(base.shape[0], len(order), base.shape[1])
        for picked, target in pieces:
            total = total.index_add(1, rank[torch.tensor(target, dtype=torch.long)].to(total.device), picked)
        return cls(
            subsets=order,
            dividends=total,
            sii=rearrange(sii, "b (i j) c -> b i j c", i=num_players),
            base=base,
            output=output,
            complete=max_order is None or max_order >= largest,
            kind=kind,
            **meta,
        )

    @classmethod
    def from_coalition_values(cls, values: Tensor, max_order: int | None = None, kind: str = "and",
                              **meta) -> Interactions:
        """Interactions (`kind` `"and"` or `"or"`) of one game from its values on all `2^n` coalitions."""
        if values.dim() != 3:
            raise ValueError(f"coalition values must be (2^n, B, C_out), got shape {tuple(values.shape)}")
        n = int(values.shape[0]).bit_length() - 1
        if values.shape[0] != 2**n:
            raise ValueError(f"the number of coalition values must be a power of two, got {values.shape[0]}")
        members = torch.arange(n, device=values.device)[None]
        return cls.from_module_games([(values[:, :, None], members)], n, max_order, kind, **meta)

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_players(self) -> int:
        return self.sii.shape[1]

    @property
    def orders(self) -> Tensor:
        """`(S,)`: the size of every listed subset."""
        return torch.tensor([len(s) for s in self.subsets], dtype=torch.long)

    def player_name(self, player: int) -> str:
        """A player's name: its given name, `(h,w)` for pixels, else `x{i}`."""
        if self.player_names is not None:
            return str(self.player_names[player])
        if self.player_shape is not None and len(self.player_shape) == 2:
            return f"({player // self.player_shape[1]},{player % self.player_shape[1]})"
        return f"x{player}"

    def names(self, subset: Sequence[int]) -> tuple[str, ...]:
        """The names of a subset's players."""
        return tuple(self.player_name(int(i)) for i in subset)

    # ------------------------------------------------------------------ decomposition
    def residual(self) -> Tensor:
        """`output - base - sum(dividends)`, shape `(B, C_out)`; zero when the decomposition is complete."""
        return self.output - self.base - self.dividends.sum(1)

    def decomposition_error(self) -> float:
        """The largest absolute `residual()` over the batch and outputs."""
        return self.residual().abs().max().item() if self.output.numel() else 0.0

    def _require_complete(self, what: str) -> None:
        if not self.complete:
            largest = max((len(s) for s in self.subsets), default=0)
            raise ValueError(f"{what} needs every dividend, but these interactions list only subsets of up to "
                             f"{largest} players (max_order): compute them without max_order")

    def check_decomposition(self, atol: float | None = None, rtol: float = 1e-4) -> None:
        """Raise `DecompositionError` unless `base + sum of dividends == output` for every sample and output.

        Args:
            atol: absolute tolerance; default 1e-9 in float64 and 1e-4 otherwise.
            rtol: tolerance relative to the largest output magnitude.

        Raises:
            ValueError: the record was truncated by `max_order` (the left-out dividends are missing).
        """
        self._require_complete("check_decomposition")
        if atol is None:
            atol = 1e-9 if self.output.dtype == torch.float64 else 1e-4
        err = self.decomposition_error()
        scale = self.output.abs().max().item() if self.output.numel() else 0.0
        if not err <= atol + rtol * scale:
            what = "Harsanyi" if self.kind == "and" else "OR"
            raise DecompositionError(
                f"{what} decomposition violated: max |output - base - sum(dividends)| = {err:.3e} "
                f"> atol {atol:.1e} + rtol {rtol:.1e} * {scale:.3e}"
            )

    def shapley_values(self) -> Tensor:
        """`(B, P, C_out)`: each dividend split evenly among its players, `phi_i = sum_{T ∋ i} d_T / |T|`."""
        self._require_complete("shapley_values")
        players = torch.tensor([i for s in self.subsets for i in s], dtype=torch.long, device=self.dividends.device)
        owner = torch.tensor([t for t, s in enumerate(self.subsets) for _ in s], dtype=torch.long,
                             device=self.dividends.device)
        share = (self.dividends / self.orders.to(self.dividends)[:, None])[:, owner]
        return self.dividends.new_zeros(self.batch_size, self.num_players, self.num_outputs).index_add(1, players,
                                                                                                      share)

    # ------------------------------------------------------------------ ranking
    def _target_index(self, target: int | Sequence[int] | Tensor | None) -> Tensor:
        if target is None:
            return self.output.argmax(1)
        return class_indices(self.output, target)

    def top(
        self,
        k: int = 10,
        target: int | None = None,
        sample: int = 0,
        min_order: int = 1,
        max_order: int | None = None,
    ) -> list[RankedInteraction]:
        """The `k` largest dividends (by magnitude) of one sample for one output.

        Args:
            k: how many.
            target: the output channel; default the sample's largest output (the predicted class).
            sample: which sample of the batch.
            min_order: only subsets of at least this many players (2: interactions proper).
            max_order: only subsets of at most this many players.

        Returns:
            `RankedInteraction(subset, names, value)` tuples, largest `|value|` first.
        """
        if not -self.batch_size <= sample < self.batch_size:
            raise IndexError(f"sample {sample} out of range for a batch of {self.batch_size}")
        c = int(self._target_index(target)[sample])
        values = self.dividends[sample, :, c].detach()
        orders = self.orders.to(values.device)
        keep = orders >= min_order
        if max_order is not None:
            keep &= orders <= _check_max_order(max_order)
        candidates = keep.nonzero().flatten()
        ranked = candidates[values[candidates].abs().argsort(descending=True, stable=True)][: max(k, 0)]
        return [RankedInteraction(self.subsets[t], self.names(self.subsets[t]), float(values[t]))
                for t in ranked.tolist()]

    def mass_in_top(self, share: float = 0.05, target: int | Sequence[int] | Tensor | None = None) -> Tensor:
        """Per sample, the fraction of `sum |d_T|` held by the `ceil(share * S)` largest `|d_T|` (at least one).

        Args:
            share: the fraction of the listed subsets counted as "top".
            target: output channel(s); default each sample's largest output (the predicted class).

        Returns:
            `(B,)`; NaN for a sample whose dividends are all 0.
        """
        if not 0 < share <= 1:
            raise ValueError(f"share must lie in (0, 1], got {share}")
        magnitudes = self.select(target).dividends[..., 0].abs()
        count = max(1, math.ceil(share * magnitudes.shape[1]))
        top = magnitudes.topk(min(count, magnitudes.shape[1]), dim=1).values.sum(1)
        total = magnitudes.sum(1)
        return torch.where(total > 0, top / total, torch.full_like(total, math.nan))

    # ------------------------------------------------------------------ selection and conversion
    def select(self, target: int | Sequence[int] | Tensor | None) -> Interactions:
        """Keep one output channel: an int for all samples, one index per sample, or None (the largest output)."""
        index = self._target_index(target)
        B = self.batch_size
        names = None
        if self.class_names is not None and B and bool((index == index[0]).all()):
            names = [self.class_names[int(index[0])]]
        return replace(
            self,
            dividends=self.dividends.gather(2, index.view(B, 1, 1).expand(B, self.dividends.shape[1], 1)),
            sii=self.sii.gather(3, index.view(B, 1, 1, 1).expand(*self.sii.shape[:3], 1)),
            base=self.base.gather(1, index.view(B, 1)),
            output=self.output.gather(1, index.view(B, 1)),
            class_names=names,
        )

    def _map(self, fn) -> Interactions:
        return replace(self, dividends=fn(self.dividends), sii=fn(self.sii), base=fn(self.base),
                       output=fn(self.output))

    def __getitem__(self, index: int | slice) -> Interactions:
        """Samples of the batch: `inter[0]` keeps a batch of one, `inter[2:5]` a slice."""
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"sample {index} out of range for a batch of {self.batch_size}")
            index %= self.batch_size
            index = slice(index, index + 1)
        return self._map(lambda t: t[index])

    def __repr__(self) -> str:
        largest = max((len(s) for s in self.subsets), default=0)
        return (
            f"Interactions(method={self.method!r}, batch={self.batch_size}, players={self.num_players}, "
            f"subsets={len(self.subsets)} (orders 1..{largest}), outputs={self.num_outputs}, "
            f"complete={self.complete})"
        )
