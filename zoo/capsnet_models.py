"""Capsule networks in the timm registry: the paper's MNIST CapsNet and a smaller one for CPU training.

Dynamic Routing Between Capsules (Sabour, Frosst, Hinton), NeurIPS 2017, https://arxiv.org/abs/1710.09829

Entry points (all take the constructor arguments of `shapnets.CapsNet`, e.g. `num_classes`, `in_chans`,
`image_size`, `conv_channels`, `primary_types`, `routing_iterations`, `decoder_widths`):

* `capsnet`: any image size and classes (the constructor's defaults are the paper's MNIST network); with a
  decoder it needs the data's normalisation, `input_mean` / `input_std` (`shapnets train` passes the data
  config's), and refuses to guess one;
* `capsnet_mnist`: the paper's architecture for MNIST: conv1 256 9x9, 32 x 8D primary capsules on 6x6,
  10 x 16D class capsules, decoder 512 / 1024 (8,215,728 parameters; 6,804,384 without the decoder);
* `capsnet_small_mnist`: a smaller MNIST variant for CPU training: conv1 64 9x9, 16 x 8D primary capsules
  (9x9 stride 2), 10 x 16D class capsules, decoder 512 / 1024 (2,817,712 parameters).

Class scores are the capsule lengths (in [0, 1)); `explain` is a normalised routing attribution with exact
local accuracy, not a Shapley value (see `shapnets.capsnet`). `pretrained=True` loads weights of the whole
model from `pretrained_cfg_overlay=dict(file=<folder or .safetensors>)` or from the package's
`zoo/weights/<name>/`, hash-checked by `zoo.hub`; nothing is ever downloaded.
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from torch import nn

from shapnets.capsnet import CapsNet

from ._args import full_model_args
from ._build import finish_model, pop_timm_kwargs, variant_kwargs
from .shapnets_models import ShapNetCfg, _shipped_file
from .shapnets_models import _cfg as zoo_cfg

__all__ = ["CAPSNET_ARCHITECTURES", "CAPSNET_VARIANT_DEFAULTS"]

PAPER = "Dynamic Routing Between Capsules (Sabour, Frosst, Hinton, NeurIPS 2017)"
PAPER_ID = "arXiv:1710.09829"
_EXPLANATION = ("normalised routing attribution (not Shapley values): each primary capsule's coupling-weighted "
                "agreement with its class capsule, spread over its receptive field; local accuracy holds exactly "
                "(base = the DigitCaps bias's share of each capsule length)")


def _cfg(description: str, **kwargs: Any) -> ShapNetCfg:
    """The zoo's cfg (`zoo.shapnets_models._cfg`) with this family's paper, pixel players and explanation."""
    family = dict(
        description=description,
        fixed_input_size=True,
        num_classes=None,
        paper_name=PAPER,
        paper_ids=PAPER_ID,
        origin_url="https://github.com/Sarasra/models/tree/master/research/capsules",
        players="one player per pixel (all its channels)",
        player_axes=("height", "width"),
        explanation=_EXPLANATION,
    )
    return zoo_cfg(**{**family, **kwargs})


def _mnist_cfg(name: str, description: str) -> ShapNetCfg:
    return _cfg(
        f"{description}: 1x28x28 images, 10 classes",
        file=_shipped_file(name),
        input_size=(1, 28, 28),
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        num_players=28 * 28,
        dataset="MNIST, official train (60,000) / test (10,000) split",
        preprocessing="pixels scaled to [0, 1] (uint8 / 255), then normalized with mean 0.1307 and std 0.3081",
        label_names=tuple(str(d) for d in range(10)),
    )


default_cfgs = generate_default_cfgs(
    {
        "capsnet": _cfg("CapsNet with dynamic routing, any fixed image size (pass in_chans, image_size, num_classes)"),
        "capsnet_mnist": _mnist_cfg("capsnet_mnist", "CapsNet (the paper's MNIST architecture, 8.2M parameters)"),
        "capsnet_small_mnist": _mnist_cfg(
            "capsnet_small_mnist", "Small CapsNet for MNIST (conv1 64, 16 x 8D primary capsules, 2.8M parameters)"
        ),
    }
)

_MNIST_NORMALIZATION = dict(input_mean=0.1307, input_std=0.3081)  # the MNIST loader's constants

CAPSNET_VARIANT_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "capsnet_mnist": ("capsnet", dict(in_chans=1, image_size=28, num_classes=10, **_MNIST_NORMALIZATION)),
    "capsnet_small_mnist": ("capsnet", dict(in_chans=1, image_size=28, num_classes=10, conv_channels=64,
                                            primary_types=16, **_MNIST_NORMALIZATION)),
}
"""Named variant -> (the entry point it is built like, its documented constructor arguments)."""

CAPSNET_ARCHITECTURES: dict[str, type[nn.Module]] = {"capsnet": CapsNet}
"""Registered name -> class, in the form of `zoo.shapnets_models.ARCHITECTURES` (for the hub's rebuild)."""


def _create_capsnet(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> CapsNet:
    """Build a CapsNet, record its arguments and cfg as the ShapNet builders do, then load whole-model weights."""
    cfg = pop_timm_kwargs(variant, kwargs)
    if variant in CAPSNET_VARIANT_DEFAULTS:
        kwargs = variant_kwargs(variant, CAPSNET_VARIANT_DEFAULTS[variant][1], kwargs)
    model_args = full_model_args(CapsNet, kwargs)
    return finish_model(CapsNet(**model_args), variant, model_args, cfg, pretrained,
                        "use pretrained=False or pretrained_cfg_overlay=dict(file=<folder or .safetensors>)")


@register_model
def capsnet(pretrained: bool = False, **kwargs: Any) -> CapsNet:
    """CapsNet with dynamic routing for any fixed image size; kwargs of `shapnets.CapsNet`."""
    return _create_capsnet("capsnet", pretrained, kwargs)


@register_model
def capsnet_mnist(pretrained: bool = False, **kwargs: Any) -> CapsNet:
    """The paper's MNIST CapsNet (conv1 256, 1152 primary capsules, 3 routing iterations); 1x28x28 in, 10 classes."""
    return _create_capsnet("capsnet_mnist", pretrained, kwargs)


@register_model
def capsnet_small_mnist(pretrained: bool = False, **kwargs: Any) -> CapsNet:
    """A smaller MNIST CapsNet for CPU training (conv1 64, 16 x 8D primary capsules); 1x28x28 in, 10 classes."""
    return _create_capsnet("capsnet_small_mnist", pretrained, kwargs)
