"""The ShapNet model zoo: a timm registry, verified safetensors weights and generated model cards.

```python
import zoo

model = zoo.create_model("shapnet_deep", in_features=8, num_classes=10)   # any timm-style kwargs
zoo.save_pretrained(model, "out/yeast", metadata={"metrics": {"test_accuracy": 0.6}})
model = zoo.load_pretrained("out/yeast")                                   # hash-checked, strict
zoo.list_models("shapnet_*")
```

Importing `zoo` registers every `shapnet_*` name with timm, so `timm.create_model` and
`timm.list_models("shapnet_*")` see them too. Nothing here touches the network.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any

import timm
from timm.models import is_model
from timm.models import list_models as _timm_list_models
from torch import nn

# The family files register their names (with timm too) when imported.
from . import baselines, capsnet_models, icnn_models, shapnets_models  # noqa: F401
from ._args import ACT_LAYERS, jsonable
from ._builder import build_model_with_cfg, register, register_variant
from ._paths import card_path, shipped_dir
from ._registry import (
    ARCHITECTURES,
    VARIANT_DEFAULTS,
    Family,
    ShapNetCfg,
    known_names_hint,
    model_cfg,
    model_class,
    weights_available,
)
from .cards import model_info, write_model_card
from .hub import load_pretrained, read_config, save_pretrained, sha256_of

__all__ = [
    "ACT_LAYERS",
    "ARCHITECTURES",
    "VARIANT_DEFAULTS",
    "Family",
    "ShapNetCfg",
    "build_model_with_cfg",
    "card_path",
    "create_model",
    "jsonable",
    "list_models",
    "load_pretrained",
    "model_cfg",
    "model_class",
    "model_info",
    "read_config",
    "register",
    "register_variant",
    "save_pretrained",
    "sha256_of",
    "shipped_dir",
    "write_model_card",
]



def _unknown_model(name: str) -> ValueError:
    close = difflib.get_close_matches(name, _timm_list_models(), n=5, cutoff=0.6)
    hint = f" Close matches among all timm models: {close}." if close else ""
    return ValueError(f"unknown model {name!r}.{hint} " + known_names_hint(name))


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
