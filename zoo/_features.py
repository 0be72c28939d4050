"""timm's `features_only=True` for the zoo's image families: a list of per-stage maps and their `feature_info`.

A family that has feature maps says so with timm's own interface: `feature_info` (one dict per level: `num_chs`,
`reduction`, `module`) and `forward_intermediates(x, indices, intermediates_only=True)`. `FeatureStages` wraps such
a model, as timm's feature wrappers do: `model(x)` returns the selected levels' maps `(B, C, H, W)`, and
`model.feature_info.channels()` / `.reduction()` describe them. Tabular families have no maps and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models import FeatureInfo
from torch import Tensor, nn

__all__ = ["FeatureStages", "feature_levels"]


def feature_levels(count: int, out_indices: int | Sequence[int] | None, who: str) -> tuple[int, ...]:
    """Absolute level indices, in the model's order, from timm's `out_indices` (`None`: all; an int `n`: the last
    `n`; negatives count from the end).

    Raises:
        ValueError: an index outside the model's `count` levels.
    """
    if out_indices is None:
        return tuple(range(count))
    if isinstance(out_indices, int):
        if not 0 < out_indices <= count:
            raise ValueError(f"{who}: out_indices={out_indices} (the last n levels) must lie in [1, {count}]")
        return tuple(range(count - out_indices, count))
    bad = [i for i in out_indices if not -count <= int(i) < count]
    if bad:
        raise ValueError(f"{who}: out_indices {list(out_indices)} name levels {bad} outside the model's {count} "
                         f"(0..{count - 1}, or negative from the end)")
    return tuple(sorted({int(i) % count for i in out_indices}))  # the maps come in the model's order


class FeatureStages(nn.Module):
    """A zoo model as timm's `features_only=True` gives it: `forward(x)` -> the selected levels' maps.

    Args:
        model: a model with `feature_info` (a list of dicts) and `forward_intermediates`.
        out_indices: the levels to return (timm's `out_indices`; default all).

    Attributes:
        feature_info: timm's `FeatureInfo` of the selected levels (`channels()`, `reduction()`, `module_name()`).
    """

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        levels = list(model.feature_info)
        self.out_indices = feature_levels(len(levels), out_indices, type(model).__name__)
        self.model = model
        self.feature_info = FeatureInfo([dict(level) for level in levels], self.out_indices)
        self.pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
        self.default_cfg = self.pretrained_cfg
        self.model_args: dict[str, Any] = getattr(model, "model_args", {})

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
