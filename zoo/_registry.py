"""The zoo's one registry: every family's classes, trained variants and per-weight cfgs, filled by `zoo.register`.

Nothing here builds a model from weights or touches a file but `weights_location`; the builder (`zoo._builder`)
and the hub (`zoo.hub`) read these tables, and the family files (`zoo/*_models.py`) fill them.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm.models import PretrainedCfg, get_pretrained_cfg
from torch import nn

from shapnets.contract import rename_args

from ._args import decode_model_args, full_model_args
from ._paths import WEIGHTS_NAME, shipped_dir

__all__ = [
    "ARCHITECTURES",
    "ENTRIES",
    "MNIST_CFG",
    "VARIANT_DEFAULTS",
    "Family",
    "ShapNetCfg",
    "architecture_of",
    "complete_cfg",
    "instantiate",
    "known_names_hint",
    "model_cfg",
    "model_class",
    "resolve_cfg",
    "weights_available",
    "weights_location",
]

ARCHITECTURES: dict[str, type[nn.Module]] = {}
"""Generic registered name -> the class it builds (`shapnet_deep` -> `DeepShapNet`); the hub rebuilds through it."""

VARIANT_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {}
"""Trained variant -> (the generic name it is built like, its documented constructor arguments)."""


@dataclass(frozen=True)
class Family:
    """How the builder treats one generic name beyond "call the class with the arguments".

    Attributes:
        prepare: `(name, args) -> args`, run on the merged arguments before the class is called: fills or checks
            arguments the name implies (e.g. the backbone of `icnn_resnet18`). Raises for arguments it refuses.
        transient_args: arguments used while building only, recorded as `None` in `model.model_args` (e.g. a
            backbone checkpoint that seeds the weights: a rebuild from config.json must not need the file).
        missing_hint: what to do instead, said when `pretrained=True` finds no weights.
        defaults: documented arguments of a bare creation (`create_model(name)` with nothing else); the cfg
            says the same (`num_classes`, `input_size`).
    """

    prepare: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
    transient_args: tuple[str, ...] = ()
    missing_hint: str = "Use pretrained=False, or pretrained_cfg_overlay=dict(file=<folder or .safetensors>)"
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


ENTRIES: dict[str, Family] = {}
"""Generic registered name -> its `Family` options (variants use their generic name's)."""


@dataclass
class ShapNetCfg(PretrainedCfg):
    """timm's per-weight metadata plus the data set and the game a self-explaining model explains.

    Attributes:
        dataset: the data set (and split) the weights were trained on.
        preprocessing: how raw inputs become model inputs (the explanation is in that space).
        num_players: how many players one explanation has.
        players: what a player is (a feature, a pixel with all its channels).
        player_axes: the attribution axes between batch and class (`Explanation.player_axes`).
        reference: the reference input the explanation is relative to.
        explanation: which guarantees the model's own explanation has (exact / local accuracy ...).
    """

    dataset: str | None = None
    preprocessing: str | None = None
    num_players: int | None = None
    players: str | None = None
    player_axes: tuple[str, ...] | None = None
    reference: str | None = None
    explanation: str | None = None


_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(ShapNetCfg))

MNIST_CFG: dict[str, Any] = dict(
    input_size=(1, 28, 28), num_classes=10, mean=(0.1307,), std=(0.3081,), num_players=28 * 28,
    dataset="MNIST, official train (60,000) / test (10,000) split", label_names=tuple(str(d) for d in range(10)),
    preprocessing="pixels scaled to [0, 1] (uint8 / 255), then normalized with mean 0.1307 and std 0.3081",
)
"""The cfg fields every family's MNIST weights share (data set, input, normalisation, one player per pixel)."""


def model_cfg(**kwargs: Any) -> ShapNetCfg:
    """A cfg with neutral defaults: no input size and no image preprocessing fields that would mislead.

    Args:
        **kwargs: any `ShapNetCfg` field (`description`, `input_size`, `num_classes`, `mean`, `paper_ids` ...).
    """
    defaults = dict(input_size=None, fixed_input_size=True, interpolation=None, crop_pct=None, crop_mode=None,
                    mean=None, std=None, license="mit")
    return ShapNetCfg(**{**defaults, **kwargs})


def architecture_of(name: str) -> str:
    """The generic architecture (`shapnet_shallow`, `icnn_vgg_small` ...) behind a registered name.

    Raises:
        ValueError: the name is not registered in the zoo, with close matches.
    """
    arch = name.split(".", 1)[0]
    if arch in ARCHITECTURES:
        return arch
    if arch in VARIANT_DEFAULTS:
        return VARIANT_DEFAULTS[arch][0]
    raise ValueError(f"unknown ShapNet architecture {name!r}. " + known_names_hint(arch))


def model_class(name: str) -> type[nn.Module]:
    """The class a registered name builds (`shapnet_shallow_adult` -> `ShallowShapNet`).

    Raises:
        ValueError: the name is not registered in the zoo, with close matches.
    """
    return ARCHITECTURES[architecture_of(name)]


