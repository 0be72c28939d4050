"""`kind="or"` on the models' own `interactions` (Shapley modules, Deep and Conv ShapNet layers) vs brute force.

The reference here is written from the definition, independently of the library's butterflies: the layer's game
is evaluated on every coalition by masking, `I_or(T) = -sum_{L ⊆ T} (-1)^(|T|-|L|) v(N minus L)` by loops over
subsets, and universal matching `v(S) = v(∅) + sum_{T ∩ S ≠ ∅} I_or(T)` is checked on every coalition in float64.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from einops import rearrange
from torch import Tensor, nn

from shapnets import ConvShapNet, DeepShapNet, ShapleyModule
from shapnets.interactions import Interactions

F64 = torch.float64


def subsets_of(players: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [c for r in range(len(players) + 1) for c in itertools.combinations(players, r)]


def game_table(fn, absolute: Tensor, reference: Tensor, player_of: Tensor, n: int) -> dict[frozenset, Tensor]:
    """`v(S)` for every coalition: the elements of the players in S from `absolute`, the others at `reference`."""
    table = {}
    for s in subsets_of(tuple(range(n))):
        mask = torch.isin(player_of, torch.tensor(s, dtype=torch.long))
        table[frozenset(s)] = fn(torch.where(mask, absolute, reference))
    return table


def brute_or(v: dict[frozenset, Tensor], n: int) -> dict[tuple[int, ...], Tensor]:
    everyone = frozenset(range(n))
    return {t: -sum((-1) ** (len(t) - len(s)) * v[everyone - frozenset(s)] for s in subsets_of(t))
            for t in subsets_of(tuple(range(n))) if t}


def check_against_brute_force(found: Interactions, v: dict[frozenset, Tensor], n: int) -> None:
    assert found.kind == "or" and found.complete
    listed = {s: found.dividends[:, i] for i, s in enumerate(found.subsets)}
    brute = brute_or(v, n)
    for subset, value in brute.items():  # the listed ones, and exactly 0 on every subset the model leaves out
        torch.testing.assert_close(listed.get(subset, torch.zeros_like(value)), value, atol=1e-12, rtol=0)
    torch.testing.assert_close(found.base, v[frozenset()], atol=1e-12, rtol=0)
    for s in v:  # universal matching on every coalition, from the record alone
        rebuilt = found.base + sum((value for t, value in listed.items() if s & set(t)), torch.zeros_like(found.base))
        torch.testing.assert_close(rebuilt, v[s], atol=1e-12, rtol=0)
    found.check_decomposition()


def test_shapley_module_or_interactions() -> None:
    torch.manual_seed(0)
    module = ShapleyModule(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)), num_players=4,
                           reference=0.3).double()
    x = torch.randn(3, 4, 2, dtype=F64)
    player_of = torch.arange(4)[:, None].expand(4, 2)
    v = game_table(module, x, module.reference.expand_as(x[0]), player_of, 4)
    found = module.interactions(x, kind="or")
    check_against_brute_force(found, v, 4)
    torch.testing.assert_close(found.sii, module.interactions(x).sii)  # the game's SII, whatever the kind


def deep_stage_function(model: DeepShapNet, stage: int):
    """One stage's game as a function of the D feature rows (absolute values): its modules' values, summed."""
    stride = model.stage_stride(stage)

    def fn(z: Tensor) -> Tensor:
        padded = z.new_zeros(z.shape[0], model.num_padded, z.shape[-1]).index_copy(1, model.live_rows, z)
        return model.stages[stage](rearrange(padded, "b (hi two lo) c -> b (hi lo) two c", two=2, lo=stride)).sum(1)

    return fn


@pytest.mark.parametrize("features", [4, 5])  # 5: padded to 8, so some modules have a padding slot
def test_deep_shapnet_layer_or_interactions(features: int) -> None:
    torch.manual_seed(features)
    model = DeepShapNet(features, 3, channels=[4, 4, 4], hidden=(8,), reference=torch.randn(features))
    model = model.double().eval()
    x = torch.randn(2, features, dtype=F64)
    reps = [z.index_select(1, model.live_rows) for z in model.representations(x)]
    player_of = torch.arange(features)[:, None]
    for stage in (0, 1, model.num_stages - 1):
        absolute = reps[stage - 1] if stage else x[..., None]
        reference = model.reference if stage == 0 else torch.zeros_like(absolute[0])
        v = game_table(deep_stage_function(model, stage), absolute, reference,
                       player_of.expand_as(absolute[0]), features)
        found = model.interactions(x, stage, kind="or")
        check_against_brute_force(found, v, features)
        assert max(len(s) for s in found.subsets) == 2  # pairs and singletons only, as the AND dividends


def test_conv_shapnet_layer_or_interactions() -> None:
    torch.manual_seed(0)
    model = ConvShapNet(2, 3, channels=(4,), hidden=(8,), reference=torch.tensor([0.3, -0.2])).double()
    x = torch.randn(2, 2, 2, 3, dtype=F64)  # 6 pixels
    reps = model.representations(x)
    for stage in range(model.num_stages):
        conv = model.stages[stage]
        if stage == 0:
            absolute, reference = rearrange(x, "b c h w -> b h w c"), model.reference
        else:
            absolute = reps[stage - 1]
            reference = torch.zeros(absolute.shape[-1], dtype=F64)

        def fn(z: Tensor, conv=conv, reference=reference) -> Tensor:  # the layer game on absolute pixels
            return conv.bank(conv.patches(z - reference)[..., None, :, :] + reference).sum((1, 2, 3))

        player_of = torch.arange(6).view(2, 3, 1).expand(2, 3, absolute.shape[-1])
        v = game_table(fn, absolute, reference.expand_as(absolute[0]), player_of, 6)
        check_against_brute_force(model.interactions(x, stage, kind="or"), v, 6)


def test_models_name_the_kinds_they_give() -> None:
    deep = DeepShapNet(4, 2, hidden=(4,))
    conv = ConvShapNet(1, 2, channels=(3,))
    module = ShapleyModule(nn.Linear(4, 2), num_players=4, in_channels=1)
    calls = [lambda kind: deep.interactions(torch.randn(1, 4), 0, kind=kind),
             lambda kind: conv.interactions(torch.randn(1, 1, 3, 3), 0, kind=kind),
             lambda kind: module.interactions(torch.randn(1, 4, 1), kind=kind)]
    for call in calls:
        with pytest.raises(ValueError, match="exact_interactions"):
            call("and_or")
        with pytest.raises(ValueError, match="unknown interaction kind 'xor'"):
            call("xor")
