"""What Deep and Conv ShapNets share for timm's model interface: the head is the last stage.

A ShapNet's class channels are the last stage's Shapley representation, so its head is that stage (the modules
that produce the class channels). A new head is a freshly initialised stage of the same shape with another number
of outputs; every earlier stage keeps its weights, and local accuracy and missingness still hold (they hold for
any weights of a stage).
"""

from __future__ import annotations

from torch import nn

from .modules import ShapleyModuleBank

__all__ = ["StagedHead", "bank_like"]


def bank_like(old: ShapleyModuleBank, out_channels: int) -> ShapleyModuleBank:
    """A freshly initialised bank shaped like `old` (groups, players, inputs, hidden widths, activation) with
    `out_channels` outputs, on `old`'s device and dtype."""
    hidden = [int(w.shape[-1]) for w in old.weights[:-1]]
    output_bias = len(old.biases) == len(old.weights)
    new = ShapleyModuleBank(old.num_groups, old.num_players, old.in_channels, out_channels, hidden, type(old.act),
                            output_bias=output_bias)
    return new.to(old.weights[0])


class StagedHead:
    """Mixin: `get_classifier`, `reset_classifier`, `num_features`, `head_hidden_size` for a `stages` list.

    The class provides `stages` (an `nn.ModuleList`, the head last), `num_classes`, `_head_in_channels()` and
    `_new_head(num_classes)`.
    """

    stages: nn.ModuleList
    num_classes: int

    def _head_in_channels(self) -> int:
        raise NotImplementedError

    def _new_head(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    @property
    def num_features(self) -> int:
        """Channels of the representation the head (the last stage) reads."""
        return self._head_in_channels()

    @property
    def head_hidden_size(self) -> int:
        """timm's name for the width before the classifier: `num_features` (a ShapNet has no pre-logits layer)."""
        return self._head_in_channels()

    def get_classifier(self) -> nn.Module:
        """The head: the last stage, whose modules produce the class channels."""
        return self.stages[-1]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised last stage with `num_classes` outputs.

        Raises:
            ValueError: `num_classes < 1`: the class channels are the head's Shapley representation, so the head
                cannot be dropped (timm's `num_classes=0`); `forward_head(forward_features(x), pre_logits=True)`
                gives the pooled features instead.
        """
        name = type(self).__name__
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"{name}.reset_classifier: num_classes must be an int >= 1, got {num_classes!r}; a "
                             "ShapNet's classes are its last stage's Shapley representation, so the head cannot be "
                             "dropped: use forward_head(forward_features(x), pre_logits=True) for pooled features")
        self.stages[-1] = self._new_head(num_classes)
        self.num_classes = num_classes
