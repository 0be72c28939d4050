"""Interpretable CNNs: top-layer filters that each fire on one part of one class.

Interpretable Convolutional Neural Networks (Quanshi Zhang, Ying Nian Wu, Song-Chun Zhu), CVPR 2018,
https://arxiv.org/abs/1710.00935 (journal version: TPAMI 2020, https://arxiv.org/abs/1901.02413).

Theory, guarantees and where this departs from the paper or the original code: docs/theory.md#interpretable-cnns.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ._heads import take_levels
from ._streaming import LIVE_COPIES, StreamedBatches, streamed
from ._validation import check_input, finite_output, image_size_errors
from .contract import LossTerm, StepOutput, no_layers
from .explanation import Explanation

__all__ = [
    "ExactMutualInformationTerm",
    "FilterLossTerm",
    "InterpretableCNN",
    "InterpretableConv2d",
    "PartLocalization",
    "check_template_support",
    "default_alpha",
    "default_tau",
    "feature_to_pixel",
    "filter_loss",
    "filter_mutual_information",
    "location_instability",
    "mask_at_peak",
    "part_localization",
    "part_templates",
    "peak_indices",
    "template_shape",
]

POOLS = ("avg", "max")
NORMALIZERS = ("constant", "batch")
ASSIGNMENTS = ("running", "fixed")


# ---------------------------------------------------------------------------------------------------- templates
def default_tau(height: int, width: int) -> float:
    """The paper's template scale `tau = 0.5 / n^2`, with `n^2 = H W` cells."""
    return 0.5 / (height * width)


def default_alpha(height: int, width: int) -> float:
    """The paper's prior mass of the positive templates, `alpha = n^2 / (1 + n^2)`."""
    cells = height * width
    return cells / (1.0 + cells)


