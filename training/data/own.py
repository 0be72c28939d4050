"""The user's own data: a CSV table (`data.name: csv`) or a folder of images, one subfolder per class
(`data.name: image_folder`).

Tabular (`load_csv`):

- columns: every column except the target and `drop`, in file order; one model input (one Shapley player) each;
- categorical columns: those listed in `categorical` plus every column whose values are all non-numeric.
  A column that mixes numbers and text is refused (naming the first odd cell) unless listed as categorical;
- encoding: categorical values become ordinal codes (position in the sorted categories of the whole file, so
  val / test never meet an unknown category), then every column is z-scored with the train split's mean / std;
- missing cells (`""`, `NA`, `N/A`, `NaN`, `null`, `None`, `?`): with `missing: impute` (the default) filled with
  the train split's median (numeric) or most frequent category (categorical), and counted in the log and in
  `preprocessing["missing"]`; with `missing: error` refused, naming the first one. A missing target is always
  refused: a row without a class cannot be trained on or scored;
- target: string values become classes named by them (sorted); integer values become classes sorted by value;
  a fractional target (regression) is refused;
- reference (the Shapley baseline): the train mean (0) for numeric columns, the most frequent category for
  categorical ones (a real value rather than an average of codes).

Images (`load_image_folder`): `<path>/<class>/<image>`, like torchvision's `ImageFolder`; every image is
converted to `channels` (1: grayscale, 3: RGB), resized to `image_size`, scaled to [0, 1] and normalised with the
train split's per-channel mean / std (reference: the mean colour, i.e. 0). Hidden files and files without an
image extension are skipped. All images are held in memory as uint8.

Everything is validated while loading, before the trainer writes anything into the run folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.preprocessing import PreprocessingError, is_missing, parse_number, read_csv_rows

from .core import ArrayDataset, DataBundle, DatasetInfo
from .splits import TEST_FRACTION, check_split_args, fit_standardizer, limit_indices, stratified_holdout

__all__ = ["IMAGE_EXTENSIONS", "MISSING_POLICIES", "load_csv", "load_image_folder"]

log = logging.getLogger("training")

MISSING_POLICIES = ("impute", "error")
"""`data.missing` values: fill missing cells with train-split statistics, or refuse them."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""File endings read as images by `load_image_folder` (case-insensitive)."""


@dataclasses.dataclass(frozen=True)
class _Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    stratified: bool


