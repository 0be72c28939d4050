"""The Shapley-kernel fidelity term: sampler, unbiasedness, minimiser, training effect and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from shapnets import ConvShapNet, DeepShapNet, coalition_masks, exact_shapley
from shapnets import fidelity as fid
from training.config import ConfigError, LossConfig
from training.losses import ExplanationFidelity, ModelStep, Objective, build_loss_terms


def _interacting(model: nn.Module, scale: float = 3.0) -> nn.Module:
    """Scale every weight: a randomly initialised ShapNet is nearly additive (and its last stage starts at 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p)).mul_(scale)
    return model


def _terms(model: nn.Module, **kwargs) -> list:
    return build_loss_terms(LossConfig(terms=[{"name": "explanation_fidelity", **kwargs}]), model)


def test_kernel_probabilities_match_the_shapley_kernel() -> None:
    n = 6
    p = fid.shapley_kernel_probabilities(n)
    sizes = coalition_masks(n).sum(1).long()
    kernel = torch.tensor([0.0 if k in (0, n) else (n - 1) / (math.comb(n, k) * k * (n - k)) for k in sizes.tolist()],
                          dtype=torch.float64)
    torch.testing.assert_close(p, kernel / kernel.sum())
    torch.testing.assert_close(fid.kernel_size_probabilities(n).sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("paired", [True, False])
def test_sampler_draws_the_kernel_distribution(paired: bool) -> None:
    n, draws = 5, 40_000
    torch.manual_seed(0)
    masks = fid.sample_kernel_coalitions(1, n, draws, paired=paired)[0]
    index = (masks.long() * (1 << torch.arange(n))).sum(1)  # coalition_masks order: members = set bits
    freq = torch.bincount(index, minlength=2**n).double() / draws
    p = fid.shapley_kernel_probabilities(n)
    assert freq[0] == 0 and freq[-1] == 0
    # Each coalition's frequency within 5 binomial standard errors of its probability.
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / draws).sqrt() + 1e-12).all()
    if paired:
        assert torch.equal(masks[draws // 2:], ~masks[: draws // 2])


@pytest.mark.parametrize("paired", [True, False])
def test_estimator_is_unbiased(paired: bool) -> None:
    """The mean squared gap over many sampled coalitions converges to the exactly weighted sum."""
    torch.manual_seed(0)
    D = 5
    model = _interacting(DeepShapNet(D, 2, channels=4, hidden=(8,))).double().eval()
    x = torch.randn(3, D, dtype=torch.float64)
    phi = model.explain(x).attributions.detach()
    exact = fid.exact_fidelity_objective(phi, model, x)  # (B, C)
    draws = 20_000
    coalitions = fid.sample_kernel_coalitions(3, D, draws, paired=paired)
    with torch.no_grad():
        values = model(fid.masked_inputs(x, model.reference.reshape(D), coalitions, torch.arange(D))).view(3, draws, 2)
        squares = fid.fidelity_gaps(phi, values, model.explain(x).base, coalitions).square()
    estimate = squares.mean(1)
    stderr = squares.std(1) / math.sqrt(draws) * (2 if paired else 1)  # paired draws are not independent
    assert ((estimate - exact).abs() <= 5 * stderr + 1e-12).all(), (estimate, exact)


@pytest.mark.parametrize("paired", [True, False])
def test_two_permutation_estimates_give_the_squared_distance_without_bias(paired: bool) -> None:
    """E[(phi - psi_1)(phi - psi_2)] over independent permutation estimates is ||phi - phi*||^2 exactly."""
    torch.manual_seed(0)
    D, B, C = 5, 3, 2
    model = _interacting(DeepShapNet(D, C, channels=4, hidden=(8,))).double().eval()
    x = torch.randn(B, D, dtype=torch.float64)
    expl = model.explain(x)
    phi = expl.attributions.detach()
    shapley = exact_shapley(model, x).attributions
    draws = 4000
    ranks = fid.sample_permutation_ranks(B, D, draws, antithetic=paired)
    with torch.no_grad():
        coalitions = fid.prefix_coalitions(ranks, D).reshape(B, -1, D)
        values = model(fid.masked_inputs(x, model.reference.reshape(D), coalitions, torch.arange(D)))
        values = values.view(B, draws, D - 1, C)
    psi = fid.permutation_estimates(ranks, values, expl.base, expl.output)  # (B, draws, D, C)
    torch.testing.assert_close(psi.sum(2), (expl.output - expl.base)[:, None].expand(B, draws, C))
    if paired:  # keep antithetic pairs together: estimate j = (order j, its reverse)
        psi = torch.stack([psi[:, : draws // 2], psi[:, draws // 2:]], 2).mean(2)
    first, second = psi[:, 0::2], psi[:, 1::2]  # independent pairs of estimates
    products = ((phi[:, None] - first) * (phi[:, None] - second)).sum(2)  # (B, pairs, C)
    truth = (phi - shapley).square().sum(1)
    stderr = products.std(1) / math.sqrt(products.shape[1])
    assert ((products.mean(1) - truth).abs() <= 5 * stderr + 1e-12).all(), (products.mean(1), truth)
    spread = psi.std(1) / math.sqrt(psi.shape[1])
    assert ((psi.mean(1) - shapley).abs() <= 5 * spread + 1e-12).all()


def test_minimiser_is_the_shapley_value() -> None:
    """Among explanations with the right total, the exact objective is smallest at the Shapley values."""
    torch.manual_seed(1)
    D = 5
    model = _interacting(DeepShapNet(D, 2, channels=4, hidden=(8,))).double().eval()
    x = torch.randn(2, D, dtype=torch.float64)
    shapley = exact_shapley(model, x).attributions
    at_shapley = fid.exact_fidelity_objective(shapley, model, x)
    own = fid.exact_fidelity_objective(model.explain(x).attributions.detach(), model, x)
    assert (own >= at_shapley - 1e-12).all()
    for _ in range(5):
        noise = torch.randn_like(shapley)
        noise = 0.1 * (noise - noise.mean(1, keepdim=True))  # zero-sum: the efficiency constraint still holds
        assert (fid.exact_fidelity_objective(shapley + noise, model, x) > at_shapley).all()


def _own_error(model: DeepShapNet, x: torch.Tensor) -> float:
    with torch.no_grad():
        model64 = model.double()
        own = model64.explain(x.double()).attributions
        exact = exact_shapley(model64, x.double()).attributions
        model.float()
    return float((own - exact).norm() / exact.norm())


def test_training_with_the_term_moves_the_explanation_to_the_shapley_values() -> None:
    """Sixty steps on a tiny Deep ShapNet: the own error falls clearly; local accuracy and missingness hold."""
    torch.manual_seed(0)
    D = 4
    # Strong interactions, so the layer-wise explanation starts far from the network's Shapley values.
    model = _interacting(DeepShapNet(D, 2, channels=4, hidden=(8,)))
    x_train = torch.randn(256, D)
    y_train = (x_train[:, 0] * x_train[:, 1] + x_train[:, 2] > 0).long()
    x_test = torch.randn(16, D)
    before = _own_error(model, x_test)
    objective = Objective(_terms(model, weight=10.0, permutations=2))
    step = ModelStep(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(x_train), (16,), generator=generator)
        out = objective.forward(step, x_train[idx], y_train[idx])
        loss, _ = objective(out, y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _own_error(model, x_test)
    print(f"own error vs exact_shapley: {before:.4f} -> {after:.4f}")
    assert after < 0.4 * before, (before, after)
    with torch.no_grad():
        model64 = model.double()
        x64 = x_test.double()
        expl = model64.explain(x64)
        assert expl.local_accuracy_error() < 1e-12
        assert (expl.output - model64(x64)).abs().max() < 1e-12
        moved = x64.clone()
        moved[:, 1] = 0.0  # the reference
        assert model64.explain(moved).attributions[:, 1].abs().max() < 1e-12


def test_conv_patch_game_runs_and_keeps_missingness() -> None:
    torch.manual_seed(0)
    model = ConvShapNet(1, 3, channels=(4,), hidden=(8,), reference=0.0)
    term = _terms(model, weight=1.0, permutations=2, patch=2)[0]
    objective = Objective([term])
    x = torch.randn(2, 1, 4, 4)
    out = objective.forward(ModelStep(model), x, torch.tensor([0, 1]))
    loss, parts = objective(out, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(parts["explanation_fidelity"]) and parts["explanation_fidelity"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    players = fid.patch_players(4, 4, 2)
    assert players.max() == 3 and torch.equal(players[:2, :2], torch.zeros(2, 2, dtype=torch.long))
    phi = fid.player_sums(out.explanation.attributions, players, 4)
    torch.testing.assert_close(phi.sum(1), out.explanation.output - out.explanation.base)


@pytest.mark.parametrize("estimator", ["permutation", "kernel"])
def test_restricted_game_runs(estimator: str) -> None:
    torch.manual_seed(0)
    model = _interacting(DeepShapNet(6, 2, channels=4, hidden=(8,)))
    terms = _terms(model, weight=1.0, estimator=estimator, keep_players=3)
    objective = Objective(terms)
    assert not objective.needs_explanation  # the term explains the restricted input itself
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 0, 1])
    loss, parts = objective(objective.forward(ModelStep(model), x, y), y)
    assert torch.isclose(parts["loss"], parts["ce"] + parts["explanation_fidelity"])
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weight": -1.0}, "weight must be a finite number >= 0"),
    ({"weight": float("nan")}, "weight must be a finite number >= 0"),
    ({"coalitions": 0}, "coalitions .* must be an integer >= 1"),
    ({"coalitions": 3, "estimator": "kernel"}, "coalitions must be even"),
    ({"permutations": 0}, "permutations .* must be an integer >= 1"),
    ({"permutations": 3}, "permutations must be even"),
    ({"estimator": "lime"}, "estimator must be one of"),
    ({"target": "best"}, "target must be one of"),
    ({"patch": 0}, "patch must be an integer >= 1"),
    ({"keep_players": 1}, "keep_players must be an integer >= 2"),
])
def test_bad_settings_fail_when_the_terms_are_built(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _terms(DeepShapNet(4, 2, channels=4, hidden=(8,)), **kwargs)


def test_a_model_without_an_explanation_is_refused() -> None:
    with pytest.raises(ConfigError, match="has no explanation of its own"):
        _terms(nn.Sequential(nn.Linear(4, 2)), weight=1.0)


def test_unbound_term_says_so() -> None:
    term = ExplanationFidelity(weight=1.0)
    with pytest.raises(RuntimeError, match="not bound to a model"):
        term(None, torch.zeros(1))  # type: ignore[arg-type]


@pytest.mark.parametrize("term", ["{name: explanation_fidelity, weight: -0.5}",
                                  "{name: explanation_fidelity, weight: 1.0, coalitions: 0}"])
def test_trainer_refuses_bad_fidelity_settings_before_writing_a_run(tmp_path, term: str) -> None:
    from training.config import load_config
    from training.data import ArrayDataset, DataBundle, DatasetInfo
    from training.trainer import train

    x = torch.randn(16, 4)
    data = ArrayDataset(x, (x[:, 0] > 0).long())
    info = DatasetInfo(name="toy", num_classes=2, input_shape=(4,), class_names=["a", "b"],
                       feature_names=[f"f{i}" for i in range(4)], reference=[0.0] * 4)
    with pytest.raises(ConfigError, match="explanation_fidelity"):  # when the config is read, or before training
        cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "name=toy", "model.name=shapnet_deep",
                                 "model.args.channels=4", "data.batch_size=8", "train.epochs=1",
                                 f"loss.terms=[{term}]"])
        train(cfg, data=DataBundle(data, data, data, info))
    assert not (tmp_path / "run" / "last.pt").exists()
