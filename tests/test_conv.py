"""Convolutional ShapNet: one layer against the oracle, local accuracy, per-pixel missingness, validation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from shapnets import ConvShapNet, ShapleyConv2d, exact_shapley

DT = torch.float64
ATOL = 1e-10
MISSING_ATOL = 1e-13  # "exactly zero" up to float64 rounding


def conv(in_chans: int = 2, reference=None, **kwargs) -> ConvShapNet:
    kwargs.setdefault("channels", (4, 4))
    kwargs.setdefault("hidden", (8,))
    return ConvShapNet(in_chans, 3, reference=reference, **kwargs).to(DT)


# ---------------------------------------------------------------------------------------------
# One ShapleyConv2d layer is a Shallow ShapNet of sum_patches f(patch)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("height", "width", "kernel_size", "dilation", "nonzero_reference"),
    [(4, 4, 2, 1, True), (4, 4, 2, 2, False), (3, 5, (1, 3), 1, True), (3, 4, 2, (1, 2), True)],
)
def test_one_layer_equals_the_oracle(height, width, kernel_size, dilation, nonzero_reference: bool) -> None:
    layer = ShapleyConv2d(2, 3, kernel_size, dilation, hidden=(8,)).to(DT)
    reference = torch.randn(2, dtype=DT) if nonzero_reference else torch.zeros(2, dtype=DT)
    x = torch.randn(1, height, width, 2, dtype=DT)  # channel-last; 2^16 coalitions for 4x4
    rep = layer(x - reference, reference if nonzero_reference else None)
    assert rep.shape == (1, height, width, 3)

    def sum_over_patches(pixels: Tensor) -> Tensor:
        # Patches beyond the border are filled with the reference, as in the layer.
        z = pixels.reshape(-1, height, width, 2)
        return layer.bank(layer.patches(z - reference)[..., None, :, :] + reference).sum((1, 2, 3))

    oracle = exact_shapley(sum_over_patches, x.reshape(1, height * width, 2), reference, max_batch=2**16)
    torch.testing.assert_close(rep.reshape(1, height * width, 3), oracle.attributions, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# ConvShapNet: local accuracy, missingness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize(("height", "width"), [(8, 8), (5, 7), (3, 8), (1, 1)])
def test_shape_local_accuracy_and_reference(height: int, width: int, residual: bool) -> None:
    reference = torch.tensor([0.3, -0.2], dtype=DT)
    net = conv(reference=reference, residual=residual)
    x = torch.randn(2, 2, height, width, dtype=DT)
    expl = net.explain(x)
    assert expl.attributions.shape == (2, height, width, 3) and not expl.exact
    assert expl.player_axes == ("height", "width")
    torch.testing.assert_close(expl.output, expl.attributions.sum((1, 2)), rtol=0, atol=0)
    torch.testing.assert_close(expl.output, net(x), rtol=0, atol=ATOL)
    assert torch.equal(expl.base, torch.zeros_like(expl.base))
    expl.check_local_accuracy()
    at_reference = reference[None, :, None, None].expand(1, 2, height, width)
    assert net(at_reference).abs().max() < MISSING_ATOL  # g(reference) == 0


@pytest.mark.parametrize("residual", [True, False])
def test_pixel_at_reference_is_zero_at_every_layer(residual: bool) -> None:
    reference = torch.tensor([0.5, -1.0, 0.25], dtype=DT)
    net = conv(3, reference=reference, channels=(4, 3, 5), residual=residual)
    x = torch.randn(2, 3, 6, 5, dtype=DT)
    x[:, :, 2, 3] = reference
    x[0, :, 5, 0] = reference  # a border pixel, in one sample only
    expl = net.explain(x, layers=True)
    assert [z.shape for z in expl.layers] == [(2, 6, 5, c) for c in (4, 3, 5, 3)]
    for z in expl.layers:
        assert z[:, 2, 3].abs().max() < MISSING_ATOL
        assert z[0, 5, 0].abs().max() < MISSING_ATOL
        assert z[1, 5, 0].abs().max() > 1e-6
    torch.testing.assert_close(expl.layers[-1], expl.attributions, rtol=0, atol=0)


def test_one_channel_at_reference_is_not_missing() -> None:
    # A player is a whole pixel: only all channels at the reference make it missing.
    net = conv(reference=torch.tensor([0.5, -1.0], dtype=DT))
    x = torch.randn(1, 2, 4, 4, dtype=DT)
    x[0, 0, 1, 1] = 0.5
    assert net.explain(x).attributions[0, 1, 1].abs().max() > 1e-6


def test_every_pixel_reaches_the_logits_at_large_dilation() -> None:
    # Border patches are padded with the reference, so no band of pixels is dropped (unlike the
    # original unfold/fold without padding).
    net = conv(channels=(4,), dilations=(1, 4))
    x = torch.randn(1, 2, 6, 6, dtype=DT, requires_grad=True)
    net(x).sum().backward()
    assert bool((x.grad.abs().sum(1) > 0).all())


# ---------------------------------------------------------------------------------------------
# Channel split
# ---------------------------------------------------------------------------------------------
def test_channel_split_carries_the_rest_unchanged() -> None:
    net = conv(1, channels=(8, 8), channel_split=[None, 4, None], reference=0.1)
    assert net.channel_split == [1, 4, 12]
    x = torch.randn(2, 1, 5, 6, dtype=DT)
    x[:, :, 0, 0] = net.reference
    expl = net.explain(x, layers=True)
    assert [z.shape[-1] for z in expl.layers] == [8, 12, 3]
    torch.testing.assert_close(expl.layers[1][..., 8:], expl.layers[0][..., 4:], rtol=0, atol=0)
    expl.check_local_accuracy()
    assert max(z[:, 0, 0].abs().max().item() for z in expl.layers) < MISSING_ATOL


def test_skip_path_with_a_channel_split_unlists_pixels_whose_taken_channels_sit_at_the_reference() -> None:
    """Stage 0 takes channel 0 only: pixels off the reference in channel 1 alone are listed but are players at the
    reference of stage 0's game (exactly 0 there), and the skip path equals the dense one."""
    torch.manual_seed(3)
    net = conv(2, channels=(4, 4), channel_split=[1, None, None])
    x = torch.randn(2, 2, 6, 5, dtype=DT)
    x[:, 0, :2] = 0  # channel 0 at the reference (0) in two rows, channel 1 not
    layers = []
    for skip in (True, False):
        net.skip_inactive = skip
        layers.append(net.explain(x, layers=True).layers)
    for a, b in zip(*layers):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    stage0 = layers[0][0][..., :4]  # stage 0's Shapley map (the input's channel 1 is carried after it)
    assert (stage0[:, :2] == 0).all() and (stage0[:, 2:].abs().sum(-1) > 0).any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": (4,), "channel_split": [None, 5]}, r"stage 1: channel_split 5 must lie in \[1, 4\]"),
        ({"channels": (4,), "channel_split": [0, None]}, r"stage 0: channel_split 0 must lie in \[1, 2\]"),
        ({"channels": (4,), "channel_split": [None]}, "2 stages need 2 channel_split entries, got 1"),
        ({"channels": (4,), "channel_split": [None, 2]}, "carries 2 channel"),
        ({"channels": (4, 4), "dilations": (1, 2)}, "3 stages need 3 dilations, got 2"),
    ],
)
def test_constructor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConvShapNet(2, 3, **kwargs)