def _split(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> _Split:
    every = np.arange(len(labels))
    rest, test, strat_test = stratified_holdout(every, labels, test_fraction, seed)
    train, val, strat_val = stratified_holdout(rest, labels, val_fraction, seed)
    return _Split(train, val, test, strat_test and strat_val)


def _split_record(split: _Split, *, seed: int, val_fraction: float, test_fraction: float, limit: int | None,
                  train_size: int) -> dict[str, Any]:
    return {
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "official_test": False,
        "stratified": split.stratified,
        "limit": limit,
        "sizes": {"train": train_size, "val": len(split.val), "test": len(split.test)},
    }


def _check_fractions(path: Path, n: int, val_fraction: float, test_fraction: float | None, limit: int | None) -> float:
    check_split_args(val_fraction, limit)
    test_fraction = TEST_FRACTION if test_fraction is None else float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if n < 3:
        raise ValueError(f"{path}: {n} samples are too few to split into train / val / test")
    return test_fraction


def _resolve(root: str | os.PathLike | None, path: str | os.PathLike) -> Path:
    """`path` with `~` expanded; a relative one is taken against `root` (`None`: the current folder)."""
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() or root is None else Path(root).expanduser() / resolved


def _close(name: str, options: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------------------------ tabular
def _column_kind(path: Path, name: str, cells: list[tuple[int, int, str]], declared: bool) -> str:
    """`"categorical"` or `"numeric"` for one column of `(row, line, text)` cells (missing ones left out)."""
    if declared:
        return "categorical"
    numeric = [parse_number(text) is not None for _, _, text in cells]
    if all(numeric):
        return "numeric"
    if not any(numeric):
        return "categorical"
    # Mixed: name the first cell of the minority kind - usually a typo ("12,5", "abc") in a numeric column.
    odd_numeric = sum(numeric) < len(numeric) / 2
    row, line, text = next(c for c, is_num in zip(cells, numeric) if is_num == odd_numeric)
    if odd_numeric:
        what = f"{text!r} is a number in a column of mostly text"
    else:
        what = f"{text!r} is not a number, in a numeric column ({sum(numeric)} of {len(numeric)} values are numbers)"
    raise ValueError(f"{path}: row {row} (line {line}), column {name!r}: {what}. Fix the value, leave the cell empty "
                     f"(missing), or list {name!r} under data.categorical to treat the column as categories")


def _class_names(path: Path, target: str, values: list[tuple[int, int, str]]) -> tuple[list[str], str]:
    """Sorted class names of the target column, and whether they were read as strings or integers."""
    numbers = [parse_number(text) for _, _, text in values]
    if all(n is not None for n in numbers):
        if fractional := next(((r, line, t) for (r, line, t), n in zip(values, numbers) if not float(n).is_integer()),
                              None):
            row, line, text = fractional
            raise ValueError(f"{path}: row {row} (line {line}), column {target!r}: {text!r} is not a class label; the "
                             "target must hold classes (text or whole numbers), regression is not supported")
        classes = sorted({int(n) for n in numbers})
        return [str(c) for c in classes], "integer"
    return sorted({text.strip() for _, _, text in values}), "string"


def load_csv(
    root: str | os.PathLike | None = None,
    *,
    path: str | os.PathLike | None = None,
    target: str | None = None,
    categorical: Sequence[str] | None = None,
    drop: Sequence[str] = (),
    missing: str = "impute",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float | None = None,
    limit: int | None = None,
) -> DataBundle:
    """A classification table from a CSV file with a header row (see the module docstring for the rules).

    Args:
        root: folder a relative `path` is resolved against (`None`: the current folder).
        path: the CSV file.
        target: the column holding the class.
        categorical: columns to treat as categories even if they hold numbers (non-numeric columns are
            categorical anyway).
        drop: columns to leave out (ids, leaks); they are allowed, and ignored, in rows given to `explain`.
        missing: `"impute"` or `"error"`.
        seed: split seed.
        val_fraction: share of the non-test rows sent to val.
        test_fraction: share of the rows held out for test (default `TEST_FRACTION`).
        limit: keep at most this many train rows (statistics are fitted before the cut).

    Raises:
        ValueError: an empty file, an unknown target / categorical / drop column, a non-numeric value in a
            numeric column, a missing target, a single class, ... each naming the file, row and column.
        FileNotFoundError: no such file.
    """
    if path is None or target is None:
        raise ValueError("data.name=csv needs data.path (the CSV file) and data.target (the class column)")
    file = _resolve(root, path)
    if not file.is_file():
        raise FileNotFoundError(f"data.path: no such CSV file: {file}")
    if missing not in MISSING_POLICIES:
        raise ValueError(f"data.missing must be one of {MISSING_POLICIES}, got {missing!r}")
    try:
        header, rows = read_csv_rows(file)
    except PreprocessingError as e:
        raise ValueError(str(e)) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not a UTF-8 text file ({e.reason} at byte {e.start}): is it really a CSV?") from None
    if target not in header:
        sep = next((c for c in (";", "\t", "|") if len(header) == 1 and c in header[0]), None)
        hint = f" (the header looks {sep!r}-separated; only commas separate columns)" if sep else ""
        raise ValueError(f"{file}: no target column {target!r}{_close(target, header)}; the columns are: "
                         f"{', '.join(header)}{hint}")
    categorical = list(categorical or [])
    for key, names in (("categorical", categorical), ("drop", list(drop))):
        for name in names:
            if name not in header:
                raise ValueError(f"{file}: data.{key} names a column {name!r} that is not in the header"
                                 f"{_close(name, header)}; the columns are: {', '.join(header)}")
            if name == target:
                raise ValueError(f"{file}: data.{key} lists the target column {target!r}")
    features = [h for h in header if h != target and h not in drop]
    if not features:
        raise ValueError(f"{file}: no feature columns left besides the target {target!r}")
    col = {h: i for i, h in enumerate(header)}

    # ---- the target: refused when missing; classes named by their values
    target_cells = []
    for r, (line, cells) in enumerate(rows, start=1):
        if is_missing(cells[col[target]]):
            raise ValueError(f"{file}: row {r} (line {line}), column {target!r}: the target is missing; remove the row "
                             "or give it a class")
        target_cells.append((r, line, cells[col[target]]))
    class_names, target_kind = _class_names(file, target, target_cells)
    if len(class_names) < 2:
        raise ValueError(f"{file}: the target column {target!r} holds a single class ({class_names[0]!r}); "
                         "a classifier needs at least two")
    if target_kind == "integer":
        labels = np.array([class_names.index(str(int(float(t)))) for _, _, t in target_cells])
    else:
        labels = np.array([class_names.index(t.strip()) for _, _, t in target_cells])
    test_fraction = _check_fractions(file, len(rows), val_fraction, test_fraction, limit)
    split = _split(labels, seed, val_fraction, test_fraction)

    # ---- the feature columns: kind, missing cells, categories, codes
    raw = np.full((len(rows), len(features)), np.nan)
    kinds: dict[str, str] = {}
    categories: dict[str, list[str]] = {}
    missing_counts: dict[str, int] = {}
    fill: dict[str, float | str] = {}
    in_train = np.zeros(len(rows), dtype=bool)
    in_train[split.train] = True
    for j, name in enumerate(features):
        present = [(r, line, cells[col[name]]) for r, (line, cells) in enumerate(rows, start=1)
                   if not is_missing(cells[col[name]])]
        gaps = len(rows) - len(present)
        if gaps and missing == "error":
            r, line = next((r, line) for r, (line, cells) in enumerate(rows, start=1) if is_missing(cells[col[name]]))
            raise ValueError(f"{file}: row {r} (line {line}), column {name!r}: missing value ({gaps} in this column); "
                             "fill it in, drop the column, or set data.missing=impute")
        if not present:
            raise ValueError(f"{file}: column {name!r} has no values at all; list it under data.drop")
        kinds[name] = _column_kind(file, name, present, name in categorical)
        rows_present = np.array([r - 1 for r, _, _ in present])
        if kinds[name] == "categorical":
            texts = [text.strip() for _, _, text in present]
            categories[name] = sorted(set(texts))
            code = {c: i for i, c in enumerate(categories[name])}
            raw[rows_present, j] = [code[t] for t in texts]
        else:
            raw[rows_present, j] = [parse_number(text) for _, _, text in present]
        if gaps:
            missing_counts[name] = gaps
            train_values = raw[in_train, j][~np.isnan(raw[in_train, j])]
            if not len(train_values):
                raise ValueError(f"{file}: column {name!r} has no values in the train split to impute from")
            if kinds[name] == "categorical":
                code = Counter(train_values.astype(int).tolist()).most_common(1)[0][0]
                fill[name], value = categories[name][code], float(code)
            else:
                value = float(np.median(train_values))
                fill[name] = value
            raw[np.isnan(raw[:, j]), j] = value
    if missing_counts:
        log.info("data %s: imputed %d missing cell(s) with train-split statistics (median / most frequent): %s",
                 file.name, sum(missing_counts.values()),
                 ", ".join(f"{k} {v} -> {fill[k]!r}" for k, v in missing_counts.items()))

    mean, std, standardize = fit_standardizer(raw[split.train])
    # The train split's largest |z| per column: the out-of-range guard's yardstick (zoo.preprocessing).
    standardize["z_max"] = np.abs((raw[split.train] - mean) / std).max(axis=0).tolist()
    train_rows = limit_indices(split.train, labels, limit, seed)

    def make(rows_: np.ndarray) -> ArrayDataset:
        z = (raw[rows_] - mean) / std
        return ArrayDataset(torch.from_numpy(z.astype(np.float32)), torch.from_numpy(labels[rows_].astype(np.int64)))

    # Reference: the train mean for numbers (z = 0); for categories the most frequent one in train, standardised.
    reference = []
    for j, name in enumerate(features):
        if name in categories:
            code = Counter(raw[split.train, j].astype(int).tolist()).most_common(1)[0][0]
            reference.append(float((code - mean[j]) / std[j]))
        else:
            reference.append(0.0)
    preprocessing = {
        "source": f"csv file {file.name}",
        "kind": "csv",
        "target": target,
        "target_kind": target_kind,
        "dropped_columns": list(drop),
        "categorical": [f for f in features if f in categories],
        "categories": categories,
        "encoding": "ordinal, one input per column: code = position in the sorted categories of the file; "
                    "then every column z-scored with the train split's mean / std",
        "missing": {"policy": missing, "tokens": ["", "NA", "N/A", "NaN", "null", "None", "?"],
                    "fill": fill, "counts": missing_counts},
        "reference": "numeric: train mean; categorical: most frequent train category",
        "standardize": standardize,
    }
    info = DatasetInfo(
        name="csv",
        num_classes=len(class_names),
        input_shape=(len(features),),
        class_names=class_names,
        feature_names=features,
        preprocessing=preprocessing,
        reference=reference,
        split=_split_record(split, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, limit=limit,
                            train_size=len(train_rows)),
    )
    return DataBundle(train=make(train_rows), val=make(split.val), test=make(split.test), info=info)


# ------------------------------------------------------------------------------------------------ images
def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"data.image_size must be a positive int or [height, width], got {image_size!r}")
    return size  # type: ignore[return-value]


def load_image_folder(
    root: str | os.PathLike | None = None,
    *,
    path: str | os.PathLike | None = None,
    image_size: int | Sequence[int] = 32,
    channels: int = 3,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float | None = None,
    limit: int | None = None,
) -> DataBundle:
    """Images in `<path>/<class name>/`, one subfolder per class (class names: the sorted folder names).

    Args:
        root: folder a relative `path` is resolved against (`None`: the current folder).
        path: the folder of class folders.
        image_size: `(height, width)` (or one int for squares) every image is resized to.
        channels: 1 (grayscale) or 3 (RGB).
        seed: split seed.
        val_fraction: share of the non-test images sent to val.
        test_fraction: share held out for test (default `TEST_FRACTION`).
        limit: keep at most this many train images.

    Raises:
        ValueError: fewer than two classes, an empty class folder, an unreadable image (named).
        FileNotFoundError: no such folder.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:  # pragma: no cover - Pillow comes with torchvision
        raise ValueError(f"data.name=image_folder needs Pillow (pip install pillow): {e}") from e
    if path is None:
        raise ValueError("data.name=image_folder needs data.path (a folder with one subfolder per class)")
    folder = _resolve(root, path)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.path: no such image folder: {folder}")
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    height, width = _image_size(image_size)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        found = [p.name for p in class_dirs]
        raise ValueError(f"{folder}: found {len(class_dirs)} class folder(s) {found}; an image folder needs one "
                         "subfolder per class and at least two classes")
    files: list[tuple[Path, int]] = []
    skipped = 0
    for label, class_dir in enumerate(class_dirs):
        entries = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped += len(entries) - len(images)
        if not images:
            raise ValueError(f"{class_dir}: the class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += [(p, label) for p in images]
    mode = "L" if channels == 1 else "RGB"
    pixels = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for i, (file, _) in enumerate(files):
        try:
            with Image.open(file) as image:
                image = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"{file}: unreadable image ({type(e).__name__}: {e})") from None
        pixels[i] = array[None] if channels == 1 else np.moveaxis(array, -1, 0)
    if skipped:
        log.info("data %s: skipped %d file(s) without an image extension", folder.name, skipped)
    labels = np.array([label for _, label in files], dtype=np.int64)
    test_fraction = _check_fractions(folder, len(files), val_fraction, test_fraction, limit)
    split = _split(labels, seed, val_fraction, test_fraction)
    # Per-channel statistics of the train split, in [0, 1] pixel units.
    train_pixels = pixels[split.train].astype(np.float64) / 255.0
    mean = train_pixels.mean(axis=(0, 2, 3))
    std = train_pixels.std(axis=(0, 2, 3))
    std = np.where(std == 0, 1.0, std)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    train_rows = limit_indices(split.train, labels, limit, seed)

    def make(rows_: np.ndarray) -> ArrayDataset:
        x = torch.from_numpy(np.ascontiguousarray(pixels[rows_])).float().div_(255.0).sub_(mean_t).div_(std_t)
        return ArrayDataset(x, torch.from_numpy(labels[rows_]))

    info = DatasetInfo(
        name="image_folder",
        num_classes=len(class_dirs),
        input_shape=(channels, height, width),
        class_names=[p.name for p in class_dirs],
        preprocessing={
            "source": f"image folder {folder.name}",
            "kind": "image_folder",
            "color": mode,
            "resize": [height, width],
            "scale": "pixel / 255",
            "normalize": {"mean": mean.tolist(), "std": std.tolist(), "per": "channel", "fitted_on": "train split"},
            "files": len(files),
        },
        # The mean colour of the train split: 0 after normalisation.
        reference=[0.0] * channels,
        split=_split_record(split, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, limit=limit,
                            train_size=len(train_rows)),
    )
    return DataBundle(train=make(train_rows), val=make(split.val), test=make(split.test), info=info)
