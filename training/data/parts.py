"""A seeded synthetic data set of objects made of parts with known landmarks, for measuring part localisation.

Every image shows one object of one of four classes on a noisy background with clutter. An object is three
coloured parts (primitive shapes) at class-specific places of an object frame; the object is placed at a random
position and scale, and every part is jittered a little (a deformable object). Each shape appears in two
classes, so no single part gives the class away, and the clutter holds line segments and, in half of the
images, a smaller stray copy of a random part away from any object configuration, so a filter must find the
object's part, not any instance of its shape.

The centre of every part is recorded as a landmark: `landmarks[n, k] = (row, col)` in the pixels of the model
input (pixel `(i, j)` has its centre at `(i, j)`), part `k` of the image's class (`PARTS_CLASSES`). The
landmarks of a split are `bundle.<split>.landmarks` (a `(N, 3, 2)` float32 tensor, aligned with
`bundle.<split>.features`), and `bundle.info.preprocessing["landmarks"]` names them, so part localisation (the
Interpretable-CNN location instability, `shapnets.icnn.location_instability`) is measured without downloads.

As for the other synthetic sets, the images are fixed (drawn with `GENERATOR_SEED`); `seed` only changes the
split. Pixels are scaled to [0, 1] and normalised with the fixed constants `PARTS_MEAN` / `PARTS_STD`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .core import ArrayDataset, DataBundle
from .images import image_bundle
from .splits import limit_indices, split_indices
from .synthetic import GENERATOR_SEED

__all__ = [
    "PARTS_CLASSES",
    "PARTS_MEAN",
    "PARTS_STD",
    "PART_COLOURS",
    "PartsDataset",
    "load_parts",
    "make_parts_images",
]

PART_COLOURS: dict[str, tuple[int, int, int]] = {
    "disc": (230, 60, 60),
    "square": (60, 200, 60),
    "triangle": (70, 110, 240),
    "ring": (235, 210, 50),
    "cross": (200, 70, 220),
    "bar": (60, 210, 220),
}
"""The RGB colour of each part shape (jittered in brightness per image)."""

PARTS_CLASSES: dict[str, tuple[tuple[str, str, tuple[float, float]], ...]] = {
    "tower": (("apex", "triangle", (-0.38, 0.0)), ("body", "square", (0.0, 0.0)), ("base", "bar", (0.38, 0.0))),
    "face": (("left_eye", "disc", (-0.2, -0.3)), ("right_eye", "ring", (-0.2, 0.3)), ("mouth", "bar", (0.3, 0.0))),
    "kite": (("top", "cross", (-0.38, 0.0)), ("left_wing", "square", (0.1, -0.32)),
             ("right_wing", "triangle", (0.1, 0.32))),
    "cart": (("roof", "cross", (-0.3, 0.0)), ("back_wheel", "ring", (0.3, -0.3)), ("front_wheel", "disc", (0.3, 0.3))),
}
"""Class -> its parts `(name, shape, (row, col) offset in object units)`; landmark `k` is part `k`."""

PARTS_MEAN, PARTS_STD = 0.19, 0.15
"""Per-channel normalisation constants (close to the training images' pixel mean / std in [0, 1])."""

_PART_RADIUS = 0.16       # part size in object units
_SCALE_RANGE = (0.45, 0.8)  # object units -> pixels, as a fraction of the image size
_JITTER = 0.03            # std of each part's displacement, object units
_BACKGROUND = (0.05, 0.25)  # range of the background grey level
_REFERENCE_GREY = sum(_BACKGROUND) / 2
_TRAIN, _TEST, _IMAGE_SIZE = 2000, 500, 64


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Pixels inside `shape` of radius `r`, given offsets from its centre."""
    ady, adx = np.abs(dy), np.abs(dx)
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return np.maximum(ady, adx) <= 0.8 * r
    if shape == "triangle":  # apex up, base at 0.7 r
        return (dy >= -r) & (dy <= 0.7 * r) & (adx <= 0.6 * (dy + r))
    if shape == "ring":
        dist = np.sqrt(dy**2 + dx**2)
        return (dist >= 0.5 * r) & (dist <= r)
    if shape == "cross":
        return ((ady <= 0.3 * r) & (adx <= r)) | ((adx <= 0.3 * r) & (ady <= r))
    if shape == "bar":
        return (ady <= 0.3 * r) & (adx <= 1.3 * r)
    raise ValueError(f"unknown part shape {shape!r}; known: {sorted(PART_COLOURS)}")


def _check_draw_args(who: str, n: int, image_size: int) -> None:
    """Refuse an image count or size a generator cannot draw, naming the generator `who`."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"{who}: image_size must be an int >= 16, got {image_size!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{who}: n must be a non-negative int, got {n!r}")


def _segment_mask(rows: np.ndarray, cols: np.ndarray, start: np.ndarray, end: np.ndarray, width: float) -> np.ndarray:
    """Pixels within `width` of the segment `start -> end` (row, col)."""
    direction = end - start
    length2 = max(float(direction @ direction), 1e-9)
    t = np.clip(((rows - start[0]) * direction[0] + (cols - start[1]) * direction[1]) / length2, 0.0, 1.0)
    return (rows - start[0] - t * direction[0]) ** 2 + (cols - start[1] - t * direction[1]) ** 2 <= width**2


def _draw_one(rng: np.random.Generator, label: int, size: int, rows: np.ndarray, cols: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """One `(3, size, size)` float image in [0, 1] of class `label` and its `(3, 2)` landmarks."""
    image = rng.uniform(*_BACKGROUND) + rng.normal(0.0, 0.03, size=(3, size, size))
    for _ in range(rng.integers(2, 6)):  # clutter: line segments of random dim colours
        start, end = rng.uniform(0, size - 1, size=2), rng.uniform(0, size - 1, size=2)
        image[:, _segment_mask(rows, cols, start, end, rng.uniform(0.5, 1.2))] = rng.uniform(0.2, 0.6, size=(3, 1))
    if rng.random() < 0.5:  # clutter: a smaller stray part
        shape = list(PART_COLOURS)[rng.integers(len(PART_COLOURS))]
        centre = rng.uniform(0.1 * size, 0.9 * size, size=2)
        radius = _PART_RADIUS * 0.6 * size * rng.uniform(*_SCALE_RANGE)
        mask = _shape_mask(shape, rows - centre[0], cols - centre[1], radius)
        image[:, mask] = np.asarray(PART_COLOURS[shape])[:, None] / 255.0 * rng.uniform(0.8, 1.1)
    parts = list(PARTS_CLASSES.values())[label]
    scale = size * rng.uniform(*_SCALE_RANGE)  # pixels per object unit
    extent = (0.38 + _PART_RADIUS * 1.3 + 3 * _JITTER) * scale  # the object's half-size, so it fits the image
    centre = rng.uniform(extent, size - 1 - extent, size=2) if size - 1 > 2 * extent else np.full(2, (size - 1) / 2)
    landmarks = np.zeros((len(parts), 2))
    for k, (_, shape, offset) in enumerate(parts):
        landmarks[k] = centre + (np.asarray(offset) + rng.normal(0.0, _JITTER, size=2)) * scale
        mask = _shape_mask(shape, rows - landmarks[k, 0], cols - landmarks[k, 1], _PART_RADIUS * scale)
        image[:, mask] = np.asarray(PART_COLOURS[shape])[:, None] / 255.0 * rng.uniform(0.8, 1.1)
    return image, landmarks


def make_parts_images(
    n: int, *, image_size: int = _IMAGE_SIZE, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw `n` images of the parts data set.

    Args:
        n: number of images.
        image_size: side of the square images (at least 16).
        rng: the generator; default one seeded with `GENERATOR_SEED`.

    Returns:
        `(images, labels, landmarks)`: uint8 `(n, 3, S, S)`, int64 `(n,)` (balanced in expectation) and float32
        `(n, 3, 2)` part centres (row, col) in pixels.
    """
    _check_draw_args("make_parts_images", n, image_size)
    rng = np.random.default_rng(GENERATOR_SEED) if rng is None else rng
    rows, cols = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    labels = rng.integers(0, len(PARTS_CLASSES), size=n)
    images = np.zeros((n, 3, image_size, image_size), dtype=np.uint8)
    landmarks = np.zeros((n, 3, 2), dtype=np.float32)
    for i, label in enumerate(labels):
        image, landmarks[i] = _draw_one(rng, int(label), image_size, rows, cols)
        images[i] = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return images, labels.astype(np.int64), landmarks


@functools.lru_cache(maxsize=8)
def _drawn(
    make: Callable[..., tuple[np.ndarray, ...]], generator_seed: int, image_size: int, num_train: int, num_test: int
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The fixed train-file and test draws of `make` (cached: every split seed reuses them), read-only."""
    rng = np.random.default_rng(generator_seed)
    train = make(num_train, image_size=image_size, rng=rng)
    test = make(num_test, image_size=image_size, rng=rng)
    for array in (*train, *test):
        array.flags.writeable = False
    return train, test


class PartsDataset(ArrayDataset):
    """An `ArrayDataset` of `(x, y)` pairs that also holds every sample's part landmarks.

    Attributes:
        landmarks: `(N, K, 2)` float32 (row, col) pixel coordinates of the `K` parts of each sample's class.
        occluded: `(N,)` int64 index of the partly occluded part of each sample (-1: none), or None where the data
            set has no occlusion (`"parts"`).
    """

    def __init__(self, features: Tensor, labels: Tensor, landmarks: Tensor) -> None:
        super().__init__(features, labels)
        if landmarks.dtype != torch.float32 or landmarks.dim() != 3 or landmarks.shape[-1] != 2:
            raise TypeError(f"PartsDataset: landmarks must be float32 (N, K, 2), got {landmarks.dtype} "
                            f"{tuple(landmarks.shape)}")
        if len(landmarks) != len(labels):
            raise ValueError(f"PartsDataset: {len(labels)} samples but {len(landmarks)} landmark rows")
        self.landmarks = landmarks
        self.occluded: Tensor | None = None

    def __repr__(self) -> str:
        shapes = f"x={tuple(self.features.shape[1:])}, landmarks={tuple(self.landmarks.shape[1:])}"
        return f"PartsDataset(n={len(self)}, {shapes})"


def load_parts(
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    limit: int | None = None,
    image_size: int = _IMAGE_SIZE,
    num_train: int = _TRAIN,
    num_test: int = _TEST,
) -> DataBundle:
    """The parts data set: 3 x 64 x 64 images of 4 classes (2,000 train-file and 500 test images by default).

    Args:
        seed: split seed (the images themselves never change).
        val_fraction: share of the train file held out for validation (stratified).
        limit: keep at most this many train samples.
        image_size: image side in pixels.
        num_train: images in the train file (train + val).
        num_test: images in the test split.

    Returns:
        A `DataBundle` whose splits are `PartsDataset`s (with `.landmarks`); `info.preprocessing["landmarks"]`
        names the parts of every class.
    """
    train, test = _drawn(make_parts_images, GENERATOR_SEED, image_size, num_train, num_test)
    return _parts_bundle(
        "parts", train, test, PARTS_CLASSES, mean=PARTS_MEAN, std=PARTS_STD, reference_grey=_REFERENCE_GREY,
        image_size=image_size, generator_seed=GENERATOR_SEED, seed=seed, val_fraction=val_fraction, limit=limit,
    )


def _parts_bundle(
    name: str,
    train: tuple[np.ndarray, ...],
    test: tuple[np.ndarray, ...],
    classes: dict[str, tuple[tuple[str, str, tuple[float, float]], ...]],
    *,
    mean: float,
    std: float,
    reference_grey: float,
    image_size: int,
    generator_seed: int,
    seed: int,
    val_fraction: float,
    limit: int | None,
    extra: dict[str, str] | None = None,
) -> DataBundle:
    """Split `(images, labels, landmarks[, occluded])` draws into a `DataBundle` of `PartsDataset`s."""
    train_images, train_labels = train[:2]
    test_images, test_labels = test[:2]
    bundle = image_bundle(
        name,
        (train_images, train_labels),
        (test_images, test_labels),
        mean=[mean] * 3,
        std=[std] * 3,
        class_names=list(classes),
        reference_pixel=[reference_grey] * 3,
        seed=seed,
        val_fraction=val_fraction,
        limit=limit,
        preprocessing={
            "source": "synthetic",
            "generator_seed": generator_seed,
            "image_size": image_size,
            "reference": "the mean background grey",
            **(extra or {}),
            "landmarks": {
                "per_class": {cls: [part for part, _, _ in parts] for cls, parts in classes.items()},
                "shapes": {cls: [shape for _, shape, _ in parts] for cls, parts in classes.items()},
                "layout": "(N, 3, 2) float32 (row, col) pixel coordinates of the part centres in the model input; "
                          "landmark k of an image of class c is part k of class c",
                "where": "the .landmarks attribute of each split (bundle.train.landmarks, ...)",
            },
        },
    )
    # The same split calls image_bundle makes; the fingerprint check proves the landmark rows line up.
    idx = split_indices(train_labels, seed=seed, val_fraction=val_fraction, official_test_size=len(test_labels))
    idx = dataclasses.replace(idx, train=limit_indices(idx.train, train_labels, limit, seed))
    if idx.fingerprint() != bundle.info.split["fingerprint"]:
        raise RuntimeError(f"{name}: the landmark split no longer matches image_bundle's split (fingerprints "
                           "differ); keep the two in step")

    def with_landmarks(split: ArrayDataset, arrays: tuple[np.ndarray, ...], rows: np.ndarray) -> PartsDataset:
        out = PartsDataset(split.features, split.labels, torch.from_numpy(np.array(arrays[2][rows])))
        if len(arrays) > 3:  # the occluded part of every image (-1: none)
            out.occluded = torch.from_numpy(np.array(arrays[3][rows]))
        return out

    return dataclasses.replace(
        bundle,
        train=with_landmarks(bundle.train, train, idx.train),
        val=with_landmarks(bundle.val, train, idx.val),
        test=with_landmarks(bundle.test, test, idx.test),
    )
