"""Convolutional (vision) ShapNet: a shared Shapley module on every dilated patch, no pooling.

Local accuracy and per-pixel missingness hold exactly.

Shapley Explanation Networks (Wang, Wang, Inouye, ICLR 2021), https://arxiv.org/abs/2104.02297

Theory, guarantees and where this departs from the paper or the original code: docs/theory.md#convolutional-shapnet.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ._heads import BankShape, StagedHead, take_levels
from ._streaming import LIVE_COPIES, StreamedBatches, streamed
from ._validation import check_input, check_reference, finite_output
from .coalitions import cached_table
from .explanation import Explanation
from .interactions import Interactions, check_layer, check_module_kind
from .modules import ShapleyModuleBank, modules_by_active_count, off_zero
from .pruning import check_input_fraction, prune_listed, prune_players, stage_fractions

__all__ = ["ConvShapNet", "ShapleyConv2d", "list_rows", "scatter_rows"]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def scatter_rows(values: Tensor, rows: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """A channel-last map `(*shape, C)` that is `values` `(R, C)` at the flat pixel indices `rows` and 0 elsewhere."""
    full = values.new_zeros(math.prod(shape), values.shape[-1])
    # In place on the fresh zeros (autograd records it all the same): the out-of-place form copies them first.
    return full.index_copy_(0, rows, values).view(*shape, values.shape[-1])


def list_rows(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The pixels of a channel-last map `z` `(B, H, W, C)` off the reference (0): their values `(R, C)`, their flat
    indices `(R,)`, increasing, and the `(B, H, W)` bool mask of them (the inverse of `scatter_rows`)."""
    active = off_zero(z)
    rows = active.flatten().nonzero().squeeze(1)
    return z.reshape(-1, z.shape[-1]).index_select(0, rows), rows, active


