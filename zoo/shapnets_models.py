"""ShapNets in the timm registry: generic architectures and named variants with shipped weights.

Shapley Explanation Networks (Rui Wang, Xiaoqian Wang, David I. Inouye), ICLR 2021,
https://arxiv.org/abs/2104.02297

Generic entry points take the constructor arguments of the `shapnets` classes:

* `shapnet_shallow` -> `shapnets.ShallowShapNet` (exact Shapley values),
* `shapnet_deep` -> `shapnets.DeepShapNet` (butterfly wiring; local accuracy + missingness),
* `shapnet_conv` -> `shapnets.ConvShapNet` (dilated Shapley convolutions for images).

Named variants (`shapnet_<kind>_<dataset>`) fix a data set's input size and classes. Their
architecture comes from the shipped `zoo/weights/<name>/config.json` when it exists (the single
source of truth for those weights) and otherwise from the documented defaults below. Weights are
found inside the package, so `timm.create_model("shapnet_conv_mnist", pretrained=True)` works
offline once `zoo` (or this module) is imported.

Every model built here carries `model.model_args` (all constructor arguments) and
`model.pretrained_cfg`, which `zoo.save_pretrained` writes to config.json.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm.models import PretrainedCfg, generate_default_cfgs, get_pretrained_cfg, register_model
from torch import nn

from shapnets import ConvShapNet, DeepShapNet, ShallowShapNet

from ._args import decode_model_args, full_model_args
from ._paths import CONFIG_NAME, WEIGHTS_NAME, shipped_dir

__all__ = [
    "ARCHITECTURES",
    "VARIANT_DEFAULTS",
    "ShapNetCfg",
    "architecture_of",
    "instantiate",
    "known_names_hint",
    "weights_available",
]

PAPER = "Shapley Explanation Networks (Wang, Wang, Inouye, ICLR 2021)"
PAPER_ID = "arXiv:2104.02297"

# Generic architecture name -> class; named variants map onto one of these.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "shapnet_shallow": ShallowShapNet,
    "shapnet_deep": DeepShapNet,
    "shapnet_conv": ConvShapNet,
}


@dataclass
class ShapNetCfg(PretrainedCfg):
    """timm's per-weight metadata plus the data set and the game a ShapNet explains.

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

_EXACT = "exact Shapley values of the whole network (Shallow ShapNet)"
_LAYERWISE = "local accuracy and missingness hold exactly; layer-wise Shapley representations (not end-to-end exact)"


def _cfg(**kwargs: Any) -> ShapNetCfg:
    """A cfg with tabular defaults: no image preprocessing fields that would mislead."""
    defaults = dict(
        input_size=None,
        fixed_input_size=True,
        interpolation=None,
        crop_pct=None,
        crop_mode=None,
        mean=None,
        std=None,
        license="mit",
        paper_name=PAPER,
        paper_ids=PAPER_ID,
        origin_url="https://github.com/inouye-lab/ShapleyExplanationNetworks",
    )
    return ShapNetCfg(**{**defaults, **kwargs})


def _shipped_file(name: str) -> str | None:
    """The shipped weights file of `name` when it exists at import time (timm then lists it as pretrained)."""
    weights = shipped_dir(name) / WEIGHTS_NAME
    return str(weights) if weights.is_file() else None


def _tabular_cfg(
    name: str, dataset: str, num_features: int, num_classes: int, explanation: str, description: str | None = None,
    **kwargs: Any
) -> ShapNetCfg:
    kind = "Shallow" if name.startswith("shapnet_shallow") else "Deep"
    return _cfg(
        file=_shipped_file(name),
        description=description or f"{kind} ShapNet for {dataset.split(',')[0]}: {num_features} features, "
                                   f"{num_classes} classes",
        input_size=(num_features,),
        num_classes=num_classes,
        dataset=dataset,
        preprocessing="features standardized to zero mean and unit variance on the training split",
        num_players=num_features,
        players="one player per feature",
        player_axes=("feature",),
        reference="zeros in standardized space (the training mean of every feature)",
        explanation=explanation,
        **kwargs,
    )


