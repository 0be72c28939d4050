"""The trainer's shift augmentation (`data.shift_pixels`): a per-image translation with the edges repeated."""

from __future__ import annotations

import pytest
import torch

from training.data.augment import random_shift


def test_each_image_is_its_own_translation_within_the_bound() -> None:
    """Every output image is the input moved by whole pixels, at most `max_shift` per axis, edges repeated."""
    torch.manual_seed(0)
    x = torch.rand(16, 2, 9, 7)
    y = random_shift(x, 2)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for b in range(len(x)):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(y[b], padded[b, :, dy:dy + 9, dx:dx + 7])]
        assert matches, f"image {b} is not a translation of its input by at most 2 pixels"


def test_offsets_vary_and_follow_the_global_seed() -> None:
    """Offsets are drawn per image from torch's global RNG (captured by checkpoints: resumes draw the same)."""
    x = torch.rand(64, 1, 8, 8)
    torch.manual_seed(3)
    a = random_shift(x, 1)
    torch.manual_seed(3)
    b = random_shift(x, 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    assert len({tuple(img.flatten().tolist()) for img in a[:, :, :, :] - x}) > 1


def test_zero_shift_is_the_identity_and_non_images_are_refused() -> None:
    """`max_shift=0` returns the batch itself; a tabular batch is an error naming the shape."""
    x = torch.rand(4, 1, 5, 5)
    assert random_shift(x, 0) is x
    with pytest.raises(ValueError, match=r"expects images \(B, C, H, W\), got shape \(4, 6\)"):
        random_shift(torch.rand(4, 6), 1)
