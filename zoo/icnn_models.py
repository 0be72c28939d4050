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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
from timm.models import generate_default_cfgs, is_model, register_model
from torch import Tensor, nn

from shapnets.icnn import InterpretableCNN

from ._args import full_model_args
from ._build import finish_model, pop_timm_kwargs, variant_kwargs
from .shapnets_models import ShapNetCfg, _shipped_file
from .shapnets_models import _cfg as zoo_cfg

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
        num_classes: classes.
        in_chans: input channels.
        num_filters: interpretable filters; default the backbone's top-map channels.
        out_index: timm feature stage to put the layer on (`-1`: the top).
        pool: `"avg"` or `"max"`.
        beta: template decay (paper: 4).
        tau: template scale; `None`: `0.5 / (H W)`.
        alpha: positive-template prior; `None`: `H W / (1 + H W)`.
        normalizer: `"constant"` (the paper's gradient) or `"batch"` (see `shapnets.icnn.filter_loss`).
        momentum: of the running filter-to-class assignment.
        assignment: `"running"` or `"fixed"`.
        interpretable: `False` gives the baseline (plain conv layer, no filter loss).
        filter_loss_weight: weight of the filter loss handed to the trainer through `loss_terms()`.
        backbone_args: extra constructor arguments of the backbone (e.g. `drop_path_rate`).
        backbone_checkpoint_path: local checkpoint file to start a timm backbone from (see the module docstring).
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


def _cfg(description: str, **kwargs: Any) -> ShapNetCfg:
    """The zoo's cfg (`zoo.shapnets_models._cfg`) with this family's paper, pixel players and explanation."""
    family = dict(
        description=description,
        fixed_input_size=False,
        num_classes=None,
        paper_name=PAPER,
        paper_ids=PAPER_ID,
        origin_url="https://github.com/zqs1022/interpretableCNN",
        players="one player per pixel (all its channels)",
        player_axes=("height", "width"),
        explanation=("local accuracy holds exactly: each logit is split over the interpretable filters (linear "
                     "head on pooled masked maps) and each filter's share over the pixels of its masked map"),
    )
    return zoo_cfg(**{**family, **kwargs})


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

default_cfgs = generate_default_cfgs(
    {
        "icnn_vgg_small": _cfg("Interpretable CNN on a small VGG-style backbone (stride 8), any image size"),
        "icnn_vgg16": _cfg("Interpretable CNN on VGG-16 (the paper's backbone), any image size"),
        "icnn_resnet18": _cfg("Interpretable CNN on ResNet-18, any image size"),
        "icnn_resnet34": _cfg("Interpretable CNN on ResNet-34, any image size"),
        "icnn_timm": _cfg("Interpretable CNN on any timm CNN (pass backbone=<timm name>)"),
        "icnn_vgg_small_parts": _cfg(
            "Interpretable CNN (small VGG, stride 4) for the hard synthetic parts data: 3x64x64 images, 8 classes",
            file=_shipped_file("icnn_vgg_small_parts"),
            **_HARD_PARTS,
        ),
        "icnn_vgg_small_parts_baseline": _cfg(
            "The same small VGG without the filter loss and mask (the ICNN's baseline), hard parts data, 8 classes",
            file=_shipped_file("icnn_vgg_small_parts_baseline"),
            **_HARD_PARTS,
        ),
        "icnn_vgg_small_mnist": _cfg(
            "Interpretable CNN (small VGG, stride 4) for MNIST: 1x28x28 images, 10 classes",
            file=_shipped_file("icnn_vgg_small_mnist"),
            input_size=(1, 28, 28),
            num_classes=10,
            mean=(0.1307,),
            std=(0.3081,),
            dataset="MNIST, official train (60,000) / test (10,000) split",
            preprocessing="pixels scaled to [0, 1] (uint8 / 255), then normalized with mean 0.1307 and std 0.3081",
            label_names=tuple(str(d) for d in range(10)),
        ),
    }
)

_DEFAULT_BACKBONES = {
    "icnn_vgg_small": "vgg_small",
    "icnn_vgg16": "vgg16",
    "icnn_resnet18": "resnet18",
    "icnn_resnet34": "resnet34",
}

ICNN_VARIANT_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Kept in step with configs/icnn_parts*.yaml and configs/icnn_mnist.yaml, which train the shipped weights.
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
"""Registered name -> class, in the form of `zoo.shapnets_models.ARCHITECTURES` (for the hub's rebuild)."""


def _create_icnn(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> TimmInterpretableCNN:
    """Build an ICNN, record its arguments and cfg as the ShapNet builders do, then load whole-model weights."""
    cfg = pop_timm_kwargs(variant, kwargs)
    base = variant
    if variant in ICNN_VARIANT_DEFAULTS:
        base, defaults = ICNN_VARIANT_DEFAULTS[variant]
        kwargs = variant_kwargs(variant, defaults, kwargs)
    if base in _DEFAULT_BACKBONES:
        given = kwargs.setdefault("backbone", _DEFAULT_BACKBONES[base])
        if given != _DEFAULT_BACKBONES[base]:
            raise ValueError(f"{variant} is built on {_DEFAULT_BACKBONES[base]!r}, got backbone={given!r}; "
                             f"use icnn_timm for another backbone")
    elif "backbone" not in kwargs:
        raise TypeError(f"{variant} needs backbone=<timm CNN name>, e.g. backbone='resnet50'")
    model_args = full_model_args(TimmInterpretableCNN, kwargs)
    model = TimmInterpretableCNN(**model_args)
    # The backbone checkpoint only seeds the weights: a rebuild from config.json must not need the file.
    return finish_model(model, variant, {**model_args, "backbone_checkpoint_path": None}, cfg, pretrained,
                        "use pretrained=False, pretrained_cfg_overlay=dict(file=<folder or .safetensors>), or "
                        "backbone_checkpoint_path=<file> to start only the backbone from a checkpoint")


@register_model
def icnn_vgg_small(pretrained: bool = False, **kwargs: Any) -> TimmInterpretableCNN:
    """Interpretable CNN on a small VGG-style backbone (4 stages, stride 8); kwargs of `TimmInterpretableCNN`."""
    return _create_icnn("icnn_vgg_small", pretrained, kwargs)


@register_model
def icnn_vgg16(pretrained: bool = False, **kwargs: Any) -> TimmInterpretableCNN:
    """Interpretable CNN on timm's VGG-16 (the paper's backbone); kwargs of `TimmInterpretableCNN`."""
    return _create_icnn("icnn_vgg16", pretrained, kwargs)


@register_model
def icnn_resnet18(pretrained: bool = False, **kwargs: Any) -> TimmInterpretableCNN:
    """Interpretable CNN on timm's ResNet-18 (after the last residual addition); kwargs of `TimmInterpretableCNN`."""
    return _create_icnn("icnn_resnet18", pretrained, kwargs)


@register_model
def icnn_resnet34(pretrained: bool = False, **kwargs: Any) -> TimmInterpretableCNN:
    """Interpretable CNN on timm's ResNet-34 (after the last residual addition); kwargs of `TimmInterpretableCNN`."""
    return _create_icnn("icnn_resnet34", pretrained, kwargs)


@register_model
def icnn_timm(pretrained: bool = False, **kwargs: Any) -> TimmInterpretableCNN:
    """Interpretable CNN on any timm CNN: `backbone=<timm name>` plus kwargs of `TimmInterpretableCNN`."""
    return _create_icnn("icnn_timm", pretrained, kwargs)


@register_model
def icnn_vgg_small_parts(pretrained: bool = False, **kwargs: Any) -> TimmInterpretableCNN:
    """Interpretable CNN trained on the hard synthetic parts data (configs/icnn_parts.yaml); 3x64x64 in, 8 classes."""
    return _create_icnn("icnn_vgg_small_parts", pretrained, kwargs)


@register_model
def icnn_vgg_small_parts_baseline(pretrained: bool = False, **kwargs: Any) -> TimmInterpretableCNN:
    """The ICNN's baseline on the hard parts data (configs/icnn_parts_baseline.yaml): no mask, no filter loss."""
    return _create_icnn("icnn_vgg_small_parts_baseline", pretrained, kwargs)


@register_model
def icnn_vgg_small_mnist(pretrained: bool = False, **kwargs: Any) -> TimmInterpretableCNN:
    """Interpretable CNN trained on MNIST (configs/icnn_mnist.yaml); 1x28x28 in, 10 classes."""
    return _create_icnn("icnn_vgg_small_mnist", pretrained, kwargs)
