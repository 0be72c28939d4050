"""Deep ShapNet: butterfly-wired stacks of pairwise Shapley modules for tabular data.

Local accuracy and missingness hold exactly; every layer is the exact Shapley representation of its own function.

Shapley Explanation Networks (Wang, Wang, Inouye, ICLR 2021), https://arxiv.org/abs/2104.02297

Theory, guarantees and where this departs from the paper or the original code: docs/theory.md#deep-shapnet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from ._heads import BankShape, StagedHead
from ._streaming import LIVE_COPIES, StreamedBatches, streamed
from ._tabular import TabularGame
from ._validation import finite_output
from .explanation import Explanation
from .interactions import Interactions, check_layer, check_module_kind
from .modules import ShapleyModuleBank, off_zero
from .pruning import prune_players, stage_fractions

__all__ = ["DeepShapNet", "butterfly_pairs", "butterfly_stages_needed", "live_rows"]


def butterfly_pairs(num_players: int, stage: int) -> list[tuple[int, int]]:
    """The pairs `(a, a + 2^s)` of butterfly stage `s` for a power-of-two number of players.

    Stride `2^(stage mod log2(D))`, so stages past log2(D) repeat the pattern. For D = 8:
    stage 0 -> (0,1)(2,3)(4,5)(6,7); stage 1 -> (0,2)(1,3)(4,6)(5,7); stage 2 -> (0,4)(1,5)(2,6)(3,7).
    """
    if num_players < 2 or num_players & (num_players - 1):
        raise ValueError(f"butterfly wiring needs a power of two >= 2 players, got {num_players}")
    stride = 1 << (stage % int(math.log2(num_players)))
    return [(a, a + stride) for a in range(num_players) if not a & stride]


def live_rows(in_features: int) -> list[int]:
    """Rows of the padded butterfly that hold the real features (the others hold padding).

    Padded rows sit at the reference, so their Shapley value is 0 at every stage and they carry no
    information: a path through one is dead. Putting the features at the bit-reversed positions
    `{bitrev(i) : i < D}` (in increasing order) spreads the dead rows so that log2(P) + 1 stages
    connect everything, where padding at the end needs up to 2 log2(P) - 1.
    """
    log2 = math.ceil(math.log2(in_features))
    if (1 << log2) == in_features:
        return list(range(in_features))
    return sorted(int(format(i, f"0{log2}b")[::-1], 2) for i in range(in_features))


def butterfly_stages_needed(in_features: int) -> int:
    """The fewest butterfly stages after which every output row depends on every input feature.

    log2(D) when `in_features` is a power of two, log2(P) + 1 with padding (see `live_rows`);
    computed by following which inputs reach which live row.
    """
    padded = 1 << math.ceil(math.log2(in_features))
    log2 = int(math.log2(padded))
    rows = live_rows(in_features)
    alive = [False] * padded
    reach = [0] * padded
    for feature, r in enumerate(rows):
        alive[r], reach[r] = True, 1 << feature
    everything = (1 << in_features) - 1
    stage = 0
    while any(reach[r] != everything for r in rows):
        stride = 1 << (stage % log2)
        new = list(reach)
        for a in range(padded):
            if not a & stride:
                if alive[a]:
                    new[a] |= reach[a + stride]
                if alive[a + stride]:
                    new[a + stride] |= reach[a]
        reach, stage = new, stage + 1
        if stage > 2 * log2 + 2:  # cannot happen for this wiring; guard against an endless loop
            raise RuntimeError(f"butterfly wiring does not connect {in_features} features")
    return max(stage, 1)


def _to_pairs(z: Tensor, stride: int) -> Tensor:
    # Row a = hi * 2 * stride + two * stride + lo: rows a and a + stride form pair (hi, lo).
    return rearrange(z, "... (hi two lo) c -> ... (hi lo) two c", two=2, lo=stride)


def _from_pairs(z: Tensor, stride: int) -> Tensor:
    return rearrange(z, "... (hi lo) two c -> ... (hi two lo) c", two=2, lo=stride)


def _member_slots(masks: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """`(R, n)` membership of each player in each mask, and its rank among the mask's members."""
    members = (masks[:, None] >> torch.arange(n)) & 1
    return members, (members.cumsum(1) - 1).clamp(min=0)