@cached_table(maxsize=64)
def _inside_slots(offsets: tuple[tuple[int, int], ...], height: int, width: int, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """`(H, W)`: bit `j` set at pixel `(h, w)` where `(h + dy_j, w + dx_j)` lies inside the image (read-only)."""
    inside = torch.zeros(height, width, dtype=torch.int64)
    for j, (dy, dx) in enumerate(offsets):
        inside[: max(height - dy, 0), : max(width - dx, 0)] += 1 << j
    return inside.to(device=device, dtype=dtype)


class ShapleyConv2d(nn.Module):
    """A Shapley convolution on channel-last maps `(B, H, W, C_in) -> (B, H, W, C_out)`.

    Args:
        in_channels: `C_in`.
        out_channels: `C_out`.
        kernel_size: patch size; `kh * kw` players per patch.
        dilation: spacing of the patch's pixels.
        hidden: hidden widths of the shared inner MLP.
        act_layer: activation of the inner MLP.
        output_act: also apply the activation after the inner's last layer (with a bias): `hidden=()` and
            `output_act=True` is the original code's `Linear -> LeakyReLU` inner.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 2,
        dilation: int | Sequence[int] = 1,
        hidden: Sequence[int] = (32,),
        act_layer: Callable[[], nn.Module] = nn.GELU,
        output_act: bool = False,
    ) -> None:
        super().__init__()
        kh, kw = _pair(kernel_size)
        dh, dw = _pair(dilation)
        self.kernel_size, self.dilation = (kh, kw), (dh, dw)
        self.offsets = [(i * dh, j * dw) for i in range(kh) for j in range(kw)]
        self.pad = ((kh - 1) * dh, (kw - 1) * dw)
        self.bank = ShapleyModuleBank(1, kh * kw, in_channels, out_channels, hidden, act_layer,
                                      output_bias=output_act, output_act=output_act)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, dilation={self.dilation}"

    def patches(self, delta: Tensor) -> Tensor:
        """`(B, H, W, C)` offsets -> `(B, H, W, k, C)`: the players of the patch anchored at each pixel."""
        H, W = delta.shape[1:3]
        ph, pw = self.pad
        # Pad bottom/right with offset 0 (== the reference), then im2col: one op forward, one (col2im) backward.
        padded = F.pad(rearrange(delta, "b h w c -> b c h w"), (0, pw, 0, ph))
        cols = F.unfold(padded, self.kernel_size, dilation=self.dilation)  # (B, C*k, H*W), C-major
        return rearrange(cols, "b (c k) (h w) -> b h w k c", k=len(self.offsets), h=H, w=W)

    def fold(self, phi: Tensor) -> Tensor:
        """Scatter-add each patch player's vector onto its pixel: `(B, H, W, k, C)` -> `(B, H, W, C)`."""
        H, W = phi.shape[1:3]
        ph, pw = self.pad
        # Player j of the patch at (h, w) is pixel (h + dy_j, w + dx_j): col2im adds it there.
        cols = rearrange(phi, "b h w k c -> b (c k) (h w)")
        summed = F.fold(cols, (H + ph, W + pw), self.kernel_size, dilation=self.dilation)
        return rearrange(summed[:, :, :H, :W], "b c h w -> b h w c")

    def forward(self, delta: Tensor, reference: Tensor | None = None, skip_inactive: bool = False) -> Tensor:
        """The layer's Shapley representation.

        Args:
            delta: input minus reference, channel-last `(B, H, W, C_in)`.
            reference: per-channel reference `(C_in,)`; `None` means 0.
            skip_inactive: do not evaluate patches whose pixels all sit at the reference (their
                Shapley values are exactly 0) and evaluate fewer coalitions for partly inactive ones. Values and
                parameter gradients are those of the dense computation; the gradient with respect to a pixel that
                sits exactly at the reference is 0 (it is not evaluated).
        """
        if len(self.bank.weights) == 1:
            return self._one_layer_map(delta, reference)
        ref = None if reference is None else reference.expand(1, len(self.offsets), reference.shape[-1])
        if skip_inactive:
            return self._active_patches_map(delta, ref)
        players = self.patches(delta)[..., None, :, :]  # one shared module: G = 1
        # Players in the padding are null too, but their values are cropped by `fold`: the dense path needs its
        # exact-zero pass over all k players of every patch only if a pixel of the image sits at the reference
        # (checked once per pixel, k times cheaper).
        zero_null = not bool(off_zero(delta).all())
        phi, _, _ = self.bank.shapley(players, ref, zero_null_players=zero_null)
        return self.fold(phi[..., 0, :, :])

    def _active_patches_map(self, delta: Tensor, ref: Tensor | None) -> Tensor:
        """`forward` with `skip_inactive` on a full map: `sparse_map` on its pixels off the reference, scattered."""
        values, rows, active = list_rows(delta)
        return scatter_rows(self.sparse_map(values, rows, active, ref), rows, active.shape)

    def sparse_map(self, values: Tensor, rows: Tensor, active: Tensor, reference: Tensor | None = None, *,
                   all_off: bool = False) -> Tensor:
        """The layer's Shapley values on a map given by its pixels that may be off the reference (the others at it).

        A patch whose pixels all sit at the reference has Shapley values exactly 0, so it is never built: the work
        (gather, coalitions, sums) follows the number of *active* patches, not the image size, and pruning a pixel
        removes the patches it was the last active player of. Player `j` of the patch anchored at pixel `a` is
        pixel `a + offset_j`; past the border, or not listed, it is a player at the reference.

        Args:
            values: `(R, C_in)` offsets from the reference of the listed pixels.
            rows: `(R,)` long, the listed pixels' flat indices into `(B, H, W)`, increasing.
            active: `(B, H, W)` bool, True exactly at the listed pixels.
            reference: the reference, `(C_in,)` or broadcastable to `(1, k, C_in)`; `None` means 0.
            all_off: the caller knows that every listed pixel is off the reference (skips that check).

        Returns:
            `(R, C_out)`: the listed pixels' Shapley values (every other pixel's are exactly 0).
        """
        off = None if all_off else off_zero(values)
        if off is not None and not bool(off.all()):
            # A listed pixel exactly at the reference (a later stage's exact zero, or channels this stage does not
            # take): unlisted, it gets exactly 0 as missingness demands (as a player, rounding could leave ~1e-9).
            kept = off.nonzero().squeeze(1)
            narrowed = active.clone()
            narrowed.view(-1)[rows[~off]] = False
            phi = self.sparse_map(values.index_select(0, kept), rows.index_select(0, kept), narrowed, reference)
            return phi.new_zeros(len(rows), phi.shape[-1]).index_copy(0, kept, phi)
        B, H, W = active.shape
        k = len(self.offsets)
        ref = None if reference is None else reference.expand(1, k, reference.shape[-1])
        pattern = self.patch_patterns(active).flatten()
        anchors = pattern.nonzero().squeeze(1)  # (A,) in (b h w) order: the patches with a player off the reference
        pattern = pattern.index_select(0, anchors)  # index_select: ~4x faster than pattern[anchors] here
        # Row of every listed pixel, by flat index. An active slot's pixel lies inside the image (`patch_patterns`),
        # so anchor + offset needs no border check; an unlisted one would be out of range (an error, not a wrong row).
        position = torch.full((B * H * W,), k * len(rows), dtype=torch.long, device=values.device)
        position.index_copy_(0, rows, torch.arange(len(rows), device=values.device))
        step = torch.tensor([dy * W + dx for dy, dx in self.offsets], device=values.device)
        modules = []
        for count, chosen, slots in modules_by_active_count(pattern, k):  # slots: (k', m)
            pixels = anchors.index_select(0, chosen) + step.index_select(0, slots.flatten()).view(count, -1)
            modules.append((slots, position.index_select(0, pixels.flatten()).view(count, -1)))
        skipped = B * H * W - len(anchors)
        self.bank._count(skipped, skipped * 2**k, skipped, skipped * 2**k)
        return self.bank.shapley_sums(values, modules, ref)

    def patch_patterns(self, active: Tensor) -> Tensor:
        """`(B, H, W)` bool pixels off the reference -> `(B, H, W)` integer: bit `j` set at pixel `a` where player
        `j` of the patch anchored there (pixel `a + offset_j`, inside the image) is off the reference."""
        height, width = active.shape[-2:]
        k = len(self.offsets)
        dtype = torch.uint8 if k <= 8 else torch.int16 if k <= 15 else torch.int32
        # Shifts of the flat map (contiguous, several times faster than shifted 2-D slices), then the bits whose
        # player falls past the right or bottom border (wrapped into the next row or image) are cleared.
        bits = active.to(dtype).flatten()
        pattern = torch.zeros_like(bits)
        total = bits.numel()
        for j, (dy, dx) in enumerate(self.offsets):
            shift = dy * width + dx
            if dy < height and dx < width and shift < total:
                pattern[: total - shift] |= bits[shift:] << j
        inside = _inside_slots(tuple(self.offsets), height, width, dtype, active.device)
        return (pattern.view(-1, height, width) & inside).view(active.shape)

    def _one_layer_map(self, delta: Tensor, reference: Tensor | None) -> Tensor:
        """`forward` for a one-layer inner (`hidden=()`), without im2col, col2im or a coalition tensor in memory.

        Player j of the patch anchored at pixel a is pixel `a + offset_j`, and its projection `W_j (x - r)` depends
        only on that pixel: every pixel is projected once for all `k` roles (one `(B*H*W, C_in) x (C_in, k*C_out)`
        product), each role's projections are shifted to the anchors, the bank combines the coalitions in cache
        (`shapley_from_projections`) and each role's Shapley values are shifted back and summed onto the pixels.
        Dense: nothing is skipped, and a pixel at the reference projects to exactly 0 and gets exactly 0 (in the
        eager path; `compile_coalitions`' kernel enforces exact zeros wherever a projection is 0).
        """
        bank, k = self.bank, len(self.offsets)
        B, H, W, C = delta.shape
        ref = None if reference is None else reference.expand(1, k, C)
        at_reference = bank._at_reference(delta, ref)[0]  # (C_out,)
        weight = rearrange(bank.weights[0][0], "(k c) o -> c (k o)", k=k)
        per_pixel = (delta.reshape(-1, C) @ weight.to(delta.dtype)).view(B, H, W, k, -1)
        out_channels = per_pixel.shape[-1]
        # projected[j, b, h, w] = player j's projection in the patch anchored at (h, w); 0 past the border (padding).
        projected = per_pixel.new_empty(k, B, H, W, out_channels)
        for j, (dy, dx) in enumerate(self.offsets):
            rows, cols = max(H - dy, 0), max(W - dx, 0)
            projected[j, :, rows:] = 0
            projected[j, :, :rows, cols:] = 0
            if rows and cols:
                projected[j, :, :rows, :cols] = per_pixel[:, dy:, dx:, j]
        # Exact zeros are needed only where an image pixel sits at the reference (padding players' values are
        # never added back): one check per pixel instead of a pass over the k projections of every anchor.
        exact_zeros = not bool(off_zero(delta).all())
        phi = bank.shapley_from_projections(projected.view(k, B * H * W, out_channels), at_reference, exact_zeros)
        phi = phi.view(k, B, H, W, out_channels)
        bank._count(B * H * W, B * H * W * 2**k, 0, 0)
        # Scatter back: player j of the patch at a is pixel a + offset_j (patches anchored past the image don't exist).
        out = phi[0].clone()
        for j, (dy, dx) in enumerate(self.offsets):
            if j and dy < H and dx < W:
                out[:, dy:, dx:] += phi[j, :, : H - dy, : W - dx]
        return out

    def patch_members(self, height: int, width: int) -> Tensor:
        """`(H * W, k)`: the pixel (`h * W + w`) of every player of every patch, `-1` for padding."""
        h = torch.arange(height)[:, None, None]
        w = torch.arange(width)[None, :, None]
        dy = torch.tensor([o[0] for o in self.offsets])
        dx = torch.tensor([o[1] for o in self.offsets])
        inside = (h + dy < height) & (w + dx < width)
        pixel = torch.where(inside, (h + dy) * width + (w + dx), -1)
        return rearrange(pixel, "h w k -> (h w) k")

    def interactions(self, delta: Tensor, reference: Tensor | None = None,
                     max_order: int | None = None, kind: str = "and") -> Interactions:
        """Exact interactions of the layer's game `F(Z) = sum_patches f(patch)` over the pixels of its input.

        Per output channel the layer is a Shallow ShapNet whose groups are the patches, so its dividends are
        the patches' own: every subset of the pixels of a patch, summed over the patches that share it (a
        pixel's singleton is in up to `k` patches); subsets of pixels that share no patch have dividend 0 and
        are not listed. Kept per output channel. Padding pixels are dummies and are left out.

        Args:
            delta: input minus reference, channel-last `(B, H, W, C_in)`.
            reference: per-channel reference `(C_in,)`; `None` means 0.
            max_order: list only subsets of at most this many pixels.
            kind: `"and"` (Harsanyi dividends) or `"or"` (OR interactions, from the same patch values).

        Returns:
            `Interactions` over the `H * W` pixels (`player_shape=(H, W)`), dividends `(B, S, C_out)`, sii
            `(B, H*W, H*W, C_out)` (dense: mind the memory for large images and batches).
        """
        kind = check_module_kind(kind, f"{type(self).__name__}.interactions")
        height, width = delta.shape[1:3]
        players = self.patches(delta)[..., None, :, :]
        ref = None if reference is None else reference.expand(1, len(self.offsets), reference.shape[-1])
        values = rearrange(self.bank.coalition_values(players, ref), "t b h w 1 o -> t b (h w) o")
        members = self.patch_members(height, width).to(delta.device)
        return Interactions.from_module_games([(values, members)], height * width, max_order, kind,
                                              player_shape=(height, width), method=type(self).__name__)


class ConvShapNet(StagedHead, StreamedBatches, nn.Module):
    """Deep convolutional ShapNet for images.

    Args:
        in_chans: image channels.
        num_classes: outputs; the last stage's channels. `0`: no head (timm's pooled features): the last hidden
            stage's map is the model's, `forward` returns its sum over the pixels `(B, num_features)`.
        channels: output channels of the hidden stages; there are `len(channels) + 1` stages.
        kernel_size: patch size of every stage.
        kernel_sizes: optional per-stage patch sizes (overrides `kernel_size`), e.g. alternating
            `(1, 2)` and `(2, 1)`: two-player modules evaluate 4 coalitions instead of 16.
        dilations: one per stage; default 1, 2, 4, ... (receptive field 2^stages for 2x2 kernels).
        hidden: hidden widths of each stage's shared inner MLP.
        channel_split: optional, one entry per stage: how many leading channels go through the stage
            (`None` = all); the other channels are carried over unchanged and concatenated after.
        residual: add a stage's input to its output when channels match (stage 0 adds x - ref).
        reference: `None` (zeros), a number, or one value per channel `(C,)`.
        act_layer: activation of the inner MLPs.
        prune: instance-based pruning fraction of pixels after each stage: one float or one per
            stage (see `shapnets.pruning`); in eval mode, and in training only if
            `prune_during_training`.
        prune_during_training: also prune in training mode.
        prune_mode: what `prune` counts: `"all"` players (the paper's rule), the `"active"` (non-reference)
            players, or a `"threshold"` on the norm relative to the sample's largest (see `shapnets.pruning`).
        prune_input: prune the input's pixels too, before the first stage, by the same rule on `|x - reference|`
            (the 0th representation): the first stage, otherwise never pruned, then skips them as well.
        skip_inactive: skip patches (and coalitions) whose pixels sit at the reference; exact in values and parameter
            gradients (see `ShapleyConv2d.forward`).
        zero_init_output: start the last stage's output layer at zero, so the logits start at 0
            (the spatial sum over many pixels otherwise starts with large logits).
        output_act: apply the activation after each inner's last layer too (see `ShapleyConv2d`).
    """

    data_args = ("reference",)  # what a data set may fill (shapnets.contract)

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32, 32, 32),
        kernel_size: int | Sequence[int] = 2,
        dilations: Sequence[int] | None = None,
        hidden: Sequence[int] = (32,),
        kernel_sizes: Sequence[int | Sequence[int]] | None = None,
        channel_split: Sequence[int | None] | None = None,
        residual: bool = True,
        reference: Tensor | float | Sequence[float] | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        prune: float | Sequence[float] = 0.0,
        prune_during_training: bool = False,
        prune_mode: str = "all",
        prune_input: float = 0.0,
        skip_inactive: bool = True,
        zero_init_output: bool = False,
        output_act: bool = False,
    ) -> None:
        super().__init__()
        num_stages = len(channels) + 1
        dilations = list(dilations) if dilations is not None else [2**s for s in range(num_stages)]
        split = list(channel_split) if channel_split is not None else [None] * num_stages
        kernels = list(kernel_sizes) if kernel_sizes is not None else [kernel_size] * num_stages
        if len(kernels) != num_stages:
            raise ValueError(f"{num_stages} stages need {num_stages} kernel_sizes, got {len(kernels)}")
        if len(dilations) != num_stages:
            raise ValueError(f"{num_stages} stages need {num_stages} dilations, got {len(dilations)}")
        if len(split) != num_stages:
            raise ValueError(f"{num_stages} stages need {num_stages} channel_split entries, got {len(split)}")
        if num_classes < 0:
            raise ValueError(f"ConvShapNet: num_classes must be >= 0 (0: no head), got {num_classes}")
        head_classes = num_classes or 1  # without a head (0), one is built and dropped: its shape is kept
        self.in_chans, self.num_classes, self.residual = in_chans, head_classes, residual
        self.channel_split: list[int] = []
        self.stages = nn.ModuleList()
        width = in_chans
        for s, (c_out, d, kernel) in enumerate(zip([*channels, head_classes], dilations, kernels)):
            take = width if split[s] is None else int(split[s])
            if not 1 <= take <= width:
                raise ValueError(f"stage {s}: channel_split {take} must lie in [1, {width}] (channels available)")
            self.channel_split.append(take)
            self.stages.append(ShapleyConv2d(take, c_out, kernel, d, hidden, act_layer, output_act))
            width = c_out + width - take
        if width != head_classes:
            raise ValueError(
                f"the last map has {width} channels but must have num_classes={head_classes}: "
                f"channel_split carries {width - head_classes} channel(s) past the last stage"
            )
        if zero_init_output:
            nn.init.zeros_(self.stages[-1].bank.weights[-1])
        self.prune, self.prune_mode = stage_fractions(prune, num_stages, prune_mode), prune_mode
        self.prune_input = check_input_fraction(prune_input, prune_mode)
        self.prune_during_training, self.skip_inactive = prune_during_training, skip_inactive
        ref = torch.as_tensor(reference) if reference is not None and not isinstance(reference, Tensor) else reference
        self.register_buffer("reference", check_reference(ref, (in_chans,), "ConvShapNet"))
        if num_classes == 0:
            self.reset_classifier(0)

    def _check(self, x: Tensor) -> Tensor:
        x = check_input(x, [(None, self.in_chans, None, None)], type(self).__name__, self)
        if x.shape[-1] < 1 or x.shape[-2] < 1:
            raise ValueError(f"{type(self).__name__}: empty image of size {tuple(x.shape[-2:])}")
        return x

    def _input_offsets(self, x: Tensor) -> Tensor:
        """The first stage's input: the image's offsets from the reference, channel-last `(B, H, W, C)`."""
        return rearrange(x - self.reference[:, None, None], "b c h w -> b h w c")

    def representations(self, x: Tensor) -> list[Tensor]:
        """Every stage's Shapley map, channel-last `(B, H, W, C_l)`."""
        return list(self._run_stages(self._input_offsets(x), range(self.num_stages)))

    def _maps(self, x: Tensor, every: bool) -> list[Tensor]:
        """Every stage's map (`every`), or only the last one's (the sparse path then builds no other full map)."""
        if every or not self._sparse():
            return self.representations(x)
        z = self._input_offsets(x)
        values, rows = deque(self._run_sparse(z, range(self.num_stages)), maxlen=1)[0]
        return [scatter_rows(values, rows, z.shape[:3])]

    def _run_stages(self, z: Tensor, stages: range) -> Iterator[Tensor]:
        """Run `stages` on the channel-last map `z` in turn, yielding each one's map."""
        if self._sparse():
            shape = z.shape[:3]
            for values, rows in self._run_sparse(z, stages):
                yield scatter_rows(values, rows, shape)
            return
        if stages.start == 0 and self._pruning(self.prune_input):
            z = prune_players(z, self.prune_input, mode=self.prune_mode)
        for s in stages:
            z = self._stage(s, z)
            yield z

    def _sparse(self) -> bool:
        return self.skip_inactive and all(len(stage.bank.weights) > 1 for stage in self.stages)

    def _run_sparse(self, z: Tensor, stages: range) -> Iterator[tuple[Tensor, Tensor]]:
        """`_run_stages` on the pixels that may be off the reference only: yields each stage's `(values, rows)`, the
        map's rows `(R, C)` at the flat pixel indices `rows` (every other pixel is exactly 0).

        By missingness a pixel at the reference stays exactly there through every stage (its Shapley values are 0,
        and so is its residual), and a pruned pixel joins it: the list only shrinks, and no stage touches, scans or
        builds a full `(B, H, W, C)` map.
        """
        values, rows, active = list_rows(z)
        all_off = True  # every listed row is off the reference (in some channel): so listed, and kept so by pruning
        if stages.start == 0 and self._pruning(self.prune_input):
            values, rows = self._drop_pruned(values, rows, active, self.prune_input)
        for s in stages:
            take = self.channel_split[s]
            head, tail = values[:, :take], values[:, take:]
            phi = self.stages[s].sparse_map(head, rows, active, self.reference[:take] if s == 0 else None,
                                            all_off=all_off and not tail.shape[-1])
            if self.residual and phi.shape[-1] == take:
                phi = phi + head
            values = torch.cat([phi, tail], dim=-1) if tail.shape[-1] else phi
            all_off = self._pruning(self.prune[s])
            if all_off:
                values, rows = self._drop_pruned(values, rows, active, self.prune[s])
            yield values, rows

    def _pruning(self, fraction: float) -> bool:
        return bool(fraction) and (self.prune_during_training or not self.training)

    def _drop_pruned(self, values: Tensor, rows: Tensor, active: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
        """Prune the listed pixels (`prune_listed`): they leave the list and `active` (in place), and so do pixels
        exactly at the reference (whatever the mode: the list then holds only pixels off it)."""
        batch, height, width = active.shape
        sample = rows.div(height * width, rounding_mode="floor")
        norms = values.abs().sum(-1)
        gone = prune_listed(norms, sample, batch, height * width, fraction, self.prune_mode)
        if self.prune_mode == "threshold":  # the other modes prune zero norms first; this one not in an all-zero sample
            gone |= norms == 0
        active.view(-1).index_fill_(0, rows.masked_select(gone), False)
        kept = (~gone).nonzero().squeeze(1)
        return values.index_select(0, kept), rows.index_select(0, kept)

    def _stage(self, s: int, z: Tensor) -> Tensor:
        """Stage `s` on the full channel-last map `z` `(B, H, W, C)`: its Shapley map (channel split, residual,
        pruned). `_run_sparse` is the same on the listed pixels; this one serves the dense path, one-layer inners
        and `forward_head`."""
        take = self.channel_split[s]
        head, tail = z[..., :take], z[..., take:]
        phi = self.stages[s](head, self.reference[:take] if s == 0 else None, skip_inactive=self.skip_inactive)
        if self.residual and phi.shape[-1] == take:
            phi = phi + head
        z = torch.cat([phi, tail], dim=-1) if tail.shape[-1] else phi
        if self._pruning(self.prune[s]):
            z = prune_players(z, self.prune[s], mode=self.prune_mode)
        return z

    # ------------------------------------------------------------------ timm's model interface (head = last stage)
    def forward_features(self, x: Tensor) -> Tensor:
        """The channel-last map the head reads, `(B, H, W, num_features)` (the input offsets for one stage)."""
        z = self._input_offsets(self._check(x))
        for stage_map in self._run_stages(z, range(self.body_stages)):
            z = stage_map
        return z

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits from `forward_features(x)`; `pre_logits=True` (or no head): the map summed over pixels
        `(B, num_features)`."""
        if not pre_logits and self.num_classes:
            features = self._stage(self.num_stages - 1, features)
        return features.sum((1, 2))

    def _head_shape(self) -> tuple[BankShape, Any, Any]:
        head = self.stages[-1]
        return BankShape.of(head.bank), head.kernel_size, head.dilation

    def _build_head(self, shape: tuple[BankShape, Any, Any], num_classes: int) -> nn.Module:
        bank, kernel_size, dilation = shape
        new = ShapleyConv2d(bank.in_channels, num_classes, kernel_size, dilation, bank.hidden, bank.act_layer,
                            bank.output_act)
        new.bank = bank.build(num_classes, self.reference)  # the old head's output bias too
        return new

    def _head_changed(self, num_classes: int) -> None:
        # The head reads every channel (checked in __init__); without it the map keeps them all.
        if num_classes:
            self.channel_split.append(self._dropped_head[0][0].in_channels)
        else:
            self.channel_split.pop()

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's feature levels: every stage before the head, its map's channels, stride 1 (dilated, no pooling)."""
        levels, width = [], self.in_chans
        for s in range(self.body_stages):
            width = self.stages[s].bank.out_channels + width - self.channel_split[s]
            levels.append(dict(num_chs=width, reduction=1, module=f"stages.{s}"))
        return levels

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's per-stage representations: the Shapley maps of the stages in `indices` (default: every stage
        before the head), `(B, C_s, H, W)` (`output_fmt="NHWC"`: channel-last), each explained by its own pixels.

        Returns:
            The maps, or with `intermediates_only=False` also `forward_features(x)` (channel-last) first.
        """
        take = take_levels(self.body_stages, indices, type(self).__name__)
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"{type(self).__name__}.forward_intermediates: output_fmt must be 'NCHW' or 'NHWC', got "
                             f"{output_fmt!r}")
        z = self._input_offsets(self._check(x))
        maps = []
        last = self.body_stages if not intermediates_only else (max(take) + 1 if take else 0)
        for s, stage_map in enumerate(self._run_stages(z, range(last))):
            z = stage_map
            if s in take:
                maps.append(z if output_fmt == "NHWC" else rearrange(z, "b h w c -> b c h w"))
        return maps if intermediates_only else (z, maps)

    def working_elements(self, x: Tensor) -> int:
        """Elements per sample alive at the peak of `x`'s explanation (the streaming estimate).

        Dense: every patch's coalitions at the widest layer, `LIVE_COPIES` times. The skip path (`skip_inactive`)
        keeps a list of the pixels off the reference, which only shrinks through the stages (so `x`'s list bounds
        every stage's), and builds stage by stage the listed pixels' first-layer projections (one per player slot)
        and the coalitions of the patches with a player off the reference: `2^k' - 1` for a patch with `k'` of them,
        at most `k' (2^k - 1) / k` (convexity), and a listed pixel plays in at most `k` patches, so at most
        `2^k - 1` coalitions per listed pixel. The activations run in place: a coalition holds its first hidden
        layer and the widest later one. Twice that covers the temporaries (gathered projections, Shapley values,
        indices); every stage's full map is added (`layers=True` keeps them). On MNIST: ~2.3x the measured peak
        (0.5 MB per image), a tenth of the dense estimate.
        """
        pixels = x.shape[-2] * x.shape[-1]
        dense = pixels * max(stage.bank.coalition_elements() for stage in self.stages) * LIVE_COPIES
        checkable = x.dim() >= 3 and x.numel() and x.device == self.reference.device and x.shape[-3] == self.in_chans
        if not self.skip_inactive or not checkable or any(len(st.bank.weights) == 1 for st in self.stages):
            return dense  # the one-layer path is dense; a bad input gets its named error from the model's checks
        active = (x != self.reference[:, None, None].to(x.dtype)).any(-3)
        listed = int(torch.count_nonzero(active)) / max(1, active[..., 0, 0].numel())  # mean per sample
        per_listed = 0
        for stage in self.stages:
            bank = stage.bank
            first, *later = (w.shape[2] for w in bank.weights)
            coalitions = ((1 << bank.num_players) - 1) * (first + max(later))
            per_listed = max(per_listed, coalitions + bank.num_players * first + bank.in_channels + bank.out_channels)
        maps = pixels * sum(stage.bank.out_channels for stage in self.stages)
        return min(dense, math.ceil(2 * listed * per_listed) + maps)

    @streamed
    @finite_output
    def forward(self, x: Tensor) -> Tensor:
        """Logits `(B, num_classes)`: the spatial sum of the last Shapley map."""
        return self._maps(self._check(x), every=False)[-1].sum((1, 2))

    @streamed
    @finite_output
    def explain(self, x: Tensor, layers: bool = False) -> Explanation:
        """Full-resolution explanation from the forward pass.

        Returns:
            `Explanation` with attributions `(B, H, W, num_classes)` (one vector per pixel, all
            channels of a pixel form one player), base 0, output the logits, `exact=False`.
        """
        reps = self._maps(self._check(x), every=layers)
        output = reps[-1].sum((1, 2))
        return Explanation(
            attributions=reps[-1],
            base=torch.zeros_like(output),
            output=output,
            reference=self.reference,
            player_axes=("height", "width"),
            exact=False,
            layers=reps if layers else None,
            method=type(self).__name__,
        )

    def interactions(self, x: Tensor, layer: int, max_order: int | None = None, kind: str = "and") -> Interactions:
        """Exact interactions of one stage's game with respect to that stage's input pixels (not of the network).

        Stage `layer` plays `F(Z) = sum_patches f(patch)` on the channels it takes (`channel_split`) of its
        input map `Z` (the image for stage 0, reference the model's; the previous stage's map after, reference
        0): see `ShapleyConv2d.interactions`. Its Shapley values are the stage's Shapley map before the
        residual connection and pruning; its dividends live on subsets of the pixels of one dilated patch,
        per output channel of the stage (the classes for the last stage).

        Args:
            x: `(B, C, H, W)` images.
            layer: the stage, `0..num_stages - 1` (negative counts from the end).
            max_order: list only subsets of at most this many pixels.
            kind: `"and"` (Harsanyi dividends) or `"or"` (OR interactions, from the same patch values).

        Returns:
            `Interactions` over the `H * W` pixels (`player_shape=(H, W)`), per output channel of the stage.
        """
        stage_index = check_layer(layer, self.num_stages, type(self).__name__)
        check_module_kind(kind, f"{type(self).__name__}.interactions")
        x = self._check(x)
        take = self.channel_split[stage_index]
        if stage_index == 0:
            z, reference = self._input_offsets(x), self.reference[:take]
        else:
            z, reference = self.representations(x)[stage_index - 1], None
        found = self.stages[stage_index].interactions(z[..., :take], reference, max_order, kind)
        return replace(found, method=f"{type(self).__name__} layer {stage_index} (per-layer game)")
