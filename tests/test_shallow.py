"""Shallow ShapNet: exact Shapley values end to end, group handling, serialization, validation."""

from __future__ import annotations

import itertools

import pytest
import torch

from shapnets import ShallowShapNet, exact_shapley, make_groups

DT = torch.float64
ATOL = 1e-10

MIXED_GROUPS = [(0,), (1, 2), (2, 3, 4), (0, 5), (1, 3, 5), (6, 0, 2, 4)]  # arities 1-4, overlapping


def shallow(in_features: int, groups, in_channels: int = 1, reference=None, **kwargs) -> ShallowShapNet:
    kwargs.setdefault("hidden", (8,))
    return ShallowShapNet(in_features, 3, groups, reference=reference, in_channels=in_channels, **kwargs).to(DT)


def assert_exact(net: ShallowShapNet, x: torch.Tensor) -> None:
    expl = net.explain(x)
    oracle = exact_shapley(net, x, net.reference)
    assert expl.exact and expl.attributions.shape == (x.shape[0], net.in_features, net.num_classes)
    torch.testing.assert_close(expl.attributions, oracle.attributions, rtol=0, atol=ATOL)
    torch.testing.assert_close(expl.base, oracle.base, rtol=0, atol=ATOL)
    torch.testing.assert_close(expl.output, net(x), rtol=0, atol=ATOL)
    expl.check_local_accuracy()


# ---------------------------------------------------------------------------------------------
# make_groups
# ---------------------------------------------------------------------------------------------
def test_make_groups_keywords() -> None:
    assert make_groups("singles", 4) == [(0,), (1,), (2,), (3,)]
    pairs = make_groups("pairs", 32)
    assert len(pairs) == 32 * 31 // 2 == 496  # the original code kept only 55 of them
    assert set(pairs) == set(itertools.combinations(range(32), 2))


def test_make_groups_accepts_lists_and_numpy_ints() -> None:
    import numpy as np

    assert make_groups([[2, 0], np.array([1])], 3) == [(2, 0), (1,)]


