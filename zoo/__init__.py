"""The ShapNet model zoo: a timm registry, verified safetensors weights and generated model cards.

```python
import zoo

model = zoo.create_model("shapnet_deep", in_features=8, num_classes=10)   # any timm-style kwargs
zoo.save_pretrained(model, "out/yeast", metadata={"metrics": {"test_accuracy": 0.6}})
model = zoo.load_pretrained("out/yeast")                                   # hash-checked, strict
zoo.list_models("shapnet_*")
```

Importing `zoo` registers every zoo name (`shapnet_*`, `icnn_*`, `capsnet*`, `baseline_*`) with timm, so
`timm.create_model` and `timm.list_models("shapnet_*")` see them too (without `import zoo`, timm does not know
them); a misspelt zoo name then gets a "did you mean" from both `zoo.create_model` and `timm.create_model`.
Nothing here touches the network.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from typing import Any

import timm
from timm.models import is_model
from timm.models import list_models as _timm_list_models
from torch import nn

# The family files register their names (with timm too) when imported.
from . import baselines, capsnet_models, icnn_models, shapnets_models  # noqa: F401
from ._args import ACT_LAYERS, jsonable
from ._builder import build_model_with_cfg, register, register_variant, replace_head
from ._paths import card_path, shipped_dir
from ._registry import (
    ARCHITECTURES,
    VARIANT_DEFAULTS,
    Family,
    ShapNetCfg,
    model_cfg,
    model_class,
    weights_available,
)
from .cards import model_info, write_model_card
from .hub import load_pretrained, read_config, save_pretrained, sha256_of
from .summary import model_summary

__all__ = [
    "ACT_LAYERS",
    "ARCHITECTURES",
    "VARIANT_DEFAULTS",
    "Family",
    "ShapNetCfg",
    "build_model_with_cfg",
    "card_path",
    "create_model",
    "did_you_mean",
    "jsonable",
    "list_models",
    "load_pretrained",
    "model_cfg",
    "model_class",
    "model_info",
    "model_summary",
    "read_config",
    "register",
    "register_variant",
    "replace_head",
    "save_pretrained",
    "sha256_of",
    "shipped_dir",
    "write_model_card",
]



def _zoo_names() -> list[str]:
    """Every registered name, now (families registered after import included)."""
    return sorted([*ARCHITECTURES, *VARIANT_DEFAULTS])


def did_you_mean(name: str) -> str:
    """`"Did you mean 'shapnet_shallow_adult'?"` for a misspelt zoo name ('' when nothing is close), naming the
    next-closest zoo names too."""
    close = difflib.get_close_matches(name, _zoo_names(), n=3, cutoff=0.75)
    if not close:
        return ""
    others = f" (or {', '.join(repr(c) for c in close[1:])})" if len(close) > 1 else ""
    return f"Did you mean {close[0]!r}{others}?"


def _unknown_model(name: str) -> ValueError:
    hint = did_you_mean(name)
    if not hint:  # not a misspelt zoo name: perhaps one of timm's own models
        close = difflib.get_close_matches(name, _timm_list_models(), n=3, cutoff=0.75)
        hint = f"Close timm models: {close}." if close else ""
    return ValueError(f"unknown model {name!r}. {hint + ' ' if hint else ''}zoo.list_models() lists the "
                      f"{len(_zoo_names())} zoo models (zoo.list_models(pretrained=True): those with weights).")


def _hint_unknown_timm_models() -> None:
    """Make `timm.create_model` add a "did you mean" to its bare "Unknown model (...)" for misspelt zoo names.

    timm's registry has no hook for unknown names, so its `create_model` is wrapped once, at `import zoo` (which
    also registers the names): the same function for every known name, the same `RuntimeError` (its message
    starts as timm's) for unknown ones, with the closest zoo names appended when there are any.
    """
    original = timm.create_model
    if getattr(original, "_zoo_did_you_mean", False):
        return

    @functools.wraps(original)
    def create_model(model_name: str, *args: Any, **kwargs: Any) -> nn.Module:
        try:
            return original(model_name, *args, **kwargs)
        except RuntimeError as e:
            hint = did_you_mean(str(model_name)) if str(e).startswith("Unknown model") else ""
            if not hint:
                raise
            raise RuntimeError(f"{e}. {hint} (zoo.list_models() lists the zoo's names)") from e

    create_model._zoo_did_you_mean = True  # type: ignore[attr-defined]
    timm.create_model = create_model
    timm.models.create_model = create_model


_hint_unknown_timm_models()


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered model through `timm.create_model` (offline: weights ship in the package).

    Args:
        name: a registered name (`zoo.list_models()`), optionally `local-dir:<folder>`.
        pretrained: load the shipped, hash-checked weights (see `zoo.list_models(pretrained=True)`).
        **kwargs: constructor arguments of the model class (e.g. `in_features`, `num_classes`,
            `hidden`, `reference`, `act_layer="gelu"`), or timm's `pretrained_cfg_overlay`.

    Raises:
        ValueError: an unknown name (close matches listed) or a `hf-hub:` name (no network).
        RuntimeError: `pretrained=True` for a name without shipped weights (names with weights listed).
    """
    if name.startswith(("hf-hub:", "hf_hub:")):
        raise ValueError(f"{name!r}: the zoo never downloads; use a registered name or 'local-dir:<folder>'")
    if not name.startswith("local-dir:") and not is_model(name.split(".", 1)[0]):
        raise _unknown_model(name)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """The zoo's registered names matching a wildcard pattern, sorted.

    Args:
        pattern: an fnmatch pattern, e.g. `"shapnet_deep*"`; empty means all (as in timm).
        pretrained: only names whose weights ship in the package (checked on disk now).
    """
    names = weights_available() if pretrained else [*ARCHITECTURES, *VARIANT_DEFAULTS]
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern or "*"))