def _mnist_conv_cfg(name: str, description: str) -> ShapNetCfg:
    return _cfg(
        file=_shipped_file(name),
        description=f"{description}: 1x28x28 images, 10 classes",
        input_size=(1, 28, 28),
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        dataset=_MNIST,
        preprocessing="pixels scaled to [0, 1] (uint8 / 255), then normalized with mean 0.1307 and std 0.3081",
        num_players=28 * 28,
        players="one player per pixel",
        player_axes=("height", "width"),
        reference="a black pixel after normalization, (0 - 0.1307) / 0.3081: the background",
        explanation=_LAYERWISE,
        label_names=tuple(str(d) for d in range(10)),
    )


_BREAST = "UCI Breast Cancer Wisconsin (Diagnostic), 569 rows (the copy in scikit-learn)"
_YEAST = "UCI Yeast, 1,484 rows"
_ADULT = ("UCI Adult / Census Income, 12 features (fnlwgt and education dropped, rows with '?' dropped), "
          "official train / test split (30,162 / 15,061 rows after dropping)")
_MNIST = "MNIST, official train (60,000) / test (10,000) split"

default_cfgs = generate_default_cfgs(
    {
        "shapnet_shallow": _cfg(
            description="Shallow ShapNet, any tabular data (pass in_features, out_features)",
            explanation=_EXACT,
            player_axes=("feature",),
            players="one player per feature",
            num_classes=None,
            fixed_input_size=False,
        ),
        "shapnet_deep": _cfg(
            description="Deep ShapNet, any tabular data (pass in_features, num_classes)",
            explanation=_LAYERWISE,
            player_axes=("feature",),
            players="one player per feature",
            num_classes=None,
            fixed_input_size=False,
        ),
        "shapnet_conv": _cfg(
            description="Convolutional ShapNet, any image size (pass in_chans, num_classes)",
            explanation=_LAYERWISE,
            player_axes=("height", "width"),
            players="one player per pixel (all its channels)",
            num_classes=None,
            fixed_input_size=False,
        ),
        "shapnet_shallow_breast_cancer": _tabular_cfg(
            "shapnet_shallow_breast_cancer", _BREAST, 30, 2, _EXACT, label_names=("malignant", "benign")
        ),
        "shapnet_deep_breast_cancer": _tabular_cfg(
            "shapnet_deep_breast_cancer", _BREAST, 30, 2, _LAYERWISE, label_names=("malignant", "benign")
        ),
        "shapnet_shallow_yeast": _tabular_cfg("shapnet_shallow_yeast", _YEAST, 8, 10, _EXACT),
        "shapnet_deep_yeast": _tabular_cfg("shapnet_deep_yeast", _YEAST, 8, 10, _LAYERWISE),
        "shapnet_shallow_adult": _tabular_cfg(
            "shapnet_shallow_adult", _ADULT, 12, 2, _EXACT, label_names=("<=50K", ">50K")
        ),
        "shapnet_deep_adult": _tabular_cfg(
            "shapnet_deep_adult", _ADULT, 12, 2, _LAYERWISE, label_names=("<=50K", ">50K")
        ),
        "shapnet_deep_yeast_l1": _tabular_cfg(
            "shapnet_deep_yeast_l1", _YEAST, 8, 10, _LAYERWISE,
            description="Deep ShapNet for UCI Yeast fine-tuned with L1 sparsity on every layer: 8 features, 10 classes",
        ),
        "shapnet_deep_yeast_faithful": _tabular_cfg(
            "shapnet_deep_yeast_faithful", _YEAST, 8, 10, _LAYERWISE,
            description="Deep ShapNet for UCI Yeast fine-tuned with the fidelity term (own explanation trained "
                        "toward the exact Shapley values): 8 features, 10 classes",
        ),
        "shapnet_deep_adult_faithful": _tabular_cfg(
            "shapnet_deep_adult_faithful", _ADULT, 12, 2, _LAYERWISE, label_names=("<=50K", ">50K"),
            description="Deep ShapNet for Adult fine-tuned with the fidelity term (own explanation trained toward "
                        "the exact Shapley values): 12 features, 2 classes",
        ),
        "shapnet_deep_breast_cancer_faithful": _tabular_cfg(
            "shapnet_deep_breast_cancer_faithful", _BREAST, 30, 2, _LAYERWISE, label_names=("malignant", "benign"),
            description="Deep ShapNet for Breast Cancer fine-tuned with the fidelity term (own explanation trained "
                        "toward the exact Shapley values): 30 features, 2 classes",
        ),
        "shapnet_conv_mnist": _mnist_conv_cfg("shapnet_conv_mnist", "Convolutional ShapNet for MNIST"),
        "shapnet_conv_mnist_l1": _mnist_conv_cfg(
            "shapnet_conv_mnist_l1", "Convolutional ShapNet for MNIST fine-tuned with L1 sparsity on its explanation"
        ),
    }
)

