"""The benchmarks' cases and games: which models are explained, on which samples, and the game they all explain.

A `Case` is a model with samples, a reference and a player map (shipped zoo models on their test samples, or
small synthetic models); `make_game` turns it into the `Game` every method explains (offsets from the reference,
at most `max_players` players, with the exact Shapley values of the oracle).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from shapnets import ConvShapNet, DeepShapNet, InterpretableCNN, ShallowShapNet, exact_shapley, pixel_players

__all__ = ["Case", "Game", "OffsetGame", "make_game", "synthetic_cases", "zoo_cases"]


@dataclass
class Case:
    """A model and the samples to explain.

    Attributes:
        name: row label.
        family: "Shallow ShapNet", "Deep ShapNet", "Conv ShapNet", "MLP", ... (what the bars apply to).
        model: float32, eval mode; `explain()` when it has its own explanation.
        x: `(B, *S)` samples.
        reference: `S`: the input every absent player takes.
        players: integer map of shape `S`: the player of every input element (the model's own numbering: feature
            `i`, or pixel `h * W + w`).
        inputs: where `x` came from (printed with the table).
        max_players: the largest game of this case (default: the benchmark's `max_players`); the synthetic cases
            are small enough to keep all their players (<= 16).
    """

    name: str
    family: str
    model: nn.Module
    x: Tensor
    reference: Tensor
    players: Tensor
    inputs: str
    max_players: int | None = None

    @property
    def num_players(self) -> int:
        return int(self.players.max()) + 1

    @property
    def own_explanation(self) -> bool:
        return callable(getattr(self.model, "explain", None))


class OffsetGame(nn.Module):
    """`d (N, M) -> model(reference + d placed on the kept elements)`: the restricted game, in offsets.

    Every other element sits at the reference, so the non-kept players are absent from every coalition.
    """

    def __init__(self, model: nn.Module, reference: Tensor, elements: Tensor, sample_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.sample_shape = model, sample_shape
        self.register_buffer("background", reference.reshape(1, -1).clone())
        self.register_buffer("elements", elements.clone())
        self.register_buffer("kept_reference", reference.reshape(-1)[elements].clone())

    def forward(self, d: Tensor) -> Tensor:
        index = self.elements.expand(d.shape[0], -1)
        # Out of place, so gradients flow back to `d` (the gradient methods differentiate through this).
        full = self.background.expand(d.shape[0], -1).scatter(1, index, self.kept_reference + d)
        return self.model(full.reshape(d.shape[0], *self.sample_shape))


@dataclass
class Game:
    """The <= `max_players` game of a case that every method explains (see docs/benchmarks.md).

    Attributes:
        case: the case.
        kept: `(K,)` the kept players (the model's numbering).
        element_player: `(M,)` the kept elements' players, numbered 0..K-1 in the order of `kept`.
        d: `(B, M)` the kept elements' offsets from the reference (float32).
        full: `(B, *S)` the input with the non-kept players at the reference (float32).
        fn: the game on offsets, float32; `fn64` the same in float64.
        target: `(B,)` the class the model predicts at `full` (float64).
        exact: `(B, K)` the exact Shapley values of `target` (float64), and `oracle_s` the seconds it took.
    """

    case: Case
    kept: Tensor
    element_player: Tensor
    d: Tensor
    full: Tensor
    fn: nn.Module
    fn64: nn.Module
    target: Tensor
    exact: Tensor = field(default_factory=lambda: torch.empty(0))
    oracle_s: float = math.nan

    @property
    def num_kept(self) -> int:
        return int(self.kept.numel())

    def per_player(self, element_values: Tensor, grouped: bool) -> Tensor:
        """`(B, M)` per-element attributions -> `(B, K)` per player: the sum over the player's elements, or
        (`grouped`, for methods that already give every element of a player its player's value) their mean."""
        out = element_values.new_zeros(element_values.shape[0], self.num_kept)
        out.index_add_(1, self.element_player, element_values)
        if grouped:
            counts = torch.bincount(self.element_player, minlength=self.num_kept).to(out.dtype)
            out = out / counts
        return out


@torch.no_grad()
def make_game(case: Case, max_players: int = 12, oracle: bool = True) -> Game:
    """The case's game with at most `max_players` players (the others at the reference), its targets and, with
    `oracle`, its exact Shapley values."""
    x = case.x.float()
    sample_shape = tuple(x.shape[1:])
    reference = case.reference.float().expand(sample_shape)
    players = case.players.reshape(-1)
    n = case.num_players
    if n > max_players:
        # The players that move the most from the reference: the game keeps most of what the model sees.
        spread = (x - reference).abs().reshape(x.shape[0], -1).mean(0)
        per_player = torch.zeros(n).index_add_(0, players, spread)
        kept = per_player.topk(max_players).indices.sort().values
    else:
        kept = torch.arange(n)
    position = torch.full((n,), -1, dtype=torch.long)
    position[kept] = torch.arange(len(kept))
    elements = torch.nonzero(position[players] >= 0).flatten()
    element_player = position[players[elements]]
    offsets = (x - reference).reshape(x.shape[0], -1)
    d = offsets[:, elements]
    full = (reference.reshape(1, -1).expand(x.shape[0], -1)
            .scatter(1, elements.expand(x.shape[0], -1), x.reshape(x.shape[0], -1)[:, elements])
            .reshape(x.shape))
    model = case.model.eval()
    fn = OffsetGame(model, reference, elements, sample_shape).eval()
    fn64 = OffsetGame(copy.deepcopy(model).double().eval(), reference.double(), elements, sample_shape).eval()
    target = fn64(d.double()).argmax(1)
    game = Game(case, kept, element_player, d, full, fn, fn64, target)
    if oracle:
        start = time.perf_counter()
        expl = exact_shapley(fn64, d.double(), players=element_player, max_players=max(20, len(kept)))
        game.oracle_s = time.perf_counter() - start
        game.exact = _for_target(expl.attributions, game.target)
    return game


def _for_target(attributions: Tensor, target: Tensor) -> Tensor:
    """`(B, K, C)` -> `(B, K)`: each sample's target class."""
    return attributions.gather(2, target.view(-1, 1, 1).expand(-1, attributions.shape[1], 1))[..., 0]


def _own_attributions(game: Game) -> Tensor:
    """The model's own explanation of the game's input, `(B, K)` for the target class (float32)."""
    expl = game.case.model.explain(game.full)
    flat = expl.attributions.reshape(expl.attributions.shape[0], -1, expl.attributions.shape[-1])
    return _for_target(flat[:, game.kept], game.target)




# ---------------------------------------------------------------------------------------------- the cases
def _chunk_groups(in_features: int, size: int) -> list[tuple[int, ...]]:
    """Disjoint groups of consecutive features (the last one shorter when `size` does not divide D)."""
    return [tuple(range(a, min(a + size, in_features))) for a in range(0, in_features, size)]


def _tabular_case(name: str, family: str, model: nn.Module, x: Tensor, reference: Tensor | None, inputs: str) -> Case:
    D = x.shape[1]
    reference = torch.zeros(D) if reference is None else reference.reshape(x.shape[1:])
    players = torch.arange(D).view(-1, *([1] * (x.dim() - 2))).expand(x.shape[1:])
    return Case(name, family, model.eval(), x, reference, players, inputs)


def synthetic_cases(samples: int = 8, quick: bool = False, seed: int = 0) -> list[Case]:
    """Small random-weight models with <= 16 players and N(0, 1) inputs, zero reference: one per family, plus a
    plain ReLU MLP (no explanation of its own; every captum method applies to it)."""
    from zoo.baselines import BaselineMLP  # training -> zoo is the allowed direction

    generator = torch.Generator().manual_seed(seed)
    D = 8 if quick else 12
    inputs = "N(0, 1) draws"
    torch.manual_seed(seed)
    cases = [
        _tabular_case(f"synthetic Shallow, groups of 3 (D={D})", "Shallow ShapNet",
                      ShallowShapNet(D, 2, _chunk_groups(D, 3)), torch.randn(samples, D, generator=generator), None,
                      inputs),
        _tabular_case(f"synthetic Shallow, all pairs (D={D})", "Shallow ShapNet", ShallowShapNet(D, 2, "pairs"),
                      torch.randn(samples, D, generator=generator), None, inputs),
        _tabular_case(f"synthetic Deep (D={D})", "Deep ShapNet", DeepShapNet(D, 2, channels=16),
                      torch.randn(samples, D, generator=generator), None, inputs),
        _tabular_case(f"synthetic MLP, ReLU (D={D})", "MLP", BaselineMLP(D, 2, hidden=(32, 32)),
                      torch.randn(samples, D, generator=generator), None, inputs),
    ]
    side = 3 if quick else 4
    conv = ConvShapNet(1, 2, channels=(8,), hidden=(16,))  # 2 stages, dilations 1, 2: every pixel reaches every map
    cases.append(Case(f"synthetic Conv ({side}x{side} pixels)", "Conv ShapNet", conv.eval(),
                      torch.randn(samples, 1, side, side, generator=generator), torch.zeros(1, side, side),
                      pixel_players(1, side, side), inputs))
    for case in cases:  # small and cheap: the oracle enumerates all their players (<= 2^16 coalitions)
        case.max_players = case.num_players
    return cases


def _family(model: nn.Module) -> str:
    names = {ShallowShapNet: "Shallow ShapNet", DeepShapNet: "Deep ShapNet", ConvShapNet: "Conv ShapNet",
             InterpretableCNN: "Interpretable CNN"}
    return next((label for cls, label in names.items() if isinstance(model, cls)), type(model).__name__)


def zoo_cases(names: Sequence[str] | None = None, samples: int = 8, data_root: str | None = None,
              tabular_only: bool = True, seed: int = 0) -> list[Case]:
    """Shipped zoo models with their own explanation (tabular only by default) and their first test samples; when
    the data are not found, N(0, 1) draws for tabular models (standardized features) and the model's reference plus
    N(0, 1) noise for images."""
    import zoo

    from .config import UserError
    from .sources import load_source, load_split

    cases = []
    for name in names if names is not None else zoo.list_models(pretrained=True):
        loaded = load_source(name, torch.device("cpu"))
        model, info = loaded.model, loaded.info
        tabular = len(info.input_shape) == 1
        if (tabular_only and not tabular) or not callable(getattr(model, "explain", None)):
            continue
        try:
            dataset = load_split(loaded, "test", data_root)
            x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(min(samples, len(dataset)))]).float()
            inputs = f"first {len(x)} test samples of {info.name}"
        except UserError:
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(samples, *info.input_shape, generator=generator)
            inputs = f"N(0, 1) draws ({info.name} data not found)"
        reference = getattr(model, "reference", None)
        if tabular:
            cases.append(_tabular_case(name, _family(model), model, x, reference, inputs))
        else:
            C, H, W = info.input_shape
            ref = (reference if reference is not None else torch.zeros(C)).float().reshape(-1, 1, 1).expand(C, H, W)
            if inputs.startswith("N(0"):
                x = x + ref
            cases.append(Case(name, _family(model), model, x, ref.clone(), pixel_players(C, H, W), inputs))
    return cases