def _deposit(index: Tensor, masks: Tensor, n: int) -> Tensor:
    """`(K, R)`: the bits of `index` `(K,)` (modulo `2^popcount`) placed at the set bits of each of `masks` `(R,)`."""
    members, slot = _member_slots(masks, n)
    out = index.new_zeros(index.shape[0], masks.shape[0])
    for bit in range(n):  # one player at a time: (K, R) integers, never (K, R, n)
        out |= (((index[:, None] >> slot[:, bit]) & 1) & members[:, bit]) << bit
    return out


def _popcount(masks: Tensor) -> Tensor:
    return ((masks[:, None] >> torch.arange(63)) & 1).sum(1)


def _compress(coalitions: Tensor, masks: Tensor, n: int) -> Tensor:
    """`(K, R)`: the index of `coalitions & masks` among the subsets of `masks` (`_deposit`'s inverse)."""
    members, slot = _member_slots(masks, n)
    out = torch.zeros_like(coalitions)
    for bit in range(n):
        out |= (((coalitions >> bit) & 1) & members[:, bit]) << slot[:, bit]
    return out


class DeepShapNet(StagedHead, StreamedBatches, TabularGame):
    """Deep ShapNet with butterfly wiring: local accuracy and missingness at every layer.

    Args:
        in_features: `D`, the number of features; padded to the next power of two `P` internally.
        num_classes: outputs; the last stage's channels. `0`: no head (timm's pooled features): the last hidden
            stage's representation is the model's, `forward` returns its sum over the features
            `(B, num_features)`.
        channels: channels of the hidden representations: an int (used for every hidden stage) or
            one width per hidden stage. There are `len(channels) + 1` stages, at least
            `butterfly_stages_needed(in_features)` (log2(D) for a power of two, more with padding).
        hidden: hidden widths of each pairwise module's inner MLP.
        residual: add the stage input to its Shapley representation when channels match (the first
            stage adds `x - reference`, so missingness still holds).
        reference: the reference input: `None` (zeros), a number, `(D,)` or `(D, C)`.
        in_channels: channels per feature (1 for tabular data).
        act_layer: activation of the inner MLPs.
        feature_names: optional names used in explanations and plots.
        prune: instance-based pruning fraction after each stage: one float for all stages or one per
            stage (see `shapnets.pruning`). Applied in eval mode, and in training only if
            `prune_during_training`.
        prune_during_training: also prune in training mode.
        prune_mode: what `prune` counts: `"all"` players (the paper's rule), the `"active"` (non-reference)
            players, or a `"threshold"` on the norm relative to the sample's largest (see `shapnets.pruning`).
        skip_inactive: skip modules (and coalitions) whose players sit at the reference; exact.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        channels: int | Sequence[int] = 16,
        hidden: Sequence[int] = (32,),
        residual: bool = True,
        reference: Tensor | float | None = None,
        in_channels: int = 1,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        feature_names: Sequence[str] | None = None,
        prune: float | Sequence[float] = 0.0,
        prune_during_training: bool = False,
        prune_mode: str = "all",
        skip_inactive: bool = True,
    ) -> None:
        super().__init__()
        if in_features < 2:
            raise ValueError(f"DeepShapNet needs at least 2 features, got {in_features}")
        if num_classes < 0 or in_channels < 1:
            raise ValueError(f"num_classes must be >= 0 and in_channels >= 1, got {num_classes}, {in_channels}")
        self.num_classes = num_classes or 1  # without a head (0), one is built and dropped: its shape is kept
        self.num_padded = 1 << math.ceil(math.log2(in_features))
        min_stages = butterfly_stages_needed(in_features)
        if isinstance(channels, int):
            channels = [channels] * (min_stages - 1)
        channels = [int(c) for c in channels]
        if len(channels) + 1 < min_stages:
            raise ValueError(
                f"{in_features} features (padded to {self.num_padded}) need at least {min_stages} stages so that "
                f"every output row depends on every input: give at least {min_stages - 1} hidden channel widths, "
                f"got {len(channels)}"
            )
        self.stage_channels = [in_channels, *channels, self.num_classes]
        self.residual = residual
        self._init_game(in_features, in_channels, reference, feature_names)
        self.register_buffer("live_rows", torch.tensor(live_rows(in_features)), persistent=False)
        self.stages = nn.ModuleList(
            ShapleyModuleBank(self.num_padded // 2, 2, c_in, c_out, hidden, act_layer, output_bias=False)
            for c_in, c_out in zip(self.stage_channels[:-1], self.stage_channels[1:])
        )
        self.prune, self.prune_mode = stage_fractions(prune, len(self.stages), prune_mode), prune_mode
        self.prune_during_training, self.skip_inactive = prune_during_training, skip_inactive
        if num_classes == 0:
            self.reset_classifier(0)

    def stage_stride(self, stage: int) -> int:
        return 1 << (stage % int(math.log2(self.num_padded)))

    def _padded_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The first stage's game: offsets `(B, P, C)` of the checked input and the padded reference `(P, C)`."""
        # Work in offsets from the reference: padded players sit exactly at the reference (offset 0).
        z = x.new_zeros(x.shape[0], self.num_padded, x.shape[2]).index_copy(1, self.live_rows, x - self.reference)
        reference = self.reference.new_zeros(self.num_padded, x.shape[2]).index_copy(0, self.live_rows, self.reference)
        return z, reference

    def representations(self, x: Tensor) -> list[Tensor]:
        """Every layer's Shapley representation `Z^(1..L)`, each `(B, P, C_l)`.

        Rows are the padded butterfly's: feature `i` sits at row `live_rows[i]`; padded rows are 0.
        """
        z, reference = self._padded_input(self._check(x))
        layers = []
        for s in range(self.num_stages):
            z = self._stage(s, z, reference)
            layers.append(z)
        return layers

    def _stage(self, s: int, z: Tensor, reference: Tensor | None) -> Tensor:
        """Stage `s` on the padded representation `z` `(B, P, C)`: its Shapley representation (residual, pruned)."""
        stride = self.stage_stride(s)
        # Stage 0 sees the input game (reference r); deeper stages see Shapley representations,
        # whose reference is 0 (the representation of the reference input is identically 0).
        ref = _to_pairs(reference, stride) if s == 0 else None
        phi, _, _ = self.stages[s].shapley(_to_pairs(z, stride), ref, skip_inactive=self.skip_inactive)
        phi = _from_pairs(phi, stride)
        z = z + phi if self.residual and phi.shape[-1] == z.shape[-1] else phi
        if self.prune[s] and (self.prune_during_training or not self.training):
            z = prune_players(z, self.prune[s], self.live_rows, self.prune_mode)
        return z

    # ------------------------------------------------------------------ timm's model interface (head = last stage)
    def forward_features(self, x: Tensor) -> Tensor:
        """The padded representation the head reads, `(B, P, num_features)` (the input offsets for one stage)."""
        z, reference = self._padded_input(self._check(x))
        for s in range(self.body_stages):
            z = self._stage(s, z, reference)
        return z

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits from `forward_features(x)`; `pre_logits=True` (or no head): the features summed over rows
        `(B, num_features)`."""
        if not pre_logits and self.num_classes:
            last = self.num_stages - 1
            reference = self._padded_input(self.reference[None])[1] if last == 0 else None
            features = self._stage(last, features, reference)
        return features.index_select(1, self.live_rows).sum(1)

    def _head_shape(self) -> BankShape:
        return BankShape.of(self.stages[-1])

    def _build_head(self, shape: BankShape, num_classes: int) -> nn.Module:
        return shape.build(num_classes, self.reference)

    def _head_changed(self, num_classes: int) -> None:
        self.stage_channels = [*self.stage_channels[: len(self.stages) + 1 - (1 if num_classes else 0)],
                               *([num_classes] if num_classes else [])]

    def working_elements(self, x: Tensor) -> int:
        return max(stage.coalition_elements() for stage in self.stages) * LIVE_COPIES

    @streamed
    @finite_output
    def forward(self, x: Tensor) -> Tensor:
        """Logits: the sum over features of the last Shapley representation."""
        return self.representations(x)[-1].index_select(1, self.live_rows).sum(1)

    @streamed
    @finite_output
    def explain(self, x: Tensor, layers: bool = False) -> Explanation:
        """The network's own explanation (one forward pass; training pays the same cost).

        Args:
            x: `(B, D)` or `(B, D, C)`.
            layers: also return every layer's representation `(B, D, C_l)` in `Explanation.layers`.

        Returns:
            `Explanation` with attributions `Z^(L)` `(B, D, num_classes)`, base 0 (`g(reference)`),
            output `g(x)`, `exact=False` (local accuracy and missingness hold exactly).
        """
        reps = [z.index_select(1, self.live_rows) for z in self.representations(x)]
        attributions = reps[-1]
        output = attributions.sum(1)
        return Explanation(
            attributions=attributions,
            base=torch.zeros_like(output),
            output=output,
            reference=self.reference,
            player_axes=("feature",),
            player_names=self.feature_names,
            exact=False,
            layers=reps if layers else None,
            method=type(self).__name__,
        )

    @torch.no_grad()
    def coalition_outputs(self, x: Tensor, players: Sequence[int] | Tensor, max_rows: int = 1 << 12) -> Tensor:
        """The network's outputs on every coalition of some features, the other features at the reference.

        The same numbers as the oracle's masked forward passes (`shapnets.oracle.coalition_values` of
        `model` over those features), from the network's own wiring instead of `2^n` full forward passes:

        * a stage-`s` module reads two rows whose values depend only on the players in their reach (the
          features wired into them by the earlier stages), so it is evaluated once per distinct restriction of
          the coalitions to that reach (4 per module at stage 0, 16 at stage 1, ...), never on all `2^n`
          coalitions before the last stage;
        * a module of two players needs `f(a)` and `f(b)` (one row each, so at that row's few entries) and
          `f(ab)`: one evaluation per entry instead of the `2^2` coalitions of the dense computation; the logits
          are the last stage's Shapley values summed over the rows, by efficiency `sum f(ab) - f(reference)`.

        Args:
            x: `(B, D)` or `(B, D, C)` inputs.
            players: the `n` distinct features that play (player `j` is feature `players[j]`; `n <= 16`).
            max_rows: samples are processed in chunks of `max(1, max_rows // 2^n)`: small chunks keep the
                coalition tensors in cache (on one CPU core, 2^12 rows ran about 2x faster than 2^16).

        Returns:
            `(2^n, B, num_classes)`: row `t` is the output with the features whose bits are set in `t` taken
            from `x` (row order of `coalition_masks`), exact up to rounding.

        Raises:
            ValueError: bad `players`, or pruning is active in this mode (it couples all rows of a sample, so
                the wiring no longer bounds what a module depends on: use the oracle).
        """
        x = self._check(x)
        chosen = torch.as_tensor(players, dtype=torch.long).flatten().cpu()
        n = chosen.numel()
        if n < 1 or n > 16 or len(set(chosen.tolist())) != n or int(chosen.min()) < 0 \
                or int(chosen.max()) >= self.in_features:
            raise ValueError(f"coalition_outputs: players must be 1..16 distinct feature indices in "
                             f"[0, {self.in_features}), got {chosen.tolist()}")
        if any(self.prune) and (self.prune_during_training or not self.training):
            raise ValueError("coalition_outputs: pruning makes every row depend on the whole sample; use "
                             "shapnets.oracle.coalition_values on the model instead")
        T, device = 2**n, x.device
        # A row of a representation depends only on the players wired into it ("reach", as bits). Each one is
        # kept compressed: `values[j, :, r]` is row r on the j-th subset of its reach, `2^|reach|` rows in all
        # (padded to the stage's largest reach), never the `2^n` coalitions until the last stage.
        row_of = self.live_rows.cpu()[chosen]
        reach = torch.zeros(self.num_padded, dtype=torch.long)
        reach[row_of] = 1 << torch.arange(n)
        gathers = []  # per stage: the compressed row each module input reads, (K_s, P)
        for s in range(self.num_stages):
            stride = self.stage_stride(s)
            # A module reads both its rows: its outputs depend on the union of their reaches.
            pair = _to_pairs(reach[:, None], stride)[..., 0]
            union = _from_pairs((pair[:, :1] | pair[:, 1:])[..., None].expand(-1, 2, 1), stride)[:, 0]
            count = 1 << int(_popcount(union).max()) if s < self.num_stages - 1 else T
            coalitions = _deposit(torch.arange(count), union, n) if s < self.num_stages - 1 else \
                torch.arange(T)[:, None].expand(T, self.num_padded)
            gathers.append(_compress(coalitions, reach, n).to(device))
            reach = union
        reference = self._padded_input(self.reference[None])[1]  # (P, C): what stage 0 plays against
        out = []
        for sub in x.split(max(1, max_rows // T)):
            b = sub.shape[0]
            # Stage 0's rows: a player's row is 0 (absent) or its offset (present); every other row is 0.
            values = sub.new_zeros(2, b, self.num_padded, sub.shape[2])
            values[1, :, row_of.to(device)] = sub[:, chosen.to(device)] - self.reference[chosen.to(device)]
            for s in range(self.num_stages - 1):
                z, phi = self._stage_on_coalitions(s, values, gathers[s], reference)
                values = z + phi if self.residual and phi.shape[-1] == z.shape[-1] else phi
            out.append(self._stage_on_coalitions(self.num_stages - 1, values, gathers[-1], reference, True)[1])
        return torch.cat(out, 1)

    def _stage_on_coalitions(self, s: int, values: Tensor, key: Tensor, reference: Tensor,
                             last: bool = False) -> tuple[Tensor, Tensor]:
        """Stage `s` on compressed rows: `values` `(K, b, P, C)`, row r of coalition j at `values[key[j, r], :, r]`.

        A module of two players has `phi_a = ((f(a) - f(0)) + (f(ab) - f(b))) / 2`: the singletons `f(a)` depend
        on one row each (evaluated at that row's `K` compressed entries), only `f(ab)` on the union of the two
        rows' reaches (one evaluation per entry of `key`, not the `2^2` coalitions of the dense computation). The
        first layer is linear, so `f(ab)`'s pre-activation is assembled from the rows' projections; everything is
        kept in the `(G, h_1, entries x samples)` layout the bank's later layers take without copies.

        Returns:
            `(z, phi)`: the input rows `(J, b, P, C)` and their Shapley values `(J, b, P, C_out)` at the `J` entries
            of `key`; with `last`, `(None, logits (J, b, num_classes))`: the module values summed by efficiency,
            `sum_modules f(ab) - f(0)`, plus the residual.
        """
        stride, bank = self.stage_stride(s), self.stages[s]
        b, J = values.shape[1], key.shape[0]
        weight = bank._first_layer_weight()  # (G, 2, C, h_1)
        rows = rearrange(_to_pairs(values, stride), "k b g two c -> g two c (k b)")
        projected = torch.einsum("gsch,gscn->gshn", weight, rows)  # (G, 2, h_1, K b)
        slot = rearrange(_to_pairs(key[..., None], stride)[..., 0], "j g two -> g two j")  # (G, 2, J)
        # Column j * b + i of the coalition layout reads column key * b + i of the compressed rows.
        column = rearrange(slot[..., None] * b + torch.arange(b, device=key.device), "g two j b -> g two (j b)")
        hidden = projected.shape[2]
        at_reference = bank._at_reference(projected, _to_pairs(reference, stride) if s == 0 else None)[..., None]
        pre = at_reference + projected[:, 0].gather(2, column[:, 0, None].expand(-1, hidden, -1))
        pre += projected[:, 1].gather(2, column[:, 1, None].expand(-1, hidden, -1))
        if last:
            out = bank._rest_grouped(torch.cat([at_reference, pre], 2), overwrite=True)  # (G, C_out, 1 + J b)
            logits = rearrange((out[:, :, 1:] - out[:, :, :1]).sum(0), "c (j b) -> j b c", j=J)
            if self.residual and bank.in_channels == bank.out_channels:
                z = values.gather(0, key[:, None, :, None].expand(-1, b, -1, values.shape[-1]))
                logits = logits + z.index_select(2, self.live_rows).sum(2)
            return None, logits
        pair = bank._rest_grouped(pre, overwrite=True)  # f(ab): (G, C_out, J b)
        empty = bank._rest_grouped(at_reference.clone(), overwrite=True)  # f(0): (G, C_out, 1)
        singles = [bank._rest_grouped(at_reference + projected[:, i], overwrite=True) for i in range(2)]
        single = [v.gather(2, column[:, i, None].expand(-1, v.shape[1], -1)) for i, v in enumerate(singles)]
        phi = torch.stack([(single[0] - empty) + (pair - single[1]), (single[1] - empty) + (pair - single[0])], 1)
        phi = _from_pairs(rearrange(phi * 0.5, "g two o (j b) -> j b g two o", j=J), stride)
        z = values.gather(0, key[:, None, :, None].expand(-1, b, -1, values.shape[-1]))  # (J, b, P, C)
        # Missingness exactly, as in the dense computation: a row at the reference has value 0, not ~1e-18.
        return z, phi.masked_fill(~off_zero(z)[..., None], 0.0)

    def interactions(self, x: Tensor, layer: int, max_order: int | None = None, kind: str = "and") -> Interactions:
        """Exact interactions of one layer's game with respect to that layer's inputs (not of the network).

        Stage `layer` is the game `F(Z) = sum_pairs f_pair(Z_a, Z_{a + stride})` of its input rows `Z` (the
        previous stage's representation; the input features for stage 0), with the stage's reference (the
        model's reference for stage 0, 0 after). Its Shapley values are the stage's Shapley representation
        before the residual connection adds `Z` (and before pruning), and its dividends live on the singletons
        and on the stage's butterfly pairs only (the pairs are disjoint, so nothing is summed); every other
        subset's dividend is 0. Row `live_rows[i]` of any representation is feature `i`'s slot, so players are
        numbered (and named) by feature; padded rows are dummies and are left out. The output channels are the
        stage's (`num_classes` for the last stage). End to end, a Deep ShapNet's interactions are not these:
        use `exact_interactions(model, x, model.reference)` for those (up to 16 features).

        Args:
            x: `(B, D)` or `(B, D, C)` model input.
            layer: the stage, `0..num_stages - 1` (negative counts from the end).
            max_order: list only subsets of at most this many players (1 or 2 here).
            kind: `"and"` (Harsanyi dividends) or `"or"` (OR interactions, from the same module values: they live
                on the same subsets); `"and_or"` of the network through `shapnets.exact_interactions`.

        Returns:
            `Interactions` with dividends `(B, S, C_layer)`, sii `(B, D, D, C_layer)`; base and output are the
            summed module values at the stage's reference and at its input.
        """
        stage_index = check_layer(layer, self.num_stages, type(self).__name__)
        kind = check_module_kind(kind, f"{type(self).__name__}.interactions")
        x = self._check(x)
        if stage_index == 0:
            z, reference = self._padded_input(x)
        else:
            z, reference = self.representations(x)[stage_index - 1], None
        stride = self.stage_stride(stage_index)
        ref = None if reference is None else _to_pairs(reference, stride)
        values = self.stages[stage_index].coalition_values(_to_pairs(z, stride), ref)  # (4, B, pairs, C_out)
        feature_of_row = torch.full((self.num_padded,), -1, dtype=torch.long, device=z.device)
        feature_of_row[self.live_rows] = torch.arange(self.in_features, device=z.device)
        rows = torch.arange(self.num_padded, device=z.device)[:, None]
        members = feature_of_row[_to_pairs(rows, stride)[..., 0]]  # (pairs, 2): the features each module plays on
        return Interactions.from_module_games(
            [(values, members)], self.in_features, max_order, kind, player_names=self.feature_names,
            method=f"{type(self).__name__} layer {stage_index} (per-layer game)",
        )