# Documented architectures of the named variants, used when no shipped config.json overrides them.
VARIANT_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Kept in step with configs/<kind>_<dataset>.yaml, which trains the shipped weights.
    "shapnet_shallow_breast_cancer": ("shapnet_shallow", dict(in_features=30, out_features=2, groups="pairs",
                                                              hidden=(16,))),
    "shapnet_deep_breast_cancer": ("shapnet_deep", dict(in_features=30, num_classes=2, channels=8, hidden=(16,))),
    "shapnet_shallow_yeast": ("shapnet_shallow", dict(in_features=8, out_features=10, groups="pairs", hidden=(32,))),
    "shapnet_deep_yeast": ("shapnet_deep", dict(in_features=8, num_classes=10, channels=32, hidden=(32,))),
    "shapnet_shallow_adult": ("shapnet_shallow", dict(in_features=12, out_features=2, groups="pairs", hidden=(32,))),
    "shapnet_deep_adult": ("shapnet_deep", dict(in_features=12, num_classes=2, channels=32, hidden=(32,))),
    "shapnet_deep_yeast_l1": ("shapnet_deep", dict(in_features=8, num_classes=10, channels=32, hidden=(32,))),
    "shapnet_deep_yeast_faithful": ("shapnet_deep", dict(in_features=8, num_classes=10, channels=32, hidden=(32,))),
    "shapnet_deep_adult_faithful": ("shapnet_deep", dict(in_features=12, num_classes=2, channels=32, hidden=(32,))),
    "shapnet_deep_breast_cancer_faithful": ("shapnet_deep", dict(in_features=30, num_classes=2, channels=8,
                                                                 hidden=(16,))),
    "shapnet_conv_mnist": ("shapnet_conv", dict(in_chans=1, num_classes=10, channels=(16, 16, 16, 16), hidden=(32,),
                                                reference=-0.1307 / 0.3081)),
    "shapnet_conv_mnist_l1": ("shapnet_conv", dict(in_chans=1, num_classes=10, channels=(16, 16, 16, 16),
                                                   hidden=(32,), reference=-0.1307 / 0.3081)),
}


def architecture_of(name: str) -> str:
    """The generic architecture (`shapnet_shallow` / `_deep` / `_conv`) behind a registered name.

    Raises:
        ValueError: the name is not a ShapNet, with close matches.
    """
    arch = name.split(".", 1)[0]
    if arch in ARCHITECTURES:
        return arch
    if arch in VARIANT_DEFAULTS:
        return VARIANT_DEFAULTS[arch][0]
    raise ValueError(f"unknown ShapNet architecture {name!r}. " + known_names_hint(arch))


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
        base = get_pretrained_cfg(variant) or _cfg()
    if not isinstance(base, ShapNetCfg):
        base = ShapNetCfg(**dataclasses.asdict(base))
    changes = dict(overlay or {})
    if not base.architecture:
        changes.setdefault("architecture", variant)
    return dataclasses.replace(base, **changes)


