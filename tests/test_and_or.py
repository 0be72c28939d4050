"""OR interactions, the AND-OR split and their order statistics (shapnets.and_or, shapnets.interaction_stats).

The reference definitions here are written from the formulas, independently of the library's butterflies: loops
over subsets, the complement written as a set difference.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from shapnets import (
    AndOrInteractions,
    DecompositionError,
    Interactions,
    and_or_interactions,
    exact_interactions,
    exact_shapley,
    or_transform,
)
from shapnets.and_or import zeta_transform
from shapnets.interaction_stats import jaccard_by_order, order_statistics
from shapnets.oracle import coalition_values

F64 = torch.float64


def subsets_of(players: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [c for r in range(len(players) + 1) for c in itertools.combinations(players, r)]


def game_table(fn, x: Tensor, reference: Tensor) -> dict[frozenset, Tensor]:
    """v(S) for every coalition S, by masking one coalition at a time: `(B, C)` each."""
    n = x.shape[1]
    table = {}
    for s in subsets_of(tuple(range(n))):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(s)] = True
        table[frozenset(s)] = fn(torch.where(mask, x, reference))
    return table


def brute_and(v: dict[frozenset, Tensor], n: int) -> dict[tuple[int, ...], Tensor]:
    return {t: sum((-1) ** (len(t) - len(s)) * v[frozenset(s)] for s in subsets_of(t))
            for t in subsets_of(tuple(range(n))) if t}


def brute_or(v: dict[frozenset, Tensor], n: int) -> dict[tuple[int, ...], Tensor]:
    everyone = frozenset(range(n))
    return {t: -sum((-1) ** (len(t) - len(s)) * v[everyone - frozenset(s)] for s in subsets_of(t))
            for t in subsets_of(tuple(range(n))) if t}


def listed(record: Interactions) -> dict[tuple[int, ...], Tensor]:
    return {s: record.dividends[:, i] for i, s in enumerate(record.subsets)}


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Softplus(), nn.Linear(12, 3)).double()


@pytest.fixture
def batch() -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    return torch.randn(3, 5, dtype=F64), 0.3 * torch.randn(5, dtype=F64)


def test_or_interactions_match_the_definition_and_match_every_coalition(net, batch) -> None:
    x, ref = batch
    n = x.shape[1]
    v = game_table(net, x, ref)
    found = exact_interactions(net, x, ref, kind="or")
    assert found.kind == "or"
    expected = brute_or(v, n)
    got = listed(found)
    assert set(got) == set(expected)
    for t, value in expected.items():
        torch.testing.assert_close(got[t], value, atol=1e-12, rtol=0)
    # Universal matching, written from the definition: v(S) = v(∅) + sum over T meeting S of I_or(T).
    for s, value in v.items():
        rebuilt = found.base + sum(got[t] for t in got if s & set(t))
        torch.testing.assert_close(rebuilt, value, atol=1e-12, rtol=0)
    found.check_decomposition()
    # The OR record describes the same game: same SII, and an OR interaction split evenly gives the Shapley values.
    torch.testing.assert_close(found.shapley_values(), exact_shapley(net, x, ref).attributions, atol=1e-12, rtol=0)


def test_and_kind_is_unchanged_and_matches_the_definition(net, batch) -> None:
    x, ref = batch
    v = game_table(net, x, ref)
    got = listed(exact_interactions(net, x, ref, kind="and"))
    for t, value in brute_and(v, x.shape[1]).items():
        torch.testing.assert_close(got[t], value, atol=1e-12, rtol=0)


@pytest.mark.parametrize("split", ["half", "sparse"])
def test_and_or_split_matches_every_coalition(net, batch, split: str) -> None:
    x, ref = batch
    n = x.shape[1]
    v = game_table(net, x, ref)
    found = exact_interactions(net, x, ref, kind="and_or", split=split)
    assert isinstance(found, AndOrInteractions)
    found.check_decomposition()
    and_, or_ = listed(found.and_), listed(found.or_)
    base = found.and_.base + found.or_.base
    for s, value in v.items():
        rebuilt = base + sum(and_[t] for t in and_ if set(t) <= s) + sum(or_[t] for t in or_ if s & set(t))
        torch.testing.assert_close(rebuilt, value, atol=1e-9, rtol=0)
    # Each part is what its own definition gives on its own game v_and = share v + gamma, v_or = (1-share) v - gamma.
    gamma = {frozenset(s): found.gamma[sum(1 << i for i in s)] for s in subsets_of(tuple(range(n)))}
    v_and = {s: 0.5 * value + gamma[s] for s, value in v.items()}
    v_or = {s: 0.5 * value - gamma[s] for s, value in v.items()}
    for t, value in brute_and(v_and, n).items():
        torch.testing.assert_close(and_[t], value, atol=1e-9, rtol=0)
    for t, value in brute_or(v_or, n).items():
        torch.testing.assert_close(or_[t], value, atol=1e-9, rtol=0)
    if split == "half":
        assert found.gamma.abs().max() == 0
        for t, value in brute_and(v, n).items():
            torch.testing.assert_close(and_[t], 0.5 * value, atol=1e-12, rtol=0)


def test_sparse_split_is_never_denser_and_recovers_pure_games() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    x, ref = torch.randn(2, 4, dtype=F64), torch.zeros(4, dtype=F64)
    half = exact_interactions(net, x, ref, kind="and_or", split="half")
    sparse = exact_interactions(net, x, ref, kind="and_or", split="sparse")
    assert (sparse.l1() <= half.l1() + 1e-9).all()
    # A pure OR game (max of indicators) and a pure AND game (product): one interaction of weight 1 explains each.
    x = torch.ones(1, 3, dtype=F64)
    for fn, kind in ((lambda z: z.amax(1, keepdim=True), "or"), (lambda z: z.prod(1, keepdim=True), "and")):
        best = exact_interactions(fn, x, torch.zeros(3, dtype=F64), kind="and_or", split="sparse")
        best.check_decomposition()
        assert best.l1().item() == pytest.approx(1.0, abs=1e-9)
        record = best.or_ if kind == "or" else best.and_
        assert listed(record)[(0, 1, 2)].item() == pytest.approx(1.0, abs=1e-9)


def test_transforms_invert() -> None:
    values = torch.randn(2**4, 3, dtype=F64)
    from shapnets import moebius_transform

    torch.testing.assert_close(zeta_transform(moebius_transform(values, 4), 4), values)
    rows = or_transform(values, 4)
    assert rows[0].equal(values[0])
    torch.testing.assert_close(rows.sum(0), values[-1])


def test_bad_kind_split_and_share_are_clear_errors(net, batch) -> None:
    x, ref = batch
    with pytest.raises(ValueError, match="unknown interaction kind 'xor'"):
        exact_interactions(net, x, ref, kind="xor")
    with pytest.raises(ValueError, match="unknown AND-OR split"):
        exact_interactions(net, x, ref, kind="and_or", split="greedy")
    values, _ = coalition_values(net, x, ref, None, 16, 8192, "test")
    with pytest.raises(ValueError, match="share must lie in"):
        and_or_interactions(values, share=1.5)
    with pytest.raises(ValueError, match="linear program"):
        and_or_interactions(torch.zeros(2**13, 1, 1), split="sparse")


def test_check_decomposition_catches_a_wrong_interaction(net, batch) -> None:
    x, ref = batch
    found = exact_interactions(net, x, ref, kind="and_or")
    found.or_.dividends[0, 3, 0] += 1e-3
    with pytest.raises(DecompositionError, match="universal matching"):
        found.check_decomposition()


# ---------------------------------------------------------------------------------------------- order statistics
def record(values: list[list[float]], subsets: list[tuple[int, ...]], n: int) -> Interactions:
    d = torch.tensor(values, dtype=F64)[..., None]
    B = d.shape[0]
    return Interactions(subsets=subsets, dividends=d, sii=torch.zeros(B, n, n, 1, dtype=F64),
                        base=torch.zeros(B, 1, dtype=F64), output=d.sum(1))


def test_order_statistics_by_hand() -> None:
    subsets = [(0,), (1,), (0, 1)]
    # Sample 0: max |I| = 4, threshold 0.1 * 4 = 0.4 drops the 0.3; sample 1: all salient.
    r = record([[4.0, 0.3, -2.0], [1.0, -1.0, 2.0]], subsets, 2)
    stats = order_statistics(r, tau=0.1)
    torch.testing.assert_close(stats.positive, torch.tensor([(4.0 + 1.0) / 2, 2.0 / 2], dtype=F64))
    torch.testing.assert_close(stats.negative, torch.tensor([-1.0 / 2, -2.0 / 2], dtype=F64))
    torch.testing.assert_close(stats.count, torch.tensor([(1 + 2) / 2, 1.0], dtype=F64))
    torch.testing.assert_close(stats.distribution, torch.tensor([0.6, 0.4], dtype=F64))
    torch.testing.assert_close(stats.relative_positive, torch.tensor([(4 / 6 + 1 / 4) / 2, (2 / 4) / 2], dtype=F64))
    # Pooling two records (AND and OR) uses one threshold per sample over both.
    # Sample 0's threshold becomes 0.1 * 50 = 5: its own 4 and -2 drop out; sample 1's stays at 0.2.
    pooled = order_statistics([r, record([[0.0, 0.0, 50.0], [0.0, 0.0, 0.0]], subsets, 2)], tau=0.1)
    torch.testing.assert_close(pooled.count, torch.tensor([(0 + 2) / 2, (1 + 1) / 2], dtype=F64))
    assert order_statistics(r, tau=0.5).count[1] == pytest.approx(0.5)  # sample 0 drops its -2 at 0.5 * 4
    with pytest.raises(ValueError, match="tau"):
        order_statistics(r, tau=1.5)


def test_jaccard_is_one_for_the_same_interactions_and_zero_for_opposite_ones() -> None:
    subsets = [(0,), (1,), (0, 1)]
    a = record([[1.0, -2.0, 3.0], [3.0, -2.0, 1.0]], subsets, 2)
    same = jaccard_by_order(a, torch.tensor([0, 0]), a, torch.tensor([0, 0]))
    assert same["mean"] == pytest.approx([1.0, 1.0])
    flipped = record([[-1.0, 2.0, -3.0], [-3.0, 2.0, -1.0]], subsets, 2)
    opposite = jaccard_by_order(a, torch.tensor([0, 0]), flipped, torch.tensor([0, 0]))
    assert opposite["mean"] == pytest.approx([0.0, 0.0])
    # Class means: train class 0 averages to (2, -2 | 2); test (1, -1 | 1): min/max = (1+1)/(2+2) and 1/2.
    half = record([[1.0, -1.0, 1.0]], subsets, 2)
    partial = jaccard_by_order(a, torch.tensor([0, 0]), half, torch.tensor([0]))
    assert partial["mean"] == pytest.approx([0.5, 0.5])
    # A class missing from one side is left out.
    assert set(jaccard_by_order(a, torch.tensor([0, 1]), half, torch.tensor([1]))["per_class"]) == {1}
    assert not math.isnan(partial["mean"][0])


@pytest.mark.parametrize("groups", ["pairs", [[0, 1, 2], [2, 3, 4]]])
def test_shallow_shapnet_or_interactions_from_its_modules_match_the_oracle(groups) -> None:
    from shapnets import ShallowShapNet

    torch.manual_seed(0)
    model = ShallowShapNet(5, 3, groups=groups, hidden=[8]).double()
    x = torch.randn(4, 5, dtype=F64)
    mine = model.interactions(x, kind="or")
    oracle = exact_interactions(model, x, model.reference, kind="or")
    assert mine.kind == "or" and len(mine.subsets) < len(oracle.subsets)
    found = listed(mine)
    for subset, value in listed(oracle).items():
        torch.testing.assert_close(found.get(subset, torch.zeros_like(value)), value, atol=1e-12, rtol=0)
    torch.testing.assert_close(mine.sii, oracle.sii, atol=1e-12, rtol=0)
    mine.check_decomposition()
    with pytest.raises(ValueError, match="exact_interactions"):
        model.interactions(x, kind="and_or")
