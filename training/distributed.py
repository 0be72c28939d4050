"""DistributedDataParallel plumbing: torchrun environment, process group, samplers, rank-0 helpers.

Launch with `torchrun --nproc_per_node N -m training train CONFIG` (or `shapnets` under torchrun): the trainer
reads RANK / WORLD_SIZE / LOCAL_RANK, joins a gloo (CPU) or nccl (CUDA) group, splits the global batch evenly
across processes and lets only rank 0 write files. Without those variables everything runs in one process.

Shuffling is a pure function of (seed, epoch) - `DistributedSampler` semantics - which is what makes a resumed
run see exactly the batches an uninterrupted one would; `ResumableDistributedSampler` adds the skip of the batches
already done in the interrupted epoch.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from .config import UserError

__all__ = [
    "DistInfo",
    "ResumableDistributedSampler",
    "ShardSampler",
    "all_gather_objects",
    "all_reduce_flag",
    "barrier",
    "cleanup_distributed",
    "init_distributed",
    "resolve_device",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: `rank` of `world_size`, GPU index `local_rank`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got {raw!r}") from None


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA (this process's GPU) when available, else CPU; `cuda` without a GPU is an error."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device='cuda' but no CUDA device is available: use 'auto' or 'cpu'")
    if torch.cuda.is_available() and requested in ("cuda", "auto"):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Read the torchrun environment, join the process group if WORLD_SIZE > 1, and pick this process's device.

    Returns:
        The `DistInfo` and the device. A group that is already initialised (e.g. by a test harness) is reused.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)
    device = resolve_device(requested_device, local_rank)
    if info.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=10),
                                device_id=device if device.type == "cuda" else None)
    return info, device


def cleanup_distributed() -> None:
    """Leave the process group (no-op when none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_flag(flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is True on any (so that all ranks stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (just `[obj]` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ResumableDistributedSampler(DistributedSampler):
    """`DistributedSampler` (order = f(seed, epoch), this rank's share) that can start part-way into an epoch.

    `set_start(k)` skips the first `k` indices of this rank's share for the current epoch only; the next
    `set_epoch` resets it. With `num_replicas=1` it is a plain seeded per-epoch shuffle.
    """

    def __init__(self, dataset: Any, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"cannot skip {start} samples of an epoch of {self.num_samples}")
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r gets indices r, r + W, r + 2W, ... (each sample exactly once)."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
