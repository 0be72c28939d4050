"""Large batches in bounded memory: in evaluation mode, `forward` and `explain` run over chunks of the batch.

A Shapley module evaluates its inner network on all 2^k coalitions, so its working memory per sample is 2^k times
a plain layer's; a batch of 10,000 MNIST images through a ConvShapNet would need ~50 GB at once. Models that mix
`StreamedBatches` in estimate their working memory per sample (`working_elements`) and split any batch larger
than `memory_budget` allows; the results are concatenated, so they are identical to one big call.

Only in `eval()` mode: in training the autograd graph keeps every chunk's activations anyway, and batch
statistics (e.g. BatchNorm in a timm backbone) must see the whole batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from .explanation import Explanation

__all__ = ["DEFAULT_MEMORY_BUDGET", "LIVE_COPIES", "StreamedBatches", "concat_batches", "streamed"]

DEFAULT_MEMORY_BUDGET = 1 << 29  # 512 MiB of estimated working memory per chunk
# An estimate from the largest tensor alone: its pre-activation, activation, output and temporaries coexist.
LIVE_COPIES = 4

_F = TypeVar("_F", bound=Callable[..., Any])


class StreamedBatches:
    """Mixin: `chunk_size` / `memory_budget` control how `@streamed` methods split large evaluation batches.

    Attributes:
        chunk_size: samples per chunk; `None` (default) derives it from `memory_budget`.
        memory_budget: bytes of estimated working memory one chunk may use.
    """

    chunk_size: int | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    def working_elements(self, x: Tensor) -> int:
        """Estimated elements per sample of `x` of every tensor alive at the computation's peak (override per model).

        A model that counts only its largest intermediate tensor multiplies it by `LIVE_COPIES`; one that knows what
        coexists (in-place activations, tensors freed on the way) counts that instead.
        """
        raise NotImplementedError

    def chunk_rows(self, x: Tensor) -> int | None:
        """Samples per chunk for input `x`, or `None` when `x` is not split (training mode, not a batch)."""
        if getattr(self, "training", False) or not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
            return None
        if self.chunk_size is not None:
            if int(self.chunk_size) < 1:
                raise ValueError(f"{type(self).__name__}.chunk_size must be >= 1 or None, got {self.chunk_size}")
            return int(self.chunk_size)
        per_sample = max(1, self.working_elements(x)) * x.element_size()
        return max(1, int(self.memory_budget) // per_sample)


def concat_batches(parts: list[Any]) -> Any:
    """Join per-chunk results along the batch axis: tensors, `Explanation`s, or tuples of those."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, Explanation):
        return Explanation.concat(parts)
    if isinstance(first, tuple):
        return type(first)(concat_batches(list(items)) for items in zip(*parts))
    raise TypeError(f"cannot join chunk results of type {type(first).__name__}")


def streamed(method: _F) -> _F:
    """Decorate `forward` / `explain(self, x, ...)` so that large evaluation batches run chunk by chunk."""

    @functools.wraps(method)
    def run(self: StreamedBatches, x: Any, *args: Any, **kwargs: Any) -> Any:
        rows = self.chunk_rows(x)
        if rows is None or x.shape[0] <= rows:
            return method(self, x, *args, **kwargs)
        # As few chunks as the budget allows, of equal size (129 rows at 128 per chunk: 65 + 64, not 128 + 1).
        parts = x.tensor_split(-(-x.shape[0] // rows))
        return concat_batches([method(self, part, *args, **kwargs) for part in parts])

    return run  # type: ignore[return-value]
