"""The training objective: cross-entropy plus weighted extra terms, from one forward pass.

A loss term is any object with `name`, `weight`, `needs_explanation`, `needs_layers` and
`__call__(out: StepOutput, target) -> scalar Tensor`, and optionally `bind(model)`, called once when the terms are
built (a term that evaluates the model itself keeps it there and rejects an unsuitable model before training
starts). Terms come from two places:

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

import contextlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shapnets import Explanation, fidelity_gaps, masked_inputs, patch_players, player_sums, sample_kernel_coalitions

from .config import ConfigError, LossConfig

__all__ = [
    "LOSS_TERMS",
    "ExplanationFidelity",
    "ExplanationPenalty",
    "LossTerm",
    "ModelStep",
    "Objective",
    "StepOutput",
    "build_loss_terms",
    "register_loss_term",
]


@dataclass
class StepOutput:
    """What one forward pass produced.

    Attributes:
        logits: `(B, num_classes)`.
        explanation: the model's explanation of `logits` when a term asked for it, else `None`.
        extras: anything else a model or term wants to pass along.
        inputs: the batch the step ran on (terms that evaluate the model elsewhere, e.g. on masked copies).
    """

    logits: Tensor
    explanation: Explanation | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    inputs: Tensor | None = None


@runtime_checkable
class LossTerm(Protocol):
    """One weighted part of the training objective."""

    name: str
    weight: float
    needs_explanation: bool
    needs_layers: bool

    def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
        """A scalar loss (unweighted; the objective multiplies by `weight`)."""
        ...


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
        term = factory(**spec)
        if model is not None and callable(getattr(term, "bind", None)):
            term.bind(model)  # terms that evaluate the model themselves check it here, before training starts
        terms.append(term)
    if model is not None and callable(getattr(model, "loss_terms", None)):
        terms.extend(model.loss_terms())
    names = [t.name for t in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"loss terms must have distinct names for logging, got duplicates {duplicates}")
    return terms


def _explain_accepts_layers(model: nn.Module) -> bool:
    explain = getattr(model, "explain", None)
    return explain is not None and "layers" in inspect.signature(explain).parameters


class ModelStep(nn.Module):
    """The training forward pass as a module: `forward(x, need_explanation, layers) -> (logits, explanation)`.

    DistributedDataParallel only synchronises gradients of computations that run through its own `forward`, so the
    trainer wraps *this* module (not the bare model) in DDP: calling `model.explain` directly would bypass it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.explain_takes_layers = _explain_accepts_layers(model)
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
        if layers and not self.explain_takes_layers:
            raise TypeError(f"a loss term needs per-layer explanations but {type(self.model).__name__}.explain() "
                            "has no `layers` argument")
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
        return StepOutput(logits=logits, explanation=explanation, extras=extras, inputs=x)

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
class ExplanationPenalty:
    """A `shapnets.regularizers` penalty as a loss term, read from the explanation of the training forward pass.

    Args:
        kind: `"l1"` (sparsity) or `"linf"` (spreading); see `shapnets.regularizers` for the definitions.
        weight: its weight in the total loss.
        layers: `"final"` (the attributions) or `"all"` (every layer's representation; Deep and Conv ShapNets).
        target: `"all"` (every output channel), `"label"` (each sample's true class) or `"predicted"` (its argmax),
            for the final layer.
        layer_weights: with `layers="all"`, one weight per layer.
    """

    TARGETS = ("all", "label", "predicted")

    def __init__(self, kind: str, weight: float = 1.0, layers: str = "final", target: str = "all",
                 layer_weights: list[float] | None = None) -> None:
        if layers not in ("final", "all"):
            raise ConfigError(f"explanation_{kind}: layers must be 'final' or 'all', got {layers!r}")
        if target not in self.TARGETS:
            raise ConfigError(f"explanation_{kind}: target must be one of {self.TARGETS}, got {target!r}")
        self.kind, self.weight, self.layers, self.target = kind, float(weight), layers, target
        self.layer_weights = layer_weights
        self.name = f"explanation_{kind}" + ("_all_layers" if layers == "all" else "")
        self.needs_explanation = True
        self.needs_layers = layers == "all"

    def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
        from shapnets import explanation_penalty

        if out.explanation is None:
            raise RuntimeError(f"{self.name} needs the explanation of the forward pass, but none was computed")
        classes = {"all": None, "label": target, "predicted": out.logits.detach().argmax(1)}[self.target]
        return explanation_penalty(out.explanation, self.kind, self.layers, classes,  # type: ignore[arg-type]
                                   self.layer_weights)


@register_loss_term("explanation_l1")
def _explanation_l1(weight: float = 1.0, layers: str = "final", target: str = "all",
                    layer_weights: list[float] | None = None) -> ExplanationPenalty:
    """L1 sparsity of the explanation (`shapnets.regularizers.l1_sparsity`)."""
    return ExplanationPenalty("l1", weight, layers, target, layer_weights)


