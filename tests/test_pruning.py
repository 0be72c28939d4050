"""Instance-based pruning and the skip path: exact counts, skip == masked computation, guarantees kept."""

from __future__ import annotations

import math

import pytest
import torch

from shapnets import ConvShapNet, DeepShapNet, ShapleyModuleBank, prune_players
from shapnets.pruning import configure_pruning, prune_listed

F64 = torch.float64


def test_prune_count_is_exact_without_ties() -> None:
    z = torch.randn(5, 13, 4, dtype=F64)
    for p in (0.0, 0.1, 0.3, 0.5, 0.99, 1.0):
        out = prune_players(z, p)
        zeroed = (out.abs().sum(-1) == 0).sum(1)
        assert torch.equal(zeroed, torch.full((5,), math.floor(p * 13)))


def test_prune_removes_the_smallest_norms_per_sample() -> None:
    z = torch.randn(3, 20, 2, dtype=F64)
    out = prune_players(z, 0.25)
    norms = z.abs().sum(-1)
    for b in range(3):
        pruned = out[b].abs().sum(-1) == 0
        assert norms[b][pruned].max() <= norms[b][~pruned].min()


def test_prune_tie_rule_lower_index_first() -> None:
    z = torch.ones(1, 6, 1, dtype=F64)  # all norms tie
    out = prune_players(z, 0.5)
    assert torch.equal(out[0, :, 0], torch.tensor([0, 0, 0, 1, 1, 1], dtype=F64))


def test_prune_counts_only_real_players() -> None:
    z = torch.randn(2, 8, 3, dtype=F64)
    rows = torch.tensor([0, 2, 3, 5, 6, 7])
    z[:, [1, 4]] = 0  # padding rows
    out = prune_players(z, 0.5, rows)
    assert ((out[:, rows].abs().sum(-1) == 0).sum(1) == 3).all()


def test_prune_fraction_validation() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prune_players(torch.randn(1, 4, 1), 1.5)
    with pytest.raises(ValueError, match="pruning fractions"):
        DeepShapNet(8, 2, prune=[0.1, 2.0, 0.0])
    with pytest.raises(ValueError, match="3 stages need 3 pruning fractions"):
        DeepShapNet(8, 2, prune=[0.1, 0.2])


@pytest.mark.parametrize("groups,k", [(1, 4), (6, 2), (3, 3)])
def test_bank_skip_path_equals_dense(groups: int, k: int) -> None:
    bank = ShapleyModuleBank(groups, k, 3, 4, (8,)).double()
    delta = torch.randn(4, 5, groups, k, 3, dtype=F64)
    delta[torch.rand(4, 5, groups, k) < 0.5] = 0
    delta[0] = 0
    reference = torch.randn(groups, k, 3, dtype=F64)
    for ref in (None, reference):
        dense = bank.shapley(delta, ref)
        bank.reset_stats()
        sparse = bank.shapley(delta, ref, skip_inactive=True)
        for a, b in zip(dense, sparse):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        stats = bank.stats
        assert stats["module_evals_skipped"] == int((delta.ne(0).any(-1).any(-1) == 0).sum())
        assert 0 < stats["coalition_evals_skipped"] < stats["coalition_evals"]


def test_pair_with_one_input_at_reference_needs_two_coalitions() -> None:
    bank = ShapleyModuleBank(1, 2, 1, 3, (4,)).double()
    delta = torch.tensor([[[[1.5], [0.0]]]], dtype=F64)  # (1, G=1, k=2, C=1)
    bank.reset_stats()
    phi, _, _ = bank.shapley(delta, skip_inactive=True)
    assert bank.stats["coalition_evals"] - bank.stats["coalition_evals_skipped"] == 2
    assert torch.equal(phi[0, 0, 1], torch.zeros(3, dtype=F64))


