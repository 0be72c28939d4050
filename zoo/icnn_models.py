"""Interpretable CNNs in the timm registry: the interpretable layer on the top map of any timm CNN.

Interpretable Convolutional Neural Networks (Zhang, Wu, Zhu), CVPR 2018, https://arxiv.org/abs/1710.00935

Entry points (all take the constructor arguments of `TimmInterpretableCNN`, e.g. `num_classes`, `in_chans`,
`num_filters`, `pool`, `filter_loss_weight`, `interpretable=False` for the baseline):

* `icnn_vgg_small`: a small VGG-style backbone of our own (conv-BN-ReLU stages, stride 8), fast on a CPU;
* `icnn_vgg16`: timm's VGG-16 (the paper's main backbone), cut after its last conv stage;
* `icnn_resnet18`, `icnn_resnet34`: timm ResNets; the layer sits after the last residual addition, so no skip
  connection bypasses it;
* `icnn_timm`: any timm CNN that supports `features_only`, named by `backbone=` (e.g. `"convnext_atto"`).

Nothing is ever downloaded. A backbone can start from a checkpoint file the user has (a timm / torchvision
state dict, `.safetensors` or `.pth`): pass `backbone_checkpoint_path=`. timm adapts it as for its own
pretrained weights (first conv summed or repeated for another `in_chans`, classifier dropped). The argument
is not called `checkpoint_path` because `timm.create_model` reserves that name for a checkpoint of the whole
model, which it loads after building. The path is used while building only: the recorded `model.model_args`
hold `backbone_checkpoint_path=None`, so a saved ICNN rebuilds from its own weights without the file.

`pretrained=True` loads weights of the whole ICNN, from `pretrained_cfg_overlay=dict(file=<folder or
.safetensors>)` or from the package's `zoo/weights/<name>/`, hash-checked by `zoo.hub`. Trained variants (their
architecture in `ICNN_VARIANT_DEFAULTS`, trained by `configs/<...>.yaml`):

* `icnn_vgg_small_parts`: the hard synthetic parts data (8 classes of 3-part objects, 64x64, random colours,
  clutter, occlusion; `configs/icnn_parts.yaml`), and `icnn_vgg_small_parts_baseline`, the same network without
  mask and filter loss given the same epochs (`configs/icnn_parts_baseline.yaml`);
* `icnn_vgg_small_mnist`: MNIST (`configs/icnn_mnist.yaml`).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import is_model
from torch import Tensor, nn

from shapnets.icnn import InterpretableCNN

from ._builder import register, register_variant
from ._registry import MNIST_CFG, Family, architecture_of, model_cfg

__all__ = [
    "ICNN_ARCHITECTURES",
    "ICNN_VARIANT_DEFAULTS",
    "LOCAL_BACKBONES",
    "TimmInterpretableCNN",
    "VGGSmallFeatures",
    "build_backbone",
]

PAPER = "Interpretable Convolutional Neural Networks (Zhang, Wu, Zhu, CVPR 2018)"
PAPER_ID = "arXiv:1710.00935"


class VGGSmallFeatures(nn.Module):
    """A small VGG-style feature extractor: stages of (3x3 conv, BatchNorm, ReLU) x n, max-pooled between stages.

    Args:
        in_chans: input channels.
        channels: width of each stage.
        convs_per_stage: 3x3 convs in each stage.

    `forward` returns the last stage's map `(B, channels[-1], H / 2^(S-1), W / 2^(S-1))` for `S` stages.
    """

    def __init__(self, in_chans: int = 3, channels: Sequence[int] = (32, 64, 128, 256),
                 convs_per_stage: Sequence[int] = (1, 1, 2, 2)) -> None:
        super().__init__()
        if len(channels) != len(convs_per_stage) or not channels:
            raise ValueError(f"VGGSmallFeatures: one conv count per stage: {len(channels)} stages but "
                             f"{len(convs_per_stage)} counts")
        layers: list[nn.Module] = []
        width = in_chans
        for stage, (out, convs) in enumerate(zip(channels, convs_per_stage)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs):
                layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                width = out
        self.features = nn.Sequential(*layers)
        self.out_channels = int(channels[-1])
        self.reduction = 2 ** (len(channels) - 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


LOCAL_BACKBONES: dict[str, type[nn.Module]] = {"vgg_small": VGGSmallFeatures}
"""Backbones defined here rather than in timm, by the name `backbone=` takes."""


def build_backbone(
    name: str,
    in_chans: int = 3,
    out_index: int = -1,
    backbone_args: Mapping[str, Any] | None = None,
    checkpoint_path: str | None = None,
) -> nn.Module:
    """A feature extractor returning the top map: a `LOCAL_BACKBONES` entry or timm `features_only=True`.

    Args:
        name: `"vgg_small"` or a timm model name.
        in_chans: input channels.
        out_index: which of timm's feature stages to use (`-1`: the last, stride 32 for most CNNs; `-2`: the one
            before, stride 16, for small images).
        backbone_args: extra constructor arguments of the backbone.
        checkpoint_path: a local checkpoint file to start the (timm) backbone from; never a download.

    Raises:
        ValueError: an unknown name (with close matches), a hub name, a checkpoint for a local backbone, or a
            timm model without `features_only` support.
        FileNotFoundError: the checkpoint file does not exist.
    """
    args = dict(backbone_args or {})
    if name in LOCAL_BACKBONES:
        if checkpoint_path is not None:
            raise ValueError(f"backbone {name!r} has no timm checkpoint format; load weights into the whole model")
        if out_index != -1:
            raise ValueError(f"backbone {name!r} has one output map (out_index=-1), got out_index={out_index}")
        return LOCAL_BACKBONES[name](in_chans=in_chans, **args)
    if name.startswith(("hf-hub:", "hf_hub:")):
        raise ValueError(f"backbone {name!r}: the zoo never downloads; name a timm architecture and pass "
                         "backbone_checkpoint_path=<local file>")
    if name.startswith(("icnn_", "shapnet_")):
        raise ValueError(f"backbone {name!r} is a zoo model, not a feature extractor; name a timm CNN, e.g. 'resnet18'")
    if not is_model(name.split(".", 1)[0]):
        close = difflib.get_close_matches(name, [*LOCAL_BACKBONES, *timm.list_models()], n=5, cutoff=0.6)
        raise ValueError(f"unknown backbone {name!r}" + (f"; close matches: {close}" if close else ""))
    pretrained = checkpoint_path is not None
    if pretrained:
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"backbone checkpoint {str(path)!r} does not exist")
        # source=None makes timm take the file (never the hub); hf_hub_id/url cleared for the same reason.
        args["pretrained_cfg_overlay"] = dict(file=str(path), source=None, hf_hub_id=None, url=None)
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=(out_index,),
                                 in_chans=in_chans, **args)
    except RuntimeError as err:
        if "features_only" in str(err) or "feature" in str(err).lower():
            raise ValueError(f"backbone {name!r} cannot serve as a feature extractor: {err}") from err
        raise


class TimmInterpretableCNN(InterpretableCNN):
    """`shapnets.InterpretableCNN` on a backbone named by string, so that its arguments are plain JSON.

    Args:
        backbone: `"vgg_small"` or a timm CNN name.
        out_index: timm feature stage to put the layer on (`-1`: the top).
        backbone_args: extra constructor arguments of the backbone (e.g. `drop_path_rate`).
        backbone_checkpoint_path: local checkpoint file to start a timm backbone from (see the module docstring).
        num_classes, in_chans, num_filters, pool, beta, tau, alpha, normalizer, momentum, assignment, interpretable,
            filter_loss_weight: as `shapnets.InterpretableCNN`.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        in_chans: int = 3,
        num_filters: int | None = None,
        out_index: int = -1,
        pool: str = "avg",
        beta: float = 4.0,
        tau: float | None = None,
        alpha: float | None = None,
        normalizer: str = "constant",
        momentum: float = 0.9,
        assignment: str = "running",
        interpretable: bool = True,
        filter_loss_weight: float = 0.1,
        backbone_args: Mapping[str, Any] | None = None,
        backbone_checkpoint_path: str | None = None,
    ) -> None:
        if not isinstance(backbone, str):
            raise TypeError(f"{type(self).__name__}: backbone must be a name (str), got {type(backbone).__name__}; "
                            "wrap a module with shapnets.InterpretableCNN instead")
        features = build_backbone(backbone, in_chans, out_index, backbone_args, backbone_checkpoint_path)
        super().__init__(
            features, num_classes, in_chans=in_chans, num_filters=num_filters, pool=pool, beta=beta, tau=tau,
            alpha=alpha, normalizer=normalizer, momentum=momentum, assignment=assignment, interpretable=interpretable,
            filter_loss_weight=filter_loss_weight,
        )
        self.backbone_name = backbone


