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

from typing import Any

from shapnets import ConvShapNet, DeepShapNet, ShallowShapNet

from ._builder import register, register_variant

# The registry's tables, re-exported: they lived here before zoo/_registry.py.
from ._registry import ARCHITECTURES, MNIST_CFG, VARIANT_DEFAULTS, Family, ShapNetCfg, model_cfg

__all__ = ["ARCHITECTURES", "PAPER", "PAPER_ID", "VARIANT_DEFAULTS"]

PAPER = "Shapley Explanation Networks (Wang, Wang, Inouye, ICLR 2021)"
PAPER_ID = "arXiv:2104.02297"

_EXACT = "exact Shapley values of the whole network (Shallow ShapNet)"
_LAYERWISE = "local accuracy and missingness hold exactly; layer-wise Shapley representations (not end-to-end exact)"


def _cfg(**kwargs: Any) -> ShapNetCfg:
    """`zoo.model_cfg` with this family's paper."""
    return model_cfg(**{"paper_name": PAPER, "paper_ids": PAPER_ID,
                        "origin_url": "https://github.com/inouye-lab/ShapleyExplanationNetworks", **kwargs})


def _tabular_cfg(
    name: str, dataset: str, num_features: int, num_classes: int, explanation: str, description: str | None = None,
    **kwargs: Any
) -> ShapNetCfg:
    kind = "Shallow" if name.startswith("shapnet_shallow") else "Deep"
    if kind == "Shallow":
        kwargs.setdefault("classifier", "banks")  # every module produces class channels: no earlier stage
    return _cfg(
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


def _mnist_conv_cfg(description: str) -> ShapNetCfg:
    return _cfg(
        description=f"{description}: 1x28x28 images, 10 classes",
        **MNIST_CFG,
        players="one player per pixel",
        player_axes=("height", "width"),
        reference="a black pixel after normalization, (0 - 0.1307) / 0.3081: the background",
        explanation=_LAYERWISE,
    )


_BREAST = "UCI Breast Cancer Wisconsin (Diagnostic), 569 rows (the copy in scikit-learn)"
_YEAST = "UCI Yeast, 1,484 rows"
_ADULT = ("UCI Adult / Census Income, 12 features (fnlwgt and education dropped, rows with '?' dropped), "
          "official train / test split (30,162 / 15,061 rows after dropping)")

# Generic names build bare with documented defaults (timm's convention), which their cfgs state too.
_TABULAR = Family(defaults=dict(in_features=8, num_classes=2))
_TABULAR_CFG = dict(fixed_input_size=False, input_size=(8,), num_classes=2, player_axes=("feature",),
                    players="one player per feature")
register("shapnet_shallow", ShallowShapNet, _cfg(
    description="Shallow ShapNet, any tabular data (pass in_features, num_classes; bare: 8 features, 2 classes)",
    explanation=_EXACT, classifier="banks", **_TABULAR_CFG), family=_TABULAR)
register("shapnet_deep", DeepShapNet, _cfg(
    description="Deep ShapNet, any tabular data (pass in_features, num_classes; bare: 8 features, 2 classes)",
    explanation=_LAYERWISE, **_TABULAR_CFG), family=_TABULAR)
register("shapnet_conv", ConvShapNet, _cfg(
    description="Convolutional ShapNet, any image size (pass in_chans, num_classes; bare: 1x28x28, 10 classes)",
    explanation=_LAYERWISE, player_axes=("height", "width"), players="one player per pixel (all its channels)",
    fixed_input_size=False, input_size=(1, 28, 28), num_classes=10, mean=MNIST_CFG["mean"], std=MNIST_CFG["std"]))

_CANCER_LABELS = dict(label_names=("malignant", "benign"))
_ADULT_LABELS = dict(label_names=("<=50K", ">50K"))
_MNIST_CONV = dict(in_chans=1, num_classes=10, channels=(16, 16, 16, 16), hidden=(32,), reference=-0.1307 / 0.3081)

# Trained variants: (name, generic name, documented arguments, cfg). A shipped zoo/weights/<name>/config.json
# overrides the documented arguments; tests/test_architecture.py checks that the two agree.
for _name, _arch, _defaults, _variant_cfg in [
    ("shapnet_shallow_breast_cancer", "shapnet_shallow", dict(in_features=30, num_classes=2, groups="pairs",
                                                              hidden=(2,)),
     _tabular_cfg("shapnet_shallow_breast_cancer", _BREAST, 30, 2, _EXACT, **_CANCER_LABELS)),
    ("shapnet_deep_breast_cancer", "shapnet_deep", dict(in_features=30, num_classes=2, channels=8, hidden=(16,)),
     _tabular_cfg("shapnet_deep_breast_cancer", _BREAST, 30, 2, _LAYERWISE, **_CANCER_LABELS)),
    ("shapnet_shallow_yeast", "shapnet_shallow", dict(in_features=8, num_classes=10, groups="pairs", hidden=(32,)),
     _tabular_cfg("shapnet_shallow_yeast", _YEAST, 8, 10, _EXACT)),
    ("shapnet_deep_yeast", "shapnet_deep", dict(in_features=8, num_classes=10, channels=32, hidden=(32,)),
     _tabular_cfg("shapnet_deep_yeast", _YEAST, 8, 10, _LAYERWISE)),
    ("shapnet_deep_yeast_l1", "shapnet_deep", dict(in_features=8, num_classes=10, channels=32, hidden=(32,)),
     _tabular_cfg("shapnet_deep_yeast_l1", _YEAST, 8, 10, _LAYERWISE, description=(
         "Deep ShapNet for UCI Yeast fine-tuned with L1 sparsity on every layer: 8 features, 10 classes"))),
    ("shapnet_shallow_adult", "shapnet_shallow", dict(in_features=12, num_classes=2, groups="pairs", hidden=(32,)),
     _tabular_cfg("shapnet_shallow_adult", _ADULT, 12, 2, _EXACT, **_ADULT_LABELS)),
    ("shapnet_deep_adult", "shapnet_deep", dict(in_features=12, num_classes=2, channels=32, hidden=(32,)),
     _tabular_cfg("shapnet_deep_adult", _ADULT, 12, 2, _LAYERWISE, **_ADULT_LABELS)),
    ("shapnet_conv_mnist", "shapnet_conv", _MNIST_CONV, _mnist_conv_cfg("Convolutional ShapNet for MNIST")),
    ("shapnet_conv_mnist_l1", "shapnet_conv", _MNIST_CONV,
     _mnist_conv_cfg("Convolutional ShapNet for MNIST fine-tuned with scale-free L1 (L1/L2) sparsity on its "
                     "explanation")),
    # Trained with pruning on and shipped pruned (docs/regularizers.md): the pruning is part of the model.
    ("shapnet_conv_mnist_l1_all", "shapnet_conv", dict(_MNIST_CONV, prune=(0.15, 0.15, 0.15, 0.15, 0.0),
                                                       prune_mode="active", prune_input=0.35,
                                                       prune_during_training=True),
     _mnist_conv_cfg("Convolutional ShapNet for MNIST fine-tuned with L1 sparsity on every layer's representation and "
                     "instance-based pruning on, shipped pruned")),
    ("shapnet_conv_mnist_linf", "shapnet_conv", _MNIST_CONV,
     _mnist_conv_cfg("Convolutional ShapNet for MNIST fine-tuned with scale-free L-inf (L-inf/L1) spreading of its "
                     "explanation")),
    ("shapnet_deep_yeast_faithful", "shapnet_deep", dict(in_features=8, num_classes=10, channels=32, hidden=(32,)),
     _tabular_cfg("shapnet_deep_yeast_faithful", _YEAST, 8, 10, _LAYERWISE, description=(
         "Deep ShapNet for UCI Yeast fine-tuned with the fidelity term (own explanation trained toward the exact "
         "Shapley values): 8 features, 10 classes"))),
    ("shapnet_deep_adult_faithful", "shapnet_deep", dict(in_features=12, num_classes=2, channels=32, hidden=(32,)),
     _tabular_cfg("shapnet_deep_adult_faithful", _ADULT, 12, 2, _LAYERWISE, **_ADULT_LABELS, description=(
         "Deep ShapNet for Adult fine-tuned with the fidelity term (own explanation trained toward the exact "
         "Shapley values): 12 features, 2 classes"))),
    ("shapnet_deep_breast_cancer_faithful", "shapnet_deep", dict(in_features=30, num_classes=2, channels=8,
                                                                 hidden=(16,)),
     _tabular_cfg("shapnet_deep_breast_cancer_faithful", _BREAST, 30, 2, _LAYERWISE, **_CANCER_LABELS, description=(
         "Deep ShapNet for Breast Cancer fine-tuned with the fidelity term (own explanation trained toward the "
         "exact Shapley values): 30 features, 2 classes"))),
]:
    register_variant(_name, _arch, _defaults, _variant_cfg)