def instantiate(name: str, args: Mapping[str, Any], cfg: ShapNetCfg) -> nn.Module:
    """Build the class behind `name` from (JSON-able or Python) arguments, recording them and the cfg.

    `model.model_args` gets every constructor argument (defaults filled in) for `zoo.save_pretrained`;
    `model.pretrained_cfg` (and timm's alias `default_cfg`) the cfg as a dict, as timm's builder does.
    """
    model_cls = ARCHITECTURES[architecture_of(name)]
    model_args = full_model_args(model_cls, decode_model_args(args, name))
    model = model_cls(**model_args)
    model.model_args = model_args
    model.pretrained_cfg = cfg.to_dict()
    model.default_cfg = model.pretrained_cfg  # timm's backwards-compatible alias
    return model


def _weights_location(variant: str, cfg: ShapNetCfg) -> Path | None:
    """Where this variant's weights are: an explicit `file` (a file or a folder), else the package folder.

    The registry's own `file` was resolved at import; the package folder is looked up again now, so
    weights exported after import (or a relocated weights root) are what gets loaded.
    """
    registry_cfg = get_pretrained_cfg(variant)
    if cfg.file and cfg.file != getattr(registry_cfg, "file", None):
        return Path(cfg.file)  # from pretrained_cfg_overlay or timm's `local-dir:`
    weights = shipped_dir(variant) / WEIGHTS_NAME
    return weights if weights.is_file() else None


