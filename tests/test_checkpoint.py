"""Checkpoints: atomic writes, weights_only loading, RNG round trips, and a SIGKILLed run resuming bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from training import checkpoint as ckpt
from training.config import UserError


@pytest.mark.reliability("runs")
def test_atomic_save_survives_a_crash_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, path)

    def crash(src, dst):
        raise OSError("simulated crash between write and replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3)), "the previous file must be intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"], "no temp files left behind"


@pytest.mark.reliability("runs")
def test_atomic_save_survives_a_failing_serialiser(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    ckpt.save_checkpoint({"model": {}, "step": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        ckpt.save_checkpoint({"model": {}, "bad": lambda: None}, path)
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


@pytest.mark.reliability("weights")
def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    state = {"model": {"w": torch.randn(2)}, "rng": ckpt.capture_rng_state(torch.Generator().manual_seed(3)),
             "config": {"a": [1, 2.0, "x", None]}, "epoch": 3}
    ckpt.save_checkpoint(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["version"] == ckpt.CHECKPOINT_VERSION and loaded["epoch"] == 3
    assert loaded["config"] == state["config"]


@pytest.mark.reliability("weights")
def test_unreadable_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(garbage)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": {}, "obj": Path("x")}, pickled)  # needs full unpickling: refused by weights_only
    with pytest.raises(UserError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(pickled)
    no_model = tmp_path / "no_model.pt"
    torch.save({"step": 1}, no_model)
    with pytest.raises(UserError, match="no 'model' entry"):
        ckpt.load_checkpoint(no_model)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    state = ckpt.capture_rng_state(gen)
    ckpt.save_checkpoint({"model": {}, "rng": state}, tmp_path / "r.pt")
    state = ckpt.load_checkpoint(tmp_path / "r.pt")["rng"]

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
                torch.rand(3).tolist(), torch.rand(2, generator=gen).tolist())

    first = draw()
    ckpt.restore_rng_state(state, gen)
    assert draw() == first


# ------------------------------------------------------------------------------------------------ kill and resume
WORKER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)  # the same arithmetic in every process
    import training.checkpoint as ckpt
    from training.config import load_config
    from training.data import ArrayDataset, DataBundle, DatasetInfo
    from training.trainer import train

    mode, out, kill_at_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    def split(n):
        x = torch.randn(n, 4, generator=g)
        return ArrayDataset(x, (x[:, 0] * x[:, 1] > 0).long())
    info = DatasetInfo(name="toy", num_classes=2, input_shape=(4,), class_names=["a", "b"])
    bundle = DataBundle(split(96), split(16), split(16), info)
    cfg = load_config(None, ["model.name=shapnet_deep", "model.args.channels=4", "model.args.hidden=[8]",
                             "data.batch_size=8", "train.epochs=3", "train.checkpoint_every_steps=4",
                             "train.ema_decay=0.9", "optim.lr=0.01"])
    if mode == "kill":
        save = ckpt.save_checkpoint
        def save_or_die(state, path):
            if state.get("step") == kill_at_step and str(path).endswith("last.pt"):
                os.kill(os.getpid(), signal.SIGKILL)  # dies with the newer state unsaved
            return save(state, path)
        ckpt.save_checkpoint = save_or_die
    if mode == "killstep":  # SIGKILL inside optimizer step number kill_at_step, after backward, before the update
        step = torch.optim.AdamW.step
        calls = [0]
        def step_or_die(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *args, **kwargs)
        torch.optim.AdamW.step = step_or_die
    train(cfg, data=bundle, output_dir=out, resume=mode == "resume")
""")


def _run(script: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.reliability("runs")
def test_sigkilled_run_resumes_to_identical_parameters(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # 96 samples / batch 8 = 12 steps per epoch, a checkpoint every 4 steps: the process is killed when it is
    # about to write the step-20 checkpoint (epoch 2, batch 8), so last.pt holds step 16 (epoch 2, batch 4)
    # and the resumed run must redo steps 17-20 with the same batches and random numbers.
    full = _run(script, "full", str(tmp_path / "full"), "-1")
    killed = _run(script, "kill", str(tmp_path / "killed"), "20")
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, err
    state = ckpt.load_checkpoint(tmp_path / "killed" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 4, 16)
    resumed = _run(script, "resume", str(tmp_path / "killed"), "-1")
    for proc in (full, resumed):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    a = ckpt.load_checkpoint(tmp_path / "full" / "last.pt")
    b = ckpt.load_checkpoint(tmp_path / "killed" / "last.pt")
    assert a["step"] == b["step"] == 36
    _assert_same_training_state(a, b, "killed while writing step 20")


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference: the same run, never killed (36 steps)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    script = root / "worker.py"
    script.write_text(WORKER)
    proc = _run(script, "full", str(root / "full"), "-1")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return ckpt.load_checkpoint(root / "full" / "last.pt")


@pytest.mark.reliability("runs", per="function")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(seed: int, tmp_path: Path,
                                                                   uninterrupted_run: dict) -> None:
    """SIGKILL at a random step (drawn from the seed), resume: parameters, EMA, optimizer identical (torch.equal)."""
    kill_at = random.Random(seed).randint(2, 35)  # any of the 36 steps but the first (no checkpoint before it)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    killed = _run(script, "killstep", str(tmp_path / "run"), str(kill_at))
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, err
    if (tmp_path / "run" / "last.pt").is_file():  # a checkpoint every 4 steps and at each epoch's end
        assert ckpt.load_checkpoint(tmp_path / "run" / "last.pt")["step"] < kill_at
        resumed = _run(script, "resume", str(tmp_path / "run"), "-1")
    else:  # killed before the first checkpoint: nothing to resume, the run starts over
        resumed = _run(script, "full", str(tmp_path / "run"), "-1")
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    b = ckpt.load_checkpoint(tmp_path / "run" / "last.pt")
    assert b["step"] == uninterrupted_run["step"] == 36
    _assert_same_training_state(uninterrupted_run, b, f"killed at step {kill_at}")


def _assert_same_training_state(a: dict, b: dict, label: str) -> None:
    """Parameters, EMA and optimizer state bitwise equal (torch.equal), the same scheduler state."""
    for key in ("model", "ema", "optimizer"):
        flat_a, flat_b = _tensors(a[key]), _tensors(b[key])
        assert flat_a.keys() == flat_b.keys()
        unequal = [k for k in flat_a if not torch.equal(flat_a[k], flat_b[k])]
        assert not unequal, f"{label}: {key} differs: {unequal}"
    assert a["scheduler"] == b["scheduler"]


def _tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for k, v in items:
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        else:
            out.update(_tensors(v, f"{prefix}{k}."))
    return out
