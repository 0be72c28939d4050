"""DDP on CPU: two gloo processes under torchrun end where one process with the same global batch ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.dist

WORKER = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from training.config import load_config
    from training.data import ArrayDataset, DataBundle, DatasetInfo
    from training.losses import register_loss_term
    from training.trainer import train

    class L1Attribution:  # needs the explanation, so the forward goes ModelStep -> DDP -> model.explain
        name, weight, needs_explanation, needs_layers = "l1_phi", 0.01, True, False

        def __call__(self, out, target):
            return out.explanation.attributions.abs().mean()

    register_loss_term("l1_phi")(lambda weight=0.01: L1Attribution())
    g = torch.Generator().manual_seed(0)
    def split(n):
        x = torch.randn(n, 4, generator=g)
        return ArrayDataset(x, (x[:, 0] * x[:, 1] > 0).long())
    info = DatasetInfo(name="toy", num_classes=2, input_shape=(4,), class_names=["a", "b"])
    bundle = DataBundle(split(64), split(21), split(21), info)  # odd eval sizes: shards of unequal length
    cfg = load_config(None, ["model.name=shapnet_deep", "model.args.channels=4", "model.args.hidden=[8]",
                             "data.batch_size=8", "train.epochs=2", "optim.lr=0.01", "loss.terms=[{name: l1_phi}]"])
    result = train(cfg, data=bundle, output_dir=sys.argv[1])
    print("RESULT", result["test"]["acc"], result["best_val_acc"], result["steps"])
""")


def _run(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    single = _run([str(script), str(tmp_path / "one")])
    ddp = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                str(tmp_path / "two")])
    outputs = {}
    for name, proc in (("single", single), ("ddp", ddp)):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{name} failed:\n{err[-3000:]}"
        outputs[name] = [line.split()[1:] for line in out.splitlines() if line.startswith("RESULT")]
    assert len(outputs["single"]) == 1 and len(outputs["ddp"]) == 2, outputs
    # torchmetrics syncs evaluation over ranks: both ranks report the global test accuracy of 21 samples.
    assert outputs["ddp"][0] == outputs["ddp"][1]
    a = load_checkpoint(tmp_path / "one" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "last.pt")
    assert a["step"] == b["step"] == 16
    live = _parameters_that_reach_the_output(a["model"])
    assert len(live) > len(a["model"]) // 2
    for k in live:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    probe = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_model(b["model"])(probe), _model(a["model"])(probe), rtol=1e-4, atol=1e-5)
    assert float(outputs["ddp"][0][0]) == pytest.approx(float(outputs["single"][0][0]), abs=1 / 21 + 1e-9)
    assert len(b["per_rank"]) == 2, "every rank's RNG state is checkpointed"
    assert not (tmp_path / "two" / "metrics.csv").read_text().count("\n") > 3, "only rank 0 writes the CSV"


def _model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from shapnets import DeepShapNet

    model = DeepShapNet(4, 2, channels=4, hidden=(8,))
    model.load_state_dict(state)
    return model


def _parameters_that_reach_the_output(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of parameters with a non-zero gradient.

    The output bias of every pairwise Shapley module cancels in the Shapley differences, so its true gradient is
    0 and Adam turns the float noise in it into lr-sized steps that differ between any two reduction orders. Those
    parameters cannot change the function; they are compared through the outputs instead.
    """
    model = _model(state)
    model(torch.randn(64, 4, generator=torch.Generator().manual_seed(2))).square().sum().backward()
    return [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 1e-6]
