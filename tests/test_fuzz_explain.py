"""Reliability catalogue, category "fuzz": hypothesis draws architectures, shapes and input values for every model
family's `explain`; local accuracy (and, for ShapNets, missingness) must hold for every generated case.

Values are drawn element by element (exact zeros, tiny and large magnitudes, players exactly at the reference), not
only from a Gaussian. The ShapNet cases run in float64 with tight tolerances; CapsNet and the Interpretable CNN
have no missingness property (their attributions are spread over receptive fields, not Shapley values), so only
local accuracy and agreement with `forward` are asserted there. tests/test_properties.py holds the exactness
properties (Shapley modules and Shallow ShapNets against the oracle).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import zoo
from shapnets import CapsNet, ConvShapNet, DeepShapNet, ShallowShapNet, exact_shapley
from shapnets.deep import butterfly_stages_needed

pytestmark = pytest.mark.reliability("fuzz")

DT = torch.float64
# Derandomized so that CI sees the same 25 cases per test every run; to explore, set derandomize=False and raise
# max_examples (a randomized exploration found the dense-fallback missingness bug fixed in modules.py).
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)
# Exact zeros, tiny and large magnitudes; no NaN / inf (those are refused, see test_reliability_inputs.py).
values = st.one_of(st.just(0.0), st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
                   st.floats(-1e-6, 1e-6))


def tensor_of(draw, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(draw(arrays(np.float64, shape, elements=values)))


def relative_local_accuracy(expl) -> float:
    """The local-accuracy residual relative to the largest term (float rounding grows with the values)."""
    scale = max(expl.attributions.abs().max().item(), expl.output.abs().max().item(), 1.0)
    return expl.local_accuracy_error() / scale


@FUZZ
@given(data=st.data(), d=st.integers(2, 8), groups=st.sampled_from(["singles", "pairs"]), batch=st.integers(1, 3),
       seed=seeds)
def test_shallow_missingness_and_exactness_on_drawn_values(data, d, groups, batch, seed) -> None:
    """Shallow ShapNets: exact vs the oracle on drawn values; players at the reference get exactly 0."""
    torch.manual_seed(seed)
    reference = tensor_of(data.draw, (d,))
    net = ShallowShapNet(d, 2, groups, hidden=(4,), reference=reference).to(DT).eval()
    x = tensor_of(data.draw, (batch, d))
    missing = data.draw(st.lists(st.integers(0, d - 1), max_size=d, unique=True), label="missing")
    x[:, missing] = reference[missing]
    expl = net.explain(x)
    assert relative_local_accuracy(expl) < 1e-12
    if missing:
        assert expl.attributions[:, missing].abs().max() == 0
    oracle = exact_shapley(net, x, net.reference)
    scale = max(oracle.attributions.abs().max().item(), 1.0)
    torch.testing.assert_close(expl.attributions, oracle.attributions, rtol=0, atol=1e-9 * scale)


@FUZZ
@given(data=st.data(), d=st.integers(2, 12), prune=st.sampled_from([0.0, 0.3, 0.6]), skip=st.booleans(),
       batch=st.integers(1, 4), chunk=st.integers(1, 4), seed=seeds)
def test_deep_with_pruning_skipping_and_chunks(data, d, prune, skip, batch, chunk, seed) -> None:
    """Deep ShapNets with inference pruning, the skip path and any chunk size: local accuracy and missingness."""
    torch.manual_seed(seed)
    reference = tensor_of(data.draw, (d,))
    stages = butterfly_stages_needed(d)
    net = DeepShapNet(d, 3, [3] * (stages - 1), hidden=(5,), reference=reference, prune=prune,
                      skip_inactive=skip).to(DT).eval()
    net.chunk_size = chunk
    x = tensor_of(data.draw, (batch, d))
    missing = data.draw(st.lists(st.integers(0, d - 1), max_size=d, unique=True), label="missing")
    x[:, missing] = reference[missing]
    expl = net.explain(x, layers=True)
    assert relative_local_accuracy(expl) < 1e-12
    for z in expl.layers:
        if missing:
            assert z[:, missing].abs().max() == 0
    net.chunk_size = None
    torch.testing.assert_close(net.explain(x).attributions, expl.attributions, rtol=1e-12, atol=1e-12)


@FUZZ
@given(data=st.data(), height=st.integers(1, 7), width=st.integers(1, 7), in_chans=st.integers(1, 3),
       kernel=st.sampled_from([1, 2, (1, 2), (2, 1)]), split=st.booleans(), skip=st.booleans(), seed=seeds)
def test_conv_with_kernels_splits_and_skipping(data, height, width, in_chans, kernel, split, skip, seed) -> None:
    """Conv ShapNets over drawn image sizes, kernels, channel splits and values: local accuracy and missingness."""
    torch.manual_seed(seed)
    reference = tensor_of(data.draw, (in_chans,))
    channels = (3, 4)
    channel_split = [None, 2, None] if split else None
    net = ConvShapNet(in_chans, 2, channels, kernel, [1, 2, 1], hidden=(4,), channel_split=channel_split,
                      reference=reference, skip_inactive=skip).to(DT).eval()
    x = tensor_of(data.draw, (2, in_chans, height, width))
    pixels = st.tuples(st.integers(0, height - 1), st.integers(0, width - 1))
    missing = data.draw(st.lists(pixels, max_size=5, unique=True), label="missing")
    for h, w in missing:
        x[:, :, h, w] = reference
    expl = net.explain(x, layers=True)
    assert relative_local_accuracy(expl) < 1e-12
    for z in expl.layers:
        for h, w in missing:
            assert z[:, h, w].abs().max() == 0


@FUZZ
@given(data=st.data(), in_chans=st.integers(1, 2), size=st.integers(12, 20), conv_kernel=st.integers(3, 5),
       primary_kernel=st.integers(3, 5), primary_stride=st.integers(1, 2), iterations=st.integers(1, 3),
       num_classes=st.integers(2, 4), seed=seeds)
def test_capsnet_local_accuracy(data, in_chans, size, conv_kernel, primary_kernel, primary_stride, iterations,
                                num_classes, seed) -> None:
    """CapsNets of drawn sizes and routing iterations: the routing attribution sums to the capsule lengths."""
    torch.manual_seed(seed)
    net = CapsNet(in_chans, size, num_classes, conv_channels=8, conv_kernel=conv_kernel, primary_types=2,
                  primary_dim=4, primary_kernel=primary_kernel, primary_stride=primary_stride, class_dim=4,
                  routing_iterations=iterations, decoder_widths=None, input_mean=0.0, input_std=1.0).to(DT).eval()
    x = tensor_of(data.draw, (2, in_chans, size, size)).clamp(-10, 10)  # normalised images: lengths saturate above
    expl = net.explain(x)
    assert relative_local_accuracy(expl) < 1e-12
    torch.testing.assert_close(expl.output, net(x), rtol=1e-12, atol=1e-12)
    assert bool(((expl.output >= 0) & (expl.output < 1)).all())


@FUZZ
@given(data=st.data(), height=st.integers(8, 24), width=st.integers(16, 24), pool=st.sampled_from(["avg", "max"]),
       num_classes=st.integers(2, 4), seed=seeds)
def test_icnn_local_accuracy(data, height, width, pool, num_classes, seed) -> None:
    """Interpretable CNNs on drawn image sizes and values: the pixel attributions sum to the logits.

    Widths start at 16 (a top map at least 2 cells wide): a 1x1 top map is refused (no room to localise)."""
    torch.manual_seed(seed)
    net = zoo.create_model("icnn_vgg_small", num_classes=num_classes, in_chans=1, pool=pool).to(DT).eval()
    x = tensor_of(data.draw, (2, 1, height, width)).clamp(-10, 10)
    expl = net.explain(x)
    assert relative_local_accuracy(expl) < 1e-12
    torch.testing.assert_close(expl.output, net(x), rtol=1e-12, atol=1e-12)
