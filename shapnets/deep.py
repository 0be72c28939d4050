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
from ._streaming import StreamedBatches, streamed
from ._tabular import TabularGame
from ._validation import finite_output
from .explanation import Explanation
from .interactions import Interactions, check_layer
from .modules import ShapleyModuleBank, evaluation_stats
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

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def evaluation_stats(self, reset: bool = False) -> dict[str, int]:
        """Module and coalition evaluations done and skipped since the last reset (all stages)."""
        return evaluation_stats(self, reset)

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
        return max(stage.coalition_elements() for stage in self.stages)

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

    def interactions(self, x: Tensor, layer: int, max_order: int | None = None) -> Interactions:
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

        Returns:
            `Interactions` with dividends `(B, S, C_layer)`, sii `(B, D, D, C_layer)`; base and output are the
            summed module values at the stage's reference and at its input.
        """
        stage_index = check_layer(layer, self.num_stages, type(self).__name__)
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
            [(values, members)], self.in_features, max_order, player_names=self.feature_names,
            method=f"{type(self).__name__} layer {stage_index} (per-layer game)",
        )