# `zoo.model_cfg` with this family's paper, pixel players and explanation.
_cfg = functools.partial(
    model_cfg, fixed_input_size=False, num_classes=None, paper_name=PAPER, paper_ids=PAPER_ID,
    origin_url="https://github.com/zqs1022/interpretableCNN", players="one player per pixel (all its channels)",
    player_axes=("height", "width"), classifier="head",
    explanation=("local accuracy holds exactly: each logit is split over the interpretable filters (linear head on "
                 "pooled masked maps) and each filter's share over the pixels of its masked map"))


# Generic names build bare like timm's backbones: 3x224x224 ImageNet-normalised images, 1000 classes.
_IMAGENET = dict(input_size=(3, 224, 224), num_classes=1000, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)

_HARD_PARTS = dict(
    input_size=(3, 64, 64),
    num_classes=8,
    mean=(0.28, 0.28, 0.28),
    std=(0.15, 0.15, 0.15),
    dataset=("hard synthetic parts (training.data.parts_hard): 8 classes of 3-part objects with exact landmarks, "
             "random colours per part, clutter and occlusion, random position and scale; 3,200 train (10% held out "
             "for validation) / 800 test images"),
    preprocessing="pixels scaled to [0, 1], then normalized with mean 0.28 and std 0.15 (every channel)",
    label_names=("tower", "face", "kite", "cart", "snowman", "boat", "robot", "bell"),
)

