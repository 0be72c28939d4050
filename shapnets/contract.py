"""The model contract: what the trainer, the losses and the zoo rely on in a self-explaining model.

A family (`ShallowShapNet`, `DeepShapNet`, `ConvShapNet`, `CapsNet`, `InterpretableCNN`, or one of your own) is an
`nn.Module` that

* takes `num_classes` and, for images, `in_chans` (for tabular data, `in_features`) as constructor arguments, the
  names timm uses, and may take more of what a data set knows: the names listed in its `data_args` class attribute
  (`"feature_names"`, `"reference"`);
* has `num_classes`, `forward(x) -> (B, num_classes)` logits and `explain(x, layers=False) -> Explanation`, whose
  `output` equals `forward(x)`; `layers=True` adds every layer's representation where the family has layers, and
  is a `TypeError` naming the class where it has not (`SelfExplaining`);
* optionally has `loss_terms() -> list[LossTerm]`, the parts of its own objective, which the trainer adds to the
  cross-entropy, and `forward_train(x, target) -> (logits, extras)` when its training forward needs the labels;
  its terms then read `StepOutput.extras`.

A constructor argument that was renamed stays accepted for one release: the class lists it in `renamed_args` (old
name -> new name) and warns; `rename_args` applies the same mapping to recorded arguments (a saved config.json).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from .explanation import Explanation

__all__ = ["DATA_ARGS", "LossTerm", "SelfExplaining", "StepOutput", "no_layers", "rename_args"]

DATA_ARGS = ("feature_names", "reference", "input_mean", "input_std")
"""The optional constructor arguments a data set can fill, when the class lists them in its `data_args`."""


@runtime_checkable
class SelfExplaining(Protocol):
    """A model whose explanation is part of the model: `explain(x).output` is `forward(x)`."""

    num_classes: int

    def forward(self, x: Tensor) -> Tensor:
        """Logits `(B, num_classes)`."""
        ...

    def explain(self, x: Tensor, layers: bool = False) -> Explanation:
        """The model's own explanation of `forward(x)`; `layers=True` adds the per-layer representations."""
        ...


def no_layers(model: object, layers: bool) -> None:
    """The `explain(x, layers=True)` refusal of a family that has no per-layer explanations.

    Raises:
        TypeError: `layers` is true, naming the class.
    """
    if layers:
        raise TypeError(f"no per-layer explanations from {type(model).__name__}: explain(x, layers=True) is for "
                        "families with layers (Deep and Conv ShapNets)")


@dataclass
class StepOutput:
    """What one training forward pass produced: what every loss term reads.

    Attributes:
        logits: `(B, num_classes)`.
        explanation: the model's explanation of `logits` when a term asked for it, else `None`.
        extras: what `forward_train` returned besides the logits (e.g. CapsNet's reconstruction).
        inputs: the batch the step ran on (for terms that evaluate the model elsewhere, e.g. on masked copies).
    """

    logits: Tensor
    explanation: Explanation | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    inputs: Tensor | None = None


class LossTerm:
    """One weighted part of the training objective; subclasses implement `__call__`.

    The trainer reads the attributes below; any object that has them works as a term, this base only gives the
    defaults and a `repr`.

    Attributes:
        name: the column it is logged under (distinct within one objective).
        weight: its factor in the total loss.
        needs_explanation: the step must compute `model.explain(x)` (its output is then the logits).
        needs_layers: ... with `layers=True`.
        replaces_cross_entropy: the total leaves out the cross-entropy (still logged), e.g. CapsNet's margin loss.
    """

    name: str = "loss_term"
    needs_explanation: bool = False
    needs_layers: bool = False
    replaces_cross_entropy: bool = False

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = float(weight)

    def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
        """A scalar loss (unweighted: the objective multiplies it by `weight`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(out, target)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight})"


def rename_args(model_cls: type, args: Mapping[str, Any], warn: bool = True) -> dict[str, Any]:
    """`args` with the class's renamed constructor arguments (`model_cls.renamed_args`) under their new names.

    Args:
        model_cls: the class the arguments are for.
        args: constructor arguments, possibly with old names.
        warn: emit a `DeprecationWarning` per old name (off for recorded arguments, e.g. a saved config.json).

    Raises:
        TypeError: an old and its new name both given, with different values.
    """
    renamed = dict(args)
    for old, new in getattr(model_cls, "renamed_args", {}).items():
        if old not in renamed:
            continue
        value = renamed.pop(old)
        if value is None:
            continue
        if renamed.get(new) is not None and renamed[new] != value:
            raise TypeError(f"{model_cls.__name__}: {old}={value!r} and {new}={renamed[new]!r} both given; "
                            f"{old} is the old name of {new}")
        if warn:
            warnings.warn(f"{model_cls.__name__}: {old!r} is renamed {new!r}; the old name goes in the next "
                          "release", DeprecationWarning, stacklevel=3)
        renamed[new] = value
    return renamed
