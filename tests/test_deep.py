"""Deep ShapNet: butterfly wiring, connectivity, local accuracy, missingness at every layer, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from shapnets import DeepShapNet, butterfly_pairs, exact_shapley
from shapnets.deep import butterfly_stages_needed, live_rows

DT = torch.float64
ATOL = 1e-10
MISSING_ATOL = 1e-13  # "exactly zero" up to float64 rounding


def deep(in_features: int, reference=None, **kwargs) -> DeepShapNet:
    kwargs.setdefault("channels", 4)
    kwargs.setdefault("hidden", (8,))
    return DeepShapNet(in_features, 3, reference=reference, **kwargs).to(DT)


def dependency(net: DeepShapNet, x: Tensor, layer: int) -> Tensor:
    """`(P, D)` bool: which input features row i of `representations(x)[layer]` depends on (one sample)."""
    assert x.shape[0] == 1
    jac = torch.autograd.functional.jacobian(
        lambda v: net.representations(v[None, :, None])[layer][0].sum(-1), x[0], vectorize=True
    )
    return jac.abs() > 0


# ---------------------------------------------------------------------------------------------
# Butterfly wiring (research notes, section 3.1)
# ---------------------------------------------------------------------------------------------
def test_butterfly_pairs_for_8_features() -> None:
    assert butterfly_pairs(8, 0) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert butterfly_pairs(8, 1) == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert butterfly_pairs(8, 2) == [(0, 4), (1, 5), (2, 6), (3, 7)]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_butterfly_pairs_for_16_features_follow_the_module_index_formula(stage: int) -> None:
    # Module j pairs a_j and a_j + 2^s with a_j = floor(2j / 2^(s+1)) * 2^(s+1) + (2j mod 2^(s+1)) / 2.
    span = 2 ** (stage + 1)
    expected = [((2 * j // span) * span + (2 * j % span) // 2,) for j in range(8)]
    expected = [(a, a + 2**stage) for (a,) in expected]
    assert butterfly_pairs(16, stage) == expected
    if stage == 3:
        assert expected == [(i, i + 8) for i in range(8)]


@pytest.mark.parametrize("num_players", [2, 4, 8, 16, 32])
def test_butterfly_stage_is_a_perfect_matching(num_players: int) -> None:
    for stage in range(int(math.log2(num_players))):
        pairs = butterfly_pairs(num_players, stage)
        assert len(pairs) == num_players // 2
        assert sorted(i for pair in pairs for i in pair) == list(range(num_players))
        assert all(b - a == 2**stage for a, b in pairs)


def test_butterfly_stages_past_log2_repeat() -> None:
    assert butterfly_pairs(8, 3) == butterfly_pairs(8, 0)
    assert butterfly_pairs(8, 5) == butterfly_pairs(8, 2)


@pytest.mark.parametrize("num_players", [0, 1, 6, 12])
def test_butterfly_needs_a_power_of_two(num_players: int) -> None:
    with pytest.raises(ValueError, match=f"power of two >= 2 players, got {num_players}"):
        butterfly_pairs(num_players, 0)


# ---------------------------------------------------------------------------------------------
# Connectivity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("in_features", [2, 8, 16])
def test_every_row_depends_on_every_input_only_after_the_last_stage(in_features: int, residual: bool) -> None:
    net = deep(in_features, reference=torch.randn(in_features, dtype=DT), residual=residual)
    x = torch.randn(1, in_features, dtype=DT)
    for layer in range(net.num_stages):
        dep = dependency(net, x, layer)
        # After stage s each row has mixed exactly the 2^(s+1) features of its butterfly block.
        assert dep.sum(1).tolist() == [2 ** (layer + 1)] * in_features
    assert bool(dependency(net, x, -1).all())


@pytest.mark.parametrize("in_features", [3, 5, 6, 9, 12, 13, 30])
def test_padded_nets_need_one_extra_stage(in_features: int) -> None:
    # Padded rows are dead (always at the reference); bit-reversed placement keeps log2(P) + 1 enough.
    assert butterfly_stages_needed(in_features) == math.ceil(math.log2(in_features)) + 1
    rows = live_rows(in_features)
    assert len(set(rows)) == in_features and rows == sorted(rows)


@pytest.mark.parametrize("in_features", [6, 13, 30])
def test_every_row_depends_on_every_input_when_padded(in_features: int) -> None:
    net = deep(in_features, reference=torch.randn(in_features, dtype=DT))
    dep = dependency(net, torch.randn(1, in_features, dtype=DT), -1)
    assert bool(dep[net.live_rows].all())


@pytest.mark.parametrize("in_features", [6, 13, 30])
def test_logits_depend_on_every_input_when_padded(in_features: int) -> None:
    net = deep(in_features, reference=torch.randn(in_features, dtype=DT))
    jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0].sum(), torch.randn(in_features, dtype=DT))
    assert bool((jac.abs() > 0).all())


@pytest.mark.parametrize("in_features", [5, 8, 13])
def test_too_few_stages_raise(in_features: int) -> None:
    stages = butterfly_stages_needed(in_features)
    with pytest.raises(ValueError, match=f"need at least {stages} stages.*got {stages - 2}"):
        DeepShapNet(in_features, 2, channels=[4] * (stages - 2))
    DeepShapNet(in_features, 2, channels=[4] * (stages - 1))  # the minimum is accepted


# ---------------------------------------------------------------------------------------------
# Local accuracy, reference, missingness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("in_features", [2, 6, 8, 13, 30])
def test_local_accuracy_and_output_at_reference(in_features: int, residual: bool) -> None:
    reference = torch.randn(in_features, dtype=DT)
    net = deep(in_features, reference=reference, residual=residual)
    x = torch.randn(4, in_features, dtype=DT)
    expl = net.explain(x)
    assert expl.attributions.shape == (4, in_features, 3) and not expl.exact
    torch.testing.assert_close(expl.output, net(x), rtol=0, atol=ATOL)
    assert torch.equal(expl.base, torch.zeros_like(expl.base))
    expl.check_local_accuracy()
    assert net(reference[None]).abs().max() < MISSING_ATOL  # g(reference) == 0: no hidden bias


@pytest.mark.parametrize("in_channels", [1, 2])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("in_features", [6, 8, 13])
def test_missingness_at_every_layer(in_features: int, residual: bool, in_channels: int) -> None:
    reference = torch.randn(in_features, in_channels, dtype=DT)
    net = deep(in_features, reference=reference, residual=residual, in_channels=in_channels, channels=[4, 6, 4, 5])
    x = torch.randn(3, in_features, in_channels, dtype=DT)
    x[:, 1] = reference[1]
    x[0, in_features - 1] = reference[in_features - 1]
    expl = net.explain(x, layers=True)
    assert [z.shape for z in expl.layers] == [(3, in_features, c) for c in net.stage_channels[1:]]
    for z in expl.layers:
        assert z[:, 1].abs().max() < MISSING_ATOL
        assert z[0, in_features - 1].abs().max() < MISSING_ATOL
        assert z[1:, in_features - 1].abs().max() > 1e-6  # the same feature off its reference is not 0
    torch.testing.assert_close(expl.layers[-1], expl.attributions, rtol=0, atol=0)


def test_padded_rows_are_zero_in_every_representation() -> None:
    net = deep(13, reference=torch.randn(13, dtype=DT))
    reps = net.representations(torch.randn(3, 13, 1, dtype=DT))
    assert all(z.shape[1] == 16 for z in reps)
    padding = [r for r in range(16) if r not in live_rows(13)]
    assert max(z[:, padding].abs().max().item() for z in reps) == 0.0


@pytest.mark.parametrize("batch", [1, 3])
def test_representations_accept_the_same_input_as_forward(batch: int) -> None:
    net = deep(6)
    x = torch.randn(batch, 6, dtype=DT)
    reps_2d, reps_3d = net.representations(x), net.representations(x[..., None])
    assert [z.shape for z in reps_2d] == [z.shape for z in reps_3d]
    torch.testing.assert_close(reps_2d[-1], reps_3d[-1], rtol=0, atol=0)


@pytest.mark.parametrize("residual", [True, False])
def test_every_layer_is_the_exact_shapley_representation_of_its_stage(residual: bool) -> None:
    # Layer l is the exact Shapley value of stage l's function sum_pairs f_pair(z_pair), w.r.t.
    # Z^(l-1) (reference r for the first stage, 0 after), plus Z^(l-1) itself when residual.
    net = deep(8, reference=torch.randn(8, 1, dtype=DT), channels=[4, 4], residual=residual)
    x = torch.randn(3, 8, 1, dtype=DT)
    reps = net.representations(x)
    previous, reference = x, net.reference
    for s, (stage, z) in enumerate(zip(net.stages, reps)):
        index = torch.tensor(butterfly_pairs(8, s))

        def stage_function(v: Tensor, stage=stage, index=index) -> Tensor:
            return stage(v[:, index]).sum(1)

        oracle = exact_shapley(stage_function, previous, reference).attributions
        skip = residual and s > 0 and z.shape[-1] == previous.shape[-1]
        torch.testing.assert_close(z, oracle + previous if skip else oracle, rtol=0, atol=ATOL)
        previous, reference = z, torch.zeros(8, z.shape[-1], dtype=DT)


def test_not_exact_end_to_end() -> None:
    # Shapley values do not compose through non-linear layers: the Deep net only keeps local
    # accuracy and missingness. (If this ever became exact, `exact=False` would be wrong.)
    net = deep(8, reference=torch.randn(8, dtype=DT))
    x = torch.randn(2, 8, dtype=DT)
    oracle = exact_shapley(net, x, net.reference)
    assert (net.explain(x).attributions - oracle.attributions).abs().max() > 1e-6


def test_residual_with_changing_channels() -> None:
    # The original code compared D instead of channels and crashed here.
    net = deep(8, channels=[4, 8, 8, 2], residual=True)
    net.explain(torch.randn(2, 8, dtype=DT)).check_local_accuracy()


# ---------------------------------------------------------------------------------------------
# Reference handling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_features", [2, 3])
def test_vector_reference_with_channels_is_ambiguous(in_features: int) -> None:
    # in_channels == D: (D,) could be one value per feature or one per channel.
    with pytest.raises(ValueError, match=r"ambiguous with in_channels=\d: pass \(D, C\)"):
        DeepShapNet(in_features, 2, reference=torch.zeros(in_features), in_channels=in_features)


def test_reference_forms() -> None:
    r = torch.randn(6, dtype=DT)
    torch.testing.assert_close(deep(6, reference=r).reference, r[:, None])
    torch.testing.assert_close(deep(6, reference=r[:, None]).reference, r[:, None])
    torch.testing.assert_close(deep(6, reference=0.5).reference, torch.full((6, 1), 0.5, dtype=DT))
    per_channel = deep(6, reference=torch.tensor([1.0, 2.0]), in_channels=2).reference
    torch.testing.assert_close(per_channel, torch.tensor([[1.0, 2.0]] * 6, dtype=DT))
    with pytest.raises(ValueError, match=r"reference of shape \(5,\) cannot be broadcast to .* shape \(6, 1\)"):
        DeepShapNet(6, 2, reference=torch.zeros(5))


def test_feature_names_reach_the_explanation() -> None:
    names = list("abcdef")
    assert deep(6, feature_names=names).explain(torch.randn(1, 6, dtype=DT)).player_names == names
    with pytest.raises(ValueError, match="5 feature names for 6 features"):
        DeepShapNet(6, 2, feature_names=names[:5])


# ---------------------------------------------------------------------------------------------
# Gradients, dtype and serialization
# ---------------------------------------------------------------------------------------------
def test_gradients_reach_every_parameter() -> None:
    net = deep(8, reference=torch.randn(8, dtype=DT), channels=[4, 4])
    expl = net.explain(torch.randn(4, 8, dtype=DT), layers=True)
    sum(z.square().sum() for z in expl.layers).backward()
    for stage in net.stages:
        # No output bias: a constant shift of a module's output cancels in every Shapley difference.
        assert stage.bias(len(stage.weights) - 1) is None
        for name, p in stage.named_parameters():
            assert p.grad is not None and bool((p.grad.flatten(1).abs().sum(1) > 0).all()), name


def test_double_to_and_state_dict_round_trip(assert_double_round_trip) -> None:
    net = DeepShapNet(6, 3, channels=[4, 4, 4], hidden=(8,), reference=torch.randn(6))
    x = torch.randn(4, 6, dtype=DT)
    assert_double_round_trip(net, DeepShapNet(6, 3, channels=[4, 4, 4], hidden=(8,)).double(), x)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.zeros(6, dtype=DT), ValueError, r"expects input of shape \(B, 6\) or \(B, 6, 1\), got \(6,\)"),
        (torch.zeros(2, 8, dtype=DT), ValueError, r"\(B, 6\) or \(B, 6, 1\), got \(2, 8\)"),
        (torch.zeros(2, 6, 3, dtype=DT), ValueError, r"\(B, 6\) or \(B, 6, 1\), got \(2, 6, 3\)"),
        (torch.zeros(2, 6, dtype=torch.int64), TypeError, "floating-point tensor, got dtype torch.int64"),
        (torch.zeros(2, 6, dtype=torch.float32), TypeError, "input dtype torch.float32 does not match .*float64"),
        (torch.tensor([[float("nan")] * 6], dtype=DT), ValueError, r"6 non-finite value\(s\)"),
        (torch.tensor([[float("inf")] + [0.0] * 5], dtype=DT), ValueError, r"1 non-finite value\(s\)"),
    ],
    ids=["rank", "features", "channels", "int", "dtype-mismatch", "nan", "inf"],
)
def test_rejects_bad_input(x: Tensor, error: type, match: str) -> None:
    net = deep(6)
    with pytest.raises(error, match="DeepShapNet"):
        net(x)
    with pytest.raises(error, match=match):
        net.explain(x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 1, "num_classes": 2}, "at least 2 features, got 1"),
        ({"in_features": 4, "num_classes": -1}, "num_classes must be >= 0 .*got -1, 1"),  # 0: no head (timm)
        ({"in_features": 4, "num_classes": 2, "in_channels": 0}, "in_channels >= 1, got 2, 0"),
    ],
)
def test_constructor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeepShapNet(**kwargs)