_CFGS = {
    "icnn_vgg_small": _cfg(
        description="Interpretable CNN on a small VGG-style backbone (stride 8), any image size", **_IMAGENET),
    "icnn_vgg16": _cfg(description="Interpretable CNN on VGG-16 (the paper's backbone), any image size", **_IMAGENET),
    "icnn_resnet18": _cfg(description="Interpretable CNN on ResNet-18, any image size", **_IMAGENET),
    "icnn_resnet34": _cfg(description="Interpretable CNN on ResNet-34, any image size", **_IMAGENET),
    "icnn_timm": _cfg(description="Interpretable CNN on any timm CNN (needs backbone=<timm name>)", **_IMAGENET),
    "icnn_vgg_small_parts": _cfg(
        description="Interpretable CNN (small VGG, stride 4) for the hard synthetic parts data: 3x64x64 images, "
                    "8 classes", **_HARD_PARTS),
    "icnn_vgg_small_parts_baseline": _cfg(
        description="The same small VGG without the filter loss and mask (the ICNN's baseline), hard parts data, "
                    "8 classes", **_HARD_PARTS),
    "icnn_vgg_small_mnist": _cfg(
        description="Interpretable CNN (small VGG, stride 4) for MNIST: 1x28x28 images, 10 classes",
        **{**MNIST_CFG, "num_players": None},  # players depend on the backbone's stride: not recorded
    ),
}

_DEFAULT_BACKBONES = {
    "icnn_vgg_small": "vgg_small",
    "icnn_vgg16": "vgg16",
    "icnn_resnet18": "resnet18",
    "icnn_resnet34": "resnet34",
}

ICNN_VARIANT_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    # configs/icnn_parts.yaml and configs/icnn_mnist.yaml train the shipped weights, whose config.json must
    # agree with these arguments (tests/test_architecture.py checks it).
    "icnn_vgg_small_parts": ("icnn_vgg_small", dict(
        num_classes=8, in_chans=3, num_filters=64, filter_loss_weight=0.1,
        backbone_args=dict(channels=(16, 32, 64), convs_per_stage=(1, 2, 3)))),
    "icnn_vgg_small_parts_baseline": ("icnn_vgg_small", dict(
        num_classes=8, in_chans=3, num_filters=64, interpretable=False,
        backbone_args=dict(channels=(16, 32, 64), convs_per_stage=(1, 2, 3)))),
    "icnn_vgg_small_mnist": ("icnn_vgg_small", dict(
        num_classes=10, in_chans=1, num_filters=64, filter_loss_weight=0.1,
        backbone_args=dict(channels=(16, 32, 64), convs_per_stage=(1, 1, 2)))),
}
"""Trained variant -> (the entry point it is built like, its documented constructor arguments)."""

ICNN_ARCHITECTURES: dict[str, type[nn.Module]] = {name: TimmInterpretableCNN for name in [*_DEFAULT_BACKBONES,
                                                                                            "icnn_timm"]}
"""Registered generic name -> class."""


def _prepare(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """The backbone a name implies: fixed for `icnn_vgg16` and the like, required for `icnn_timm`."""
    base = architecture_of(name)
    if base in _DEFAULT_BACKBONES:
        given = args.setdefault("backbone", _DEFAULT_BACKBONES[base])
        if given != _DEFAULT_BACKBONES[base]:
            raise ValueError(f"{name} is built on {_DEFAULT_BACKBONES[base]!r}, got backbone={given!r}; "
                             f"use icnn_timm for another backbone")
    elif "backbone" not in args:
        raise TypeError(f"{name} needs backbone=<timm CNN name>, e.g. backbone='resnet50'")
    return args


_FAMILY = Family(
    prepare=_prepare,
    # The backbone checkpoint only seeds the weights: a rebuild from config.json must not need the file.
    transient_args=("backbone_checkpoint_path",),
    missing_hint="Use pretrained=False, pretrained_cfg_overlay=dict(file=<folder or .safetensors>), or "
                 "backbone_checkpoint_path=<file> to start only the backbone from a checkpoint",
    defaults=dict(num_classes=1000),
)
for _name in ICNN_ARCHITECTURES:
    register(_name, TimmInterpretableCNN, _CFGS[_name], family=_FAMILY)
for _name, (_arch, _defaults) in ICNN_VARIANT_DEFAULTS.items():
    register_variant(_name, _arch, _defaults, _CFGS[_name])
