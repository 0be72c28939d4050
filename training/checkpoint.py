"""Training checkpoints: atomic writes, everything a bitwise resume needs, loadable with `weights_only=True`.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled objects), so
`torch.load(path, weights_only=True)` reads it. Keys:

    version, model, optimizer, scheduler, ema, epoch, step, batch_in_epoch, rng (one entry per process),
    config, data_info, metrics, best, trainer (early-stopping counters and running sums of the current epoch)

`epoch`/`batch_in_epoch` say where training continues: epoch `epoch`, after skipping its first `batch_in_epoch`
batches (0 at epoch boundaries).
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import UserError

__all__ = [
    "CHECKPOINT_VERSION",
    "atomic_torch_save",
    "atomic_write_bytes",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_VERSION = 1


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> Path:
    """Call `write(file)` on a temp file in `path`'s folder, fsync it, then `os.replace` it onto `path`.

    A crash at any point leaves either the old file or the new one, never a torn file; the temp file is removed
    when anything fails before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    """Write `data` to `path` atomically (temp file + fsync + `os.replace`)."""
    return _atomic_write(Path(path), lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)` atomically (temp file + fsync + `os.replace`)."""
    return _atomic_write(Path(path), lambda f: torch.save(obj, f))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write a checkpoint dict (see the module docstring for its keys)."""
    return atomic_torch_save({"version": CHECKPOINT_VERSION, **state}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`.

    Raises:
        UserError: the file is missing or is not a shapnets training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # any unpickling failure means "not a checkpoint we can read"
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not a shapnets training checkpoint (no 'model' entry)")
    return state


# ---------------------------------------------------------------------------------------------------- RNG states
def capture_rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) RNG states as tensors and plain types (safe for `weights_only`)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state({
        "bit_generator": npy["bit_generator"],
        "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
        "has_gauss": npy["has_gauss"],
        "gauss": npy["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])
