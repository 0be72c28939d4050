"""Capsule networks with dynamic routing (CapsNet), with a routing-based attribution map (not Shapley values).

Dynamic Routing Between Capsules (Sara Sabour, Nicholas Frosst, Geoffrey E. Hinton), NeurIPS 2017,
https://arxiv.org/abs/1710.09829 (official TensorFlow code: github.com/Sarasra/models, research/capsules).

Theory, guarantees and where this departs from the paper or the original code: docs/theory.md#capsnet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn

from ._heads import take_levels
from ._streaming import LIVE_COPIES, StreamedBatches, streamed
from ._validation import check_input, finite_output
from .contract import LossTerm, StepOutput, no_layers
from .explanation import Explanation

__all__ = [
    "CapsNet",
    "DigitCapsules",
    "MarginLossTerm",
    "PrimaryCapsules",
    "ReconstructionLossTerm",
    "Routing",
    "capsule_lengths",
    "dynamic_routing",
    "group_capsules",
    "margin_loss",
    "receptive_field_shares",
    "reconstruction_loss",
    "squash",
]

SQUASH_EPS = 1e-8
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# ---------------------------------------------------------------------------------------------------- functions
def squash(s: Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> Tensor:
    """`|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps)` along `dim`: norms in [0, 1), finite at `s = 0`.

    Computed in at least float32: `eps` would vanish in half precision and bring back the 0/0 at the origin.
    """
    wide = torch.promote_types(s.dtype, torch.float32)
    s_wide = s.to(wide)
    squared = s_wide.pow(2).sum(dim=dim, keepdim=True)
    return (squared / (1.0 + squared) * s_wide / torch.sqrt(squared + eps)).to(s.dtype)


def capsule_lengths(poses: Tensor) -> Tensor:
    """`|v|` over the last axis (the class scores of a capsule layer); its gradient at `v = 0` is 0, not NaN."""
    return torch.linalg.vector_norm(poses, dim=-1)


def group_capsules(maps: Tensor, capsule_dim: int) -> Tensor:
    """A conv output `(B, types * D, H, W)` -> capsules `(B, types * H * W, D)`, unsquashed.

    Channel `type * D + d` is component `d` of capsule `(type, row, col)`: the D components of one capsule are
    D channels of ONE grid cell (channels moved last before grouping), and capsules are ordered type-major.

    Raises:
        ValueError: not a 4-D map, or channels not divisible by `capsule_dim`.
    """
    if maps.dim() != 4 or maps.shape[1] % capsule_dim:
        raise ValueError(f"group_capsules: expected (B, types * {capsule_dim}, H, W), got {tuple(maps.shape)}")
    return rearrange(maps, "b (n d) h w -> b (n h w) d", d=capsule_dim)


class Routing(NamedTuple):
    """What `dynamic_routing` computes.

    Attributes:
        poses: `(B, J, D)` the parent capsules `v_j` (squashed).
        preactivation: `(B, J, D)` `s_j = sum_i c_ij u_hat_{j|i} + bias_j` of the last iteration.
        coupling: `(B, N, J)` the couplings `c_ij` of the last iteration (sum to 1 over `j`).
        couplings: the couplings of every iteration, first to last.
    """

    poses: Tensor
    preactivation: Tensor
    coupling: Tensor
    couplings: tuple[Tensor, ...]


def dynamic_routing(votes: Tensor, iterations: int = 3, bias: Tensor | None = None, detach: bool = True) -> Routing:
    """Routing by agreement (Sabour et al. 2017, Procedure 1) from the votes `u_hat_{j|i}`.

    Args:
        votes: `(B, N, J, D)`: child `i`'s prediction of parent `j`'s pose.
        iterations: routing iterations (the paper: 3); 1 means uniform couplings `1 / J`.
        bias: `(J, D)` added to every `s_j` (the official code's per-output bias), or None.
        detach: compute the agreement updates without gradient (the couplings of the last iteration are then
            constants and gradients reach the votes through the final weighted sum only); False differentiates
            through every iteration, as the official TF code does.

    Returns:
        A `Routing` (poses, last preactivation, last coupling, every iteration's couplings).

    Raises:
        ValueError: votes that are not 4-D, a bias of the wrong shape, or `iterations < 1`.
    """
    if votes.dim() != 4:
        raise ValueError(f"dynamic_routing: votes must be (B, N, J, D), got {tuple(votes.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"dynamic_routing: iterations must be an int >= 1, got {iterations!r}")
    batch, children, parents, dim = votes.shape
    if bias is not None and bias.shape != (parents, dim):
        raise ValueError(f"dynamic_routing: bias must be ({parents}, {dim}), got {tuple(bias.shape)}")
    logits = votes.new_zeros(batch, children, parents)
    couplings: list[Tensor] = []
    agreement_votes = votes.detach() if detach else votes
    agreement_bias = None if bias is None else (bias.detach() if detach else bias)
    for iteration in range(iterations):
        coupling = logits.softmax(dim=-1)                                      # over the parents j
        couplings.append(coupling)
        if iteration == iterations - 1:
            break
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            preactivation = torch.einsum("bnj,bnjd->bjd", coupling, agreement_votes)
            if agreement_bias is not None:
                preactivation = preactivation + agreement_bias
            logits = logits + torch.einsum("bnjd,bjd->bnj", agreement_votes, squash(preactivation))
    preactivation = torch.einsum("bnj,bnjd->bjd", coupling, votes)
    if bias is not None:
        preactivation = preactivation + bias
    return Routing(squash(preactivation), preactivation, coupling, tuple(couplings))


def margin_loss(lengths: Tensor, target: Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                lam: float = 0.5) -> Tensor:
    """The margin loss, `sum_k T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2`, batch mean.

    Args:
        lengths: `(B, K)` capsule lengths.
        target: `(B,)` class indices.
        m_plus: the length the true class should exceed.
        m_minus: the length the other classes should stay below.
        lam: down-weighting of the absent classes.

    Raises:
        ValueError: mismatched shapes or targets outside `[0, K)`.
    """
    _check_targets(lengths, target, "margin_loss")
    lengths = lengths.float()
    present = F.one_hot(target.long(), lengths.shape[1]).to(lengths.dtype)
    per_class = (present * (m_plus - lengths).clamp(min=0).pow(2)
                 + lam * (1 - present) * (lengths - m_minus).clamp(min=0).pow(2))
    return per_class.sum(dim=1).mean()


def reconstruction_loss(reconstruction: Tensor, image: Tensor) -> Tensor:
    """Sum of squared errors over each image's pixels (and channels), averaged over the batch.

    Raises:
        ValueError: the two tensors differ in shape.
    """
    if reconstruction.shape != image.shape:
        raise ValueError(f"reconstruction_loss: reconstruction {tuple(reconstruction.shape)} and image "
                         f"{tuple(image.shape)} must have the same shape")
    error = (reconstruction.float() - image.float()).pow(2)
    return reduce(error, "b ... -> b", "sum").mean()


def receptive_field_shares(image_size: tuple[int, int], conv_kernel: int, primary_kernel: int,
                           primary_stride: int) -> Tensor:
    """`(grid cells, H * W)`: how each primary grid cell's value is spread over the input pixels (rows sum to 1).

    A cell's weight on a pixel is the number of paths from the pixel to the cell through the two valid
    convolutions (conv1: `conv_kernel`, stride 1; PrimaryCaps: `primary_kernel`, `primary_stride`), i.e. its
    indicator pushed back through both layers by transposed convolutions with all-ones kernels.
    """
    height, width = image_size
    conv_h, conv_w = height - conv_kernel + 1, width - conv_kernel + 1
    grid_h, grid_w = _grid_size(conv_h, primary_kernel, primary_stride), _grid_size(conv_w, primary_kernel,
                                                                                    primary_stride)
    cells = rearrange(torch.eye(grid_h * grid_w, dtype=torch.float64), "g (h w) -> g 1 h w", h=grid_h)
    # Rows of conv1 beyond the last stride step feed no cell; output_padding restores the full conv1 size.
    padding = (conv_h - ((grid_h - 1) * primary_stride + primary_kernel),
               conv_w - ((grid_w - 1) * primary_stride + primary_kernel))
    conv_map = F.conv_transpose2d(cells, cells.new_ones(1, 1, primary_kernel, primary_kernel),
                                  stride=primary_stride, output_padding=padding)
    pixels = F.conv_transpose2d(conv_map, cells.new_ones(1, 1, conv_kernel, conv_kernel))
    paths = rearrange(pixels, "g 1 h w -> g (h w)")
    return (paths / paths.sum(dim=1, keepdim=True)).float()


# ---------------------------------------------------------------------------------------------------- layers
class PrimaryCapsules(nn.Module):
    """A conv whose output channels are read as `num_types` capsules of `capsule_dim` per grid cell, squashed.

    `forward(features (B, C, H, W)) -> (B, num_types * H' * W', capsule_dim)`, capsules type-major (see
    `group_capsules`).
    """

    def __init__(self, in_channels: int, num_types: int = 32, capsule_dim: int = 8, kernel_size: int = 9,
                 stride: int = 2) -> None:
        super().__init__()
        self.num_types, self.capsule_dim = num_types, capsule_dim
        self.conv = nn.Conv2d(in_channels, num_types * capsule_dim, kernel_size, stride=stride)

    def forward(self, features: Tensor) -> Tensor:
        return squash(group_capsules(self.conv(features), self.capsule_dim))


class DigitCapsules(nn.Module):
    """Fully connected capsules: votes `u_hat_{j|i} = W_ij u_i` for every (child, parent) pair, then routing.

    Args:
        num_inputs: child capsules `N`.
        in_dim: their dimension.
        num_outputs: parent capsules `J` (one per class).
        out_dim: their dimension.
        iterations: routing iterations.
        detach_routing: see `dynamic_routing(detach=...)`.
        init_std: std of the normal init of `W` (0.01; see docs/theory.md#capsnet).
    """

    def __init__(self, num_inputs: int, in_dim: int, num_outputs: int, out_dim: int, iterations: int = 3,
                 detach_routing: bool = True, init_std: float = 0.01) -> None:
        super().__init__()
        self.iterations, self.detach_routing = iterations, detach_routing
        self.weight = nn.Parameter(torch.randn(num_inputs, num_outputs, out_dim, in_dim) * init_std)
        self.bias = nn.Parameter(torch.zeros(num_outputs, out_dim))

    def votes(self, capsules: Tensor) -> Tensor:
        """`(B, N, in_dim) -> (B, N, J, out_dim)`."""
        return torch.einsum("njoi,bni->bnjo", self.weight, capsules)

    def route(self, votes: Tensor) -> Routing:
        """Dynamic routing of precomputed votes `(B, N, J, out_dim)`."""
        return dynamic_routing(votes, self.iterations, self.bias, self.detach_routing)

    def forward(self, capsules: Tensor) -> Routing:
        return self.route(self.votes(capsules))


# ---------------------------------------------------------------------------------------------------- loss terms
class MarginLossTerm(LossTerm):
    """The margin loss as a training term; it replaces the trainer's cross-entropy.

    `__call__(out, target)` reads `out.logits` (the capsule lengths).
    """

    name = "margin"
    replaces_cross_entropy = True

    def __init__(self, weight: float = 1.0, m_plus: float = 0.9, m_minus: float = 0.1, lam: float = 0.5) -> None:
        self.weight, self.m_plus, self.m_minus, self.lam = float(weight), m_plus, m_minus, lam

    def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
        return margin_loss(out.logits, target, self.m_plus, self.m_minus, self.lam)


class ReconstructionLossTerm(LossTerm):
    """The decoder's reconstruction loss as a training term.

    `__call__(out, target)` reads `out.extras["reconstruction"]` and `out.extras["image"]` (the un-normalised
    input), which `CapsNet.forward_train` puts there.
    """

    name = "reconstruction"

    def __init__(self, weight: float = 0.0005) -> None:
        self.weight = float(weight)

    def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
        extras = getattr(out, "extras", None) or {}
        if "reconstruction" not in extras or "image" not in extras:
            raise RuntimeError("the reconstruction loss needs extras['reconstruction'] and extras['image'] from "
                               f"CapsNet.forward_train(x, target); got extras {sorted(extras)}")
        return reconstruction_loss(extras["reconstruction"], extras["image"])


# ---------------------------------------------------------------------------------------------------- model
_NO_POOLED = ("a CapsNet's class capsules are its output (their lengths are the scores), so it has no pooled "
              "features without them: use forward_head(forward_features(x), pre_logits=True) for the class poses")


class CapsNet(StreamedBatches, nn.Module):
    """The CapsNet of Sabour et al. (2017): conv1, PrimaryCaps, DigitCaps with dynamic routing, and a decoder.

    Defaults give the paper's MNIST network (8,215,728 parameters: 6,804,384 without the decoder). See
    docs/theory.md#capsnet for the layers, the routing's gradient, the losses and the explanation.

    Args:
        in_chans: input channels.
        image_size: `H` (square) or `(H, W)`; fixed, because every primary capsule has its own `W_ij`.
        num_classes: DigitCaps capsules.
        conv_channels: conv1 filters.
        conv_kernel: conv1 kernel size (stride 1, no padding).
        primary_types: capsule types of PrimaryCaps.
        primary_dim: dimension of a primary capsule.
        primary_kernel: PrimaryCaps conv kernel size (no padding).
        primary_stride: PrimaryCaps conv stride.
        class_dim: dimension of a DigitCaps capsule.
        routing_iterations: dynamic routing iterations.
        detach_routing: routing without gradient through the agreement updates (see `dynamic_routing`).
        decoder_widths: hidden widths of the reconstruction decoder; None builds no decoder (no reconstruction
            loss, no `reconstruct`).
        input_mean: per-channel (or one) mean of the input normalisation, to un-normalise the decoder's target;
            required with a decoder (no default: MNIST's would be silently wrong on other data).
        input_std: per-channel (or one) std of the input normalisation; required with a decoder.
        margin_weight: weight of the margin loss in `loss_terms()`.
        reconstruction_weight: weight of the (summed) reconstruction loss in `loss_terms()`.
    """

    data_args = ("input_mean", "input_std")  # what a data set may fill (shapnets.contract)

    def __init__(
        self,
        in_chans: int = 1,
        image_size: int | Sequence[int] = 28,
        num_classes: int = 10,
        conv_channels: int = 256,
        conv_kernel: int = 9,
        primary_types: int = 32,
        primary_dim: int = 8,
        primary_kernel: int = 9,
        primary_stride: int = 2,
        class_dim: int = 16,
        routing_iterations: int = 3,
        detach_routing: bool = True,
        decoder_widths: Sequence[int] | None = (512, 1024),
        input_mean: float | Sequence[float] | None = None,
        input_std: float | Sequence[float] | None = None,
        margin_weight: float = 1.0,
        reconstruction_weight: float = 0.0005,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        if num_classes == 0 and not isinstance(num_classes, bool):
            raise ValueError(f"{who}: num_classes=0 (timm's 'no classifier') is not supported: " + _NO_POOLED)
        sizes = dict(in_chans=in_chans, num_classes=num_classes, conv_channels=conv_channels, conv_kernel=conv_kernel,
                     primary_types=primary_types, primary_dim=primary_dim, primary_kernel=primary_kernel,
                     primary_stride=primary_stride, class_dim=class_dim, routing_iterations=routing_iterations)
        for key, value in sizes.items():
            _check_positive_int(value, key, who)
        height, width = _pair(image_size, who)
        conv_h, conv_w = height - conv_kernel + 1, width - conv_kernel + 1
        if min(conv_h, conv_w) < primary_kernel:
            raise ValueError(f"{who}: a {height}x{width} image leaves a {conv_h}x{conv_w} conv1 map after the "
                             f"{conv_kernel}x{conv_kernel} conv1, smaller than the {primary_kernel}x{primary_kernel} "
                             "PrimaryCaps kernel; use larger images or smaller kernels")
        if not margin_weight >= 0 or not reconstruction_weight >= 0:
            raise ValueError(f"{who}: loss weights must be >= 0, got margin_weight={margin_weight}, "
                             f"reconstruction_weight={reconstruction_weight}")
        self.in_chans, self.num_classes, self.image_size = in_chans, num_classes, (height, width)
        self.class_dim, self.routing_iterations = class_dim, routing_iterations
        self.margin_weight, self.reconstruction_weight = float(margin_weight), float(reconstruction_weight)
        self.grid_size = (_grid_size(conv_h, primary_kernel, primary_stride),
                          _grid_size(conv_w, primary_kernel, primary_stride))
        self.num_primary = primary_types * self.grid_size[0] * self.grid_size[1]

        self.conv1 = nn.Conv2d(in_chans, conv_channels, conv_kernel)
        self.primary = PrimaryCapsules(conv_channels, primary_types, primary_dim, primary_kernel, primary_stride)
        self.digits = DigitCapsules(self.num_primary, primary_dim, num_classes, class_dim, routing_iterations,
                                    detach_routing)
        self.decoder: nn.Sequential | None = None
        if decoder_widths is not None:
            widths = [int(w) for w in decoder_widths]
            if any(w < 1 for w in widths):
                raise ValueError(f"{who}: decoder widths must be >= 1, got {list(decoder_widths)}")
            layers: list[nn.Module] = []
            width_in = num_classes * class_dim
            for hidden in widths:
                layers += [nn.Linear(width_in, hidden), nn.ReLU(inplace=True)]
                width_in = hidden
            layers += [nn.Linear(width_in, in_chans * height * width), nn.Sigmoid()]
            self.decoder = nn.Sequential(*layers)
        if (input_mean is None) != (input_std is None):
            raise ValueError(f"{who}: give both input_mean and input_std (the data's normalisation) or neither, got "
                             f"input_mean={input_mean!r}, input_std={input_std!r}")
        self.normalization_known = input_mean is not None
        if self.decoder is not None and not self.normalization_known:
            raise ValueError(
                f"{who}: the input normalisation is unknown (input_mean / input_std not given), but the decoder's "
                "target un-normalises the input with it; pass the data's per-channel mean and std (shapnets train "
                "takes them from the data config's preprocessing['normalize']), or build no decoder "
                "(decoder_widths=None)"
            )
        # Constants of the architecture, not weights: kept out of the state dict (config.json records them).
        # Without a decoder nothing reads them; 0 / 1 then only keep `unnormalize` defined (it refuses to run).
        mean = 0.0 if input_mean is None else input_mean
        std = 1.0 if input_std is None else input_std
        self.register_buffer("input_mean", _per_channel(mean, in_chans, "input_mean", who), persistent=False)
        self.register_buffer("input_std", _per_channel(std, in_chans, "input_std", who), persistent=False)
        if not bool((self.input_std > 0).all()):
            raise ValueError(f"{who}: input_std must be > 0, got {input_std}")
        shares = receptive_field_shares((height, width), conv_kernel, primary_kernel, primary_stride)
        self.register_buffer("pixel_shares", shares, persistent=False)

    # ------------------------------------------------------------------ forward
    def _check(self, x: Tensor) -> Tensor:
        return check_input(x, [(None, self.in_chans, *self.image_size)], type(self).__name__, self)

    def route(self, x: Tensor) -> tuple[Tensor, Routing]:
        """The votes `(B, N, num_classes, class_dim)` and their routing to the class capsules (no input check)."""
        votes = self.digits.votes(self.primary(F.relu(self.conv1(x))))
        return votes, self.digits.route(votes)

    def working_elements(self, x: Tensor) -> int:
        conv = self.conv1.out_channels * x.shape[-2] * x.shape[-1]
        votes = self.digits.weight[..., 0].numel()  # (N, J, D): one vote per primary capsule and class
        return max(conv, votes) * LIVE_COPIES

    @streamed
    @finite_output
    def forward(self, x: Tensor) -> Tensor:
        """`(B, in_chans, H, W) -> (B, num_classes)` class scores: the class capsules' lengths, in [0, 1)."""
        _, routing = self.route(self._check(x))
        return capsule_lengths(routing.poses)

    # ------------------------------------------------------------------ timm's model interface
    # The head is the class capsule layer (DigitCaps: one capsule per class, routed from the primary capsules); a
    # new label set also renews the decoder's first layer, which reads the (masked) class capsules. conv1,
    # PrimaryCaps and the rest of the decoder keep their weights.
    @property
    def num_features(self) -> int:
        """The primary capsules' dimension (the last axis of `forward_features`)."""
        return int(self.digits.weight.shape[-1])

    @property
    def head_hidden_size(self) -> int:
        """The width of `forward_head(..., pre_logits=True)`: every class capsule's pose, `num_classes * class_dim`."""
        return self.num_classes * self.class_dim

    def get_classifier(self) -> nn.Module:
        """The class capsule layer (DigitCaps)."""
        return self.digits

    def reset_classifier(self, num_classes: int) -> None:
        """A freshly initialised class capsule layer with `num_classes` capsules (and decoder input layer).

        Raises:
            ValueError: `num_classes` is not a positive int. `0` is refused: the class capsules' lengths are the
                scores and their poses what the decoder reads, so a CapsNet has no pooled features without them;
                `forward_head(forward_features(x), pre_logits=True)` gives the class poses.
        """
        who = type(self).__name__
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"{who}.reset_classifier: num_classes must be a positive int, got {num_classes!r}; "
                             + _NO_POOLED)
        old = self.digits
        self.digits = DigitCapsules(self.num_primary, old.weight.shape[-1], num_classes, self.class_dim,
                                    self.routing_iterations, old.detach_routing).to(old.weight)
        if self.decoder is not None:
            first = self.decoder[0]
            self.decoder[0] = nn.Linear(num_classes * self.class_dim, first.out_features).to(first.weight)
        self.num_classes = num_classes

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's feature levels: conv1's map (stride 1) and the PrimaryCaps conv map (its capsules before squashing,
        at the PrimaryCaps stride)."""
        conv = self.primary.conv
        return [dict(num_chs=self.conv1.out_channels, reduction=1, module="conv1"),
                dict(num_chs=conv.out_channels, reduction=int(conv.stride[0]), module="primary.conv")]

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature levels `(B, C, H, W)`: 0 conv1's (ReLU) map, 1 the PrimaryCaps conv map.

        Returns:
            The maps of `indices` (default both), or with `intermediates_only=False` also `forward_features(x)`.
        """
        take = take_levels(2, indices, type(self).__name__, output_fmt)
        conv1 = F.relu(self.conv1(self._check(x)))
        primary = self.primary.conv(conv1) if 1 in take or not intermediates_only else None
        maps = [level for i, level in enumerate((conv1, primary)) if i in take]
        if intermediates_only:
            return maps
        return squash(group_capsules(primary, self.primary.capsule_dim)), maps

    def forward_features(self, x: Tensor) -> Tensor:
        """The primary capsules `(B, N, num_features)` (squashed), which the class capsule layer routes."""
        return self.primary(F.relu(self.conv1(self._check(x))))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Class scores (capsule lengths) from `forward_features(x)`; `pre_logits=True`: the class poses flattened,
        `(B, num_classes * class_dim)`."""
        poses = self.digits(features).poses
        return rearrange(poses, "b j d -> b (j d)") if pre_logits else capsule_lengths(poses)

    def unnormalize(self, x: Tensor) -> Tensor:
        """The image in [0, 1] behind a normalised input: `x * input_std + input_mean` (the decoder's target).

        Raises:
            RuntimeError: the model was built without its input normalisation.
        """
        if not self.normalization_known:
            raise RuntimeError(f"{type(self).__name__}.unnormalize: built without input_mean / input_std, so the "
                               "image behind a normalised input is unknown")
        return x * self.input_std + self.input_mean

    def decode(self, poses: Tensor, classes: Tensor) -> Tensor:
        """Decode `(B, J, D)` poses masked to one class per sample `(B,)` into images `(B, C, H, W)`."""
        decoder = self._decoder()
        mask = F.one_hot(classes.long(), self.num_classes).to(poses.dtype)
        flat = rearrange(poses * mask[..., None], "b j d -> b (j d)")
        return rearrange(decoder(flat), "b (c h w) -> b c h w", c=self.in_chans, h=self.image_size[0])

    def forward_train(self, x: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Scores and what the loss terms read, with the decoder masked by the TRUE class.

        Returns:
            `(lengths (B, J), extras)`: `extras["poses"]` `(B, J, D)`; with a decoder also
            `extras["reconstruction"]` `(B, C, H, W)` and `extras["image"]`, the un-normalised input (its target).
        """
        x = self._check(x)
        _, routing = self.route(x)
        lengths = capsule_lengths(routing.poses)
        _check_targets(lengths, target, f"{type(self).__name__}.forward_train")
        extras = {"poses": routing.poses}
        if self.decoder is not None:
            extras["reconstruction"] = self.decode(routing.poses, target)
            extras["image"] = self.unnormalize(x)
        return lengths, extras

    def loss_terms(self) -> list[MarginLossTerm | ReconstructionLossTerm]:
        """The margin loss (replacing the cross-entropy) and, with a decoder and a weight > 0, the reconstruction."""
        terms: list[MarginLossTerm | ReconstructionLossTerm] = [MarginLossTerm(self.margin_weight)]
        if self.decoder is not None and self.reconstruction_weight > 0:
            terms.append(ReconstructionLossTerm(self.reconstruction_weight))
        return terms

    # ------------------------------------------------------------------ decoder views
    def reconstruct(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        """Decoded images `(B, C, H, W)` in [0, 1], masked by the predicted (longest) class or by `target`."""
        _, routing = self.route(self._check(x))
        lengths = capsule_lengths(routing.poses)
        if target is not None:
            _check_targets(lengths, target, f"{type(self).__name__}.reconstruct")
        classes = lengths.argmax(dim=1) if target is None else target
        return self.decode(routing.poses, classes)

    def perturb_poses(self, x: Tensor, dims: Sequence[int] | None = None,
                      steps: Tensor | Sequence[float] | None = None) -> Tensor:
        """Decode the predicted class's pose with one dimension shifted at a time (the paper's Figure 4).

        Args:
            x: `(B, C, H, W)` normalised inputs.
            dims: pose dimensions to perturb; default all `class_dim`.
            steps: shifts added to that dimension; default `torch.linspace(-0.25, 0.25, 11)`.

        Returns:
            `(B, len(dims), len(steps), C, H, W)` decoded images in [0, 1].

        Raises:
            ValueError: a dimension outside `[0, class_dim)` or steps that are not 1-D.
            RuntimeError: the model has no decoder.
        """
        self._decoder()
        dims = list(range(self.class_dim)) if dims is None else [int(d) for d in dims]
        if not dims or any(not 0 <= d < self.class_dim for d in dims):
            raise ValueError(f"perturb_poses: dims must be a non-empty list in [0, {self.class_dim}), got {dims}")
        _, routing = self.route(self._check(x))
        poses = routing.poses
        shifts = torch.linspace(-0.25, 0.25, 11) if steps is None else torch.as_tensor(steps)
        if shifts.dim() != 1 or not shifts.numel():
            raise ValueError(f"perturb_poses: steps must be a non-empty 1-D sequence, got shape {tuple(shifts.shape)}")
        shifts = shifts.to(poses)
        predicted = capsule_lengths(poses).argmax(dim=1)
        offsets = poses.new_zeros(len(dims), len(shifts), self.num_classes, self.class_dim)
        for row, dim in enumerate(dims):
            offsets[row, :, :, dim] = shifts[:, None]
        mask = F.one_hot(predicted, self.num_classes).to(poses.dtype)               # only the decoded class moves
        perturbed = poses[:, None, None] + offsets[None] * mask[:, None, None, :, None]
        flat = rearrange(perturbed, "b p s j d -> (b p s) j d")
        images = self.decode(flat, predicted.repeat_interleave(len(dims) * len(shifts)))
        return rearrange(images, "(b p s) c h w -> b p s c h w", p=len(dims), s=len(shifts))

    def _decoder(self) -> nn.Sequential:
        if self.decoder is None:
            raise RuntimeError(f"{type(self).__name__} was built with decoder_widths=None: it has no decoder")
        return self.decoder

    # ------------------------------------------------------------------ explanation
    @streamed
    @finite_output
    def explain(self, x: Tensor, layers: bool = False) -> Explanation:
        """Class scores split over input pixels through the routing (a normalised routing attribution).

        Not Shapley values (`exact=False`); see docs/theory.md#capsnet for the definition. Local accuracy holds
        exactly: `base + sum over pixels == output`.

        Returns:
            An `Explanation` with attributions `(B, H, W, num_classes)`, output = the capsule lengths, base = the
            DigitCaps bias's share of each length (0 while the bias is 0) and extras:

            * `poses` `(B, num_classes, class_dim)`;
            * `coupling` `(B, N, num_classes)`: the last routing iteration's couplings;
            * `capsule_attributions` `(B, N, num_classes)`: each primary capsule's share (before the spread to
              pixels);
            * `reconstruction` `(B, C, H, W)`, decoded from the pose of the predicted class (with a decoder).
        """
        no_layers(self, layers)  # one explanation, no per-layer representations
        x = self._check(x)
        votes, routing = self.route(x)
        poses, preactivation = routing.poses, routing.preactivation
        lengths = capsule_lengths(poses)
        # |s_j| is 0 only when v_j = 0, and then every numerator below is 0 too: clamping avoids 0/0.
        scale = capsule_lengths(preactivation).clamp(min=torch.finfo(poses.dtype).tiny)[:, None, :]
        agreement = torch.einsum("bnjd,bjd->bnj", votes, poses)
        capsule_attributions = routing.coupling * agreement / scale
        base = torch.einsum("jd,bjd->bj", self.digits.bias, poses) / scale[:, 0]
        cells = reduce(capsule_attributions, "b (n g) j -> b g j", "sum", g=self.grid_size[0] * self.grid_size[1])
        # Renormalised in the working dtype: the buffer was rounded in float32, and in float64 those rows would
        # sum to 1 +- 6e-9, an error local accuracy would show.
        shares = self.pixel_shares.to(cells.dtype)
        pixels = torch.einsum("bgj,gp->bpj", cells, shares / shares.sum(dim=1, keepdim=True))
        extras = {"poses": poses, "coupling": routing.coupling, "capsule_attributions": capsule_attributions}
        if self.decoder is not None:
            extras["reconstruction"] = self.decode(poses, lengths.argmax(dim=1))
        return Explanation(
            attributions=rearrange(pixels, "b (h w) j -> b h w j", h=self.image_size[0]),
            base=base,
            output=lengths,
            reference=None,
            player_axes=("height", "width"),
            exact=False,
            method="CapsNet routing attribution",
            extras=extras,
        )


# ---------------------------------------------------------------------------------------------------- helpers
def _grid_size(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def _check_positive_int(value: object, name: str, who: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")


def _pair(size: int | Sequence[int], who: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in pair):
        raise ValueError(f"{who}: image_size must be a positive int or (H, W), got {size!r}")
    return int(pair[0]), int(pair[1])


def _per_channel(value: float | Sequence[float], channels: int, name: str, who: str) -> Tensor:
    values = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if values.numel() not in (1, channels) or not bool(torch.isfinite(values).all()):
        raise ValueError(f"{who}: {name} must be one finite number or {channels} (one per channel), got {value!r}")
    return rearrange(values.expand(channels).clone(), "c -> c 1 1")


def _check_targets(scores: Tensor, target: Tensor, who: str) -> None:
    if not isinstance(target, Tensor) or target.shape != scores.shape[:1] or target.is_floating_point():
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"{who}: target must be ({scores.shape[0]},) integer class indices, got {shape}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= scores.shape[1]):
        raise ValueError(f"{who}: targets must lie in [0, {scores.shape[1]}), got range "
                         f"[{int(target.min())}, {int(target.max())}]")
