"""CUDA checks: float32 and bf16-autocast explanations keep local accuracy; torch.compile agrees with eager.

Every test here is marked `gpu` and skipped without a CUDA device (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shapnets import ConvShapNet, DeepShapNet, ShallowShapNet

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Small models of every family with non-zero references, and a batch for each."""
    torch.manual_seed(0)
    return {
        "shallow": (ShallowShapNet(12, 4, "pairs", reference=torch.randn(12)), torch.randn(64, 12)),
        "deep": (DeepShapNet(13, 4, channels=16, reference=torch.randn(13)), torch.randn(64, 13)),
        "conv": (
            ConvShapNet(3, 10, channels=(16, 16), reference=torch.tensor([0.1, 0.2, 0.3])),
            torch.randn(8, 3, 16, 16),
        ),
    }


@pytest.mark.parametrize("name", ["shallow", "deep", "conv"])
def test_float32_on_cuda_matches_cpu(name: str) -> None:
    model, x = models()[name]
    cpu = model.explain(x)
    model, x = model.to(DEVICE), x.to(DEVICE)
    expl = model.explain(x)
    assert expl.attributions.device.type == "cuda"
    expl.check_local_accuracy(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(expl.output, model(x), rtol=1e-4, atol=1e-4)
    # TF32 matmuls may be enabled: compare to the CPU with a float32-level tolerance.
    torch.testing.assert_close(expl.attributions.cpu(), cpu.attributions, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("name", ["shallow", "deep", "conv"])
def test_bf16_autocast_keeps_local_accuracy_loosely(name: str) -> None:
    model, x = models()[name]
    model, x = model.to(DEVICE), x.to(DEVICE)
    reference = model.explain(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expl = model.explain(x)
        logits = model(x)
    scale = reference.output.abs().max().item()
    # bf16 has ~3 significant digits: local accuracy and agreement with float32 only to ~1e-2 relative.
    assert expl.local_accuracy_error() <= 5e-2 * max(scale, 1.0)
    assert (expl.output.float() - logits.float()).abs().max().item() <= 5e-2 * max(scale, 1.0)
    assert (expl.output.float() - reference.output).abs().max().item() <= 1e-1 * max(scale, 1.0)


@pytest.mark.parametrize("name", ["shallow", "deep"])
def test_torch_compile_matches_eager(name: str) -> None:
    model, x = models()[name]
    model, x = model.to(DEVICE).eval(), x.to(DEVICE)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    explain = torch.compile(model.explain)
    eager, fast = model.explain(x), explain(x)
    torch.testing.assert_close(fast.attributions, eager.attributions, rtol=1e-4, atol=1e-4)
    fast.check_local_accuracy(atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("local_width", [0, 1 << 30])  # the second map per module, or dense over the features
def test_shallow_two_product_path_on_cuda(local_width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ShallowShapNet, "local_width", local_width)
    model, x = models()["shallow"]
    model.eval()
    with torch.no_grad():
        cpu = model.explain(x)
        model, x = model.to(DEVICE), x.to(DEVICE)
        assert model._dense_operator(x) is not None
        expl = model.explain(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            auto = model.explain(x)  # runs in float32 (the cached operator's dtype)
    torch.testing.assert_close(expl.attributions.cpu(), cpu.attributions, rtol=1e-2, atol=1e-3)
    expl.check_local_accuracy(atol=1e-3, rtol=1e-3)
    assert auto.attributions.dtype == torch.float32
    torch.testing.assert_close(auto.attributions, expl.attributions, rtol=1e-5, atol=1e-5)


def test_reference_follows_the_model_to_cuda() -> None:
    model, _ = models()["deep"]
    model = model.to(DEVICE)
    assert model.reference.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_bank_module_of_a_cuda_bank_runs_on_cuda() -> None:
    from shapnets import ShapleyModuleBank

    bank = ShapleyModuleBank(3, 2, 1, 2).to(DEVICE)
    x = torch.randn(4, 3, 2, 1, device=DEVICE)
    expl = bank.module(1).explain(x[:, 1])
    torch.testing.assert_close(expl.output, bank(x)[:, 1], rtol=1e-5, atol=1e-5)
