"""A harder seeded parts data set: 8 classes, random colours per instance, clutter and occlusion, exact landmarks.

The companion of `training.data.parts` (which stays available as `"parts"`), built so that a filter can only
score on the part measure by finding a part's *shape* in its place:

* **colour carries no information**: every part of every image gets its own random colour (hue uniform,
  saturation and value high), so a filter cannot find "the red part";
* **8 classes** of 3-part objects (`HARD_PARTS_CLASSES`) over 6 shapes; every shape appears in 3 to 5 classes and
  no two classes share their set of shapes, so the class is the configuration, not any single part; no part
  sits within 0.26 object units (about 10 pixels at the mean scale) of its object's centroid, so a detector of
  the object's centre is not a part detector;
* **clutter**: 2 to 5 line segments and 1 to 3 stray parts (random shape, colour and a size of 0.6-1.0 of the
  object's parts) at random places, drawn *under* the object;
* **occlusion**: in half of the images a random-coloured rectangle covers part of one part (its centre lies
  0.6-1.1 part radii from that part's centre, so the part is partly hidden but its centre is usually visible).

Landmarks are exact: `landmarks[n, k] = (row, col)` is the centre of part `k` of the image's class, in the pixels
of the model input, also when that part is partly occluded; `bundle.<split>.occluded` is the `(N,)` index of the
occluded part (-1 when none). The images are fixed (drawn from `GENERATOR_SEED` + 1); `seed` only changes the
split. Pixels are scaled to [0, 1] and normalised with the fixed constants `HARD_PARTS_MEAN` / `HARD_PARTS_STD`.
"""

from __future__ import annotations

import colorsys

import numpy as np

from .core import DataBundle
from .parts import (
    _JITTER,
    _PART_RADIUS,
    _SCALE_RANGE,
    PART_COLOURS,
    _check_draw_args,
    _drawn,
    _parts_bundle,
    _segment_mask,
    _shape_mask,
)
from .synthetic import GENERATOR_SEED

__all__ = [
    "HARD_PARTS_CLASSES",
    "HARD_PARTS_MEAN",
    "HARD_PARTS_STD",
    "load_parts_hard",
    "make_hard_parts_images",
]

HARD_PARTS_CLASSES: dict[str, tuple[tuple[str, str, tuple[float, float]], ...]] = {
    "tower": (("apex", "triangle", (-0.38, -0.15)), ("body", "square", (0.0, 0.25)), ("base", "bar", (0.38, -0.15))),
    "face": (("left_eye", "disc", (-0.2, -0.3)), ("right_eye", "ring", (-0.2, 0.3)), ("mouth", "bar", (0.3, 0.0))),
    "kite": (("top", "cross", (-0.38, 0.0)), ("left_wing", "square", (0.1, -0.32)),
             ("right_wing", "triangle", (0.1, 0.32))),
    "cart": (("roof", "cross", (-0.3, 0.0)), ("back_wheel", "ring", (0.3, -0.3)), ("front_wheel", "disc", (0.3, 0.3))),
    "snowman": (("head", "ring", (-0.38, 0.15)), ("belly", "disc", (0.0, -0.25)), ("feet", "square", (0.38, 0.15))),
    "boat": (("sun", "disc", (-0.35, -0.32)), ("sail", "triangle", (-0.08, 0.3)), ("hull", "bar", (0.32, 0.0))),
    "robot": (("head", "square", (-0.35, 0.0)), ("left_arm", "cross", (0.1, -0.3)), ("right_arm", "bar", (0.1, 0.3))),
    "bell": (("left_hook", "ring", (-0.3, -0.3)), ("right_hook", "triangle", (-0.3, 0.3)),
             ("clapper", "bar", (0.3, 0.0))),
}
"""Class -> its parts `(name, shape, (row, col) offset in object units)`; landmark `k` is part `k`."""

HARD_PARTS_MEAN, HARD_PARTS_STD = 0.28, 0.15
"""Per-channel normalisation constants (close to the training images' pixel mean / std in [0, 1])."""

# The object geometry (_PART_RADIUS, _SCALE_RANGE, _JITTER) is that of `parts`.
_BACKGROUND = (0.1, 0.4)    # range of the background grey level
_REFERENCE_GREY = sum(_BACKGROUND) / 2
_TRAIN, _TEST, _IMAGE_SIZE = 3200, 800, 64
_SHAPES = tuple(PART_COLOURS)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A vivid random RGB colour in [0, 1], `(3, 1)` (hue uniform; saturation and value high)."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    return np.asarray(rgb)[:, None]