@register_loss_term("explanation_linf")
def _explanation_linf(weight: float = 1.0, layers: str = "final", target: str = "all",
                      layer_weights: list[float] | None = None) -> ExplanationPenalty:
    """L-infinity spreading of the explanation (`shapnets.regularizers.linf_spreading`)."""
    return ExplanationPenalty("linf", weight, layers, target, layer_weights)


# ---------------------------------------------------------------------------------------- explanation fidelity
class ExplanationFidelity:
    """Shapley-kernel fidelity: trains the model's own explanation toward the Shapley values of its own game.

    For `coalitions` coalitions `S` per sample drawn from the Shapley kernel distribution (see
    `shapnets.fidelity`), the term is the mean over samples, coalitions and classes of
    `(v(S) - v(empty) - sum_{i in S} phi_i(x))^2`, with `v(S)` the model's output on `x` whose players outside `S`
    sit at the model's reference and `phi` the model's explanation. Its expectation is the Kernel SHAP objective,
    whose minimiser under the efficiency constraint (which a ShapNet's explanation meets exactly) is the Shapley
    value. Cost per step: `coalitions` extra forward (and backward) passes per sample on masked inputs, on top
    of the step's one explained forward. docs/fidelity.md has the derivation and choices.

    Gradients: the explanation's total is fixed by local accuracy to the output, which the cross-entropy owns, so
    the term's gradient reaches `phi` only through its zero-sum part (`phi - (sum phi - sg(sum phi)) / n`, same
    value). By default (`detach_game: false`) the gradient also flows through the game values `v(S)`: the term is
    then a true objective of the parameters, `E[gap^2] = ||phi - phi*(v)||^2_kernel + R(v)` (the distance to the
    Shapley values `phi*` of the current game plus the game's irreducible non-additivity `R`), so it also
    nudges the model toward fewer interactions, which the cross-entropy counterweighs. `detach_game: true` treats
    `v(S)` as targets (cheaper: the masked passes run without autograd); that is a semi-gradient on a target
    that the same parameters move, and it diverged in our runs (docs/fidelity.md), so it is not the default.

    Args:
        weight: weight in the total loss (>= 0).
        coalitions: coalitions per sample per step (>= 1; even with `paired`).
        paired: draw half of the coalitions and add their complements (same distribution, lower variance).
        target: `"all"` classes, each sample's `"label"`, or its `"predicted"` class.
        detach_game: treat `v(S)` as a constant (see above; unstable in our runs).
        patch: image models: players are `patch x patch` pixel patches (`shapnets.patch_players`).
        keep_players: play a smaller game each step: every sample keeps this many random players and the others
            sit at the reference, as in `shapnets bench fidelity`'s restricted game; the term then explains the
            restricted input itself (one more explained forward pass with autograd). `None`: all players.
    """

    TARGETS = ("all", "label", "predicted")
    name = "explanation_fidelity"

    def __init__(self, weight: float = 1.0, coalitions: int = 8, paired: bool = True, target: str = "all",
                 detach_game: bool = False, patch: int = 4, keep_players: int | None = None) -> None:
        who = self.name
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise ConfigError(f"{who}: weight must be a finite number >= 0, got {weight!r}")
        if isinstance(coalitions, bool) or not isinstance(coalitions, int) or coalitions < 1:
            raise ConfigError(f"{who}: coalitions (per sample per step) must be an integer >= 1, got {coalitions!r}")
        if paired and coalitions % 2:
            raise ConfigError(f"{who}: paired sampling adds the complement of every coalition, so coalitions must "
                              f"be even, got {coalitions} (or set paired: false)")
        if target not in self.TARGETS:
            raise ConfigError(f"{who}: target must be one of {self.TARGETS}, got {target!r}")
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ConfigError(f"{who}: patch must be an integer >= 1, got {patch!r}")
        if keep_players is not None and (isinstance(keep_players, bool) or not isinstance(keep_players, int)
                                         or keep_players < 2):
            raise ConfigError(f"{who}: keep_players must be an integer >= 2 or null, got {keep_players!r}")
        self.weight, self.coalitions, self.paired, self.target = float(weight), coalitions, bool(paired), target
        self.detach_game, self.patch, self.keep_players = bool(detach_game), patch, keep_players
        # With keep_players the term explains the restricted input itself; the step needs no explanation then.
        self.needs_explanation = keep_players is None
        self.needs_layers = False
        self.model: nn.Module | None = None

    def bind(self, model: nn.Module) -> None:
        """Keep the model whose game is played; reject one without an explanation or a reference.

        Raises:
            ConfigError: the model has no `explain()`, no `reference`, trains through `forward_train`, or the
                game would run outside DistributedDataParallel's forward with gradients (`detach_game: false`).
        """
        kind = type(model).__name__
        if not callable(getattr(model, "explain", None)):
            raise ConfigError(f"{self.name}: {kind} has no explanation of its own (no explain()); the term trains "
                              "a model's explanation toward the Shapley values, so it needs a ShapNet")
        if callable(getattr(model, "forward_train", None)):
            raise ConfigError(f"{self.name}: {kind} trains through forward_train(x, target); explanation terms are "
                              "not supported for it")
        if not isinstance(getattr(model, "reference", None), Tensor):
            raise ConfigError(f"{self.name}: {kind} has no `reference` tensor: the game needs the input that absent "
                              "players take")
        if not self.detach_game and torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ConfigError(f"{self.name}: detach_game: false back-propagates through forward passes that run "
                              "outside DistributedDataParallel's forward; use detach_game: true with DDP")
        self.model = model

    def _layout(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor, int]:
        """`(element_players, attribution_players, reference, n)` of the model's game on inputs like `x`."""
        assert self.model is not None
        reference = self.model.reference
        if x.dim() == 4:  # images (B, C, H, W): pixel patches, all channels of a pixel in the same player
            C, H, W = x.shape[1:]
            attribution_players = patch_players(H, W, self.patch).to(x.device)
            element_players = attribution_players.expand(C, H, W)
            ref = reference.reshape(-1, 1, 1).expand(C, H, W)
            return element_players, attribution_players, ref, int(attribution_players.max()) + 1
        D = x.shape[1]  # tabular (B, D) or (B, D, C): one player per feature
        element_players = torch.arange(D, device=x.device).view(D, *([1] * (x.dim() - 2))).expand(x.shape[1:])
        return element_players, None, reference.reshape(x.shape[1:]), D

    def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError(f"{self.name} was not bound to a model: build it with build_loss_terms(cfg, model)")
        if out.inputs is None:
            raise RuntimeError(f"{self.name} needs the step's inputs (StepOutput.inputs), but none were passed")
        x = out.inputs
        element_players, attribution_players, reference, n = self._layout(x)
        B, m = x.shape[0], self.coalitions
        if self.keep_players is not None and self.keep_players < n:
            # Restricted game: k random players per sample stay, the others sit at the reference (null players).
            k = self.keep_players
            kept = torch.rand(B, n, device=x.device).argsort(1)[:, :k]
            active = torch.zeros(B, n, dtype=torch.bool, device=x.device).scatter(1, kept, True)
            x = masked_inputs(x, reference, active[:, None], element_players)
            explanation = self.model.explain(x)
            inner = sample_kernel_coalitions(B, k, m, paired=self.paired).to(x.device)
            coalitions = torch.zeros(B, m, n, dtype=torch.bool, device=x.device)
            coalitions.scatter_(2, kept[:, None].expand(B, m, k), inner)
        else:
            if out.explanation is None:
                raise RuntimeError(f"{self.name} needs the explanation of the forward pass, but none was computed")
            explanation = out.explanation
            active = torch.ones(B, n, dtype=torch.bool, device=x.device)
            coalitions = sample_kernel_coalitions(B, n, m, paired=self.paired).to(x.device)
        phi = player_sums(explanation.attributions, attribution_players, n)  # (B, n, C)
        # Zero-sum gradient: the total (= output - base, by local accuracy) is left to the cross-entropy.
        total = phi.sum(1, keepdim=True)
        share = active.unsqueeze(-1).to(phi.dtype) / active.sum(1).view(B, 1, 1).to(phi.dtype)
        phi = phi - share * (total - total.detach())
        masked = masked_inputs(x, reference, coalitions, element_players)
        with torch.no_grad() if self.detach_game else contextlib.nullcontext():
            values = self.model(masked).view(B, m, -1)
        base = explanation.base.detach() if self.detach_game else explanation.base
        gaps = fidelity_gaps(phi, values.to(phi.dtype), base, coalitions)
        if self.target != "all":
            classes = target if self.target == "label" else out.logits.detach().argmax(1)
            gaps = gaps.gather(2, classes.view(B, 1, 1).expand(B, m, 1))
        return gaps.float().square().mean()


@register_loss_term("explanation_fidelity")
def _explanation_fidelity(weight: float = 1.0, coalitions: int = 8, paired: bool = True, target: str = "all",
                          detach_game: bool = False, patch: int = 4,
                          keep_players: int | None = None) -> ExplanationFidelity:
    """Shapley-kernel fidelity of the explanation to the model's own game (`ExplanationFidelity`)."""
    return ExplanationFidelity(weight, coalitions, paired, target, detach_game, patch, keep_players)
