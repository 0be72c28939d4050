"""The steps every family's timm builder shares (ICNN, CapsNet, plain baselines): timm's extra kwargs, a trained
variant's arguments, and recording + loading the whole model's weights.

The ShapNet builder (`zoo.shapnets_models._create_shapnet`) follows the same order: documented defaults < the shipped
config.json < the caller's kwargs; then `model_args` / `pretrained_cfg` are recorded on the model so that
`zoo.save_pretrained` can write them and `zoo.load_pretrained` can rebuild it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ._paths import CONFIG_NAME, WEIGHTS_NAME, shipped_dir
from .shapnets_models import ShapNetCfg, _weights_location, resolve_cfg

__all__ = ["finish_model", "pop_timm_kwargs", "variant_kwargs"]


def pop_timm_kwargs(variant: str, kwargs: dict[str, Any]) -> ShapNetCfg:
    """Remove timm's own keyword arguments from `kwargs` (in place) and return the resolved cfg of `variant`."""
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)  # no download cache: nothing is downloaded
    kwargs.pop("pretrained_model_args", None)  # timm's `local-dir:` copy of model_args, already in kwargs
    return resolve_cfg(variant, pretrained_cfg, overlay)


def variant_kwargs(variant: str, defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A trained variant's arguments: its documented defaults < its shipped config.json < the caller's kwargs."""
    from .hub import read_config  # hub imports the registries: a top-level import would be circular

    shipped = shipped_dir(variant)
    recorded = read_config(shipped)["model_args"] if (shipped / CONFIG_NAME).is_file() else {}
    return {**defaults, **recorded, **kwargs}


def finish_model(model: nn.Module, variant: str, model_args: Mapping[str, Any], cfg: ShapNetCfg, pretrained: bool,
                 missing_hint: str) -> nn.Module:
    """Record the arguments and cfg on `model`, then load its hash-checked weights when `pretrained`.

    Raises:
        RuntimeError: `pretrained` but no weights were found (`missing_hint` says what to do instead).
    """
    model.model_args = dict(model_args)
    model.pretrained_cfg = cfg.to_dict()
    model.default_cfg = model.pretrained_cfg  # timm's backwards-compatible alias
    if pretrained:
        from .hub import load_weights_into  # hub imports the registries: a top-level import would be circular

        location = _weights_location(variant, cfg)
        location = location if location is not None else shipped_dir(variant) / WEIGHTS_NAME
        if not location.exists():
            raise RuntimeError(f"{variant} has no shipped weights (looked in {location}); {missing_hint}")
        load_weights_into(model, location)
        model.pretrained_cfg["file"] = str(location)
    return model