def known_names_hint(name: str) -> str:
    """'Did you mean [...]? Known ShapNets: [...]' - the tail of every unknown-name error."""
    known = sorted([*ARCHITECTURES, *VARIANT_DEFAULTS])
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return (f"Did you mean {close}? " if close else "") + f"Known ShapNets: {known}"


def weights_available() -> list[str]:
    """Registered names whose weights are shipped in the package (checked on disk, now)."""
    return sorted(n for n in VARIANT_DEFAULTS if (shipped_dir(n) / WEIGHTS_NAME).is_file())


def resolve_cfg(variant: str, pretrained_cfg: Any, overlay: Mapping[str, Any] | None) -> ShapNetCfg:
    """timm's cfg resolution (registry tag, dict, or cfg, then an overlay), keeping our extra fields.

    timm's own `resolve_pretrained_cfg` would reject the extra fields of a `ShapNetCfg` given as a dict.
    """
    if isinstance(pretrained_cfg, str) and pretrained_cfg:
        base = get_pretrained_cfg(f"{variant}.{pretrained_cfg}")
        if base is None:
            raise ValueError(f"{variant} has no pretrained tag {pretrained_cfg!r}")
    elif isinstance(pretrained_cfg, Mapping):
        unknown = sorted(set(pretrained_cfg) - _CFG_FIELDS)
        if unknown:
            raise ValueError(f"{variant}: unknown pretrained_cfg field(s) {unknown}")
        base = ShapNetCfg(**pretrained_cfg)
    elif isinstance(pretrained_cfg, PretrainedCfg):
        base = pretrained_cfg
    else:
        base = get_pretrained_cfg(variant) or model_cfg()
    if not isinstance(base, ShapNetCfg):
        base = ShapNetCfg(**dataclasses.asdict(base))
    changes = dict(overlay or {})
    if not base.architecture:
        changes.setdefault("architecture", variant)
    return dataclasses.replace(base, **changes)


def weights_location(variant: str, cfg: ShapNetCfg) -> Path | None:
    """Where this variant's weights are: an explicit `file` (a file or a folder), else the package folder.

    The registry's own `file` was resolved at import; the package folder is looked up again now, so
    weights exported after import (or a relocated weights root) are what gets loaded.
    """
    registry_cfg = get_pretrained_cfg(variant)
    if cfg.file and cfg.file != getattr(registry_cfg, "file", None):
        return Path(cfg.file)  # from pretrained_cfg_overlay or timm's `local-dir:`
    weights = shipped_dir(variant) / WEIGHTS_NAME
    return weights if weights.is_file() else None


def instantiate(name: str, args: Mapping[str, Any], cfg: ShapNetCfg) -> nn.Module:
    """Build the class behind `name` from (JSON-able or Python) arguments, recording them and the cfg.

    `model.model_args` gets every constructor argument (defaults filled in) for `zoo.save_pretrained`;
    `model.pretrained_cfg` (and timm's alias `default_cfg`) the cfg as a dict, as timm's builder does.
    """
    model_cls = model_class(name)
    model_args = full_model_args(model_cls, rename_args(model_cls, decode_model_args(args, name), warn=False))
    model = model_cls(**model_args)
    model.model_args = model_args
    model.pretrained_cfg = cfg.to_dict()
    model.default_cfg = model.pretrained_cfg  # timm's backwards-compatible alias
    complete_cfg(model)
    return model


def complete_cfg(model: nn.Module) -> None:
    """The cfg as timm reads it, for the model as built: classes, input size, first conv and classifier."""
    cfg = model.pretrained_cfg
    if isinstance(getattr(model, "num_classes", None), int):
        cfg["num_classes"] = model.num_classes
    if isinstance(getattr(model, "in_features", None), int):
        channels = getattr(model, "in_channels", 1)
        cfg["input_size"] = (model.in_features,) if channels == 1 else (model.in_features, channels)
    elif isinstance(getattr(model, "in_chans", None), int) and cfg.get("input_size"):
        cfg["input_size"] = (model.in_chans, *tuple(cfg["input_size"])[1:])
    cfg["first_conv"] = next((n for n, m in model.named_modules() if _owns_parameters(m)), cfg.get("first_conv"))
    if callable(getattr(model, "get_classifier", None)):
        head = model.get_classifier()
        cfg["classifier"] = next((n for n, m in model.named_modules() if m is head), cfg.get("classifier"))


def _owns_parameters(module: nn.Module) -> bool:
    """The module holds weights itself (a parameter list counts as its owner's, as in a Shapley module bank)."""
    lists = (nn.ParameterList, nn.ParameterDict)
    if isinstance(module, lists):
        return False
    return next(module.parameters(False), None) is not None or any(isinstance(c, lists) for c in module.children())
