"""The zoo's one builder and its registration: every registered name is built by `build_model_with_cfg`.

The role of timm's `build_model_with_cfg`, in this order: resolve the cfg (registry tag, dict or cfg, then
`pretrained_cfg_overlay`); find the weights (an explicit `file`, else the package's `zoo/weights/<name>/`); merge
the arguments (documented defaults < the config.json next to the weights < the caller's kwargs); build the class;
record `model_args` and `pretrained_cfg` on the model (what `zoo.save_pretrained` writes); load the hash-checked
weights when `pretrained`.

`register` / `register_variant` add a name to the registry (`zoo._registry`) and to timm's, so that
`timm.create_model(name)` and `zoo.create_model(name)` both arrive here.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Mapping
from typing import Any

from timm.models import generate_default_cfgs, register_model
from torch import nn

from shapnets.contract import rename_args

from ._features import FeatureStages
from ._paths import CONFIG_NAME, WEIGHTS_NAME, shipped_dir
from ._registry import (
    ARCHITECTURES,
    ENTRIES,
    VARIANT_DEFAULTS,
    Family,
    ShapNetCfg,
    architecture_of,
    complete_cfg,
    instantiate,
    model_cfg,
    model_class,
    resolve_cfg,
    weights_available,
    weights_location,
)
from .hub import load_weights_into, read_config

__all__ = ["build_model_with_cfg", "register", "register_variant", "replace_head"]


def build_model_with_cfg(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered name: documented defaults < the weights' config.json < kwargs; then load the weights.

    Args:
        name: a registered name (generic or trained variant).
        pretrained: load the shipped (or `pretrained_cfg_overlay`-named) weights, hash-checked.
        **kwargs: constructor arguments of the class, plus timm's `pretrained_cfg`, `pretrained_cfg_overlay`,
            `cache_dir` (ignored: nothing is downloaded) and `pretrained_model_args` (timm's `local-dir:` copy of
            the recorded arguments, already merged into kwargs).

    Raises:
        ValueError: a config.json next to the weights that holds another architecture, or arguments the family
            refuses.
        TypeError: an argument the class does not take.
        RuntimeError: `pretrained` but no weights were found.
    """
    arch = architecture_of(name)
    family = ENTRIES.get(arch, Family())
    cfg = resolve_cfg(name, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None))
    kwargs.pop("cache_dir", None)  # no download cache: nothing is downloaded
    features_only = bool(kwargs.pop("features_only", False))
    feature_args = {k: kwargs.pop(k) for k in ("out_indices", "feature_cls", "output_fmt") if k in kwargs}
    if feature_args and not features_only:
        raise TypeError(f"{name}: {sorted(feature_args)} only go with features_only=True")
    if features_only:
        _check_features(name, model_class(name), feature_args)
    kwargs.pop("pretrained_model_args", None)  # timm's `local-dir:` copy of model_args, already in kwargs

    location = weights_location(name, cfg)
    folder = location if location is None or location.is_dir() else location.parent
    recorded: dict[str, Any] = {}
    if location is not None and (folder / CONFIG_NAME).is_file():
        config = read_config(folder)
        if architecture_of(config["architecture"]) != arch:
            raise ValueError(f"{folder / CONFIG_NAME} holds a {config['architecture']} but {name} is a {arch}")
        recorded = config["model_args"]

    # Each source under the current argument names first (shapnets.contract), so that a recorded old name never
    # conflicts with a new one given now; only the caller's old names are worth a DeprecationWarning.
    model_cls = model_class(name)
    defaults = {**family.defaults, **VARIANT_DEFAULTS.get(name, (arch, {}))[1]}
    stored = {**rename_args(model_cls, defaults, warn=False), **rename_args(model_cls, recorded, warn=False)}
    args = {**stored, **rename_args(model_cls, kwargs)}
    # timm's fine-tuning call: pretrained weights with another number of classes. The model is built like the
    # checkpoint, loaded strictly, and then given a new head (the pretrained one's classes are dropped).
    new_classes = args.get("num_classes")
    new_head = pretrained and "num_classes" in stored and new_classes != stored["num_classes"]
    if new_head:
        args["num_classes"] = stored["num_classes"]
    if family.prepare is not None:
        args = family.prepare(name, args)
    model = instantiate(name, args, cfg)
    model.model_args.update(dict.fromkeys(family.transient_args))

    if pretrained:
        if location is None:
            raise RuntimeError(
                f"{name} has no shipped weights (looked in {shipped_dir(name)}); "
                f"names with weights: {weights_available() or 'none yet'}. {family.missing_hint}"
            )
        load_weights_into(model, location)
        model.pretrained_cfg["file"] = str(location)
        if new_head:
            _replace_head(model, name, new_classes)
    if features_only:
        return FeatureStages(model, feature_args.get("out_indices"))
    return model


def _check_features(name: str, model_cls: type[nn.Module], feature_args: Mapping[str, Any]) -> None:
    """Refuse `features_only=True` where a family has no feature maps, and timm options we do not implement.

    Raises:
        ValueError: a tabular (or other map-less) family, or a `feature_cls` / `output_fmt` other than the default.
    """
    if not callable(getattr(model_cls, "forward_intermediates", None)):
        what = ("takes tabular data: its representations are per feature, not maps" if "in_features" in
                _parameters(model_cls) else "has no feature levels (no forward_intermediates)")
        raise ValueError(f"{name}: features_only=True needs feature maps, but {model_cls.__name__} {what}; use "
                         "model.forward_features(x) for the representation its head reads")
    cls = feature_args.get("feature_cls")
    if cls not in (None, "getter"):
        raise ValueError(f"{name}: feature_cls={cls!r} is not supported; the zoo's feature wrapper is the "
                         "'getter' kind (forward_intermediates)")
    fmt = feature_args.get("output_fmt")
    if fmt not in (None, "NCHW"):
        raise ValueError(f"{name}: features_only gives NCHW maps, got output_fmt={fmt!r}")


