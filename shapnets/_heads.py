"""What Deep and Conv ShapNets share for timm's model interface: the head is the last stage.

A ShapNet's class channels are the last stage's Shapley representation, so its head is that stage (the modules
that produce the class channels). A new head is a freshly initialised stage of the same shape with another number
of outputs; every earlier stage keeps its weights, and local accuracy and missingness still hold (they hold for
any weights of a stage). Without a head (timm's `num_classes=0`) the last remaining stage's representation is the
model's: `forward` sums it over the players (timm's pooled features, `(B, num_features)`) and `explain` splits
that sum over the players, exactly as for the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .modules import ShapleyModuleBank, _init_linear_, evaluation_stats

__all__ = ["BankShape", "StagedHead", "bank_like", "drop_output_layer", "renew_output_layer", "take_levels"]


@dataclass(frozen=True)
class BankShape:
    """Everything but the outputs that a Shapley module bank is built from (to build a fresh one like it)."""

    num_groups: int
    num_players: int
    in_channels: int
    hidden: tuple[int, ...]
    act_layer: type[nn.Module]
    output_bias: bool
    output_act: bool

    @classmethod
    def of(cls, bank: ShapleyModuleBank) -> BankShape:
        """The shape of `bank`."""
        return cls(bank.num_groups, bank.num_players, bank.in_channels, tuple(int(w.shape[-1]) for w in
                   bank.weights[:-1]), type(bank.act), len(bank.biases) == len(bank.weights), bank.output_act)

    def build(self, out_channels: int, like: Tensor) -> ShapleyModuleBank:
        """A freshly initialised bank of this shape with `out_channels` outputs, on `like`'s device and dtype."""
        bank = ShapleyModuleBank(self.num_groups, self.num_players, self.in_channels, out_channels, self.hidden,
                                 self.act_layer, max_players=self.num_players, output_bias=self.output_bias,
                                 output_act=self.output_act)
        return bank.to(like)


def bank_like(old: ShapleyModuleBank, out_channels: int) -> ShapleyModuleBank:
    """A freshly initialised bank shaped like `old` (groups, players, inputs, hidden widths, activation, output
    bias and activation) with `out_channels` outputs, on `old`'s device and dtype."""
    return BankShape.of(old).build(out_channels, old.weights[0])


