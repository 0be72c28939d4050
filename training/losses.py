"""The training objective: cross-entropy plus weighted extra terms, from one forward pass.

A loss term is any object with `name`, `weight`, `needs_explanation`, `needs_layers` and
`__call__(out: StepOutput, target) -> scalar Tensor`; `shapnets.contract.LossTerm` is their base class (re-exported
here with `StepOutput`). Terms come from two places:

* the config (`loss.terms: [{name: ..., weight: ..., **kwargs}]`), built from the `LOSS_TERMS` registry that
  `@register_loss_term("name")` fills;
* the model itself, through an optional `model.loss_terms() -> list[LossTerm]` (for architectures whose
  objective has its own parts).

When any term needs the explanation, the step calls `model.explain(x)` instead of `model(x)` and uses
`explanation.output` as the logits, so the network runs once either way. A model whose training forward needs the
labels or returns more than logits (CapsNet: the reconstruction masked by the true class) has
`forward_train(x, target) -> (logits, extras)`; the step calls it and the terms read `StepOutput.extras`. A term
with `replaces_cross_entropy = True` (CapsNet's margin loss) takes the cross-entropy's place in the total; the
cross-entropy is still logged, for comparison across models. `ModelStep` is that forward as an
`nn.Module`, so that DistributedDataParallel can wrap it and see the whole computation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from shapnets import Explanation
from shapnets.contract import LossTerm, StepOutput

from .config import ConfigError, LossConfig

__all__ = [
    "LOSS_TERMS",
    "ExplanationPenalty",
    "LossTerm",
    "ModelStep",
    "Objective",
    "StepOutput",
    "build_loss_terms",
    "register_loss_term",
]


LOSS_TERMS: dict[str, Callable[..., LossTerm]] = {}


def register_loss_term(name: str) -> Callable[[Callable[..., LossTerm]], Callable[..., LossTerm]]:
    """Register a loss-term factory under `name`; it is called as `factory(weight=..., **kwargs)` from the config.

    Raises:
        ValueError: `name` is already registered.
    """

    def decorator(factory: Callable[..., LossTerm]) -> Callable[..., LossTerm]:
        if name in LOSS_TERMS and LOSS_TERMS[name] is not factory:
            raise ValueError(f"loss term {name!r} is already registered")
        LOSS_TERMS[name] = factory
        return factory

    return decorator


def build_loss_terms(cfg: LossConfig, model: nn.Module | None = None) -> list[LossTerm]:
    """The config's extra terms followed by the model's own (`model.loss_terms()`, when it has that method).

    Raises:
        ConfigError: unknown term name (listing the registered ones) or arguments the factory does not accept.
    """
    terms: list[LossTerm] = []
    for i, spec in enumerate(cfg.terms):
        spec = dict(spec)
        name = spec.pop("name")
        if name not in LOSS_TERMS:
            valid = ", ".join(sorted(LOSS_TERMS)) or "none registered"
            raise ConfigError(f"loss.terms[{i}]: unknown loss term {name!r} (registered: {valid})")
        factory = LOSS_TERMS[name]
        try:
            inspect.signature(factory).bind(**spec)
        except TypeError as e:
            raise ConfigError(f"loss.terms[{i}] ({name}): {e}") from None
        terms.append(factory(**spec))
    if model is not None and callable(getattr(model, "loss_terms", None)):
        terms.extend(model.loss_terms())
    names = [t.name for t in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"loss terms must have distinct names for logging, got duplicates {duplicates}")
    return terms


class ModelStep(nn.Module):
    """The training forward pass as a module: `forward(x, need_explanation, layers) -> (logits, explanation)`.

    DistributedDataParallel only synchronises gradients of computations that run through its own `forward`, so the
    trainer wraps *this* module (not the bare model) in DDP: calling `model.explain` directly would bypass it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.has_forward_train = callable(getattr(model, "forward_train", None))

    def forward(self, x: Tensor, need_explanation: bool = False, layers: bool = False, target: Tensor | None = None
                ) -> tuple[Tensor, Explanation | None, dict[str, Any]]:
        if self.has_forward_train and target is not None:
            if need_explanation:
                raise TypeError(f"{type(self.model).__name__} trains through forward_train(x, target); explanation "
                                "penalties are not supported for it")
            logits, extras = self.model.forward_train(x, target)
            return logits, None, dict(extras)
        if not need_explanation:
            return self.model(x), None, {}
        if not hasattr(self.model, "explain"):
            raise TypeError(f"a loss term needs explanations but {type(self.model).__name__} has no explain()")
        # The model contract (shapnets.contract): a family without layers refuses layers=True with a TypeError.
        explanation = self.model.explain(x, layers=True) if layers else self.model.explain(x)
        return explanation.output, explanation, {}


