"""Property tests over random shapes: exactness of modules and Shallow nets, Deep/Conv local accuracy
and missingness. Small `max_examples` keep the file to a few seconds."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from shapnets import ConvShapNet, DeepShapNet, ShallowShapNet, ShapleyModule, exact_shapley
from shapnets.deep import butterfly_stages_needed

pytestmark = pytest.mark.reliability("fuzz")

DT = torch.float64
ATOL = 1e-10
MISSING_ATOL = 1e-12

# The autouse seeding fixture in conftest is function-scoped; each example seeds torch itself.
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
seeds = st.integers(0, 2**31 - 1)


@FAST
@given(
    k=st.integers(1, 5),
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 3),
    batch=st.integers(1, 4),
    hidden=st.lists(st.integers(1, 6), max_size=2),
    nonzero_reference=st.booleans(),
    fast_path=st.booleans(),
    seed=seeds,
)
def test_module_is_exact(k, c_in, c_out, batch, hidden, nonzero_reference, fast_path, seed) -> None:
    torch.manual_seed(seed)
    widths = [k * c_in, *hidden, c_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Tanh()] if i else []
        layers.append(nn.Linear(a, b))
    inner = nn.Sequential(*layers).to(DT)
    reference = torch.randn(k, c_in, dtype=DT) if nonzero_reference else None
    module = ShapleyModule(inner, k, reference=reference, fast_path=fast_path)
    x = torch.randn(batch, k, c_in, dtype=DT)
    expl = module.explain(x)
    oracle = exact_shapley(lambda z: inner(z.flatten(1)), x, module.reference)
    torch.testing.assert_close(expl.attributions, oracle.attributions, rtol=0, atol=ATOL)
    torch.testing.assert_close(expl.output, module(x), rtol=0, atol=ATOL)
    expl.check_local_accuracy()


@st.composite
def group_lists(draw) -> tuple[int, list[tuple[int, ...]]]:
    d = draw(st.integers(2, 7))
    group = st.lists(st.integers(0, d - 1), min_size=1, max_size=min(4, d), unique=True).map(tuple)
    return d, draw(st.lists(group, min_size=1, max_size=6))


@FAST
@given(spec=group_lists(), c_in=st.integers(1, 2), batch=st.integers(1, 3), seed=seeds)
def test_shallow_is_exact(spec, c_in, batch, seed) -> None:
    torch.manual_seed(seed)
    d, groups = spec
    net = ShallowShapNet(d, 2, groups, hidden=(5,), reference=torch.randn(d, c_in), in_channels=c_in).to(DT)
    x = torch.randn(batch, d, c_in, dtype=DT)
    expl = net.explain(x)
    oracle = exact_shapley(net, x, net.reference)
    torch.testing.assert_close(expl.attributions, oracle.attributions, rtol=0, atol=ATOL)
    torch.testing.assert_close(expl.base, oracle.base, rtol=0, atol=ATOL)
    torch.testing.assert_close(expl.output, net(x), rtol=0, atol=ATOL)


@FAST
@given(
    d=st.integers(2, 20),
    extra_stages=st.integers(0, 1),
    width=st.integers(1, 5),
    in_channels=st.integers(1, 2),
    residual=st.booleans(),
    batch=st.integers(1, 3),
    data=st.data(),
    seed=seeds,
)
def test_deep_local_accuracy_and_missingness(d, extra_stages, width, in_channels, residual, batch, data, seed) -> None:
    torch.manual_seed(seed)
    stages = butterfly_stages_needed(d) + extra_stages
    channels = [width] * (stages - 1)
    reference = torch.randn(d, in_channels, dtype=DT)
    net = DeepShapNet(d, 3, channels, hidden=(6,), residual=residual, reference=reference, in_channels=in_channels)
    net = net.to(DT)
    missing = data.draw(st.lists(st.integers(0, d - 1), max_size=d, unique=True), label="missing")
    x = torch.randn(batch, d, in_channels, dtype=DT)
    x[:, missing] = reference[missing]
    expl = net.explain(x, layers=True)
    expl.check_local_accuracy()
    torch.testing.assert_close(expl.output, net(x), rtol=0, atol=ATOL)
    assert len(expl.layers) == net.num_stages
    for z in expl.layers:
        assert z.shape[:2] == (batch, d)
        if missing:
            assert z[:, missing].abs().max() < MISSING_ATOL
    assert net(reference[None]).abs().max() < MISSING_ATOL


@FAST
@given(
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    in_chans=st.integers(1, 3),
    channels=st.lists(st.integers(1, 4), max_size=2),
    kernel_size=st.integers(1, 2),
    dilation=st.integers(1, 3),
    residual=st.booleans(),
    data=st.data(),
    seed=seeds,
)
def test_conv_local_accuracy_and_missingness(
    height, width, in_chans, channels, kernel_size, dilation, residual, data, seed
) -> None:
    torch.manual_seed(seed)
    reference = torch.randn(in_chans, dtype=DT)
    dilations = [dilation] * (len(channels) + 1)
    net = ConvShapNet(in_chans, 2, channels, kernel_size, dilations, hidden=(6,), residual=residual,
                      reference=reference)
    net = net.to(DT)
    pixels = st.tuples(st.integers(0, height - 1), st.integers(0, width - 1))
    missing = data.draw(st.lists(pixels, max_size=4, unique=True), label="missing")
    x = torch.randn(2, in_chans, height, width, dtype=DT)
    for h, w in missing:
        x[:, :, h, w] = reference
    expl = net.explain(x, layers=True)
    assert expl.attributions.shape == (2, height, width, 2)
    expl.check_local_accuracy()
    torch.testing.assert_close(expl.output, net(x), rtol=0, atol=ATOL)
    for z in expl.layers:
        for h, w in missing:
            assert z[:, h, w].abs().max() < MISSING_ATOL