def template_shape(
    peaks: Tensor, height: int, width: int, beta: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """`max(1 - beta * d(p, mu), -1)` for every peak `mu`: the template without `tau`, i.e. the forward mask.

    Args:
        peaks: `(..., 2)` integer (row, col) cells.
        height: map height `H`.
        width: map width `W`.
        beta: decay of the template with the normalised L1 distance `|di| / H + |dj| / W`.
        dtype: of the result.

    Returns:
        `(..., H, W)` in `[-1, 1]`, equal to 1 at the peak.
    """
    rows = torch.arange(height, device=peaks.device, dtype=dtype) / height
    cols = torch.arange(width, device=peaks.device, dtype=dtype) / width
    peak_rows = (peaks[..., 0].to(dtype) / height)[..., None, None]
    peak_cols = (peaks[..., 1].to(dtype) / width)[..., None, None]
    distance = (rows[:, None] - peak_rows).abs() + (cols[None, :] - peak_cols).abs()
    return (1.0 - beta * distance).clamp(min=-1.0)


def check_template_support(height: int, width: int, beta: float, who: str = "InterpretableConv2d") -> None:
    """Raise when an `H x W` map is no larger than the template's support, so a mask cannot localise anything.

    The template (and the forward mask) at a peak `mu` is positive where `beta d(p, mu) < 1`. When it is positive
    on *every* cell of the map for a peak at the map's central cell, the mask keeps the whole map and every
    positive template looks alike: the filter loss cannot pull a filter towards one place. With the paper's
    `beta = 4` this happens only for a 1 x 1 map; a smaller `beta` widens the support.

    Raises:
        ValueError: naming the map size, `beta` and what to change.
    """
    _check_positive_size(height, width, who)
    centre_row, centre_col = (height - 1) // 2, (width - 1) // 2
    farthest = (height - 1 - centre_row) / height + (width - 1 - centre_col) / width  # d to the farthest cell
    if 1.0 - beta * farthest > 0:
        raise ValueError(
            f"{who}: the top map ({height}x{width}) is smaller than the template support (beta={beta} keeps every "
            f"cell within normalised L1 distance {1 / beta:.3g} of the peak, i.e. the whole map), so the mask and the "
            "filter loss cannot localise a part; use larger images, a backbone with a smaller stride, or a larger beta"
        )


def part_templates(
    height: int, width: int, tau: float | None = None, beta: float = 4.0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The `H W` positive templates `T_mu`, one per cell `mu` in row-major order, shape `(H W, H, W)`.

    `T_mu[p] = tau * max(1 - beta * (|p_i - mu_i| / H + |p_j - mu_j| / W), -1)`; the negative template is the
    constant `-tau`. `tau` defaults to `0.5 / (H W)`.
    """
    _check_positive_size(height, width, "part_templates")
    tau = default_tau(height, width) if tau is None else float(tau)
    cells = torch.stack(
        torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"), dim=-1
    ).reshape(-1, 2)
    return tau * template_shape(cells, height, width, beta, dtype)


def peak_indices(maps: Tensor) -> Tensor:
    """The (row, col) cell of each map's maximum (the first one on ties), `(..., H, W) -> (..., 2)` int64."""
    width = maps.shape[-1]
    flat = maps.detach().flatten(-2).argmax(dim=-1)
    return torch.stack([flat // width, flat % width], dim=-1)


def mask_at_peak(maps: Tensor, beta: float = 4.0) -> tuple[Tensor, Tensor, Tensor]:
    """Mask every post-ReLU map with the template shape at its own peak.

    Args:
        maps: `(B, M, H, W)`, non-negative (after the ReLU).
        beta: template decay.

    Returns:
        `(masked, mask, peaks)`: `masked = max(maps * mask, 0)` `(B, M, H, W)`; the mask `(B, M, H, W)`, built
        from the argmax index and hence constant for autograd (the gradient of `masked` w.r.t. `maps` is
        `max(mask, 0)`, as in the paper); the peaks `(B, M, 2)` (row, col).
    """
    peaks = peak_indices(maps)
    wide = torch.promote_types(maps.dtype, torch.float32)  # half-precision grids would round the distances
    mask = template_shape(peaks, maps.shape[-2], maps.shape[-1], beta, wide).to(maps.dtype)
    # maps >= 0, so max(maps * mask, 0) == maps * max(mask, 0): one multiply, and the detached mask is explicit.
    return maps * mask.clamp(min=0.0), mask, peaks


def feature_to_pixel(peaks: Tensor, feature_size: Sequence[int], input_size: Sequence[int]) -> Tensor:
    """Feature-map cells -> input pixel coordinates (row, col) of the centre of the block each cell covers.

    A cell `i` of an `H`-row map over an `H_in`-row image covers rows `[i H_in / H, (i + 1) H_in / H)`; its
    centre is `(i + 0.5) H_in / H - 0.5` in pixel-index units (the paper's receptive-field centre).
    """
    scale = torch.tensor([input_size[0] / feature_size[0], input_size[1] / feature_size[1]], device=peaks.device)
    return (peaks.float() + 0.5) * scale - 0.5


# ---------------------------------------------------------------------------------------------------- loss
def _checked_alpha(alpha: float | None, height: int, width: int, who: str) -> float:
    """`alpha`, or its default for an `H x W` map; refused outside (0, 1)."""
    alpha = default_alpha(height, width) if alpha is None else float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{who}: alpha must lie in (0, 1), got {alpha}")
    return alpha


def _template_scores(maps: Tensor, tau: float | None, beta: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """The maps' scores under every template and the templates' prior (call with autocast off).

    Returns:
        `(x, scores, log_prior)`: the maps `(B, M, H W)` in float32 (or their dtype if wider); `tr(x . T)` for
        the `H W` positive templates and the negative one (last), `(B, M, H W + 1)`; `log p(T)`, `(H W + 1,)`.
    """
    height, width = maps.shape[-2:]
    cells = height * width
    dtype = torch.promote_types(maps.dtype, torch.float32)
    x = rearrange(maps.to(dtype), "b m h w -> b m (h w)")
    tau_value = default_tau(height, width) if tau is None else float(tau)
    positive = rearrange(part_templates(height, width, tau_value, beta, dtype).to(x.device), "t h w -> t (h w)")
    templates = torch.cat([positive, torch.full((1, cells), -tau_value, dtype=dtype, device=x.device)])
    log_prior = torch.cat([torch.full((cells,), math.log(alpha / cells), dtype=dtype, device=x.device),
                           torch.full((1,), math.log1p(-alpha), dtype=dtype, device=x.device)])
    return x, torch.einsum("bmp,tp->bmt", x, templates), log_prior


def _reduce(values: Tensor, reduction: str) -> Tensor:
    """`values` `(M,)` summed (`"sum"`), averaged (`"mean"`) or as they are (`"none"`)."""
    if reduction == "none":
        return values
    return values.sum() if reduction == "sum" else values.mean()


def filter_loss(
    maps: Tensor,
    labels: Tensor,
    filter_classes: Tensor,
    *,
    tau: float | None = None,
    beta: float = 4.0,
    alpha: float | None = None,
    normalizer: str = "constant",
    reduction: str = "sum",
) -> Tensor:
    """The filter loss: the paper's approximated negative mutual information (see docs/theory.md#interpretable-cnns).

    Args:
        maps: `(B, M, H, W)` post-ReLU maps (not masked) of the interpretable filters.
        labels: `(B,)` class of every image.
        filter_classes: `(M,)` class each filter is assigned to.
        tau: template scale; default `0.5 / (H W)`.
        beta: template decay.
        alpha: prior mass of the positive templates; default `H W / (1 + H W)`.
        normalizer: `"constant"`: `Z_T` is a constant of the backward pass (the paper's gradient); `"batch"`:
            the gradient also flows through the batch `Z_T` (the same value; see docs/theory.md#interpretable-cnns).
        reduction: `"sum"` over filters (the paper), `"mean"` over filters, or `"none"` (`(M,)`, one `Loss_f`
            per filter).

    Returns:
        The loss, computed in float32 (or the maps' dtype if wider).

    Raises:
        ValueError: shapes that do not fit, out-of-range constants or an unknown reduction.
    """
    if maps.dim() != 4:
        raise ValueError(f"filter_loss: maps must be (B, M, H, W), got shape {tuple(maps.shape)}")
    batch, filters, height, width = maps.shape
    if labels.shape != (batch,):
        raise ValueError(f"filter_loss: labels must be ({batch},), one per map, got shape {tuple(labels.shape)}")
    if filter_classes.shape != (filters,):
        raise ValueError(f"filter_loss: filter_classes must be ({filters},), got shape {tuple(filter_classes.shape)}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"filter_loss: normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"filter_loss: reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    cells = height * width
    alpha = _checked_alpha(alpha, height, width, "filter_loss")

    # Scores of O(1) feed exponentials: keep them out of autocast's half precision.
    with torch.autocast(maps.device.type, enabled=False):
        x, scores, log_prior = _template_scores(maps, tau, beta, alpha)   # tr(x . T), all H W + 1 templates
        log_z = (scores.detach() if normalizer == "constant" else scores).logsumexp(dim=0)   # log Z_T over the batch

        peaks = x.detach().argmax(dim=-1)                                 # each map's own peak cell, (B, M)
        positive_image = labels.to(x.device)[:, None] == filter_classes.to(x.device)[None, :]
        target = torch.where(positive_image, peaks, torch.full_like(peaks, cells))   # index `cells` is T^-
        target_score = scores.gather(-1, target[..., None]).squeeze(-1)
        target_log_z = log_z.gather(-1, target.T).T                       # log Z of each map's target template
        likelihood = (target_score - target_log_z).exp()                  # p(x | T_x)
        prior = log_prior[target]
        loss = (prior.exp() * prior * likelihood).sum(dim=0)              # -sum_x p(T_x) log(1/p(T_x)) p(x|T_x)
    return _reduce(loss, reduction)


def filter_mutual_information(
    maps: Tensor,
    *,
    tau: float | None = None,
    beta: float = 4.0,
    alpha: float | None = None,
    reduction: str = "sum",
) -> Tensor:
    """The exact mutual information `MI(X; T)` between a batch of maps and the templates, without the approximation.

    `MI(X; T) = sum_T p(T) sum_x p(x|T) log[p(x|T) / p(x)]` with `p(x|T) = exp(tr(x . T)) / Z_T` normalised over
    the batch, `p(x) = sum_T p(T) p(x|T)` over all `H W + 1` templates (no labels enter). `filter_loss` trains
    on the paper's approximation of `-MI` (only each map's target template explains it); this is the quantity
    that approximation stands for, to be logged next to it. It lies in `[0, H(T)]`, with `H(T)` the templates'
    prior entropy. No gradient is meant to flow through it (compute it under `torch.no_grad()` for logging).

    Args:
        maps: `(B, M, H, W)` post-ReLU maps (not masked).
        tau: template scale; default `0.5 / (H W)`.
        beta: template decay.
        alpha: prior mass of the positive templates; default `H W / (1 + H W)`.
        reduction: `"sum"` over filters, `"mean"` or `"none"` (`(M,)`).

    Raises:
        ValueError: maps that are not 4-D, `alpha` outside (0, 1) or an unknown reduction.
    """
    if maps.dim() != 4:
        raise ValueError(f"filter_mutual_information: maps must be (B, M, H, W), got shape {tuple(maps.shape)}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"filter_mutual_information: reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    height, width = maps.shape[-2:]
    alpha = _checked_alpha(alpha, height, width, "filter_mutual_information")
    with torch.autocast(maps.device.type, enabled=False):
        _, scores, log_prior = _template_scores(maps, tau, beta, alpha)
        log_likelihood = scores - scores.logsumexp(dim=0, keepdim=True)          # log p(x | T), (B, M, T)
        log_marginal = (log_likelihood + log_prior).logsumexp(dim=-1, keepdim=True)   # log p(x), (B, M, 1)
        terms = log_prior.exp() * log_likelihood.exp() * (log_likelihood - log_marginal)
        mi = terms.sum(dim=(0, 2))                                                 # (M,)
    return _reduce(mi, reduction)


# ---------------------------------------------------------------------------------------------------- layer
class InterpretableConv2d(nn.Module):
    """Conv + ReLU whose maps are masked at their own peak, with the filter loss and class assignment.

    `forward(features) -> masked maps (B, M, H, W)`. The layer keeps what the loss needs from its *last*
    forward pass on the module: `last_maps` (post-ReLU, unmasked, still attached to the graph in training so
    that `filter_loss(labels)` differentiates through the same forward pass as the classification loss),
    `last_masked` and `last_peaks`. Call the loss after the forward pass of the batch it belongs to and
    before the next one.

    Args:
        in_channels: channels of the feature map it sits on.
        num_filters: `M`, the interpretable filters.
        num_classes: classes the filters are assigned to.
        kernel_size: of the conv (the paper: 3).
        beta: template decay (the paper: 4).
        tau: template scale of the loss; `None` uses `0.5 / (H W)` of the map at hand.
        alpha: prior mass of the positive templates; `None` uses `H W / (1 + H W)`.
        normalizer: `"constant"` (the paper's gradient) or `"batch"` (see `filter_loss`).
        momentum: of the running per-class activation (the released code: 0.9).
        assignment: `"running"` (argmax of the running per-class activation) or `"fixed"` (filter `f` ->
            class `f mod C`).
        interpretable: `False` gives the same layer without mask and loss: an ordinary conv + ReLU, the
            baseline the paper compares with (its filters still have peaks and classes for the metrics).
    """

    def __init__(
        self,
        in_channels: int,
        num_filters: int,
        num_classes: int,
        kernel_size: int = 3,
        *,
        beta: float = 4.0,
        tau: float | None = None,
        alpha: float | None = None,
        normalizer: str = "constant",
        momentum: float = 0.9,
        assignment: str = "running",
        interpretable: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_filters", num_filters),
                            ("num_classes", num_classes), ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InterpretableConv2d: {name} must be a positive int, got {value!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"InterpretableConv2d: kernel_size must be odd (to keep the map size), got {kernel_size}")
        if not beta > 0:
            raise ValueError(f"InterpretableConv2d: beta must be positive, got {beta}")
        if tau is not None and not tau > 0:
            raise ValueError(f"InterpretableConv2d: tau must be positive or None, got {tau}")
        if alpha is not None and not 0.0 < alpha < 1.0:
            raise ValueError(f"InterpretableConv2d: alpha must lie in (0, 1) or be None, got {alpha}")
        if normalizer not in NORMALIZERS:
            raise ValueError(f"InterpretableConv2d: normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"InterpretableConv2d: momentum must lie in [0, 1), got {momentum}")
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"InterpretableConv2d: assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        self.num_filters, self.num_classes = num_filters, num_classes
        self.beta, self.tau, self.alpha, self.momentum = float(beta), tau, alpha, float(momentum)
        self.normalizer = normalizer
        self.assignment, self.interpretable = assignment, bool(interpretable)
        self.conv = nn.Conv2d(in_channels, num_filters, kernel_size, padding=kernel_size // 2)
        self.register_buffer("class_activation", torch.zeros(num_filters, num_classes))
        self.register_buffer("class_seen", torch.zeros(num_classes, dtype=torch.bool))
        self.last_maps: Tensor | None = None
        self.last_masked: Tensor | None = None
        self.last_peaks: Tensor | None = None

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, tau={self.tau}, alpha={self.alpha}, normalizer={self.normalizer!r}, "
                f"assignment={self.assignment!r}, interpretable={self.interpretable}")

    def __getstate__(self) -> dict[str, Any]:
        # The kept maps belong to one forward pass (and may hold its graph, which cannot be copied): copies and
        # pickles (deepcopy for export or EMA, DataParallel replicas) start without them.
        return {**self.__dict__, "last_maps": None, "last_masked": None, "last_peaks": None}

    def forward(self, features: Tensor) -> Tensor:
        """`(B, C, H, W)` features -> `(B, M, H, W)` masked maps (unmasked when `interpretable=False`)."""
        maps = F.relu(self.conv(features))
        if self.interpretable:
            check_template_support(maps.shape[-2], maps.shape[-1], self.beta, type(self).__name__)
            masked, _, peaks = mask_at_peak(maps, self.beta)
        else:
            masked, peaks = maps, peak_indices(maps)
        # Kept for the loss and for explanations of this very forward pass (see the class docstring).
        self.last_maps, self.last_masked, self.last_peaks = maps, masked, peaks
        return masked

    def reset_classes(self, num_classes: int) -> None:
        """Assign the filters to a new label set of `num_classes`: the running per-class activation starts anew (the
        conv keeps its weights). A filter's class is the round robin until the first labelled batch."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"InterpretableConv2d: num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.class_activation = self.class_activation.new_zeros(self.num_filters, num_classes)
        self.class_seen = self.class_seen.new_zeros(num_classes)

    @property
    def filter_classes(self) -> Tensor:
        """`(M,)` the class each filter is assigned to (see docs/theory.md#interpretable-cnns)."""
        round_robin = torch.arange(self.num_filters, device=self.class_activation.device) % self.num_classes
        if self.assignment == "fixed" or not bool(self.class_seen.any()):
            return round_robin
        scores = self.class_activation.masked_fill(~self.class_seen[None, :], float("-inf"))
        return scores.argmax(dim=1)

    @torch.no_grad()
    def update_assignment(self, maps: Tensor, labels: Tensor) -> None:
        """Fold a batch's per-class mean peak activation into the running average.

        Args:
            maps: `(B, M, H, W)` post-ReLU maps.
            labels: `(B,)` classes.
        """
        if maps.dim() != 4 or maps.shape[1] != self.num_filters:
            raise ValueError(f"update_assignment: maps must be (B, {self.num_filters}, H, W), "
                             f"got {tuple(maps.shape)}")
        labels = _check_labels(labels, maps.shape[0], self.num_classes, "update_assignment")
        peak = maps.detach().float().flatten(2).amax(dim=-1)                   # (B, M)
        one_hot = F.one_hot(labels.to(peak.device), self.num_classes).to(peak.dtype)   # (B, C)
        counts = one_hot.sum(dim=0)
        present = counts > 0
        mean = (peak.T @ one_hot) / counts.clamp(min=1)                         # (M, C)
        first = present & ~self.class_seen
        old = self.class_activation
        blended = self.momentum * old + (1.0 - self.momentum) * mean
        new = torch.where(first[None, :], mean, torch.where(present[None, :], blended, old))
        self.class_activation.copy_(new.to(old.dtype))
        self.class_seen.logical_or_(present.to(self.class_seen.device))

    def filter_loss(self, labels: Tensor, update: bool | None = None) -> Tensor:
        """The filter loss of the last forward pass (summed over filters); 0 when `interpretable=False`.

        Args:
            labels: `(B,)` classes of the batch of the last forward pass.
            update: fold the batch into the running class assignment first; default: in training mode.

        Raises:
            RuntimeError: no forward pass yet, or a last forward pass on a batch of another size.
        """
        maps = self.last_maps
        if maps is None:
            raise RuntimeError("filter_loss: run a forward pass first (the loss reads that pass's feature maps)")
        labels = _check_labels(labels, maps.shape[0], self.num_classes, "filter_loss")
        if update is None:
            update = self.training
        if update:
            self.update_assignment(maps, labels)
        if not self.interpretable:
            return maps.new_zeros(()).float()
        return filter_loss(maps, labels, self.filter_classes, tau=self.tau, beta=self.beta, alpha=self.alpha,
                           normalizer=self.normalizer)


def _check_labels(labels: Tensor, batch: int, num_classes: int, who: str) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dtype in (torch.bool,) or labels.is_floating_point():
        kind = type(labels).__name__ if not isinstance(labels, Tensor) else str(labels.dtype)
        raise TypeError(f"{who}: labels must be an integer tensor, got {kind}")
    if labels.shape != (batch,):
        raise RuntimeError(
            f"{who}: labels have shape {tuple(labels.shape)} but the last forward pass saw a batch of {batch}: "
            "call the loss right after the forward pass of the same batch"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{who}: labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


class FilterLossTerm(LossTerm):
    """The filter loss as a training loss term (`shapnets.contract.LossTerm`), from the same forward.

    It reads the maps the model's `InterpretableConv2d` kept from the step's forward pass (so it needs no
    explanation and no second pass) and, in training mode, updates the running filter-to-class assignment.
    It is logged as `filter_loss_approx_neg_mi`: its value is the paper's *approximation* of `-MI` (see the module
    docstring), which can sit far from the exact `-MI` (`ExactMutualInformationTerm` logs that one next to it).

    Args:
        layer: the interpretable layer.
        weight: its weight in the total loss.
    """

    name = "filter_loss_approx_neg_mi"

    def __init__(self, layer: InterpretableConv2d, weight: float = 0.1) -> None:
        self.layer, self.weight = layer, float(weight)

    def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
        return self.layer.filter_loss(target)


class ExactMutualInformationTerm:
    """The exact `-MI(X; T)` of the last forward pass's maps, summed over filters: a term for logging only.

    Its weight is 0 and its value is detached, so it never changes training; the trainer logs it as
    `filter_neg_mi_exact` next to `filter_loss_approx_neg_mi` (the approximation that is trained on). Call it
    after the forward pass of the batch, like `FilterLossTerm`.

    Args:
        layer: the interpretable layer.
    """

    name = "filter_neg_mi_exact"
    needs_explanation = False
    needs_layers = False
    weight = 0.0

    def __init__(self, layer: InterpretableConv2d) -> None:
        self.layer = layer

    @torch.no_grad()
    def __call__(self, out: Any, target: Tensor) -> Tensor:
        maps = self.layer.last_maps
        if maps is None:
            raise RuntimeError("ExactMutualInformationTerm: run a forward pass first (it reads that pass's maps)")
        layer = self.layer
        return -filter_mutual_information(maps.detach(), tau=layer.tau, beta=layer.beta, alpha=layer.alpha)

    def __repr__(self) -> str:
        return "ExactMutualInformationTerm()"


# ---------------------------------------------------------------------------------------------------- model
class InterpretableCNN(StreamedBatches, nn.Module):
    """A backbone, an interpretable conv layer on its top feature map, and a linear head on pooled filters.

    `logits = W pool(x_masked) + b`, with `pool` the spatial mean (or max) of each masked filter map. The
    head is linear in the pooled filter activations, so `explain` splits every logit exactly: filter `f`
    contributes `W[c, f] pool_f` to class `c`; under mean pooling that contribution is spread over the
    filter's masked map (`W[c, f] x_masked[f, cell] / (H W)` per cell), under max pooling it sits on the
    filter's peak cell. Each cell's value is shared equally among the input pixels of the block it covers
    (pixel row `i` belongs to cell `floor(i H / H_in)`), which preserves the sums, so
    `bias + sum over pixels == logits` holds exactly (local accuracy; the base is the head's bias, the
    output with every filter silent).

    Args:
        backbone: any module mapping `(B, in_chans, H_in, W_in)` to a top feature map `(B, C, H, W)`, or to
            a list / tuple / dict of maps whose last one is the top map (timm `features_only=True` models).
        num_classes: classes.
        feature_channels: `C`; default read from the backbone (`feature_info.channels()[-1]` for timm
            feature extractors, else an `out_channels` attribute).
        in_chans: input channels (checked on every call).
        num_filters: interpretable filters `M`; default `C` (the paper keeps the layer's width).
        kernel_size: of the interpretable conv.
        pool: `"avg"` or `"max"` pooling of the masked maps before the head.
        beta: template decay.
        tau: template scale; `None`: `0.5 / (H W)`.
        alpha: prior of the positive templates; `None`: `H W / (1 + H W)`.
        normalizer: `"constant"` (the paper's gradient) or `"batch"` (see `filter_loss`).
        momentum: of the running class assignment.
        assignment: `"running"` or `"fixed"` (see `InterpretableConv2d`).
        interpretable: `False` builds the baseline (no mask, no filter loss) with the same architecture.
        filter_loss_weight: weight of the filter loss that `loss_terms()` hands to the trainer; the default 0.1
            is only a starting point (a tiny model trained from scratch keeps its filters alive with it and loses
            most of them with 1-10); tune it per backbone and data set.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        feature_channels: int | None = None,
        in_chans: int = 3,
        num_filters: int | None = None,
        kernel_size: int = 3,
        pool: str = "avg",
        beta: float = 4.0,
        tau: float | None = None,
        alpha: float | None = None,
        normalizer: str = "constant",
        momentum: float = 0.9,
        assignment: str = "running",
        interpretable: bool = True,
        filter_loss_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"InterpretableCNN: pool must be one of {POOLS}, got {pool!r}")
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"InterpretableCNN: in_chans must be a positive int, got {in_chans!r}")
        if not filter_loss_weight >= 0:
            raise ValueError(f"InterpretableCNN: filter_loss_weight must be >= 0, got {filter_loss_weight}")
        channels = _feature_channels(backbone) if feature_channels is None else feature_channels
        self.backbone = backbone
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"InterpretableCNN: num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
        self.in_chans, self.num_classes, self.pool = in_chans, num_classes, pool
        self.filter_loss_weight = float(filter_loss_weight)
        self.interpretable_layer = InterpretableConv2d(
            channels, channels if num_filters is None else num_filters, max(num_classes, 1), kernel_size,
            beta=beta, tau=tau, alpha=alpha, normalizer=normalizer, momentum=momentum, assignment=assignment,
            interpretable=interpretable,
        )
        self.num_filters = self.interpretable_layer.num_filters
        self.head: nn.Module = nn.Linear(self.num_filters, num_classes) if num_classes else nn.Identity()

    # ------------------------------------------------------------------ timm's model interface
    # The head is the linear layer on the pooled masked filter maps; a new label set also restarts the filters'
    # class assignment (the interpretable layer's running per-class activation), while every conv keeps its weights.
    @property
    def num_features(self) -> int:
        """The interpretable filters `M` (what the head reads, pooled)."""
        return self.num_filters

    @property
    def head_hidden_size(self) -> int:
        """timm's width before the classifier: `num_features`."""
        return self.num_filters

    def get_classifier(self) -> nn.Module:
        """The linear head on the pooled masked filter maps."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A freshly initialised head with `num_classes` outputs and a new class assignment of the filters (`0`: no
        head, the model returns the pooled masked maps `(B, num_features)`; the assignment is left as it was).

        Raises:
            ValueError: `num_classes` is not an int >= 0.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"{type(self).__name__}.reset_classifier: num_classes must be an int >= 0 (0: no head, "
                             f"pooled features), got {num_classes!r}")
        like = self.interpretable_layer.conv.weight
        self.head = nn.Linear(self.num_filters, num_classes).to(like) if num_classes else nn.Identity()
        if num_classes:
            self.interpretable_layer.reset_classes(num_classes)
        self.num_classes = num_classes

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's feature levels: the backbone's top map and the interpretable layer's masked filter maps.

        Raises:
            ValueError: the backbone does not say its stride (a `reduction` attribute or timm's `feature_info`).
        """
        info = getattr(self.backbone, "feature_info", None)
        if info is not None and callable(getattr(info, "reduction", None)):
            reduction = info.reduction()
            reduction = reduction[-1] if isinstance(reduction, list | tuple) else reduction
        else:
            reduction = getattr(self.backbone, "reduction", None)
        if not isinstance(reduction, int):
            raise ValueError(f"{type(self).__name__}: the backbone does not say its stride (a `reduction` attribute "
                             "or timm's feature_info), so its feature levels are unknown")
        top = self.interpretable_layer.conv.in_channels
        return [dict(num_chs=top, reduction=reduction, module="backbone"),
                dict(num_chs=self.num_filters, reduction=reduction, module="interpretable_layer")]

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature levels `(B, C, H, W)`: 0 the backbone's top map, 1 the masked filter maps.

        Returns:
            The maps of `indices` (default both), or with `intermediates_only=False` also `forward_features(x)`.
        """
        take = take_levels(2, indices, type(self).__name__, output_fmt)
        x = check_input(x, [(None, self.in_chans, None, None)], type(self).__name__, self)
        top = self.top_features(x)
        masked = self.interpretable_layer(top) if 1 in take or not intermediates_only else None
        maps = [level for i, level in enumerate((top, masked)) if i in take]
        return maps if intermediates_only else (masked, maps)

    def forward_features(self, x: Tensor) -> Tensor:
        """The masked filter maps `(B, num_features, H, W)` on the backbone's top map."""
        x = check_input(x, [(None, self.in_chans, None, None)], type(self).__name__, self)
        return self.interpretable_layer(self.top_features(x))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits from `forward_features(x)`; `pre_logits=True`: the pooled maps `(B, num_features)`."""
        pooled = self._pooled(features)
        return pooled if pre_logits else self.head(pooled)

    # ------------------------------------------------------------------ forward
    def top_features(self, x: Tensor) -> Tensor:
        """The backbone's top feature map `(B, C, H, W)`."""
        with image_size_errors(x, type(self).__name__):
            out = self.backbone(x)
        if isinstance(out, dict):
            out = list(out.values())
        if isinstance(out, list | tuple):
            out = out[-1]
        if not isinstance(out, Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise RuntimeError(f"{type(self).__name__}: the backbone must return a (B, C, H, W) map, got {shape}")
        return out

    def _pooled(self, masked: Tensor) -> Tensor:
        return masked.mean(dim=(2, 3)) if self.pool == "avg" else masked.amax(dim=(2, 3))

    def working_elements(self, x: Tensor) -> int:
        # A backbone's widest activation is not known in advance: budget 256 values per input pixel (a VGG's
        # 64-channel full-resolution maps, a few alive at once).
        return 256 * x.shape[-2] * x.shape[-1] * LIVE_COPIES

    @streamed
    @finite_output
    def forward(self, x: Tensor) -> Tensor:
        """`(B, in_chans, H_in, W_in) -> (B, num_classes)` logits."""
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ training
    def loss_terms(self) -> list[FilterLossTerm]:
        """The filter loss as an extra training term, plus the exact -MI for logging (none for the baseline or
        with weight 0)."""
        if not self.interpretable_layer.interpretable or self.filter_loss_weight == 0:
            return []
        # The trained approximation of -MI, and the exact -MI next to it in the logs (weight 0).
        return [FilterLossTerm(self.interpretable_layer, self.filter_loss_weight),
                ExactMutualInformationTerm(self.interpretable_layer)]

    def filter_loss(self, labels: Tensor) -> Tensor:
        """The filter loss of the last forward pass (see `InterpretableConv2d.filter_loss`)."""
        return self.interpretable_layer.filter_loss(labels)

    @property
    def filter_classes(self) -> Tensor:
        """`(M,)` the class each interpretable filter is assigned to."""
        return self.interpretable_layer.filter_classes

    # ------------------------------------------------------------------ explanation
    @streamed
    @finite_output
    def explain(self, x: Tensor, layers: bool = False) -> Explanation:
        """Logits split exactly over input pixels through the interpretable filters.

        Returns:
            An `Explanation` with attributions `(B, H_in, W_in, num_classes)` (player axes height, width),
            base = the head's bias, output = the logits (local accuracy holds exactly) and `extras`:

            * `part_locations` `(B, M, 2)`: each filter's peak as input pixel (row, col), the centre of the
              block its peak cell covers (the inferred part location);
            * `peak_activations` `(B, M)`: each filter's peak activation;
            * `filter_classes` `(B, M)`: the class each filter is assigned to (the same row for every sample);
            * `filter_contributions` `(B, M, num_classes)`: `W[c, f] pool_f`, which sums over filters to
              `output - base`;
            * `masked_maps` `(B, M, H, W)`: the masked filter maps.
        """
        no_layers(self, layers)  # one explanation, no per-layer representations
        x = check_input(x, [(None, self.in_chans, None, None)], type(self).__name__, self)
        masked = self.interpretable_layer(self.top_features(x))
        peaks = self.interpretable_layer.last_peaks
        pooled = self._pooled(masked)
        logits = self.head(pooled)
        batch, filters, height, width = masked.shape
        in_height, in_width = x.shape[-2:]
        if height > in_height or width > in_width:
            raise RuntimeError(f"{type(self).__name__}.explain: the top map ({height}x{width}) is larger than the "
                               f"input ({in_height}x{in_width}); cannot share cells among pixels")
        if self.pool == "avg":
            cell_values = masked / (height * width)
        else:  # the whole pooled value sits on the peak cell
            peak_cell = peaks[..., 0] * width + peaks[..., 1]
            cell_values = torch.zeros_like(masked).flatten(2)
            cell_values = cell_values.scatter(2, peak_cell[..., None], pooled[..., None])
            cell_values = rearrange(cell_values, "b m (h w) -> b m h w", h=height)
        # Without a head the pooled maps are the output: the identity "head" splits them the same way.
        weight = self.head.weight if self.num_classes else torch.eye(filters, dtype=x.dtype, device=x.device)
        bias = self.head.bias if self.num_classes else weight.new_zeros(filters)
        cell_attributions = torch.einsum("bmhw,cm->bhwc", cell_values, weight)
        share_rows = _share_matrix(in_height, height, x)
        share_cols = _share_matrix(in_width, width, x)
        attributions = torch.einsum("ih,bhwc,jw->bijc", share_rows, cell_attributions, share_cols)
        feature_size, input_size = (height, width), (in_height, in_width)
        extras = {
            "part_locations": feature_to_pixel(peaks, feature_size, input_size).to(x.dtype),
            "peak_activations": masked.flatten(2).amax(dim=-1),
            "filter_classes": self.filter_classes.expand(batch, filters),
            "filter_contributions": pooled[:, :, None] * weight.T[None],
            "masked_maps": masked,
        }
        return Explanation(
            attributions=attributions,
            base=bias.expand(batch, -1),
            output=logits,
            reference=None,
            player_axes=("height", "width"),
            exact=False,
            method=type(self).__name__,
            extras=extras,
        )


def _share_matrix(pixels: int, cells: int, like: Tensor) -> Tensor:
    """`(pixels, cells)`: pixel `i` belongs to cell `floor(i cells / pixels)`; each column sums to 1."""
    owner = torch.arange(pixels, device=like.device) * cells // pixels
    share = F.one_hot(owner, cells).to(like.dtype)
    return share / share.sum(dim=0, keepdim=True)


def _feature_channels(backbone: nn.Module) -> int:
    info = getattr(backbone, "feature_info", None)
    if info is not None and callable(getattr(info, "channels", None)):
        channels = info.channels()
        return int(channels[-1] if isinstance(channels, list | tuple) else channels)
    if isinstance(getattr(backbone, "out_channels", None), int):
        return backbone.out_channels
    raise ValueError(
        f"InterpretableCNN: cannot tell how many channels the backbone {type(backbone).__name__} outputs; pass "
        "feature_channels=... (timm features_only models and modules with an `out_channels` int are read directly)"
    )


# ---------------------------------------------------------------------------------------------------- metric
def location_instability(
    part_locations: Tensor,
    landmarks: Tensor,
    image_size: Sequence[int],
    activations: Tensor | None = None,
    *,
    top_k: int = 100,
    valid: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The paper's location instability of filters' inferred parts w.r.t. annotated landmarks (lower is better).

    For every filter: take its `top_k` images by peak activation (all images when `activations` is None),
    compute the distance from the filter's part location to each landmark in each of those images, take the
    standard deviation of that distance across the images (with Bessel's correction, as MATLAB's `std` in
    the released `getDistSqrtVar.m`), average over landmarks and divide by the image diagonal.

    Args:
        part_locations: `(N, M, 2)` each filter's inferred part location (row, col) in each image, pixels.
        landmarks: `(N, K, 2)` annotated landmarks (row, col) in the same pixels; NaN marks a missing one.
        image_size: `(H, W)` of the images, for the diagonal.
        activations: `(N, M)` peak activation of each filter in each image, to pick its top images.
        top_k: images per filter (the paper: 100); fewer when fewer are available.
        valid: `(N, M)` bool: which images may count for which filter (e.g. the images of its class, whose
            landmarks are its parts); default all.
        reduction: `"mean"` over filters (NaN-aware; filters with fewer than two usable images are skipped)
            or `"none"` for `(M,)`.

    Raises:
        ValueError: mismatched shapes, a bad `image_size`, `top_k < 2` or an unknown reduction.
    """
    if part_locations.dim() != 3 or part_locations.shape[-1] != 2:
        raise ValueError(f"location_instability: part_locations must be (N, M, 2), got {tuple(part_locations.shape)}")
    n_images, n_filters, _ = part_locations.shape
    if landmarks.dim() != 3 or landmarks.shape[0] != n_images or landmarks.shape[-1] != 2:
        raise ValueError(f"location_instability: landmarks must be ({n_images}, K, 2), got {tuple(landmarks.shape)}")
    if activations is not None and activations.shape != (n_images, n_filters):
        raise ValueError(f"location_instability: activations must be ({n_images}, {n_filters}), "
                         f"got {tuple(activations.shape)}")
    if valid is not None and valid.shape != (n_images, n_filters):
        raise ValueError(f"location_instability: valid must be ({n_images}, {n_filters}), got {tuple(valid.shape)}")
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"location_instability: image_size must be (H, W) > 0, got {tuple(image_size)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 2:
        raise ValueError(f"location_instability: top_k must be an int >= 2 (a spread needs two images), got {top_k!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"location_instability: reduction must be 'mean' or 'none', got {reduction!r}")

    dtype = torch.promote_types(part_locations.dtype, torch.float32)
    locations, landmarks = part_locations.to(dtype), landmarks.to(dtype=dtype, device=part_locations.device)
    score = torch.zeros(n_images, n_filters, dtype=dtype) if activations is None else activations.detach().to(dtype)
    score = score.to(locations.device)
    usable = torch.ones_like(score, dtype=torch.bool) if valid is None else valid.to(locations.device).bool()
    score = score.masked_fill(~usable, float("-inf"))
    k = min(top_k, n_images)
    top = score.topk(k, dim=0).indices                                             # (k, M)
    chosen = usable.gather(0, top)                                                 # (k, M)
    top_locations = locations.gather(0, top[..., None].expand(k, n_filters, 2))   # (k, M, 2)
    top_landmarks = landmarks[top]                                                 # (k, M, K, 2)
    distance = (top_locations[:, :, None, :] - top_landmarks).norm(dim=-1)        # (k, M, K)
    present = distance.isfinite() & chosen[..., None]
    count = present.sum(dim=0)                                                     # (M, K)
    filled = distance.nan_to_num(0.0) * present
    mean = filled.sum(dim=0) / count.clamp(min=1)
    variance = (((distance.nan_to_num(0.0) - mean) ** 2) * present).sum(dim=0) / (count - 1).clamp(min=1)
    spread = torch.where(count >= 2, variance.sqrt(), torch.full_like(variance, float("nan")))
    diagonal = math.hypot(float(image_size[0]), float(image_size[1]))
    per_filter = spread.nanmean(dim=1) / diagonal                                  # (M,)
    return per_filter.nanmean() if reduction == "mean" else per_filter


@dataclasses.dataclass(frozen=True)
class PartLocalization:
    """Per-filter distances from inferred part locations to landmarks, on each filter's top images.

    Attributes:
        landmark: `(M,)` the landmark each filter is measured against (the nearest one on average over its top
            images, or the one given); -1 for a filter with no usable image.
        mean_distance: `(M,)` mean distance (pixels) from the filter's location to that landmark.
        median_distance: `(M,)` median of the same distances.
        within_cell: `(M,)` share of the filter's top images on which that distance is at most one cell side.
        centre_distance: `(M,)` mean distance (pixels) from the filter's location to the object centre.
        images: `(M,)` how many top images counted.
        cell_size: side of one top-map cell in pixels (the larger of the two axes' cell sides).
        offset_median_distance: `(M,)` median distance to the landmark *shifted by the filter's mean offset* from
            it: small when the filter fires at a fixed place relative to the part (e.g. its edge), not on it.
    """

    landmark: Tensor
    mean_distance: Tensor
    median_distance: Tensor
    within_cell: Tensor
    centre_distance: Tensor
    images: Tensor
    cell_size: float
    offset_median_distance: Tensor | None = None

    @property
    def localized(self) -> Tensor:
        """`(M,)` bool: the filter's median distance to its landmark is at most one cell side."""
        return self.median_distance <= self.cell_size

    @property
    def nearer_landmark_than_centre(self) -> Tensor:
        """`(M,)` bool: on average the filter sits nearer its landmark than the object centre."""
        return self.mean_distance < self.centre_distance

    def summary(self, filters: Tensor | None = None) -> dict[str, float]:
        """Means over filters (all, or the `(M,)` bool `filters`, e.g. the live ones; filters without images skip).

        Returns:
            `filters`; `mean_distance` (mean of the per-filter means, pixels); `median_distance` (median of the
            per-filter medians); `share_within_cell` (mean share of top images within one cell);
            `share_localized` (share of filters whose median distance is within one cell);
            `share_nearer_landmark_than_centre`; `share_localized_up_to_offset` (the same as `share_localized`
            for the landmark shifted by each filter's mean offset); `cell_size`.
        """
        keep = self.images > 0
        if filters is not None:
            if filters.shape != keep.shape:
                raise ValueError(f"PartLocalization.summary: filters must be {tuple(keep.shape)}, "
                                 f"got {tuple(filters.shape)}")
            keep = keep & filters.to(keep.device).bool()
        count = int(keep.sum())
        if count == 0:
            nan = float("nan")
            return {"filters": 0, "mean_distance": nan, "median_distance": nan, "share_within_cell": nan,
                    "share_localized": nan, "share_nearer_landmark_than_centre": nan,
                    "share_localized_up_to_offset": nan, "cell_size": self.cell_size}
        return {
            "filters": count,
            "mean_distance": self.mean_distance[keep].mean().item(),
            "median_distance": self.median_distance[keep].median().item(),
            "share_within_cell": self.within_cell[keep].mean().item(),
            "share_localized": self.localized[keep].float().mean().item(),
            "share_nearer_landmark_than_centre": self.nearer_landmark_than_centre[keep].float().mean().item(),
            "share_localized_up_to_offset": float("nan") if self.offset_median_distance is None
            else (self.offset_median_distance[keep] <= self.cell_size).float().mean().item(),
            "cell_size": self.cell_size,
        }


def part_localization(
    part_locations: Tensor,
    landmarks: Tensor | None,
    cell_size: float | Sequence[float],
    activations: Tensor | None = None,
    *,
    image_size: Sequence[int] | None = None,
    top_k: int = 100,
    valid: Tensor | None = None,
    assigned: Tensor | None = None,
    centres: Tensor | None = None,
) -> PartLocalization:
    """A part-specific measure: how far each filter's inferred part sits from one landmark, on its top images.

    The paper's location instability (`location_instability`) scores the *spread* of the distances to every
    landmark, so a filter that fires at the object's centre, or one that never fires, can score as well as a
    part detector. This measures the distance itself: for every filter, on its `top_k` images by peak
    activation (among `valid` ones), the distance from its inferred location to its landmark, i.e. the one
    nearest on average over those images (or `assigned`), and to the object centre.

    Args:
        part_locations: `(N, M, 2)` each filter's inferred part (row, col) in each image, pixels.
        landmarks: `(N, K, 2)` landmarks (row, col) in the same pixels; NaN marks a missing one. `None` (a data
            set without landmarks) is an error.
        cell_size: side of one top-map cell in pixels, `s` or `(s_row, s_col)` (e.g. input size / map size);
            "within one cell" means a distance of at most the larger side.
        activations: `(N, M)` peak activations, to pick each filter's top images (all images when None).
        image_size: `(H, W)` of the images; when given, a cell at least as large as the image is an error.
        top_k: images per filter; fewer when fewer are valid.
        valid: `(N, M)` bool: which images may count for which filter (e.g. those of its class); default all.
        assigned: `(M,)` landmark index per filter (the one it is trained towards); default the nearest on average.
        centres: `(N, 2)` object centre per image; default the mean of the image's landmarks.

    Raises:
        ValueError: missing landmarks, mismatched shapes, a non-positive cell, a cell as large as the image,
            `top_k < 1` or an out-of-range `assigned`.
    """
    if landmarks is None:
        raise ValueError("part_localization: no landmarks; the part measure needs a data set with annotated part "
                         "landmarks (e.g. 'parts' or 'parts_hard', whose splits carry .landmarks)")
    if part_locations.dim() != 3 or part_locations.shape[-1] != 2:
        raise ValueError(f"part_localization: part_locations must be (N, M, 2), got {tuple(part_locations.shape)}")
    n_images, n_filters, _ = part_locations.shape
    if landmarks.dim() != 3 or landmarks.shape[0] != n_images or landmarks.shape[-1] != 2:
        raise ValueError(f"part_localization: landmarks must be ({n_images}, K, 2), got {tuple(landmarks.shape)}")
    if not bool(landmarks.isfinite().all(dim=-1).any()):
        raise ValueError("part_localization: every landmark is missing (NaN); the part measure needs landmarks")
    sides = (float(cell_size),) * 2 if isinstance(cell_size, int | float) else tuple(float(c) for c in cell_size)
    if len(sides) != 2 or not min(sides) > 0:
        raise ValueError(f"part_localization: cell_size must be > 0 (one value or (row, col)), got {cell_size!r}")
    if image_size is not None and (sides[0] >= image_size[0] and sides[1] >= image_size[1]):
        raise ValueError(f"part_localization: one cell ({sides[0]:g}x{sides[1]:g} px) covers the whole "
                         f"{image_size[0]}x{image_size[1]} image: a 1x1 top map cannot localise a part")
    if activations is not None and activations.shape != (n_images, n_filters):
        raise ValueError(f"part_localization: activations must be ({n_images}, {n_filters}), "
                         f"got {tuple(activations.shape)}")
    if valid is not None and valid.shape != (n_images, n_filters):
        raise ValueError(f"part_localization: valid must be ({n_images}, {n_filters}), got {tuple(valid.shape)}")
    if centres is not None and centres.shape != (n_images, 2):
        raise ValueError(f"part_localization: centres must be ({n_images}, 2), got {tuple(centres.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"part_localization: top_k must be a positive int, got {top_k!r}")
    n_landmarks = landmarks.shape[1]
    if assigned is not None and (assigned.shape != (n_filters,) or bool((assigned < 0).any())
                                 or bool((assigned >= n_landmarks).any())):
        raise ValueError(f"part_localization: assigned must be ({n_filters},) landmark indices in [0, {n_landmarks})")

    dtype = torch.promote_types(part_locations.dtype, torch.float32)
    device = part_locations.device
    locations = part_locations.to(dtype)
    landmarks = landmarks.to(dtype=dtype, device=device)
    if centres is None:
        centres = landmarks.nanmean(dim=1)                                          # (N, 2)
    centres = centres.to(dtype=dtype, device=device)
    score = torch.zeros(n_images, n_filters, dtype=dtype, device=device) if activations is None \
        else activations.detach().to(dtype=dtype, device=device)
    usable = torch.ones_like(score, dtype=torch.bool) if valid is None else valid.to(device).bool()
    k = min(top_k, n_images)
    top = score.masked_fill(~usable, float("-inf")).topk(k, dim=0).indices           # (k, M)
    chosen = usable.gather(0, top)                                                  # (k, M)
    top_locations = locations.gather(0, top[..., None].expand(k, n_filters, 2))    # (k, M, 2)
    distance = (top_locations[:, :, None, :] - landmarks[top]).norm(dim=-1)        # (k, M, K); NaN: missing
    present = distance.isfinite() & chosen[..., None]
    per_landmark = (distance.nan_to_num(0.0) * present).sum(0) / present.sum(0).clamp(min=1)   # (M, K)
    per_landmark = per_landmark.masked_fill(present.sum(0) == 0, float("inf"))
    landmark = per_landmark.argmin(dim=1) if assigned is None else assigned.to(device).long()
    images = chosen.sum(dim=0)
    landmark = landmark.masked_fill(images == 0, -1)
    to_landmark = distance.gather(-1, landmark.clamp(min=0)[None, :, None].expand(k, n_filters, 1)).squeeze(-1)
    counted = chosen & to_landmark.isfinite()                                       # (k, M)
    masked = to_landmark.masked_fill(~counted, float("nan"))
    mean_distance = masked.nanmean(dim=0)
    median_distance = masked.nanmedian(dim=0).values
    within = ((to_landmark <= max(sides)) & counted).sum(0) / counted.sum(0).clamp(min=1)
    to_centre = (top_locations - centres[top]).norm(dim=-1).masked_fill(~chosen, float("nan"))
    # The same distance once each filter's mean offset from its landmark is removed (fires beside the part).
    index = landmark.clamp(min=0)[None, :, None, None].expand(k, n_filters, 1, 2)
    offsets = top_locations - landmarks[top].gather(2, index).squeeze(2)
    offsets = offsets.masked_fill(~counted[..., None], float("nan"))
    residual = (offsets - offsets.nanmean(dim=0, keepdim=True)).norm(dim=-1)
    return PartLocalization(
        landmark=landmark,
        mean_distance=mean_distance,
        median_distance=median_distance,
        within_cell=within.masked_fill(counted.sum(0) == 0, float("nan")),
        centre_distance=to_centre.nanmean(dim=0),
        images=counted.sum(0),
        cell_size=max(sides),
        offset_median_distance=residual.nanmedian(dim=0).values,
    )


def _check_positive_size(height: int, width: int, who: str) -> None:
    if min(height, width) < 1:
        raise ValueError(f"{who}: map size must be positive, got {height}x{width}")
