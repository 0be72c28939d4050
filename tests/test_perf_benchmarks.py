"""Smoke tests of the performance benchmark scripts (tiny settings: they check the scripts run and report sane rows,
not any timing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~30 s on the loaded 2-core machine (model build + warm-ups)
def test_throughput_rows() -> None:
    bench = _load("throughput")
    threads = torch.get_num_threads()
    try:
        rows = bench.measure("capsnet_small_mnist", [1, 2], torch.device("cpu"), 1, "fp32", repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert [(r["model"], r["threads"], r["batch"]) for r in rows] == [("capsnet_small_mnist", 1, 1),
                                                                      ("capsnet_small_mnist", 1, 2)]
    assert all(r["forward img/s"] > 0 and r["explain img/s"] > 0 for r in rows)
    assert all(r["explain / forward time"] == pytest.approx(r["forward img/s"] / r["explain img/s"]) for r in rows)


@pytest.mark.slow  # ~27 s on the loaded 2-core machine (captum import + KernelShap)
def test_shallow_speed_measure_rows() -> None:
    pytest.importorskip("captum")
    bench = _load("shallow_speed")
    torch.manual_seed(0)
    nets = {"tiny": bench.ShallowShapNet(4, 2, "pairs", hidden=(4,)).eval()}
    rows = bench.measure(nets, 4, [8], repeats=1, kernel_inputs=1, n_samples=16)
    assert len(rows) == 1 and rows[0]["speed-up"] > 0 and rows[0]["bound 1.2 x 2^k"] == 4.8


def test_shallow_speed_against_a_baseline_checkout(tmp_path: Path) -> None:
    """`--baseline`: another checkout's package side by side (here this one, imported a second time), same weights."""
    bench = _load("shallow_speed")
    baseline = bench.load_baseline(str(ROOT))
    assert baseline.ShallowShapNet is not bench.ShallowShapNet  # a second copy of the package, not this one
    torch.manual_seed(0)
    gelu_tanh = bench.ShallowShapNet(4, 2, "pairs", hidden=(4,), act_layer=lambda: torch.nn.GELU(approximate="tanh"))
    rows = bench.against_baseline({"tiny": gelu_tanh.eval()}, baseline, 4, [8], repeats=1, calls=1)
    assert [(r["model"], r["batch"]) for r in rows] == [("tiny", 1), ("tiny", 8)]
    assert all(r["baseline / this"] > 0 for r in rows)
    with pytest.raises(SystemExit, match=r"no shapnets/__init__\.py"):
        bench.load_baseline(str(tmp_path))
