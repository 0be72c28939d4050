"""Image data sets: MNIST (own IDX reader), Fashion-MNIST and CIFAR-10 (torchvision, never downloading).

All images become float32 `(C, H, W)`: pixels scaled to [0, 1], then normalised per channel with fixed,
conventional constants (recorded in `preprocessing`). The train file gives train + val (seeded, stratified);
test is the official test set.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from .core import DATA_ENV, ArrayDataset, DataBundle, DatasetInfo, require_files, resolve_root
from .splits import check_split_args, limit_indices, split_indices

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "image_bundle",
    "load_cifar10",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
"""The customary MNIST pixel mean / std (of the 60k training images, pixels in [0, 1])."""
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
"""Fashion-MNIST training-set pixel mean / std."""
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
"""CIFAR-10 training-set per-channel mean / std (the true per-pixel std, not the often-copied 0.20 values)."""

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The four IDX files of MNIST (and Fashion-MNIST), without the optional `.gz`."""

_CIFAR10_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]

# IDX type byte -> numpy dtype (big-endian, as the format stores multi-byte values).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (`.gz` or raw), validating the magic number and the payload size.

    The result is cached in memory (keyed by path, size and modification time) and read-only: reload the
    same file and you get the same array without decompressing again.

    Args:
        path: the file.
        expected_ndim: if given, the number of dimensions the header must declare (3 for images, 1 for labels).

    Raises:
        ValueError: not an IDX file, an unknown type byte, a wrong number of dimensions, or a payload whose
            size does not match the header (truncated or padded file), each with the expected and given values.
    """
    path = Path(path)
    stat = path.stat()
    return _read_idx_cached(str(path), stat.st_size, stat.st_mtime_ns, expected_ndim)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, size: int, mtime_ns: int, expected_ndim: int | None) -> np.ndarray:
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError) as err:
        raise ValueError(f"{path}: not a valid gzip file ({err}); re-copy the data set") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file: magic bytes {data[:4].hex()}, expected 0000 then a type byte in "
            f"{[hex(t) for t in _IDX_DTYPES]} and the number of dimensions"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: file ends inside the IDX header ({len(data)} bytes, header needs {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX payload has {len(data) - header} bytes, but the header's shape {dims} of {dtype} needs "
            f"{expected}: the file is truncated or corrupt"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    array.flags.writeable = False  # shared through the cache: nobody may modify it in place
    return array


def _check_images(
    name: str, images: np.ndarray, labels: np.ndarray, shape: tuple[int, ...], num_classes: int, part: str
) -> None:
    """Images `(N, *shape)` uint8 with N matching labels, and labels within `0 .. num_classes - 1`."""
    if images.dtype != np.uint8 or tuple(images.shape[1:]) != shape:
        raise ValueError(
            f"{name} {part}: expected uint8 images of shape (N, *{shape}), got {images.dtype} {images.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(f"{name} {part}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} {part}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}")


def image_bundle(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: list[str],
    reference_pixel: Sequence[float],
    seed: int,
    val_fraction: float,
    limit: int | None,
    preprocessing: dict[str, Any],
) -> DataBundle:
    """Carve val from train, cut train to `limit`, convert uint8 `(N, C, H, W)` to normalised float32.

    Args:
        name: registry name.
        train: `(images, labels)` of the training file: uint8 `(N, C, H, W)` and `(N,)`.
        test: the official test set, same layout.
        mean: per-channel mean of [0, 1] pixels to subtract.
        std: per-channel std to divide by.
        class_names: one per class.
        reference_pixel: the colour (per channel, in [0, 1] pixel units) to suggest as Shapley reference;
            `DatasetInfo.reference` holds its normalised value.
        seed: split seed.
        val_fraction: share of the training file sent to val.
        limit: keep at most this many train samples.
        preprocessing: data-set specific record; the normalisation entry is added here.
    """
    check_split_args(val_fraction, limit)
    train_images, train_labels = train
    test_images, test_labels = test
    channels = train_images.shape[1]
    if not len(mean) == len(std) == len(reference_pixel) == channels:
        raise ValueError(
            f"{name}: {channels} channels but {len(mean)} means, {len(std)} stds and "
            f"{len(reference_pixel)} reference values"
        )
    train_labels = np.asarray(train_labels, dtype=np.int64)
    idx = split_indices(train_labels, seed=seed, val_fraction=val_fraction, official_test_size=len(test_labels))
    idx = dataclasses.replace(idx, train=limit_indices(idx.train, train_labels, limit, seed))
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def normalize(pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] float32 pixels `(..., C, H, W)` -> model input, in place."""
        return pixels.sub_(mean_t).div_(std_t)

    def make(images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> ArrayDataset:
        # Convert only the rows kept: a `limit` smoke run never materialises the full float32 tensor.
        x = normalize(torch.from_numpy(np.ascontiguousarray(images[rows])).float().div_(255.0))
        return ArrayDataset(x, torch.from_numpy(np.asarray(labels, dtype=np.int64)[rows]))

    # The reference goes through the very float32 arithmetic the images do, so a pixel of that colour equals
    # the reference bit for bit (and missingness gives it exactly 0 attribution, not a rounding error).
    reference = normalize(torch.tensor(reference_pixel, dtype=torch.float32)[:, None, None]).flatten().tolist()

    info = DatasetInfo(
        name=name,
        num_classes=len(class_names),
        input_shape=tuple(train_images.shape[1:]),
        class_names=class_names,
        preprocessing={
            **preprocessing,
            "scale": "pixel / 255",
            "normalize": {"mean": list(mean), "std": list(std), "per": "channel"},
        },
        reference=reference,
        split=idx.record(seed=seed, val_fraction=val_fraction, limit=limit),
    )
    return DataBundle.from_split(make, train_images, train_labels, test_images, test_labels, idx, info)


# Digits and clothes sit on a black background. With the reference equal to the normalised black pixel,
# background pixels equal the reference, i.e. they are "missing", so missingness gives every background pixel
# exactly 0 attribution and the explanation lives on the strokes only.
_BLACK = [0.0]


def _idx_paths(name: str, folder: Path, allow_gz: bool) -> dict[str, Path]:
    """The four IDX files in `folder`, preferring `<file>.gz` where allowed."""
    paths, missing = {}, []
    for key, base in MNIST_FILES.items():
        candidates = [folder / f"{base}.gz", folder / base] if allow_gz else [folder / base]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(candidates[0].name)
        paths[key] = found
    if missing:
        hint = "" if allow_gz else " (torchvision reads the uncompressed files: gunzip any .gz there)"
        raise FileNotFoundError(
            f"data set {name!r}: missing {missing} in {str(folder)!r}{hint}. Point root=... or {DATA_ENV} at the "
            "folder that holds the data sets; nothing is downloaded"
        )
    return paths


def load_mnist(
    root: str | os.PathLike | None = None, *, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None
) -> DataBundle:
    """MNIST from the four IDX files in `<root>/mnist/` (gzipped or raw), parsed here without torchvision.

    Shape `(1, 28, 28)`, 10 classes, normalised with mean 0.1307 / std 0.3081; val is `val_fraction` of the
    60k training images (stratified, `seed`), test the official 10k.
    """
    folder = resolve_root("mnist", root, "mnist/" + ", ".join(f"{f}.gz" for f in MNIST_FILES.values())) / "mnist"
    paths = _idx_paths("mnist", folder, allow_gz=True)
    arrays = {key: read_idx(path, expected_ndim=3 if key.endswith("images") else 1) for key, path in paths.items()}
    for part in ("train", "test"):
        _check_images("mnist", arrays[f"{part}_images"], arrays[f"{part}_labels"], (28, 28), 10, part)
    return image_bundle(
        "mnist",
        (rearrange(arrays["train_images"], "n h w -> n 1 h w"), arrays["train_labels"]),
        (rearrange(arrays["test_images"], "n h w -> n 1 h w"), arrays["test_labels"]),
        mean=[MNIST_MEAN],
        std=[MNIST_STD],
        class_names=[str(d) for d in range(10)],
        reference_pixel=_BLACK,
        seed=seed,
        val_fraction=val_fraction,
        limit=limit,
        preprocessing={"source": "MNIST IDX files, mnist/", "reference": "normalised black pixel (background)"},
    )


def load_fashion_mnist(
    root: str | os.PathLike | None = None, *, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None
) -> DataBundle:
    """Fashion-MNIST through `torchvision.datasets.FashionMNIST(root, download=False)`.

    Expects torchvision's layout, `<root>/FashionMNIST/raw/` with the four uncompressed IDX files. Shape
    `(1, 28, 28)`, 10 classes, normalised with mean 0.2860 / std 0.3530.
    """
    folder = resolve_root("fashion_mnist", root, "FashionMNIST/raw/ with the four IDX files")
    _idx_paths("fashion_mnist", folder / "FashionMNIST" / "raw", allow_gz=False)
    from torchvision.datasets import FashionMNIST

    parts = {}
    for part in ("train", "test"):
        ds = FashionMNIST(str(folder), train=part == "train", download=False)
        images, labels = ds.data.numpy(), ds.targets.numpy()
        _check_images("fashion_mnist", images, labels, (28, 28), len(ds.classes), part)
        parts[part] = (rearrange(images, "n h w -> n 1 h w"), labels)
    return image_bundle(
        "fashion_mnist",
        parts["train"],
        parts["test"],
        mean=[FASHION_MNIST_MEAN],
        std=[FASHION_MNIST_STD],
        class_names=list(FashionMNIST.classes),
        reference_pixel=_BLACK,
        seed=seed,
        val_fraction=val_fraction,
        limit=limit,
        preprocessing={
            "source": "torchvision.datasets.FashionMNIST, FashionMNIST/raw/",
            "reference": "normalised black pixel (background)",
        },
    )


def load_cifar10(
    root: str | os.PathLike | None = None, *, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None
) -> DataBundle:
    """CIFAR-10 through `torchvision.datasets.CIFAR10(root, download=False)` (which checks the batches' MD5).

    Expects `<root>/cifar-10-batches-py/` (the extracted python pickles). Shape `(3, 32, 32)`, 10 classes,
    normalised per channel with the training-set mean / std.
    """
    folder = resolve_root("cifar10", root, "cifar-10-batches-py/ (the extracted python batches)")
    require_files("cifar10", folder / "cifar-10-batches-py", _CIFAR10_FILES)
    from torchvision.datasets import CIFAR10

    parts, classes = {}, []
    for part in ("train", "test"):
        try:
            ds = CIFAR10(str(folder), train=part == "train", download=False)
        except RuntimeError as err:  # the files exist (checked above), so the checksum failed
            raise ValueError(
                f"data set 'cifar10': the files in {str(folder / 'cifar-10-batches-py')!r} failed torchvision's "
                f"MD5 check ({err}); they are corrupt or not the official CIFAR-10 python batches"
            ) from err
        images, labels, classes = np.asarray(ds.data), np.asarray(ds.targets), list(ds.classes)
        _check_images("cifar10", images, labels, (32, 32, 3), len(classes), part)
        parts[part] = (rearrange(images, "n h w c -> n c h w"), labels)
    return image_bundle(
        "cifar10",
        parts["train"],
        parts["test"],
        mean=list(CIFAR10_MEAN),
        std=list(CIFAR10_STD),
        class_names=classes,
        # Natural images have no uniform background: the mean colour (0 once normalised) is the usual
        # uninformative baseline.
        reference_pixel=list(CIFAR10_MEAN),
        seed=seed,
        val_fraction=val_fraction,
        limit=limit,
        preprocessing={
            "source": "torchvision.datasets.CIFAR10, cifar-10-batches-py/",
            "reference": "normalised mean colour (0 per channel)",
        },
    )
