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

import functools
from typing import Any

from shapnets.capsnet import CapsNet

from ._builder import register, register_variant
from ._registry import MNIST_CFG, Family, ShapNetCfg, model_cfg

__all__ = ["CAPSNET_ARCHITECTURES", "CAPSNET_VARIANT_DEFAULTS"]

PAPER = "Dynamic Routing Between Capsules (Sabour, Frosst, Hinton, NeurIPS 2017)"
PAPER_ID = "arXiv:1710.09829"
_EXPLANATION = ("normalised routing attribution (not Shapley values): each primary capsule's coupling-weighted "
                "agreement with its class capsule, spread over its receptive field; local accuracy holds exactly "
                "(base = the DigitCaps bias's share of each capsule length)")


# `zoo.model_cfg` with this family's paper, pixel players and explanation.
_cfg = functools.partial(
    model_cfg, fixed_input_size=True, num_classes=None, paper_name=PAPER, paper_ids=PAPER_ID,
    origin_url="https://github.com/Sarasra/models/tree/master/research/capsules",
    players="one player per pixel (all its channels)", player_axes=("height", "width"), explanation=_EXPLANATION,
    classifier="digits")


def _mnist_cfg(description: str) -> ShapNetCfg:
    return _cfg(description=f"{description}: 1x28x28 images, 10 classes", **MNIST_CFG)


_MNIST_NORMALIZATION = dict(input_mean=0.1307, input_std=0.3081)  # the MNIST loader's constants

CAPSNET_VARIANT_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    # The paper's code differentiates through the routing iterations; `detach_routing=True` stays an option.
    "capsnet_mnist": ("capsnet", dict(in_chans=1, image_size=28, num_classes=10, detach_routing=False,
                                      **_MNIST_NORMALIZATION)),
    "capsnet_small_mnist": ("capsnet", dict(in_chans=1, image_size=28, num_classes=10, conv_channels=64,
                                            primary_types=16, **_MNIST_NORMALIZATION)),
}
"""Named variant -> (the entry point it is built like, its documented constructor arguments)."""

CAPSNET_ARCHITECTURES: dict[str, type[CapsNet]] = {"capsnet": CapsNet}
"""Registered generic name -> class."""

_DESCRIPTIONS = {
    "capsnet_mnist": "CapsNet (the paper's MNIST architecture, 8.2M parameters)",
    "capsnet_small_mnist": "Small CapsNet for MNIST (conv1 64, 16 x 8D primary capsules, 2.8M parameters)",
}

def _normalization_of_the_bare_network(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """A bare `capsnet` is the paper's MNIST network, with MNIST's normalisation as its cfg says. Any other input
    shape gets no default: its normalisation must come from the data (`shapnets train` passes it), never MNIST's."""
    mnist_shape = args.get("in_chans", 1) == 1 and args.get("image_size", 28) == 28
    if mnist_shape and args.get("input_mean") is None and args.get("input_std") is None:
        args = {**args, **_MNIST_NORMALIZATION}
    return args


register("capsnet", CapsNet, _cfg(
    description="CapsNet with dynamic routing, any fixed image size (pass in_chans, image_size, num_classes, and the "
                "data's input_mean / input_std; bare: the paper's MNIST network with MNIST's normalisation)",
    input_size=(1, 28, 28), num_classes=10, mean=MNIST_CFG["mean"], std=MNIST_CFG["std"]),
    family=Family(prepare=_normalization_of_the_bare_network))
for _name, (_arch, _defaults) in CAPSNET_VARIANT_DEFAULTS.items():
    register_variant(_name, _arch, _defaults, _mnist_cfg(_DESCRIPTIONS[_name]))