# ---------------------------------------------------------------------------------------------
# Gradients, dtype and serialization
# ---------------------------------------------------------------------------------------------
def test_gradients_reach_every_parameter() -> None:
    net = conv(reference=torch.tensor([0.1, 0.2], dtype=DT), channels=(4, 4), hidden=(8, 6))
    expl = net.explain(torch.randn(2, 2, 5, 5, dtype=DT), layers=True)
    sum(z.square().sum() for z in expl.layers).backward()
    for s, stage in enumerate(net.stages):
        # No output bias: a constant shift of a module's output cancels in every Shapley difference.
        assert stage.bank.bias(len(stage.bank.weights) - 1) is None
        for name, p in stage.bank.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (s, name)


def test_double_to_and_state_dict_round_trip(assert_double_round_trip) -> None:
    net = ConvShapNet(2, 3, channels=(4,), hidden=(8,), reference=torch.tensor([0.1, -0.3]))
    x = torch.randn(2, 2, 4, 5, dtype=DT)
    assert_double_round_trip(net, ConvShapNet(2, 3, channels=(4,), hidden=(8,)).double(), x)


# ---------------------------------------------------------------------------------------------
# Reference and bad input
# ---------------------------------------------------------------------------------------------
def test_reference_forms() -> None:
    torch.testing.assert_close(conv(reference=0.5).reference, torch.full((2,), 0.5, dtype=DT))
    torch.testing.assert_close(conv(reference=[1.0, 2.0]).reference, torch.tensor([1.0, 2.0], dtype=DT))
    with pytest.raises(ValueError, match=r"reference of shape \(3,\) cannot be broadcast to the players' shape \(2,\)"):
        ConvShapNet(2, 3, channels=(4,), reference=torch.zeros(3))


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.zeros(2, 4, 4, dtype=DT), ValueError, r"expects input of shape \(B, 2, None, None\)|got \(2, 4, 4\)"),
        (torch.zeros(1, 3, 4, 4, dtype=DT), ValueError, r"got \(1, 3, 4, 4\)"),
        (torch.zeros(1, 2, 0, 4, dtype=DT), ValueError, r"empty image of size \(0, 4\)"),
        (torch.zeros(1, 2, 4, 4, dtype=torch.uint8), TypeError, "floating-point tensor, got dtype torch.uint8"),
        (torch.zeros(1, 2, 4, 4, dtype=torch.float32), TypeError, "input dtype torch.float32 does not match .*float64"),
        (torch.full((1, 2, 4, 4), float("nan"), dtype=DT), ValueError, r"32 non-finite value\(s\)"),
    ],
    ids=["rank", "channels", "empty", "uint8", "dtype-mismatch", "nan"],
)
def test_rejects_bad_input(x: Tensor, error: type, match: str) -> None:
    net = conv()
    with pytest.raises(error, match="ConvShapNet"):
        net(x)
    with pytest.raises(error, match=match):
        net.explain(x)