def _parameters(model_cls: type[nn.Module]) -> set[str]:
    return set(inspect.signature(model_cls.__init__).parameters)


def replace_head(model: nn.Module, num_classes: int) -> dict[str, list[str]]:
    """`model.reset_classifier(num_classes)`, reporting which state-dict entries it kept and which are new.

    An entry is new when `reset_classifier` replaced its tensor (the family decides what its head is: a ShapNet's
    last stage, the output layers of a Shallow ShapNet's inner nets, a linear classifier ...); every other entry is
    the same tensor as before, so its weights are kept as they were.

    Args:
        model: a model with timm's `reset_classifier`.
        num_classes: the new head's classes (`0`: no head, where the family supports it).

    Returns:
        `kept` (entries untouched), `new` (freshly initialised) and `dropped` (entries the new head no longer has).

    Raises:
        ValueError: the model has no replaceable head (no `reset_classifier`).
    """
    if not callable(getattr(model, "reset_classifier", None)):
        raise ValueError(f"{type(model).__name__} has no head to replace (no reset_classifier)")
    before = model.state_dict(keep_vars=True)
    model.reset_classifier(num_classes)
    after = model.state_dict(keep_vars=True)
    new = [k for k, v in after.items() if before.get(k) is not v]
    return {"kept": [k for k in after if k not in new], "new": new, "dropped": [k for k in before if k not in after]}


def _replace_head(model: nn.Module, name: str, num_classes: Any) -> None:
    """Give a pretrained model a freshly initialised head of `num_classes`, keeping every other weight.

    Raises:
        ValueError: the family has no replaceable head (`reset_classifier`), naming what to do instead.
    """
    if not callable(getattr(model, "reset_classifier", None)):
        raise ValueError(f"{name}: pretrained=True with num_classes={num_classes} needs a new head, but "
                         f"{type(model).__name__} has none to replace (no reset_classifier); use pretrained=False, "
                         "or initialise from the checkpoint with training's model.init_from and strict=false")
    model.pretrained_load_report = replace_head(model, num_classes)
    model.model_args["num_classes"] = num_classes
    model.pretrained_cfg.update(num_classes=num_classes, label_names=None)  # the labels were the old head's
    complete_cfg(model)


def _add_to_timm(name: str, cfg: ShapNetCfg | None, module: str) -> None:
    """Register `name` with timm: its cfg in `module.default_cfgs` (where timm looks) and an entry point."""
    cfg = cfg if cfg is not None else model_cfg()
    if cfg.file is None and (shipped_dir(name) / WEIGHTS_NAME).is_file():
        cfg = dataclasses.replace(cfg, file=str(shipped_dir(name) / WEIGHTS_NAME))  # timm then lists it as pretrained
    owner = sys.modules[module]
    if not hasattr(owner, "default_cfgs"):
        owner.default_cfgs = {}
    owner.default_cfgs.update(generate_default_cfgs({name: cfg}))

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_model_with_cfg(name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = module
    entry.__doc__ = cfg.description
    register_model(entry)


def _caller_module() -> str:
    return sys._getframe(2).f_globals["__name__"]


def register(name: str, model_cls: type[nn.Module], cfg: ShapNetCfg | None = None, *, family: Family | None = None,
             module: str | None = None) -> None:
    """Register a generic name: `timm.create_model(name, **constructor_kwargs)` builds `model_cls`.

    Args:
        name: the registered name (lower case, as timm's).
        model_cls: the class it builds; its constructor arguments are the name's kwargs.
        cfg: the per-weight metadata (`zoo.model_cfg(description=..., ...)`).
        family: builder options (`Family`): an argument hook, build-only arguments, a missing-weights hint.
        module: the module timm records the name under; default the caller's.

    Raises:
        TypeError: `model_cls` is not an `nn.Module` class.
    """
    if not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module)):
        raise TypeError(f"register({name!r}): model_cls must be an nn.Module class, got {model_cls!r}")
    ARCHITECTURES[name] = model_cls
    ENTRIES[name] = family or Family()
    _add_to_timm(name, cfg, module or _caller_module())


def register_variant(name: str, architecture: str, defaults: Mapping[str, Any], cfg: ShapNetCfg | None = None, *,
                     module: str | None = None) -> None:
    """Register a trained variant: a generic name with documented arguments (and weights in `zoo/weights/<name>/`).

    Args:
        name: the variant's name, e.g. `shapnet_deep_yeast`.
        architecture: the generic name it is built like (registered first).
        defaults: its constructor arguments, used where no shipped config.json records them.
        cfg: its per-weight metadata (data set, input size, classes, preprocessing ...).
        module: the module timm records the name under; default the caller's.

    Raises:
        ValueError: `architecture` is not a registered generic name.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"register_variant({name!r}): {architecture!r} is not a registered generic name; "
                         f"known: {sorted(ARCHITECTURES)}")
    VARIANT_DEFAULTS[name] = (architecture, dict(defaults))
    _add_to_timm(name, cfg, module or _caller_module())