@pytest.mark.parametrize(
    ("groups", "in_features", "match"),
    [
        ("triples", 4, "unknown groups 'triples'"),
        ("pairs", 1, 'groups="pairs" needs at least 2 features, got 1'),
        ([(0, 1), ()], 4, "empty group"),
        ([(0, 1, 0)], 4, r"group \(0, 1, 0\) repeats a feature"),
        ([(0, 5), (2, -1)], 5, r"group \(0, 5\) has indices \[5\] outside \[0, 5\)"),
        ([(2, -1)], 5, r"indices \[-1\] outside \[0, 5\)"),
        ([], 4, "groups is empty"),
    ],
)
def test_make_groups_errors(groups, in_features: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_groups(groups, in_features)
    with pytest.raises(ValueError, match=match):
        ShallowShapNet(in_features, 2, groups)


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nonzero_reference", [False, True], ids=["zero-ref", "ref"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_mixed_overlapping_groups_are_exact(in_channels: int, nonzero_reference: bool) -> None:
    reference = torch.randn(7, in_channels, dtype=DT) if nonzero_reference else None
    net = shallow(7, MIXED_GROUPS, in_channels, reference)
    assert net.arities == [1, 2, 3, 4]
    x = torch.randn(4, 7, in_channels, dtype=DT)
    assert_exact(net, x)


@pytest.mark.parametrize("groups", ["singles", "pairs"])
def test_keyword_groups_are_exact(groups: str) -> None:
    net = shallow(6, groups, reference=torch.randn(6, dtype=DT))
    assert_exact(net, torch.randn(5, 6, dtype=DT))


def test_singles_is_additive() -> None:
    # A GAM: feature i's attribution is f_i(x_i) - f_i(r_i), whatever the other features are.
    net = shallow(5, "singles", reference=torch.randn(5, dtype=DT))
    x, y = torch.randn(2, 5, dtype=DT).unbind(0)
    y = y.clone()
    y[2] = x[2]
    attr = net.explain(torch.stack([x, y])).attributions
    torch.testing.assert_close(attr[0, 2], attr[1, 2], rtol=0, atol=ATOL)


def test_all_pairs_of_32_features_keep_all_496_modules() -> None:
    D, changed = 32, [0, 7, 13, 22, 30, 31]  # 30 and 31 lie in modules the original code dropped
    net = shallow(D, "pairs", reference=torch.randn(D, dtype=DT), hidden=(4,))
    assert len(net.groups) == sum(bank.num_groups for bank in net.banks) == 496
    # Brute force over 32 players is out of reach, but players at their reference are null players:
    # dropping them leaves every other Shapley value unchanged. So perturb only 6 features and
    # compare with the exact 6-player game on them.
    x = net.reference[:, 0].repeat(3, 1)
    x[:, changed] = torch.randn(3, len(changed), dtype=DT)
    expl = net.explain(x)

    def on_changed(z: torch.Tensor) -> torch.Tensor:
        full = net.reference[:, 0].repeat(z.shape[0], 1)
        full[:, changed] = z
        return net(full)

    oracle = exact_shapley(on_changed, x[:, changed], net.reference[changed, 0])
    torch.testing.assert_close(expl.attributions[:, changed], oracle.attributions, rtol=0, atol=ATOL)
    unchanged = [i for i in range(D) if i not in changed]
    assert expl.attributions[:, unchanged].abs().max() < 1e-13
    expl.check_local_accuracy()


def test_feature_in_no_group_gets_zero() -> None:
    net = shallow(5, [(0, 1), (1, 3)])
    attr = net.explain(torch.randn(4, 5, dtype=DT)).attributions
    assert torch.equal(attr[:, [2, 4]], torch.zeros_like(attr[:, [2, 4]]))
    assert attr[:, [0, 1, 3]].abs().min() > 0


def test_two_and_three_dimensional_inputs_agree() -> None:
    net = shallow(6, MIXED_GROUPS[:5])
    x = torch.randn(4, 6, dtype=DT)
    torch.testing.assert_close(net(x), net(x[..., None]), rtol=0, atol=0)
    torch.testing.assert_close(net.explain(x).attributions, net.explain(x[..., None]).attributions, rtol=0, atol=0)


def test_output_at_reference_is_base() -> None:
    net = shallow(6, "pairs", reference=torch.randn(6, dtype=DT))
    expl = net.explain(net.reference[None, :, 0].expand(3, -1))
    assert expl.attributions.abs().max() < 1e-13
    torch.testing.assert_close(expl.output, expl.base, rtol=0, atol=1e-13)


def test_feature_names_reach_the_explanation() -> None:
    names = [f"f{i}" for i in range(4)]
    net = shallow(4, "pairs", feature_names=names)
    expl = net.explain(torch.randn(2, 4, dtype=DT))
    assert expl.player_names == names and expl.player_axes == ("feature",)
    with pytest.raises(ValueError, match="3 feature names for 4 features"):
        ShallowShapNet(4, 2, feature_names=names[:3])


# ---------------------------------------------------------------------------------------------
# Reference handling
# ---------------------------------------------------------------------------------------------
def test_reference_vector_and_column_are_the_same() -> None:
    r = torch.randn(5, dtype=DT)
    torch.manual_seed(1)
    a = shallow(5, "pairs", reference=r)
    torch.manual_seed(1)
    b = shallow(5, "pairs", reference=r[:, None])
    torch.testing.assert_close(a.reference, b.reference)
    x = torch.randn(3, 5, dtype=DT)
    torch.testing.assert_close(a.explain(x).attributions, b.explain(x).attributions, rtol=0, atol=0)


def test_per_channel_reference_broadcasts() -> None:
    net = shallow(4, "pairs", in_channels=2, reference=torch.tensor([1.0, -1.0], dtype=DT))
    torch.testing.assert_close(net.reference, torch.tensor([[1.0, -1.0]] * 4, dtype=DT))


@pytest.mark.parametrize("in_channels", [2, 3])
def test_vector_reference_with_channels_is_ambiguous(in_channels: int) -> None:
    # (D,) could mean one value per feature or per channel (when D == C): refuse to guess.
    with pytest.raises(ValueError, match=r"ambiguous with in_channels=\d: pass \(D, C\)"):
        ShallowShapNet(in_channels, 2, reference=torch.zeros(in_channels), in_channels=in_channels)


def test_reference_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"reference of shape \(4, 2\) cannot be broadcast to .* shape \(5, 1\)"):
        ShallowShapNet(5, 2, reference=torch.zeros(4, 2))