class Objective:
    """Total loss = cross-entropy(label smoothing) + sum of weight * term, from one forward pass.

    Args:
        terms: the extra terms (see `build_loss_terms`).
        label_smoothing: label smoothing of the cross-entropy.
    """

    def __init__(self, terms: list[LossTerm], label_smoothing: float = 0.0) -> None:
        self.terms = list(terms)
        self.label_smoothing = label_smoothing
        self.needs_explanation = any(t.needs_explanation or t.needs_layers for t in self.terms)
        self.needs_layers = any(t.needs_layers for t in self.terms)
        replacing = [t.name for t in self.terms if getattr(t, "replaces_cross_entropy", False)]
        if len(replacing) > 1:
            raise ConfigError(f"only one loss term can replace the cross-entropy, got {replacing}")
        self.uses_cross_entropy = not replacing

    @property
    def part_names(self) -> list[str]:
        """Names of the logged parts: `loss` (total), `ce`, then one per term."""
        return ["loss", "ce", *[t.name for t in self.terms]]

    def forward(self, step: nn.Module, x: Tensor, target: Tensor | None = None) -> StepOutput:
        """Run `step` (a `ModelStep`, possibly wrapped in DDP or compiled) once; `target` reaches `forward_train`."""
        logits, explanation, extras = step(x, self.needs_explanation, self.needs_layers, target)
        return StepOutput(logits=logits, explanation=explanation, extras=extras)

    def __call__(self, out: StepOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss and its detached parts (unweighted term values, for logging)."""
        ce = F.cross_entropy(out.logits.float(), target, label_smoothing=self.label_smoothing)
        total = ce if self.uses_cross_entropy else ce.new_zeros(())
        parts = {"ce": ce.detach()}
        for term in self.terms:
            value = term(out, target)
            parts[term.name] = value.detach()
            total = total + term.weight * value
        parts["loss"] = total.detach()
        return total, parts



# ---------------------------------------------------------------------------------------- explanation regularizers
class ExplanationPenalty(LossTerm):
    """A `shapnets.regularizers` penalty as a loss term, read from the explanation of the training forward pass.

    Args:
        kind: `"l1"` (sparsity) or `"linf"` (spreading); see `shapnets.regularizers` for the definitions.
        weight: its weight in the total loss.
        layers: `"final"` (the attributions) or `"all"` (every layer's representation; Deep and Conv ShapNets).
        target: `"all"` (every output channel), `"label"` (each sample's true class) or `"predicted"` (its argmax),
            for the final layer.
        layer_weights: with `layers="all"`, one weight per layer.
        normalize: the scale-free version (`R_1 / R_2` or `R_inf / R_1` per map; see `shapnets.regularizers`):
            the penalty cannot be lowered by shrinking the whole explanation, only by changing its shape.
    """

    TARGETS = ("all", "label", "predicted")

    def __init__(self, kind: str, weight: float = 1.0, layers: str = "final", target: str = "all",
                 layer_weights: list[float] | None = None, normalize: bool = False) -> None:
        if layers not in ("final", "all"):
            raise ConfigError(f"explanation_{kind}: layers must be 'final' or 'all', got {layers!r}")
        if target not in self.TARGETS:
            raise ConfigError(f"explanation_{kind}: target must be one of {self.TARGETS}, got {target!r}")
        self.kind, self.weight, self.layers, self.target = kind, float(weight), layers, target
        if weight < 0:
            raise ConfigError(f"explanation_{kind}: weight must be >= 0, got {weight}")
        self.layer_weights, self.normalize = layer_weights, bool(normalize)
        self.name = f"explanation_{kind}" + ("_all_layers" if layers == "all" else "")
        self.needs_explanation = True
        self.needs_layers = layers == "all"

    def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
        from shapnets import explanation_penalty

        if out.explanation is None:
            raise RuntimeError(f"{self.name} needs the explanation of the forward pass, but none was computed")
        classes = {"all": None, "label": target, "predicted": out.logits.detach().argmax(1)}[self.target]
        return explanation_penalty(out.explanation, self.kind, self.layers, classes,  # type: ignore[arg-type]
                                   self.layer_weights, self.normalize)


@register_loss_term("explanation_l1")
def _explanation_l1(weight: float = 1.0, layers: str = "final", target: str = "all",
                    layer_weights: list[float] | None = None, normalize: bool = False) -> ExplanationPenalty:
    """L1 sparsity of the explanation (`shapnets.regularizers.l1_sparsity`)."""
    return ExplanationPenalty("l1", weight, layers, target, layer_weights, normalize)


@register_loss_term("explanation_linf")
def _explanation_linf(weight: float = 1.0, layers: str = "final", target: str = "all",
                    layer_weights: list[float] | None = None, normalize: bool = False) -> ExplanationPenalty:
    """L-infinity spreading of the explanation (`shapnets.regularizers.linf_spreading`)."""
    return ExplanationPenalty("linf", weight, layers, target, layer_weights, normalize)
