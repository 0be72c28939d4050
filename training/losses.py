"""The training objective: cross-entropy plus weighted extra terms, from one forward pass.

A loss term is any object with `name`, `weight`, `needs_explanation`, `needs_layers` and
`__call__(out: StepOutput, target) -> scalar Tensor`, and optionally `bind(model)`, called once when the terms are
built (a term that evaluates the model itself keeps it there and rejects an unsuitable model before training
starts); `shapnets.contract.LossTerm` is their base class (re-exported here with `StepOutput`). Terms come from two
places:

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shapnets import Explanation, fidelity
from shapnets.contract import LossTerm, StepOutput

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


# ---------------------------------------------------------------------------------------- explanation fidelity
class ExplanationFidelity(LossTerm):
    """Trains the model's own explanation `phi` toward the Shapley values of its own game.

    The game of a sample `x` is `v(S) = model(x_S ; reference_rest)`: the model's output with the players outside
    `S` at its reference. Two estimators (docs/fidelity.md has the derivations):

    * `"permutation"` (default): two independent Shapley estimates `psi_1`, `psi_2` from random player orders
      (marginal contributions, `permutations` orders each, antithetic pairs), and the penalty
      `sum_i (phi_i - psi_1,i) (phi_i - psi_2,i)`. Its expectation is exactly `||phi - phi*||^2`, the squared
      distance to the Shapley values `phi*` of the current game: 0 exactly at them and nowhere else. Cost per step:
      `2 * permutations * (n - 1)` forward (and backward) passes per sample on masked inputs.
    * `"kernel"`: the Kernel SHAP / FastSHAP weighted least squares, `(v(S) - v(empty) - sum_{i in S} phi_i)^2`
      over `coalitions` coalitions drawn from the Shapley kernel distribution. Under the efficiency constraint
      (which `phi` meets by local accuracy) its minimiser in `phi` is the Shapley value, but its expectation is
      `||phi - phi*||^2_kernel + R(v)` with `R(v) > 0` the game's non-additivity: through the model, the term
      is lowered mostly by removing interactions (in our yeast runs `R` was 85% of it). Cost per step:
      `coalitions` extra passes per sample.

    Gradients: the explanation's total is fixed by local accuracy to the output, which the cross-entropy owns, so
    the term's gradient reaches `phi` only through its zero-sum part (`phi - (sum phi - sg(sum phi)) / n`, same
    value). By default (`detach_game: false`) the gradient also flows through the game values, so the term is a
    true objective of the parameters. `detach_game: true` treats `v(S)` as constants (cheaper: the masked passes
    run without autograd); that is a semi-gradient toward a target that the same parameters move, and it diverged
    in our runs (docs/fidelity.md).

    Args:
        weight: weight in the total loss (>= 0).
        estimator: `"permutation"` or `"kernel"` (above).
        permutations: permutation estimator: orders per estimate (>= 1; even with `paired`).
        coalitions: kernel estimator: coalitions per sample per step (>= 1; even with `paired`).
        paired: antithetic draws: each order with its reverse, each coalition with its complement.
        target: `"all"` classes, each sample's `"label"`, or its `"predicted"` class.
        detach_game: treat the game values as constants (see above; unstable in our runs).
        patch: image models: players are `patch x patch` pixel patches (`shapnets.patch_players`).
        keep_players: play a smaller game each step: every sample keeps this many random players and the others
            sit at the reference, as in `shapnets bench fidelity`'s restricted game; the term then explains the
            restricted input itself (one more explained forward pass with autograd). `None`: all players.
    """

    TARGETS = ("all", "label", "predicted")
    ESTIMATORS = ("permutation", "kernel")
    name = "explanation_fidelity"

    def __init__(self, weight: float = 1.0, estimator: str = "permutation", permutations: int = 2,
                 coalitions: int = 8, paired: bool = True, target: str = "all", detach_game: bool = False,
                 patch: int = 4, keep_players: int | None = None) -> None:
        who = self.name
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise ConfigError(f"{who}: weight must be a finite number >= 0, got {weight!r}")
        if estimator not in self.ESTIMATORS:
            raise ConfigError(f"{who}: estimator must be one of {self.ESTIMATORS}, got {estimator!r}")
        for label, count in (("coalitions", coalitions), ("permutations", permutations)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"{who}: {label} (per sample per step) must be an integer >= 1, got {count!r}")
        draws, label = (permutations, "permutations") if estimator == "permutation" else (coalitions, "coalitions")
        if paired and draws % 2:
            raise ConfigError(f"{who}: paired (antithetic) sampling draws {label} in pairs, so {label} must be even, "
                              f"got {draws} (or set paired: false)")
        if target not in self.TARGETS:
            raise ConfigError(f"{who}: target must be one of {self.TARGETS}, got {target!r}")
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ConfigError(f"{who}: patch must be an integer >= 1, got {patch!r}")
        if keep_players is not None and (isinstance(keep_players, bool) or not isinstance(keep_players, int)
                                         or keep_players < 2):
            raise ConfigError(f"{who}: keep_players must be an integer >= 2 or null, got {keep_players!r}")
        self.weight, self.estimator, self.permutations = float(weight), estimator, permutations
        self.coalitions, self.paired, self.target = coalitions, bool(paired), target
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
            attribution_players = fidelity.patch_players(H, W, self.patch).to(x.device)
            element_players = attribution_players.expand(C, H, W)
            ref = reference.reshape(-1, 1, 1).expand(C, H, W)
            return element_players, attribution_players, ref, int(attribution_players.max()) + 1
        D = x.shape[1]  # tabular (B, D) or (B, D, C): one player per feature
        element_players = torch.arange(D, device=x.device).view(D, *([1] * (x.dim() - 2))).expand(x.shape[1:])
        return element_players, None, reference.reshape(x.shape[1:]), D

    def _game(self, x: Tensor, reference: Tensor, coalitions: Tensor, element_players: Tensor) -> Tensor:
        """`(B, *coalition dims, C)`: the model on `x` restricted to every coalition of `coalitions (B, ..., n)`."""
        assert self.model is not None
        B, n = coalitions.shape[0], coalitions.shape[-1]
        flat = coalitions.reshape(B, -1, n)
        with torch.no_grad() if self.detach_game else contextlib.nullcontext():
            values = self.model(fidelity.masked_inputs(x, reference, flat, element_players))
        values = values.view(*coalitions.shape[:-1], -1)
        return values.detach() if self.detach_game else values

    def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError(f"{self.name} was not bound to a model: build it with build_loss_terms(cfg, model)")
        if out.inputs is None:
            raise RuntimeError(f"{self.name} needs the step's inputs (StepOutput.inputs), but none were passed")
        x = out.inputs
        element_players, attribution_players, reference, n = self._layout(x)
        B = x.shape[0]
        if self.keep_players is not None and self.keep_players < n:
            # Restricted game: k random players per sample stay, the others sit at the reference (null players).
            kept = torch.rand(B, n, device=x.device).argsort(1)[:, : self.keep_players]
            active = torch.zeros(B, n, dtype=torch.bool, device=x.device).scatter(1, kept, True)
            x = fidelity.masked_inputs(x, reference, active[:, None], element_players)
            explanation = self.model.explain(x)
        else:
            if out.explanation is None and self.keep_players is None:
                raise RuntimeError(f"{self.name} needs the explanation of the forward pass, but none was computed")
            # With keep_players >= the input's players the whole game is played; the step computed no explanation
            # (needs_explanation is False with keep_players), so the term explains the input itself.
            explanation = out.explanation if out.explanation is not None else self.model.explain(x)
            active = torch.ones(B, n, dtype=torch.bool, device=x.device)
        k = int(active[0].sum())
        phi = fidelity.player_sums(explanation.attributions, attribution_players, n)  # (B, n, C)
        # Zero-sum gradient: the total (= output - base, by local accuracy) is left to the cross-entropy.
        total = phi.sum(1, keepdim=True)
        phi = phi - active.unsqueeze(-1).to(phi.dtype) / k * (total - total.detach())
        base = explanation.base.detach() if self.detach_game else explanation.base
        if self.estimator == "permutation":
            ranks = fidelity.sample_permutation_ranks(B, n, 2 * self.permutations, active=active,
                                             antithetic=self.paired).to(x.device)
            values = self._game(x, reference, fidelity.prefix_coalitions(ranks, k), element_players)  # (B, 2p, k-1, C)
            output = explanation.output.detach() if self.detach_game else explanation.output
            psi = fidelity.permutation_estimates(ranks, values.to(phi.dtype), base, output)  # (B, 2p, n, C)
            # Two independent estimates, each made of whole antithetic pairs.
            psi = _split_antithetic(psi, self.permutations) if self.paired else \
                psi.view(B, 2, self.permutations, n, -1)
            psi1, psi2 = psi.mean(2).unbind(1)
            penalty = (phi - psi1) * (phi - psi2)  # (B, n, C): E = (phi - phi*)^2 per player
            per_class = penalty.sum(1)  # (B, C)
        else:
            coalitions = fidelity.sample_kernel_coalitions(B, k, self.coalitions, paired=self.paired).to(x.device)
            if k < n:  # place the kept players' memberships; the others are never members
                index = active.nonzero()[:, 1].view(B, 1, k).expand(B, self.coalitions, k)
                coalitions = torch.zeros(B, self.coalitions, n, dtype=torch.bool, device=x.device).scatter(
                    2, index, coalitions)
            values = self._game(x, reference, coalitions, element_players)
            per_class = fidelity.fidelity_gaps(phi, values.to(phi.dtype), base, coalitions).square().mean(1)  # (B, C)
        if self.target != "all":
            classes = target if self.target == "label" else out.logits.detach().argmax(1)
            per_class = per_class.gather(1, classes.view(B, 1))
        return per_class.float().mean()


def _split_antithetic(psi: Tensor, permutations: int) -> Tensor:
    """`(B, 2p, n, C)` orders laid out `[first halves of both estimates..., their reverses...]` -> `(B, 2, p, n, C)`.

    `sample_permutation_ranks(count=2p, antithetic=True)` returns `p` drawn orders then their `p` reverses; drawn
    order `j < p / 2` and its reverse belong to estimate 0, the others to estimate 1, so each estimate is built from
    whole antithetic pairs and the two estimates are independent.
    """
    drawn, reverse = psi.chunk(2, dim=1)  # (B, p, n, C) each; reverse[j] reverses drawn[j]
    half = permutations // 2
    first = torch.cat([drawn[:, :half], reverse[:, :half]], dim=1)
    second = torch.cat([drawn[:, half:], reverse[:, half:]], dim=1)
    return torch.stack([first, second], dim=1)


@register_loss_term("explanation_fidelity")
def _explanation_fidelity(weight: float = 1.0, estimator: str = "permutation", permutations: int = 2,
                          coalitions: int = 8, paired: bool = True, target: str = "all", detach_game: bool = False,
                          patch: int = 4, keep_players: int | None = None) -> ExplanationFidelity:
    """Fidelity of the explanation to the Shapley values of the model's own game (`ExplanationFidelity`)."""
    return ExplanationFidelity(weight, estimator, permutations, coalitions, paired, target, detach_game, patch,
                               keep_players)