def test_skip_path_gradients_match_dense() -> None:
    torch.manual_seed(1)
    net = DeepShapNet(8, 3, channels=4, skip_inactive=True).double()
    x = torch.randn(6, 8, dtype=F64)
    x[:, :3] = 0  # at the reference: stage-0 pairs (0,1) fully inactive, (2,3) half
    grads = []
    for skip in (True, False):
        net.skip_inactive = skip
        net.zero_grad()
        net(x).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("residual", [True, False])
def test_deep_pruned_skip_equals_masked(residual: bool) -> None:
    torch.manual_seed(2)
    net = DeepShapNet(13, 3, channels=6, residual=residual, prune=[0.3, 0.5, 0.2, 0.1, 0.0]).double().eval()
    x = torch.randn(7, 13, dtype=F64)
    skipped = net.explain(x, layers=True)
    net.skip_inactive = False
    masked = net.explain(x, layers=True)
    for a, b in zip(skipped.layers, masked.layers):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    skipped.check_local_accuracy()
    # Pruned rows are exactly the reference (0); the counts per stage are exact.
    for z, p in zip(skipped.layers, net.prune):
        if p:
            assert ((z.abs().sum(-1) == 0).sum(1) >= math.floor(p * 13)).all()


def test_deep_pruning_is_off_in_training_unless_asked() -> None:
    net = DeepShapNet(8, 2, channels=4, prune=0.5).double()
    x = torch.randn(3, 8, dtype=F64)
    net.train()
    assert (net.explain(x, layers=True).layers[0].abs().sum(-1) == 0).sum() == 0
    net.prune_during_training = True
    assert ((net.explain(x, layers=True).layers[0].abs().sum(-1) == 0).sum(1) == 4).all()


def test_deep_missingness_under_pruning() -> None:
    net = DeepShapNet(10, 3, channels=5, prune=0.2, reference=torch.randn(10)).double().eval()
    x = torch.randn(4, 10, dtype=F64)
    x[:, 4] = net.reference[4, 0]
    e = net.explain(x, layers=True)
    for z in e.layers:
        assert torch.equal(z[:, 4], torch.zeros_like(z[:, 4]))
    assert e.local_accuracy_error() < 1e-12


def test_conv_pruned_skip_equals_masked_and_reports_savings() -> None:
    torch.manual_seed(3)
    net = ConvShapNet(2, 4, channels=(5, 5), hidden=(8,), prune=[0.4, 0.3, 0.0]).double().eval()
    x = torch.randn(3, 2, 9, 7, dtype=F64)
    x[:, :, :4] = 0  # a band at the reference: patches there are never evaluated
    net.evaluation_stats(reset=True)
    skipped = net.explain(x, layers=True)
    stats = net.evaluation_stats(reset=True)
    net.skip_inactive = False
    masked = net.explain(x, layers=True)
    for a, b in zip(skipped.layers, masked.layers):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    skipped.check_local_accuracy()
    assert stats["module_evals_skipped"] > 0.15 * stats["module_evals"]
    assert stats["coalition_evals_skipped"] >= stats["module_evals_skipped"] * 4
    for z, p in zip(skipped.layers, net.prune):
        if p:
            assert ((z.abs().sum(-1) == 0).flatten(1).sum(1) >= math.floor(p * 63)).all()