def _draw_one(rng: np.random.Generator, label: int, size: int, rows: np.ndarray, cols: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """One `(3, size, size)` float image of class `label`, its `(3, 2)` landmarks and its occluded part (or -1)."""
    tint = rng.uniform(-0.03, 0.03, size=(3, 1, 1))  # a faint colour cast, so the background is not always grey
    image = rng.uniform(*_BACKGROUND) + tint + rng.normal(0.0, 0.03, size=(3, size, size))
    scale = size * rng.uniform(*_SCALE_RANGE)  # pixels per object unit
    radius = _PART_RADIUS * scale
    for _ in range(rng.integers(2, 6)):  # clutter: line segments of random colours
        start, end = rng.uniform(0, size - 1, size=2), rng.uniform(0, size - 1, size=2)
        colour = _random_colour(rng) * rng.uniform(0.5, 1.0)
        image[:, _segment_mask(rows, cols, start, end, rng.uniform(0.5, 1.2))] = colour
    for _ in range(rng.integers(1, 4)):  # clutter: stray parts, under the object
        shape = _SHAPES[rng.integers(len(_SHAPES))]
        centre = rng.uniform(0.05 * size, 0.95 * size, size=2)
        mask = _shape_mask(shape, rows - centre[0], cols - centre[1], radius * rng.uniform(0.6, 1.0))
        image[:, mask] = _random_colour(rng)
    parts = list(HARD_PARTS_CLASSES.values())[label]
    extent = (0.38 + _PART_RADIUS * 1.3 + 3 * _JITTER) * scale  # the object's half-size, so it fits the image
    centre = rng.uniform(extent, size - 1 - extent, size=2) if size - 1 > 2 * extent else np.full(2, (size - 1) / 2)
    landmarks = np.zeros((len(parts), 2))
    for k, (_, shape, offset) in enumerate(parts):
        landmarks[k] = centre + (np.asarray(offset) + rng.normal(0.0, _JITTER, size=2)) * scale
        image[:, _shape_mask(shape, rows - landmarks[k, 0], cols - landmarks[k, 1], radius)] = _random_colour(rng)
    occluded = -1
    if rng.random() < 0.5:  # occlusion: a rectangle over the edge of one part
        occluded = int(rng.integers(len(parts)))
        angle, reach = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.1) * radius
        where = landmarks[occluded] + reach * np.array([np.sin(angle), np.cos(angle)])
        half = rng.uniform(0.5, 0.9, size=2) * radius
        box = (np.abs(rows - where[0]) <= half[0]) & (np.abs(cols - where[1]) <= half[1])
        image[:, box] = _random_colour(rng) * rng.uniform(0.4, 1.0)
    return image, landmarks, occluded


def make_hard_parts_images(
    n: int, *, image_size: int = _IMAGE_SIZE, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw `n` images of the hard parts data set.

    Args:
        n: number of images.
        image_size: side of the square images (at least 16).
        rng: the generator; default one seeded with `GENERATOR_SEED + 1`.

    Returns:
        `(images, labels, landmarks, occluded)`: uint8 `(n, 3, S, S)`, int64 `(n,)` (balanced in expectation),
        float32 `(n, 3, 2)` part centres (row, col) in pixels and int64 `(n,)` occluded part (-1: none).
    """
    _check_draw_args("make_hard_parts_images", n, image_size)
    rng = np.random.default_rng(GENERATOR_SEED + 1) if rng is None else rng
    rows, cols = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    labels = rng.integers(0, len(HARD_PARTS_CLASSES), size=n)
    images = np.zeros((n, 3, image_size, image_size), dtype=np.uint8)
    landmarks = np.zeros((n, 3, 2), dtype=np.float32)
    occluded = np.full(n, -1, dtype=np.int64)
    for i, label in enumerate(labels):
        image, landmarks[i], occluded[i] = _draw_one(rng, int(label), image_size, rows, cols)
        images[i] = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return images, labels.astype(np.int64), landmarks, occluded


def load_parts_hard(
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    limit: int | None = None,
    image_size: int = _IMAGE_SIZE,
    num_train: int = _TRAIN,
    num_test: int = _TEST,
) -> DataBundle:
    """The hard parts data set: 3 x 64 x 64 images of 8 classes (3,200 train-file and 800 test images by default).

    Args:
        seed: split seed (the images themselves never change).
        val_fraction: share of the train file held out for validation (stratified).
        limit: keep at most this many train samples.
        image_size: image side in pixels.
        num_train: images in the train file (train + val).
        num_test: images in the test split.

    Returns:
        A `DataBundle` whose splits are `PartsDataset`s (with `.landmarks` and `.occluded`);
        `info.preprocessing["landmarks"]` names the parts of every class.
    """
    train, test = _drawn(make_hard_parts_images, GENERATOR_SEED + 1, image_size, num_train, num_test)
    return _parts_bundle(
        "parts_hard", train, test, HARD_PARTS_CLASSES, mean=HARD_PARTS_MEAN, std=HARD_PARTS_STD,
        reference_grey=_REFERENCE_GREY, image_size=image_size, generator_seed=GENERATOR_SEED + 1,
        seed=seed, val_fraction=val_fraction, limit=limit,
        extra={"colours": "random per part instance (HSV: hue uniform, saturation 0.5-1, value 0.6-1)",
               "clutter": "2-5 line segments and 1-3 stray parts under the object",
               "occlusion": "half of the images: a rectangle over the edge of one part; .occluded names it (-1: none)"},
    )

