"""Tabular data sets: scikit-learn's bundled ones, UCI Yeast and UCI Adult (Census income).

Every tabular data set is z-scored with the mean / std of its train split, so the suggested Shapley reference
is the all-zeros vector, i.e. the average training sample (as in HarsanyiNet's tabular recipe).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import ArrayDataset, DataBundle, DatasetInfo, require_files, resolve_root
from .splits import check_split_args, fit_standardizer, limit_indices, split_indices

__all__ = [
    "ADULT_CATEGORICAL",
    "ADULT_DROPPED",
    "load_adult",
    "load_sklearn",
    "load_yeast",
    "raw_values",
    "tabular_bundle",
]

ADULT_DROPPED = ("fnlwgt", "education")
"""Adult columns dropped by HarsanyiNet's recipe: a sampling weight, and a duplicate of `education-num`."""

ADULT_CATEGORICAL = ("workclass", "marital-status", "occupation", "relationship", "race", "sex", "native-country")
"""Adult columns label-encoded (sorted categories -> 0 .. K-1) before z-scoring."""

_ADULT_CLASSES = ("<=50K", ">50K")
_MISSING = "?"


def tabular_bundle(
    name: str,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    feature_names: list[str],
    class_names: list[str],
    seed: int,
    val_fraction: float,
    limit: int | None,
    preprocessing: dict[str, Any],
    official_test: tuple[np.ndarray, np.ndarray] | None = None,
) -> DataBundle:
    """Split, z-score with train statistics, cut train to `limit`, and wrap as a `DataBundle`.

    Args:
        name: registry name.
        features: `(N, D)` numeric features (already encoded).
        labels: `(N,)` class indices `0 .. len(class_names) - 1`.
        feature_names: one per column.
        class_names: one per class.
        seed: split seed.
        val_fraction: share of the non-test samples sent to val.
        limit: keep at most this many train samples (statistics are fitted before the cut).
        preprocessing: data-set specific record; the standardisation entry is added here.
        official_test: `(features, labels)` of an official test set; else 20% is held out (stratified).
    """
    check_split_args(val_fraction, limit)
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    idx = split_indices(
        labels,
        seed=seed,
        val_fraction=val_fraction,
        official_test_size=None if official_test is None else len(official_test[1]),
    )
    test_x, test_y = (features, labels) if official_test is None else official_test
    mean, std, record = fit_standardizer(features[idx.train])
    idx = dataclasses.replace(idx, train=limit_indices(idx.train, labels, limit, seed))

    def make(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> ArrayDataset:
        z = (np.asarray(x, dtype=np.float64)[rows] - mean) / std
        return ArrayDataset(torch.from_numpy(z.astype(np.float32)), torch.from_numpy(np.asarray(y, np.int64)[rows]))

    info = DatasetInfo(
        name=name,
        num_classes=len(class_names),
        input_shape=(features.shape[1],),
        class_names=class_names,
        feature_names=feature_names,
        preprocessing={**preprocessing, "standardize": record},
        # z-scored features: 0 is the train mean, the usual "feature absent" baseline for tabular Shapley values.
        reference=[0.0] * features.shape[1],
        split=idx.record(seed=seed, val_fraction=val_fraction, limit=limit),
    )
    return DataBundle.from_split(make, features, labels, test_x, test_y, idx, info)


def load_sklearn(name: str, *, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None) -> DataBundle:
    """`breast_cancer` (569 x 30, 2 classes), `digits` (1797 x 64 pixels as tabular features, 10) or `wine`
    (178 x 13, 3), from the copies bundled inside scikit-learn (no files needed)."""
    from sklearn import datasets

    loaders = {"breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits, "wine": datasets.load_wine}
    if name not in loaders:
        raise ValueError(f"load_sklearn: unknown data set {name!r}; expected one of {sorted(loaders)}")
    raw = loaders[name]()
    return tabular_bundle(
        name,
        raw.data,
        raw.target,
        feature_names=[str(f) for f in raw.feature_names],
        class_names=[str(c) for c in raw.target_names],
        seed=seed,
        val_fraction=val_fraction,
        limit=limit,
        preprocessing={"source": f"sklearn.datasets.{loaders[name].__name__}"},
    )


def _read_yeast(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Feature names, `(N, 8)` features and the class column of the whitespace-separated UCI file."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    header = rows[0]
    if len(header) != 10:
        raise ValueError(f"yeast: {path} header should have 10 columns (name, 8 features, class), got {header}")
    features, classes = [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != 10:
            raise ValueError(f"yeast: {path} line {lineno} has {len(row)} fields, expected 10: {row}")
        try:
            features.append([float(v) for v in row[1:9]])
        except ValueError as err:
            raise ValueError(f"yeast: {path} line {lineno} has a non-numeric feature: {row}") from err
        classes.append(row[9])
    return header[1:9], np.asarray(features), classes


def load_yeast(
    root: str | os.PathLike | None = None, *, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None
) -> DataBundle:
    """UCI Yeast (1,484 proteins, 8 features, 10 localisation classes): `<root>/yeast/yeast.data`.

    No official split: 20% test and `val_fraction` of the rest for val, both stratified with `seed`.
    """
    folder = resolve_root("yeast", root, "yeast/yeast.data") / "yeast"
    (path,) = require_files("yeast", folder, ["yeast.data"])
    feature_names, features, classes = _read_yeast(path)
    class_names = sorted(set(classes))
    code = {c: i for i, c in enumerate(class_names)}
    return tabular_bundle(
        "yeast",
        features,
        np.array([code[c] for c in classes]),
        feature_names=feature_names,
        class_names=class_names,
        seed=seed,
        val_fraction=val_fraction,
        limit=limit,
        preprocessing={"source": "UCI Yeast, yeast/yeast.data", "class_order": "sorted class names"},
    )


def _read_adult(path: Path) -> tuple[list[str], np.ndarray, int]:
    """Header and `(N, columns)` string table of an Adult CSV with every `?` row dropped, plus the drop count."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        rows = [row for row in reader if row]  # the file ends with a blank line
    bad = next((i for i, row in enumerate(rows) if len(row) != len(header)), None)
    if bad is not None:
        raise ValueError(f"adult: {path} row {bad + 2} has {len(rows[bad])} fields, header has {len(header)}")
    table = np.char.strip(np.array(rows, dtype=str).reshape(len(rows), len(header)))
    complete = ~(table == _MISSING).any(axis=1)
    return header, table[complete], int((~complete).sum())


@dataclasses.dataclass(frozen=True)
class _AdultArrays:
    """Encoded (not yet standardised) Adult data; read-only, shared through the cache."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    feature_names: list[str]
    record: dict[str, Any]


def _encode_adult(train_path: Path, test_path: Path) -> _AdultArrays:
    """Drop columns and `?` rows, label-encode with the training file's categories; cached per file version."""
    stamps = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (train_path, test_path))
    return _encode_adult_cached(str(train_path), str(test_path), stamps)


@functools.lru_cache(maxsize=2)
def _encode_adult_cached(train_file: str, test_file: str, stamps: tuple) -> _AdultArrays:
    train_path, test_path = Path(train_file), Path(test_file)
    header, train_rows, train_dropped = _read_adult(train_path)
    test_header, test_rows, test_dropped = _read_adult(test_path)
    if test_header != header:
        raise ValueError(f"adult: {test_path} columns {test_header} differ from {train_path} columns {header}")
    if missing := sorted({*ADULT_DROPPED, *ADULT_CATEGORICAL, "class"} - set(header)):
        raise ValueError(f"adult: {train_path} lacks columns {missing}; header is {header}")

    feature_names = [h for h in header if h not in ADULT_DROPPED and h != "class"]
    columns = {h: i for i, h in enumerate(header)}
    categories: dict[str, list[str]] = {}
    fallback: dict[str, str] = {}
    for col in ADULT_CATEGORICAL:
        cats, counts = np.unique(train_rows[:, columns[col]], return_counts=True)  # sorted, hence the codes
        categories[col], fallback[col] = cats.tolist(), str(cats[counts.argmax()])
    unknown: dict[str, int] = {}

    def encode(table: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty((len(table), len(feature_names)))
        for j, col in enumerate(feature_names):
            values = table[:, columns[col]]
            if col in categories:
                cats = np.asarray(categories[col])
                known = np.isin(values, cats)
                unknown[col] = unknown.get(col, 0) + int((~known).sum())
                x[:, j] = np.searchsorted(cats, np.where(known, values, fallback[col]))
            else:
                try:
                    x[:, j] = values.astype(np.float64)
                except ValueError as err:
                    raise ValueError(f"adult: {path} column {col!r} holds non-numeric values") from err
        # Some distributions of adult.test end labels with a dot ("<=50K."); accept both spellings.
        labels = np.char.rstrip(table[:, columns["class"]], ".")
        if bad := sorted(set(labels.tolist()) - set(_ADULT_CLASSES)):
            raise ValueError(f"adult: {path} has class values {bad}; expected {list(_ADULT_CLASSES)}")
        x.flags.writeable = False
        y = (labels == _ADULT_CLASSES[1]).astype(np.int64)
        y.flags.writeable = False
        return x, y

    train_x, train_y = encode(train_rows, train_path)
    test_x, test_y = encode(test_rows, test_path)
    record = {
        "source": "UCI Adult, adult/adult.data.csv (train) + adult/adult.test.csv (official test)",
        "recipe": "HarsanyiNet: drop fnlwgt/education and '?' rows, label-encode categoricals, z-score",
        "dropped_columns": list(ADULT_DROPPED),
        "dropped_missing_rows": {"train_file": train_dropped, "test_file": test_dropped},
        "categorical": list(ADULT_CATEGORICAL),
        "categories": categories,
        "encoding": "label: code = position in the sorted categories of the training file",
        "unknown_category_fallback": fallback,
        "unknown_categories": unknown,
    }
    return _AdultArrays(train_x, train_y, test_x, test_y, feature_names, record)


def load_adult(
    root: str | os.PathLike | None = None, *, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None
) -> DataBundle:
    """UCI Adult / Census income, HarsanyiNet's recipe: `<root>/adult/adult.data.csv` and `adult.test.csv`.

    - drop `fnlwgt` and `education` (12 features left) and every row holding a `?`;
    - label-encode the categorical columns: sorted categories of the official training file -> 0 .. K-1
      (`preprocessing["categories"][column]` lists them in code order). A test category never seen in
      training is mapped to the training file's most frequent category of that column (the documented
      fallback; `preprocessing["unknown_categories"]` counts them);
    - z-score all 12 columns with the train split's mean / std;
    - val is carved from the training file (stratified, `seed`); test is the official test file.

    The parsed and encoded files are cached in memory, so reloading (another seed) costs only the split.
    """
    folder = resolve_root("adult", root, "adult/adult.data.csv, adult/adult.test.csv") / "adult"
    train_path, test_path = require_files("adult", folder, ["adult.data.csv", "adult.test.csv"])
    data = _encode_adult(train_path, test_path)
    return tabular_bundle(
        "adult",
        data.train_x,
        data.train_y,
        feature_names=list(data.feature_names),
        class_names=list(_ADULT_CLASSES),
        seed=seed,
        val_fraction=val_fraction,
        limit=limit,
        official_test=(data.test_x, data.test_y),
        preprocessing=data.record,
    )


def raw_values(info: DatasetInfo, x: torch.Tensor | np.ndarray) -> list[float | str]:
    """Undo a tabular bundle's preprocessing for one sample, to show raw values next to its attributions.

    Args:
        info: the bundle's `DatasetInfo` (or one restored with `DatasetInfo.from_dict`).
        x: one model input `(D,)`.

    Returns:
        One value per feature: the un-standardised number, or the category name for label-encoded columns.

    Raises:
        ValueError: `info` holds no standardisation record, or `x` has the wrong shape.
    """
    record = info.preprocessing.get("standardize")
    if record is None:
        raise ValueError(f"raw_values: data set {info.name!r} was not standardised; nothing to undo")
    values = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if values.shape != tuple(info.input_shape):
        raise ValueError(f"raw_values: expected one sample of shape {tuple(info.input_shape)}, got {values.shape}")
    std = np.asarray(record["std"])
    raw = values * std + np.asarray(record["mean"])
    # Model inputs are float32: undoing the standardisation leaves residues of ~1e-7 * std; show those as 0.
    raw = np.where(np.abs(raw) < std * 2.0**-20, 0.0, raw)
    categories = info.preprocessing.get("categories", {})
    names = info.feature_names or [str(j) for j in range(len(raw))]
    out: list[float | str] = []
    for name, value in zip(names, raw):
        cats = categories.get(name)
        out.append(cats[int(np.clip(np.rint(value), 0, len(cats) - 1))] if cats else float(value))
    return out
