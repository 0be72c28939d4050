"""Shared pytest set-up: slow/GPU markers, float64 helpers and the data-root fixture."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow")
    has_cuda = torch.cuda.is_available()
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data sets (MNIST, Adult, Yeast); tests using it skip with a message when absent."""
    candidates = [os.environ.get("SHAPNETS_DATA"), Path(__file__).resolve().parents[1].parent / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    pytest.skip("real data sets not found: set SHAPNETS_DATA to a folder holding mnist/, adult/, yeast/")


@pytest.fixture
def assert_double_round_trip() -> Callable[[nn.Module, nn.Module, Tensor], None]:
    """`check(net, fresh, x)`: a ShapNet explains `x` (float64) alike after `.double()`, a float32 round trip and a
    state-dict reload into `fresh` (a float64 copy of its architecture); its reference buffer travels with it."""

    def check(net: nn.Module, fresh: nn.Module, x: Tensor) -> None:
        a = net.double().explain(x, layers=True)
        assert net.reference.dtype == torch.float64
        b = net.to(torch.float32).to(torch.float64).explain(x)
        torch.testing.assert_close(b.attributions, a.attributions, rtol=0, atol=0)
        state = net.state_dict()
        assert "reference" in state
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh.reference, net.reference, rtol=0, atol=0)
        c = fresh.explain(x, layers=True)
        assert len(c.layers) == len(a.layers)
        for za, zc in zip(a.layers, c.layers):
            torch.testing.assert_close(zc, za, rtol=0, atol=0)

    return check
