"""Seeded stratified splits, train-only standardisation and the `limit` cut, shared by every loader.

The order of operations is fixed for every data set: split (test, then val from the rest), fit statistics on
the train split only, apply them to all three splits, then cut train to `limit`. Statistics are fitted before
the cut so a smoke run (`limit=...`) sees exactly the preprocessing of the full run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

__all__ = [
    "TEST_FRACTION",
    "SplitIndices",
    "check_split_args",
    "fit_standardizer",
    "limit_indices",
    "split_indices",
    "stratified_holdout",
]

TEST_FRACTION = 0.2
"""Share of the samples held out for test when a data set has no official test split."""


@dataclass(frozen=True)
class SplitIndices:
    """Row indices of each split into the array(s) they were drawn from."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    stratified: bool
    official_test: bool

    def fingerprint(self) -> str:
        """A short hash of the three index arrays: equal fingerprints mean identical splits."""
        digest = hashlib.sha256()
        for part in (self.train, self.val, self.test):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()[:16]

    def record(self, *, seed: int, val_fraction: float, limit: int | None) -> dict:
        """The JSON-able `DatasetInfo.split` entry: how the split was made and what came out.

        Args:
            seed: the split seed.
            val_fraction: share of the non-test samples sent to val.
            limit: the train cap applied, if any.
        """
        return {
            "seed": int(seed),
            "val_fraction": float(val_fraction),
            "test_fraction": None if self.official_test else TEST_FRACTION,
            "official_test": self.official_test,
            "stratified": self.stratified,
            "limit": limit,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "fingerprint": self.fingerprint(),
        }


def check_split_args(val_fraction: float, limit: int | None) -> None:
    """Reject a `val_fraction` outside [0, 1) or a `limit` that is not a positive int."""
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def stratified_holdout(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Split `indices` into (kept, held-out) with `fraction` held out, stratified by `labels[indices]`.

    Falls back to a plain seeded shuffle split when stratification is impossible (a class with a single
    member, or fewer held-out samples than classes); the returned flag says which happened.
    """
    if fraction == 0.0 or len(indices) == 0:
        return indices, indices[:0], True
    try:
        kept, held = train_test_split(indices, test_size=fraction, random_state=seed, stratify=labels[indices])
        return kept, held, True
    except ValueError:
        kept, held = train_test_split(indices, test_size=fraction, random_state=seed, stratify=None)
        return kept, held, False


def split_indices(
    labels: np.ndarray, *, seed: int, val_fraction: float, official_test_size: int | None = None
) -> SplitIndices:
    """Seeded stratified train / val / test split.

    Args:
        labels: class of every (non-official-test) sample.
        seed: random seed; the same seed gives the same split.
        val_fraction: share of the non-test samples that go to val.
        official_test_size: size of a separate official test set. When given, nothing is held out of `labels`
            for test and `test` is `arange(official_test_size)` (indices into the official test arrays);
            otherwise `TEST_FRACTION` of the samples are held out, stratified.
    """
    every = np.arange(len(labels))
    if official_test_size is None:
        rest, test, strat_test = stratified_holdout(every, labels, TEST_FRACTION, seed)
    else:
        rest, test, strat_test = every, np.arange(official_test_size), True
    train, val, strat_val = stratified_holdout(rest, labels, val_fraction, seed)
    official = official_test_size is not None
    return SplitIndices(train=train, val=val, test=test, stratified=strat_test and strat_val, official_test=official)


def limit_indices(indices: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` of `indices`: a seeded subsample, stratified by class where possible."""
    if limit is None or limit >= len(indices):
        return indices
    try:
        kept, _ = train_test_split(indices, train_size=limit, random_state=seed, stratify=labels[indices])
    except ValueError:  # fewer samples kept than classes, or a singleton class: plain shuffle
        kept, _ = train_test_split(indices, train_size=limit, random_state=seed, stratify=None)
    return kept


def fit_standardizer(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Per-feature mean and std of the train split (population std, as `sklearn.StandardScaler`).

    A constant feature gets std 1 instead of 0 so it maps to 0 rather than NaN; such features are listed in
    the returned record.

    Returns:
        mean, std (both `(D,)` float64) and the JSON-able record `{"mean", "std", "fitted_on", ...}`.
    """
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0)
    constant = np.flatnonzero(std == 0)
    std = np.where(std == 0, 1.0, std)
    record = {"mean": mean.tolist(), "std": std.tolist(), "fitted_on": "train split"}
    if len(constant):
        record["constant_features"] = constant.tolist()
    return mean, std, record
