"""Explanation regularizers: hand-computed values, target selection, per-layer weights, gradients."""

from __future__ import annotations

import pytest
import torch

from shapnets import ConvShapNet, DeepShapNet, Explanation, explanation_penalty, l1_sparsity, linf_spreading


def _hand_case() -> torch.Tensor:
    # (B=2, players=3, C=2)
    return torch.tensor(
        [[[1.0, -2.0], [0.5, 0.0], [-3.0, 1.0]],
         [[0.0, 0.0], [2.0, -1.0], [1.0, 4.0]]]
    )


def test_l1_hand_computed() -> None:
    z = _hand_case()
    # sample 0: 1+2+0.5+0+3+1 = 7.5 ; sample 1: 0+0+2+1+1+4 = 8 ; mean 7.75
    assert l1_sparsity(z).item() == pytest.approx(7.75)
    # target channels: sample 0 -> c1: 2+0+1 = 3 ; sample 1 -> c0: 0+2+1 = 3
    assert l1_sparsity(z, torch.tensor([1, 0])).item() == pytest.approx(3.0)


def test_linf_hand_computed() -> None:
    z = _hand_case()
    # sample 0: max|c0| = 3, max|c1| = 2 -> 5 ; sample 1: 2 + 4 = 6 ; mean 5.5
    assert linf_spreading(z).item() == pytest.approx(5.5)
    assert linf_spreading(z, torch.tensor([1, 1])).item() == pytest.approx((2 + 4) / 2)


def test_penalty_all_layers_with_weights() -> None:
    layers = [torch.ones(2, 3, 4), 2 * torch.ones(2, 3, 2)]
    out = layers[-1].sum(1)
    e = Explanation(attributions=layers[-1], base=torch.zeros_like(out), output=out, layers=layers)
    assert explanation_penalty(e, "l1", "final").item() == pytest.approx(12.0)
    assert explanation_penalty(e, "l1", "all").item() == pytest.approx(12.0 + 12.0)
    assert explanation_penalty(e, "l1", "all", layer_weights=[0.5, 2.0]).item() == pytest.approx(6.0 + 24.0)
    with pytest.raises(ValueError, match="2 layers but 1 layer_weights"):
        explanation_penalty(e, "l1", "all", layer_weights=[1.0])
    with pytest.raises(ValueError, match="unknown penalty kind"):
        explanation_penalty(e, "l2")  # type: ignore[arg-type]
    e.layers = None
    with pytest.raises(ValueError, match="layers=True"):
        explanation_penalty(e, "linf", "all")


@pytest.mark.parametrize("kind", ["l1", "linf"])
def test_gradients_reach_every_layer(kind: str) -> None:
    for net, x in [
        (DeepShapNet(8, 3, channels=[4, 5]), torch.randn(4, 8)),
        (ConvShapNet(1, 3, channels=(4,), hidden=(6,)), torch.randn(2, 1, 6, 6)),
    ]:
        e = net.explain(x, layers=True)
        for z in e.layers:
            z.retain_grad()
        explanation_penalty(e, kind, "all").backward()
        for i, z in enumerate(e.layers):
            assert z.grad is not None and z.grad.abs().sum() > 0, f"layer {i} got no gradient"
        for name, p in net.named_parameters():
            assert p.grad is not None, name


def test_loss_terms_from_config_use_the_same_forward_pass() -> None:
    from training.config import ConfigError, LossConfig
    from training.losses import ModelStep, Objective, build_loss_terms

    net = DeepShapNet(8, 3, channels=[4, 4]).double()
    terms = build_loss_terms(LossConfig(terms=[
        {"name": "explanation_l1", "weight": 0.5, "layers": "all"},
        {"name": "explanation_linf", "weight": 0.1, "target": "label"},
    ]))
    objective = Objective(terms)
    assert objective.needs_explanation and objective.needs_layers
    x, y = torch.randn(5, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    out = objective.forward(ModelStep(net), x)
    torch.testing.assert_close(out.logits, net(x))  # the logits are the explanation's output
    total, parts = objective(out, y)
    expected_l1 = explanation_penalty(out.explanation, "l1", "all")
    expected_linf = explanation_penalty(out.explanation, "linf", "final", y)
    torch.testing.assert_close(parts["explanation_l1_all_layers"], expected_l1.detach())
    torch.testing.assert_close(parts["explanation_linf"], expected_linf.detach())
    torch.testing.assert_close(total, parts["ce"] + 0.5 * expected_l1 + 0.1 * expected_linf)
    with pytest.raises(ConfigError, match="target must be one of"):
        build_loss_terms(LossConfig(terms=[{"name": "explanation_l1", "target": "everything"}]))
