"""One-layer Shapley inners (`hidden=()`): the in-cache coalition path, `output_act`, the conv path without im2col,
and the optional compiled kernel, all against the brute-force oracle in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import shapnets.modules as modules_impl
from shapnets import ConvShapNet, ShapleyConv2d, ShapleyModuleBank, coalitions, compile_coalitions, exact_shapley

DT = torch.float64
ATOL = 1e-10

ACTS = [nn.LeakyReLU, nn.ReLU, nn.GELU, lambda: nn.GELU(approximate="tanh"), nn.Tanh]


def one_layer_bank(k: int = 4, act=nn.LeakyReLU, output_act: bool = True) -> ShapleyModuleBank:
    bank = ShapleyModuleBank(1, k, 2, 3, hidden=(), act_layer=act, output_act=output_act).to(DT)
    if output_act:
        with torch.no_grad():
            bank.biases[0].normal_()  # a bias that moves the kink away from 0
    return bank


def projections(bank: ShapleyModuleBank, x: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """(k, M, C_out) projections W_j (x_j - r_j) and the (C_out,) pre-activation at the reference."""
    w = bank.weights[0][0].view(bank.num_players, bank.in_channels, -1)
    projected = torch.einsum("mkc,kco->kmo", x - reference, w)
    return projected, bank.biases[0][0] + torch.einsum("kc,kco->o", reference, w)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("chunk", [1 << 14, 3])  # one chunk, and many chunks with a ragged last one
def test_projection_path_equals_the_oracle(act, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ShapleyModuleBank, "projection_chunk", chunk)
    bank = one_layer_bank(act=act)
    module = bank.module(0)  # Linear -> act, the inner as a stand-alone network
    x, reference = torch.randn(7, 4, 2, dtype=DT), torch.randn(4, 2, dtype=DT)
    x[2, 1] = reference[1]  # a player at its reference
    projected, at_reference = projections(bank, x, reference)
    with torch.no_grad():
        phi = bank.shapley_from_projections(projected, at_reference)
    oracle = exact_shapley(lambda z: module.inner(z.flatten(1)), x, reference).attributions
    torch.testing.assert_close(phi.transpose(0, 1), oracle, rtol=0, atol=ATOL)
    assert torch.equal(phi[1, 2], torch.zeros(3, dtype=DT))  # exactly 0, not just small
    # The differentiable path (autograd on) gives the same values.
    projected = projected.detach().requires_grad_(True)
    phi_grad = bank.shapley_from_projections(projected, at_reference)
    torch.testing.assert_close(phi_grad, phi, rtol=0, atol=ATOL)
    assert torch.equal(phi_grad[1, 2].detach(), torch.zeros(3, dtype=DT))
    phi_grad.sum().backward()
    assert projected.grad is not None and projected.grad.abs().sum() > 0


def test_linear_inner_projections_are_the_shapley_values() -> None:
    bank = one_layer_bank(output_act=False)
    projected = torch.randn(4, 5, 3, dtype=DT)
    assert bank.shapley_from_projections(projected, torch.zeros(3, dtype=DT)) is projected


def test_projection_path_validation() -> None:
    with pytest.raises(ValueError, match="needs a one-layer inner"):
        ShapleyModuleBank(1, 4, 2, 3, hidden=(8,)).shapley_from_projections(torch.zeros(4, 1, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"projected must be \(k=4, M, C_out\)"):
        one_layer_bank().shapley_from_projections(torch.zeros(3, 1, 3, dtype=DT), torch.zeros(3, dtype=DT))


def test_output_act_bank_matches_its_module_and_dense_path() -> None:
    bank = one_layer_bank()
    assert "output_act=True" in repr(bank) and isinstance(bank.module(0).inner[-1], nn.LeakyReLU)
    x, reference = torch.randn(6, 1, 4, 2, dtype=DT), torch.randn(1, 4, 2, dtype=DT)
    torch.testing.assert_close(bank(x)[:, 0], bank.module(0)(x[:, 0]), rtol=0, atol=ATOL)
    phi, base, output = bank.shapley(x - reference, reference)  # the generic (coalition tensor) path
    oracle = exact_shapley(lambda z: bank.module(0).inner(z.flatten(1)), x[:, 0], reference[0]).attributions
    torch.testing.assert_close(phi[:, 0], oracle, rtol=0, atol=ATOL)
    torch.testing.assert_close(output, bank(x), rtol=0, atol=ATOL)
    torch.testing.assert_close(base[0], bank(reference), rtol=0, atol=ATOL)
    # The skipping path applies the output activation too.
    delta = x - reference
    delta[:3, :, 1:] = 0.0
    bank.skip_threshold = 0.0
    phi_skip, _, _ = bank.shapley(delta, reference, skip_inactive=True)
    phi_dense, _, _ = bank.shapley(delta, reference)
    torch.testing.assert_close(phi_skip, phi_dense, rtol=0, atol=ATOL)


@pytest.mark.parametrize("output_act", [True, False])
@pytest.mark.parametrize(
    ("height", "width", "kernel_size", "dilation", "nonzero_reference"),
    [(4, 4, 2, 1, True), (3, 5, (1, 3), 1, True), (3, 4, 2, (1, 2), False), (2, 3, 2, 4, True)],
)
def test_one_layer_conv_equals_the_oracle(height, width, kernel_size, dilation, nonzero_reference, output_act) -> None:
    layer = ShapleyConv2d(2, 3, kernel_size, dilation, hidden=(), act_layer=nn.LeakyReLU, output_act=output_act)
    layer = layer.to(DT)
    if output_act:
        with torch.no_grad():
            layer.bank.biases[0].normal_()
    reference = torch.randn(2, dtype=DT) if nonzero_reference else torch.zeros(2, dtype=DT)
    x = torch.randn(1, height, width, 2, dtype=DT)
    x[0, 1, 1] = reference  # a pixel at the reference: exactly 0

    def sum_over_patches(pixels: Tensor) -> Tensor:
        z = pixels.reshape(-1, height, width, 2)
        return layer.bank(layer.patches(z - reference)[..., None, :, :] + reference).sum((1, 2, 3))

    oracle = exact_shapley(sum_over_patches, x.reshape(1, height * width, 2), reference, max_batch=2**16)
    ref_arg = reference if nonzero_reference else None
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            rep = layer(x - reference, ref_arg)
        torch.testing.assert_close(rep.reshape(1, height * width, 3), oracle.attributions, rtol=0, atol=ATOL)
        assert torch.equal(rep[0, 1, 1].detach(), torch.zeros(3, dtype=DT))


def test_original_architecture_net_local_accuracy_and_gradients() -> None:
    # The original code's DeepConvShapNet: Linear + LeakyReLU inners, no residual (11,706 parameters at MNIST size).
    net = ConvShapNet(1, 10, channels=(16, 32, 32, 32), kernel_size=2, dilations=(1, 2, 4, 8, 16), hidden=(),
                      act_layer=nn.LeakyReLU, residual=False, output_act=True)
    assert sum(p.numel() for p in net.parameters()) == 11706
    net = net.to(DT)
    x = torch.randn(2, 1, 9, 7, dtype=DT)
    x[:, :, 4, 4] = 0.0
    expl = net.explain(x, layers=True)
    torch.testing.assert_close(expl.output, expl.attributions.sum((1, 2)), rtol=0, atol=0)
    assert all(torch.equal(z[:, 4, 4], torch.zeros_like(z[:, 4, 4])) for z in expl.layers)
    net(x).sum().backward()
    # (A bias's gradient is sigma'(full) - sigma'(empty) summed over patches: 0 when no patch crosses the kink.)
    assert all(p.grad is not None for p in net.parameters())
    assert all(stage.bank.weights[0].grad.abs().sum() > 0 for stage in net.stages)


def test_compile_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(modules_impl, "_COMPILED", {})
    bank = one_layer_bank()
    x, reference = torch.randn(5, 4, 2, dtype=DT), torch.randn(4, 2, dtype=DT)
    projected, at_reference = projections(bank, x, reference)
    with torch.no_grad():
        eager = bank.shapley_from_projections(projected, at_reference)
        compile_coalitions(bank)
        with pytest.warns(RuntimeWarning, match="torch.compile is not usable here"):
            first = bank.shapley_from_projections(projected, at_reference)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            second = bank.shapley_from_projections(projected, at_reference)
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_fused_kernel_eager_equals_the_oracle() -> None:
    # The expression that torch.compile fuses, run eagerly: same values, exact zeros.
    bank = one_layer_bank(act=nn.GELU)
    x, reference = torch.randn(6, 4, 2, dtype=DT), torch.randn(4, 2, dtype=DT)
    x[3, 0] = reference[0]
    projected, at_reference = projections(bank, x, reference)
    signed = coalitions.signed_weights(4).T.contiguous()
    with torch.no_grad():
        fused = modules_impl._fused_one_layer_phi(projected, at_reference, signed, "gelu_none", 0.0)
        torch.testing.assert_close(fused, bank.shapley_from_projections(projected, at_reference), rtol=0, atol=ATOL)
    assert torch.equal(fused[0, 3], torch.zeros(3, dtype=DT))


@pytest.mark.slow
def test_compiled_kernel_equals_the_oracle() -> None:
    # Compiles (a minute or more on a small CPU): slow.
    bank = compile_coalitions(one_layer_bank())
    module = bank.module(0)
    x, reference = torch.randn(9, 4, 2, dtype=DT), torch.randn(4, 2, dtype=DT)
    x[4, 2] = reference[2]
    projected, at_reference = projections(bank, x, reference)
    with torch.no_grad():
        phi = bank.shapley_from_projections(projected, at_reference)
    oracle = exact_shapley(lambda z: module.inner(z.flatten(1)), x, reference).attributions
    torch.testing.assert_close(phi.transpose(0, 1), oracle, rtol=0, atol=ATOL)
    assert torch.equal(phi[2, 4], torch.zeros(3, dtype=DT))
    assert modules_impl._COMPILED.get("fn") is not None