def _create_shapnet(
    variant: str,
    pretrained: bool = False,
    default_args: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a ShapNet: documented defaults < shipped config.json < caller's kwargs; then load weights.

    Args:
        variant: the registered name being built.
        pretrained: load the shipped (or `pretrained_cfg`-named) weights, hash-checked.
        default_args: the variant's documented architecture arguments.
        **kwargs: constructor arguments of the class, plus timm's `pretrained_cfg`,
            `pretrained_cfg_overlay`, `cache_dir` (ignored: there is no hub).
    """
    # Imported here: hub builds models through this registry, so a top-level import would be circular.
    from .hub import load_weights_into, read_config

    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)  # no download cache: weights live inside the package
    kwargs.pop("pretrained_model_args", None)  # timm's `local-dir:` copy of model_args, already merged into kwargs
    cfg = resolve_cfg(variant, pretrained_cfg, overlay)

    location = _weights_location(variant, cfg)
    folder = location if location is None or location.is_dir() else location.parent
    shipped_args: dict[str, Any] = {}
    if location is not None and (folder / CONFIG_NAME).is_file():
        config = read_config(folder)
        if architecture_of(config["architecture"]) != architecture_of(variant):
            raise ValueError(
                f"{folder / CONFIG_NAME} holds a {config['architecture']} but {variant} is a {architecture_of(variant)}"
            )
        shipped_args = config["model_args"]

    model = instantiate(variant, {**(default_args or {}), **shipped_args, **kwargs}, cfg)

    if pretrained:
        if location is None:
            raise RuntimeError(
                f"{variant} has no shipped weights (looked in {shipped_dir(variant)}); "
                f"names with weights: {weights_available() or 'none yet'}. "
                f"Use pretrained=False, or pretrained_cfg_overlay=dict(file=<folder or .safetensors>)"
            )
        load_weights_into(model, location)
        model.pretrained_cfg["file"] = str(location)
    return model


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    defaults = VARIANT_DEFAULTS[name][1] if name in VARIANT_DEFAULTS else None
    return _create_shapnet(name, pretrained, defaults, **kwargs)


@register_model
def shapnet_shallow(pretrained: bool = False, **kwargs: Any) -> ShallowShapNet:
    """Shallow ShapNet; kwargs are `shapnets.ShallowShapNet`'s (`in_features`, `out_features`, ...)."""
    return _create("shapnet_shallow", pretrained, kwargs)


@register_model
def shapnet_deep(pretrained: bool = False, **kwargs: Any) -> DeepShapNet:
    """Deep ShapNet; kwargs are `shapnets.DeepShapNet`'s (`in_features`, `num_classes`, ...)."""
    return _create("shapnet_deep", pretrained, kwargs)


@register_model
def shapnet_conv(pretrained: bool = False, **kwargs: Any) -> ConvShapNet:
    """Convolutional ShapNet; kwargs are `shapnets.ConvShapNet`'s (`in_chans`, `num_classes`, ...)."""
    return _create("shapnet_conv", pretrained, kwargs)


@register_model
def shapnet_shallow_breast_cancer(pretrained: bool = False, **kwargs: Any) -> ShallowShapNet:
    """Shallow ShapNet (all feature pairs) for Breast Cancer Wisconsin: 30 features, 2 classes."""
    return _create("shapnet_shallow_breast_cancer", pretrained, kwargs)


@register_model
def shapnet_deep_breast_cancer(pretrained: bool = False, **kwargs: Any) -> DeepShapNet:
    """Deep ShapNet for Breast Cancer Wisconsin: 30 features (padded to 32), 2 classes."""
    return _create("shapnet_deep_breast_cancer", pretrained, kwargs)


@register_model
def shapnet_shallow_yeast(pretrained: bool = False, **kwargs: Any) -> ShallowShapNet:
    """Shallow ShapNet (all feature pairs) for Yeast: 8 features, 10 classes."""
    return _create("shapnet_shallow_yeast", pretrained, kwargs)


@register_model
def shapnet_deep_yeast(pretrained: bool = False, **kwargs: Any) -> DeepShapNet:
    """Deep ShapNet for Yeast: 8 features, 10 classes."""
    return _create("shapnet_deep_yeast", pretrained, kwargs)


@register_model
def shapnet_deep_yeast_l1(pretrained: bool = False, **kwargs: Any) -> DeepShapNet:
    """shapnet_deep_yeast fine-tuned with L1 sparsity on every layer (configs/finetune_deep_yeast_l1.yaml)."""
    return _create("shapnet_deep_yeast_l1", pretrained, kwargs)


@register_model
def shapnet_shallow_adult(pretrained: bool = False, **kwargs: Any) -> ShallowShapNet:
    """Shallow ShapNet (all feature pairs) for Adult / Census Income: 12 features, 2 classes."""
    return _create("shapnet_shallow_adult", pretrained, kwargs)


@register_model
def shapnet_deep_adult(pretrained: bool = False, **kwargs: Any) -> DeepShapNet:
    """Deep ShapNet for Adult / Census Income: 12 features (padded to 16), 2 classes."""
    return _create("shapnet_deep_adult", pretrained, kwargs)


@register_model
def shapnet_deep_yeast_faithful(pretrained: bool = False, **kwargs: Any) -> DeepShapNet:
    """shapnet_deep_yeast fine-tuned with the fidelity term (configs/finetune_deep_yeast_fidelity.yaml)."""
    return _create("shapnet_deep_yeast_faithful", pretrained, kwargs)


@register_model
def shapnet_deep_adult_faithful(pretrained: bool = False, **kwargs: Any) -> DeepShapNet:
    """shapnet_deep_adult fine-tuned with the fidelity term (configs/finetune_deep_adult_fidelity.yaml)."""
    return _create("shapnet_deep_adult_faithful", pretrained, kwargs)


@register_model
def shapnet_deep_breast_cancer_faithful(pretrained: bool = False, **kwargs: Any) -> DeepShapNet:
    """shapnet_deep_breast_cancer fine-tuned with the fidelity term (configs/finetune_deep_breast_cancer_fidelity.yaml).
    """
    return _create("shapnet_deep_breast_cancer_faithful", pretrained, kwargs)


@register_model
def shapnet_conv_mnist(pretrained: bool = False, **kwargs: Any) -> ConvShapNet:
    """Convolutional ShapNet for MNIST: 1x28x28 in [0, 1], 5 stages of 2x2 dilated patches, 10 classes."""
    return _create("shapnet_conv_mnist", pretrained, kwargs)


@register_model
def shapnet_conv_mnist_l1(pretrained: bool = False, **kwargs: Any) -> ConvShapNet:
    """shapnet_conv_mnist fine-tuned with L1 sparsity on its explanation (configs/finetune_conv_mnist_l1_final.yaml)."""
    return _create("shapnet_conv_mnist_l1", pretrained, kwargs)
