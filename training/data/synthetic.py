"""Small seeded synthetic data sets with known labelling rules, for fast CI runs of the trainer.

The data themselves are fixed (drawn with `GENERATOR_SEED`), so every run sees the same data set and the
`seed` argument only changes the split, exactly as for the real data sets.
"""

from __future__ import annotations

import numpy as np

from .core import DataBundle
from .images import image_bundle
from .tabular import tabular_bundle

__all__ = [
    "GENERATOR_SEED",
    "SYNTHETIC_IMAGE_CLASSES",
    "load_synthetic_images",
    "load_synthetic_tabular",
    "synthetic_tabular_scores",
]

GENERATOR_SEED = 20210503
"""Seed of the generator drawing the synthetic samples (fixed: the data set never changes)."""

_TABULAR_SAMPLES, _TABULAR_FEATURES = 1500, 8
_IMAGE_SIZE, _IMAGE_TRAIN, _IMAGE_TEST, _BAR = 8, 1000, 250, 4
SYNTHETIC_IMAGE_CLASSES = ("horizontal bar", "vertical bar", "diagonal", "square")
"""The bright shape drawn on a black 8x8 background, one per class."""


def synthetic_tabular_scores(x: np.ndarray) -> np.ndarray:
    """Class scores of the labelling rule, `(N, 8)` raw features -> `(N, 3)`; the label is their argmax.

    Each class pairs a multiplicative interaction with additive terms, so exact Shapley values differ
    visibly from a linear model's attributions:

        s0 = x0 * x1 + x6
        s1 = x2 * x3 + x7
        s2 = x4 * x5 - (x6 + x7) / 2
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != _TABULAR_FEATURES:
        raise ValueError(f"synthetic_tabular_scores: expected shape (N, {_TABULAR_FEATURES}), got {x.shape}")
    return np.stack(
        [x[:, 0] * x[:, 1] + x[:, 6], x[:, 2] * x[:, 3] + x[:, 7], x[:, 4] * x[:, 5] - (x[:, 6] + x[:, 7]) / 2],
        axis=1,
    )


def load_synthetic_tabular(*, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None) -> DataBundle:
    """1,500 samples of 8 standard-normal features, 3 classes from `synthetic_tabular_scores` (no noise).

    Split and z-scored like the other tabular sets (20% test, stratified, `seed`).
    """
    rng = np.random.default_rng(GENERATOR_SEED)
    features = rng.standard_normal((_TABULAR_SAMPLES, _TABULAR_FEATURES))
    labels = synthetic_tabular_scores(features).argmax(axis=1)
    return tabular_bundle(
        "synthetic_tabular",
        features,
        labels,
        feature_names=[f"x{j}" for j in range(_TABULAR_FEATURES)],
        class_names=[f"class_{k}" for k in range(3)],
        seed=seed,
        val_fraction=val_fraction,
        limit=limit,
        preprocessing={
            "source": "synthetic",
            "generator_seed": GENERATOR_SEED,
            "rule": "label = argmax(x0*x1 + x6, x2*x3 + x7, x4*x5 - (x6 + x7)/2), x ~ N(0, I_8)",
        },
    )


def _draw_images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` uint8 `(1, 8, 8)` images, each one shape at a random place and brightness on black."""
    labels = rng.integers(0, len(SYNTHETIC_IMAGE_CLASSES), size=n)
    images = np.zeros((n, 1, _IMAGE_SIZE, _IMAGE_SIZE), dtype=np.uint8)
    brightness = rng.integers(128, 256, size=n)
    corners = rng.integers(0, _IMAGE_SIZE - _BAR + 1, size=(n, 2))  # every shape fits in a 4x4 box
    steps = np.arange(_BAR)
    for i, (label, (r, c)) in enumerate(zip(labels, corners)):
        if label == 0:
            rows, cols = np.full(_BAR, r + 1), c + steps
        elif label == 1:
            rows, cols = r + steps, np.full(_BAR, c + 1)
        elif label == 2:
            rows, cols = r + steps, c + steps
        else:  # a 2x2 block in the middle of the box
            rows, cols = r + 1 + np.array([0, 0, 1, 1]), c + 1 + np.array([0, 1, 0, 1])
        images[i, 0, rows, cols] = brightness[i]
    return images, labels


def load_synthetic_images(*, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None) -> DataBundle:
    """1x8x8 images of 4 shapes (`SYNTHETIC_IMAGE_CLASSES`) on black: 1,000 train-file and 250 test images.

    Pixels are scaled to [0, 1] and not shifted, so the black background is 0 and the reference is 0.
    """
    rng = np.random.default_rng(GENERATOR_SEED)
    train = _draw_images(rng, _IMAGE_TRAIN)
    test = _draw_images(rng, _IMAGE_TEST)
    return image_bundle(
        "synthetic_images",
        train,
        test,
        mean=[0.0],
        std=[1.0],
        class_names=list(SYNTHETIC_IMAGE_CLASSES),
        # Background pixels equal the reference, so missingness gives them exactly 0 attribution.
        reference_pixel=[0.0],
        seed=seed,
        val_fraction=val_fraction,
        limit=limit,
        preprocessing={"source": "synthetic", "generator_seed": GENERATOR_SEED},
    )