@pytest.mark.parametrize(("mode", "fraction"), [("all", 0.3), ("all", 0.7), ("active", 0.3), ("active", 0.6),
                                                ("threshold", 0.4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: the integer-key path, float64: sorts
def test_prune_listed_chooses_what_prune_players_prunes(mode: str, fraction: float, dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    for i in range(20):
        z = torch.randn(4, 30, 3, dtype=dtype) * (torch.rand(4, 30, 1) < 0.5)
        z[:, ::6] = z[:, 1:2]  # ties in the norm: the lower index goes first in both
        # The active players exactly, or a superset (allowed: listed players at the reference)
        listed = z.ne(0).any(-1) | (torch.rand(4, 30) < 0.2 * (i % 2))
        rows = listed.flatten().nonzero().squeeze(1)
        flat = z.reshape(-1, 3).clone()
        chosen = prune_listed(flat[rows].abs().sum(-1), rows // 30, 4, 30, fraction, mode)
        flat[rows[chosen]] = 0
        assert torch.equal(flat.view_as(z), prune_players(z, fraction, mode=mode))


def test_prune_listed_names_bad_fractions() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_listed(torch.ones(3), torch.zeros(3, dtype=torch.long), 1, 3, 1.0, "active")


@pytest.mark.parametrize(("mode", "fractions"), [("active", [0.5, 0.3, 0.0]), ("threshold", [0.3, 0.2, 0.0]),
                                                 ("all", [0.6, 0.5, 0.0])])
def test_conv_pruning_modes_skip_equals_masked_with_gradients(mode: str, fractions: list[float]) -> None:
    """The skip path ranks only the pixels it carries as possibly active: values and gradients are the dense ones."""
    torch.manual_seed(4)
    net = ConvShapNet(2, 3, channels=(4, 4), hidden=(6,), prune=fractions, prune_mode=mode,
                      prune_during_training=True).double()
    x = torch.randn(3, 2, 8, 6, dtype=F64)
    x[:, :, :3] = 0
    results = []
    for skip in (True, False):
        net.skip_inactive = skip
        net.zero_grad()
        reps = net.representations(x)
        reps[-1].sum((1, 2)).square().sum().backward()
        results.append(([r.detach() for r in reps], [p.grad.clone() for p in net.parameters()]))
    (skipped, grads_skip), (masked, grads_masked) = results
    for a, b in zip(skipped, masked):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(grads_skip, grads_masked):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    pruned = (skipped[0].abs().sum(-1) == 0).flatten(1).sum(1)
    assert (pruned > (x[:, :, :3] == 0).all(1).flatten(1).sum(1)).all()  # more than the reference band went
    net.eval().skip_inactive = True
    e = net.explain(x)
    e.check_local_accuracy()
    assert (e.attributions[:, :3] == 0).all()  # missingness: the band at the reference gets exactly 0


def test_conv_input_pruning_skips_the_first_stage_too_and_keeps_the_guarantees() -> None:
    torch.manual_seed(6)
    net = ConvShapNet(2, 3, channels=(4, 4), hidden=(6,), prune=[0.2, 0.2, 0.0], prune_mode="active").double().eval()
    x = torch.randn(3, 2, 8, 6, dtype=F64)
    x[:, :, :3] = 0
    net.evaluation_stats(reset=True)
    plain = net.explain(x)
    before = net.evaluation_stats(reset=True)
    configure_pruning(net, [0.2, 0.2, 0.0], "active", input_fraction=0.5)
    pruned = net.explain(x, layers=True)
    after = net.evaluation_stats(reset=True)
    done = {k: v["coalition_evals"] - v["coalition_evals_skipped"] for k, v in (("before", before), ("after", after))}
    assert done["after"] < 0.7 * done["before"]
    pruned.check_local_accuracy()
    # Half of each image's 30 active pixels (floor) went to the reference before stage 0: their attributions and
    # every layer's values there are exactly 0, as for the band that was at the reference already.
    zero = (pruned.attributions.abs().sum(-1) == 0).flatten(1).sum(1)
    assert (zero >= 18 + 15).all()
    net.skip_inactive = False
    masked = net.explain(x, layers=True)
    for a, b in zip(pruned.layers, masked.layers):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(plain.attributions, pruned.attributions)


def test_input_pruning_is_named_in_errors() -> None:
    with pytest.raises(ValueError, match=r"prune_input.*\[0, 1\)"):
        ConvShapNet(1, 2, channels=(3,), prune_mode="active", prune_input=1.0)
    with pytest.raises(ValueError, match="no input pruning"):
        configure_pruning(DeepShapNet(4, 2), 0.1, "active", input_fraction=0.2)