class StagedHead:
    """Mixin: timm's head interface for a `stages` list whose last stage is the head.

    `get_classifier`, `reset_classifier` (`num_classes=0` drops the head), `num_features`, `head_hidden_size`,
    and the number of stages before the head. The class provides `stages` (an `nn.ModuleList`, the head last while
    `num_classes > 0`), `num_classes`, `prune` (one fraction per stage), `_head_shape()` (what a new head is built
    from: the head's input channels first), `_build_head(shape, num_classes)` and `_head_changed(num_classes)`
    (bookkeeping of the per-stage channel lists).
    """

    stages: nn.ModuleList
    num_classes: int
    prune: list[float]
    _dropped_head: tuple[Any, float] | None = None  # the shape and pruning of a head dropped by num_classes=0

    def _head_shape(self) -> Any:
        raise NotImplementedError

    def _build_head(self, shape: Any, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def _head_changed(self, num_classes: int) -> None:
        raise NotImplementedError

    def _head_in_channels(self) -> int:
        shape = self._head_shape() if self.num_classes else self._dropped_head[0]
        return shape.in_channels if isinstance(shape, BankShape) else shape[0].in_channels

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def evaluation_stats(self, reset: bool = False) -> dict[str, int]:
        """Module and coalition evaluations done and skipped since the last reset (all stages)."""
        return evaluation_stats(self, reset)

    @property
    def body_stages(self) -> int:
        """How many stages come before the head (all of them when there is no head)."""
        return len(self.stages) - (1 if self.num_classes else 0)

    @property
    def num_features(self) -> int:
        """Channels of the representation the head reads (the model's output channels when it has no head)."""
        return self._head_in_channels()

    @property
    def head_hidden_size(self) -> int:
        """timm's name for the width before the classifier: `num_features` (a ShapNet has no pre-logits layer)."""
        return self._head_in_channels()

    def get_classifier(self) -> nn.Module:
        """The head: the last stage, whose modules produce the class channels (`nn.Identity()` without one)."""
        return self.stages[-1] if self.num_classes else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised last stage with `num_classes` outputs (`0`: drop it).

        Every earlier stage keeps its weights. With `num_classes=0` (timm's "no classifier") the model's output is
        the head's input summed over the players, `(B, num_features)`, and `explain` splits it over the players.

        Raises:
            ValueError: `num_classes` is not an int >= 0, or `0` for a model whose only stage is the head (no
                earlier representation to return).
        """
        name = type(self).__name__
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"{name}.reset_classifier: num_classes must be an int >= 0 (0: no head, pooled "
                             f"features), got {num_classes!r}")
        if num_classes == 0 and self.body_stages == 0:
            raise ValueError(f"{name}.reset_classifier(0): the head is the model's only stage, so without it there "
                             "is no representation to pool; build the model with more stages")
        if self.num_classes:  # take the head off, remembering its shape for a later new head
            self._dropped_head = (self._head_shape(), self.prune[len(self.stages) - 1])
            del self.stages[-1]
            self.prune = self.prune[: len(self.stages)]
            self._head_changed(0)
        if num_classes:
            shape, fraction = self._dropped_head
            self.stages.append(self._build_head(shape, num_classes))
            self.prune = [*self.prune, fraction]
            self._head_changed(num_classes)
        self.num_classes = num_classes



def renew_output_layer(bank: ShapleyModuleBank, out_channels: int) -> None:
    """Give every module of `bank` a freshly initialised output layer with `out_channels` outputs, in place.

    Every earlier layer keeps its weights; without hidden layers the output layer is the whole inner. A bank whose
    output layer was dropped (`drop_output_layer`) gets one again, after its last hidden layer.
    """
    last = bank.weights[-1]
    dropped = getattr(bank, "_output_dropped", False)
    fan_in = int(last.shape[-1] if dropped else last.shape[1])
    output_bias = bank._dropped_output_bias if dropped else len(bank.biases) == len(bank.weights)
    weight = nn.Parameter(last.new_empty(bank.num_groups, fan_in, out_channels))
    bias = nn.Parameter(last.new_empty(bank.num_groups, out_channels))
    _init_linear_(weight, bias, fan_in)
    if dropped:
        bank.weights.append(weight)
        if output_bias:
            bank.biases.append(bias)
        bank.output_act, bank._output_dropped = False, False
    else:
        bank.weights[-1] = weight
        if output_bias:
            bank.biases[-1] = bias
    bank.out_channels = out_channels


def drop_output_layer(bank: ShapleyModuleBank) -> None:
    """Drop the output layer of every module of `bank`, in place: the inner then ends at its last hidden layer
    (activated), whose width becomes the bank's output channels.

    Raises:
        ValueError: the inner has no hidden layer (its output layer is all of it).
    """
    if len(bank.weights) < 2:
        raise ValueError("the inner nets have no hidden layer (hidden=()): their output layer is all of them, so "
                         "there is no representation without it")
    if bank.output_act:
        raise ValueError("the inner nets end in an activation (output_act=True): dropping their output layer "
                         "would change what the remaining layers compute")
    output_bias = len(bank.biases) == len(bank.weights)
    bank.weights = nn.ParameterList(list(bank.weights)[:-1])  # the same tensors: the kept layers keep their weights
    if output_bias:
        bank.biases = nn.ParameterList(list(bank.biases)[:-1])
    bank.output_act = True  # the last hidden layer's activation, which the dropped layer used to follow
    bank.out_channels = int(bank.weights[-1].shape[-1])
    bank._output_dropped, bank._dropped_output_bias = True, output_bias


def take_levels(count: int, indices: int | list[int] | tuple[int, ...] | None, who: str,
                output_fmt: str = "NCHW") -> list[int]:
    """Absolute, sorted feature levels from timm's `indices` (`None`: all; an int `n`: the last `n`; negatives count
    from the end), for a `forward_intermediates` that returns `output_fmt` (only `"NCHW"`).

    Raises:
        ValueError: an index outside the `count` levels, or another `output_fmt`.
    """
    if output_fmt != "NCHW":
        raise ValueError(f"{who}.forward_intermediates: output_fmt must be 'NCHW', got {output_fmt!r}")
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"{who}: indices={indices} (the last n levels) must lie in [1, {count}]")
        return list(range(count - indices, count))
    bad = [i for i in indices if not -count <= int(i) < count]
    if bad:
        raise ValueError(f"{who}: feature levels {bad} lie outside the model's {count} (0..{count - 1}, or negative "
                         "from the end)")
    return sorted({int(i) % count for i in indices})