@pytest.mark.parametrize(("kernel_size", "dilation"), [(2, 1), (3, 2), ((1, 4), (1, 3)), (4, 1), (2, 9)])
def test_patch_patterns_mark_exactly_the_active_players_inside_the_image(kernel_size, dilation) -> None:
    """Bit j at pixel a <=> pixel a + offset_j is inside the image and active (no wrap into the next row or image)."""
    torch.manual_seed(0)
    layer = ShapleyConv2d(1, 2, kernel_size, dilation)
    active = torch.rand(3, 7, 9) < 0.3
    pattern = layer.patch_patterns(active).long()
    expected = torch.zeros(3, 7, 9, dtype=torch.long)
    for j, (dy, dx) in enumerate(layer.offsets):
        for h in range(7 - dy):
            for w in range(9 - dx):
                expected[:, h, w] += active[:, h + dy, w + dx].long() << j
    assert torch.equal(pattern, expected)


@pytest.mark.parametrize(("kernel_size", "dilation", "nonzero_reference"), [(2, 2, False), ((1, 3), 1, True),
                                                                            (2, 8, False)])
def test_active_patches_path_equals_the_dense_one_with_gradients_and_counts(kernel_size, dilation,
                                                                             nonzero_reference: bool) -> None:
    """`skip_inactive` builds only patches with an active pixel: same values and gradients as evaluating them all,
    and it does (and counts) less work the more pixels sit at the reference (dilation 8 > 5 pixels: every patch
    but one of each row has padding players)."""
    torch.manual_seed(0)
    layer = ShapleyConv2d(3, 2, kernel_size, dilation, hidden=(8,)).to(DT)
    reference = torch.randn(3, dtype=DT) if nonzero_reference else None
    delta = torch.randn(2, 5, 6, 3, dtype=DT)
    delta[torch.rand(2, 5, 6) < 0.6] = 0.0  # pixels at the reference
    delta.requires_grad_(True)
    params = list(layer.parameters())

    def grads(skip: bool) -> tuple[Tensor, list[Tensor]]:
        rep = layer(delta, reference, skip_inactive=skip)
        found = torch.autograd.grad(rep.square().sum(), [delta, *params])
        return rep, list(found)

    dense, grad_dense = grads(False)
    layer.bank.reset_stats()
    sparse, grad_sparse = grads(True)
    assert torch.allclose(sparse, dense, atol=ATOL)
    for g_sparse, g_dense in zip(grad_sparse[1:], grad_dense[1:]):
        assert torch.allclose(g_sparse, g_dense, atol=ATOL)
    # The input gradient agrees on active pixels; a pixel at the reference is not evaluated, so its input gradient
    # is 0 (the documented price of skipping: parameter gradients are unaffected, as shown above).
    on = delta.detach().ne(0).any(-1)
    assert torch.allclose(grad_sparse[0][on], grad_dense[0][on], atol=ATOL) and grad_sparse[0][~on].eq(0).all()
    at_reference = delta.detach().eq(0).all(-1)
    assert sparse[at_reference].eq(0).all()  # missingness: exactly zero, not just small
    stats = layer.bank.stats
    k = len(layer.offsets)
    assert stats["module_evals"] == delta.shape[0] * 5 * 6 and stats["coalition_evals"] == 60 * 2**k
    assert 0 < stats["module_evals_skipped"] < stats["module_evals"]
    assert stats["coalition_evals_skipped"] > stats["module_evals_skipped"]  # partly active patches did less
    # Every pixel at the reference: nothing is evaluated, the map is exactly 0.
    layer.bank.reset_stats()
    assert layer(torch.zeros(1, 5, 6, 3, dtype=DT), reference, skip_inactive=True).eq(0).all()
    assert layer.bank.stats["module_evals_skipped"] == layer.bank.stats["module_evals"] == 30