def test_non_finite_reference() -> None:
    with pytest.raises(ValueError, match="reference contains NaN or inf"):
        ShallowShapNet(3, 2, reference=torch.tensor([0.0, float("nan"), 1.0]))


# ---------------------------------------------------------------------------------------------
# Gradients, dtype and serialization
# ---------------------------------------------------------------------------------------------
def test_gradients_reach_every_parameter() -> None:
    net = shallow(6, MIXED_GROUPS[:5], reference=torch.randn(6, dtype=DT))
    # The training loss sees the logits; the last bias of every module shifts them (but no attribution).
    expl = net.explain(torch.randn(4, 6, dtype=DT))
    (expl.output.square().sum() + expl.attributions.square().sum()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and bool((p.grad.flatten(1).abs().sum(1) > 0).all()), name  # every module


def test_double_to_and_state_dict_round_trip() -> None:
    net = ShallowShapNet(6, 3, MIXED_GROUPS[:5], hidden=(8,), reference=torch.randn(6))
    assert net.reference.dtype == torch.float32
    x = torch.randn(4, 6, dtype=DT)
    a = net.double().explain(x)
    assert net.reference.dtype == DT
    b = net.to(torch.float32).to(DT).explain(x)  # float32 weights are exact in float64
    torch.testing.assert_close(a.attributions, b.attributions, rtol=0, atol=0)

    state = net.state_dict()
    assert "reference" in state
    assert not any(key.startswith("index_") for key in state)  # rebuilt from groups, not saved
    fresh = ShallowShapNet(6, 3, MIXED_GROUPS[:5], hidden=(8,)).double()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.reference, net.reference, rtol=0, atol=0)
    c = fresh.explain(x)
    torch.testing.assert_close(c.attributions, a.attributions, rtol=0, atol=0)
    torch.testing.assert_close(c.base, a.base, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.zeros(6, dtype=DT), ValueError, r"expects input of shape \(B, 6\) or \(B, 6, 1\), got \(6,\)"),
        (torch.zeros(2, 6, 1, 1, dtype=DT), ValueError, r"\(B, 6\) or \(B, 6, 1\), got \(2, 6, 1, 1\)"),
        (torch.zeros(2, 5, dtype=DT), ValueError, r"\(B, 6\) or \(B, 6, 1\), got \(2, 5\)"),
        (torch.zeros(2, 6, 2, dtype=DT), ValueError, r"\(B, 6\) or \(B, 6, 1\), got \(2, 6, 2\)"),
        (torch.zeros(2, 6, dtype=torch.int32), TypeError, "floating-point tensor, got dtype torch.int32"),
        (torch.zeros(2, 6, dtype=torch.float32), TypeError, "input dtype torch.float32 does not match .*float64"),
        (torch.tensor([[0.0] * 5 + [float("nan")]], dtype=DT), ValueError, r"1 non-finite value\(s\)"),
        (torch.tensor([[float("-inf")] * 6], dtype=DT), ValueError, r"6 non-finite value\(s\)"),
    ],
    ids=["rank-1", "rank-4", "features", "channels", "int", "dtype-mismatch", "nan", "inf"],
)
def test_rejects_bad_input(x: torch.Tensor, error: type, match: str) -> None:
    net = shallow(6, MIXED_GROUPS[:5])
    with pytest.raises(error, match="ShallowShapNet"):
        net(x)
    with pytest.raises(error, match=match):
        net.explain(x)


def test_group_above_max_players() -> None:
    with pytest.raises(ValueError, match=r"1 <= num_players <= 16 .*got 17"):
        ShallowShapNet(20, 2, groups=[tuple(range(17))])
    with pytest.raises(ValueError, match=r"num_players <= 3 .*got 4"):
        ShallowShapNet(5, 2, groups=[(0, 1, 2, 3)], max_players=3)


@pytest.mark.parametrize("args", [(0, 2), (3, -1)])  # num_classes=0 is timm's "no head" (tests/test_timm_interface.py)
def test_sizes_must_be_positive(args: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        ShallowShapNet(*args, groups="singles")
