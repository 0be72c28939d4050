"""Batch augmentations applied inside the training loop (on the device, from the global torch RNG).

They draw from `torch`'s global generator on the CPU, which the checkpoint captures, so a resumed run draws the
same shifts as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_shift"]


def random_shift(x: Tensor, max_shift: int) -> Tensor:
    """Translate each image of a batch by its own random whole-pixel offset in [-max_shift, max_shift]^2.

    The uncovered border repeats the edge pixels (replicate padding): on MNIST-like data the edge is the black
    background, i.e. the Shapley reference, whatever the normalisation. This is the CapsNet paper's "shifted by up
    to 2 pixels in each direction with zero padding".

    Args:
        x: images `(B, C, H, W)`.
        max_shift: largest offset in pixels; 0 returns `x` unchanged.

    Returns:
        The shifted batch, same shape, dtype and device.
    """
    if max_shift <= 0:
        return x
    if x.dim() != 4:
        raise ValueError(f"random_shift expects images (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b)).to(x.device)   # top-left corner inside the padded image
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)          # (B, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)          # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing puts the indexed dims first: (B, H, W, C).
    shifted = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return shifted.permute(0, 3, 1, 2).contiguous()
