"""Raw table rows -> model input, with the preprocessing a tabular model was trained with.

A tabular model's `data_info` (in its training checkpoint and in an exported `config.json`) records how raw
columns became model input: the column order (`feature_names`), the category list of every categorical column
(`preprocessing["categories"]`), the values that fill missing cells (`preprocessing["missing"]`) and the train
split's mean / std (`preprocessing["standardize"]`). `TabularPreprocessor` replays that record:

```python
import zoo

model = zoo.load_pretrained("zoo/weights/my_model")      # an exported run; `shapnets export`
x = model.preprocess("new_rows.csv")                      # raw rows, header of the training columns
expl = model.explain(x)
```

Encoding: each categorical column becomes one ordinal input (code = position in the sorted training
categories), then every column is z-scored. One input per original column keeps one Shapley player per column,
so an explanation reads "colour = red: +0.8" rather than splitting a column over one-hot players.

The out-of-range guard: after standardisation, training data lie within a few units of 0. A value far beyond
the training range almost always means the wrong kind of input - raw values where standardised ones were
expected (model called directly), or standardised / rescaled values where raw ones were expected (rows given to
`preprocess`). Both paths warn once, naming the features. "Far beyond" is, per feature, |z| above the larger of
`Z_LIMIT` and twice the largest |z| of the train split. That maximum is recorded for own CSV data
(`standardize["z_max"]`); where it is not recorded (the built-in data sets), it is bounded by sqrt(n_train), since
the squared z-scores of n training values sum to n. A fixed |z| > 10 alone would flag real rows: the test splits of
Breast Cancer, Adult and Digits reach |z| = 13.6, 13.1 and 50.9.

Plain Python + numpy + torch: no pandas needed (a DataFrame is accepted through its `to_dict("records")`).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "GUARD_CALLS",
    "MISSING_TOKENS",
    "Z_LIMIT",
    "OutOfRangeWarning",
    "PreprocessingError",
    "TabularPreprocessor",
    "attach_preprocessing",
    "is_missing",
    "parse_number",
]

MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
"""Cell texts read as a missing value (compared after stripping spaces, case-insensitively)."""

Z_LIMIT = 10.0
"""Smallest |standardised value| reported as out of the training range (the per-feature limit may be larger)."""

GUARD_CALLS = 16
"""Forward calls of a loaded model checked by the out-of-range guard (the guard then removes itself)."""


class PreprocessingError(ValueError):
    """Rows that cannot be turned into model input; the message names the file, row and column."""


class OutOfRangeWarning(UserWarning):
    """Inputs far outside the training range (see `TabularPreprocessor.limits`): raw vs standardised values mixed up."""


def is_missing(value: Any) -> bool:
    """Whether a cell (text, number or None) counts as missing."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in MISSING_TOKENS


def parse_number(value: Any) -> float | None:
    """A finite float from a cell, or `None` when it is not a number (`"abc"`, `"inf"`, `"1,5"`)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
    else:
        try:
            number = float(str(value).strip())
        except ValueError:
            return None
    return number if math.isfinite(number) else None


def _cell_text(value: Any) -> str:
    """Category text of a cell: strings stripped; integral numbers without a trailing `.0` (as a CSV spells them)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def read_csv_rows(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and `(line number, cells)` of every non-blank row of a CSV file (UTF-8, BOM allowed).

    Raises:
        PreprocessingError: an empty file, a header with empty or repeated names, or a row whose number of
            fields differs from the header's (naming the row and line).
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        rows: list[tuple[int, list[str]]] = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                continue
            if len(cells) != len(header):
                raise PreprocessingError(
                    f"{path}: row {len(rows) + 1} (line {reader.line_num}) has {len(cells)} fields, the header has "
                    f"{len(header)}"
                )
            rows.append((reader.line_num, cells))
    if header is None:
        raise PreprocessingError(f"{path}: the file is empty (no header row, no data rows)")
    if not rows:
        raise PreprocessingError(f"{path}: the file has a header but no data rows")
    if empty := [i + 1 for i, h in enumerate(header) if not h]:
        raise PreprocessingError(f"{path}: header column(s) {empty} have no name")
    if repeated := sorted({h for h in header if header.count(h) > 1}):
        raise PreprocessingError(f"{path}: header names {repeated} appear more than once")
    return header, rows


class TabularPreprocessor:
    """The fitted preprocessing of a tabular model, applied to raw rows.

    Build it with `from_data_info` from a model's `data_info` (a dict or a `training.data.DatasetInfo`). Call it
    (or `transform`) on a CSV path, a mapping of one row, a list of mappings, or a pandas DataFrame; the result is
    the float32 `(N, D)` model input.

    Attributes:
        feature_names: the model's input columns, in input order.
        categories: category list per categorical column (code = position).
        mean, std: per-column standardisation (0 / 1 when the data set was not standardised).
        fill: raw value (number or category) that replaces a missing cell, per column; columns without one
            refuse missing cells.
        limits: per column, the |z| above which an input counts as far outside the training range.
        target: the target column's name (optional in input rows; read as labels when present).
        class_names: class names in label order.
        ignored: column names allowed in input rows and ignored (the columns dropped in training).
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        *,
        categories: Mapping[str, Sequence[str]] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        fill: Mapping[str, float | str] | None = None,
        target: str | None = None,
        class_names: Sequence[str] | None = None,
        ignored: Sequence[str] = (),
        train_z_max: Sequence[float] | float | None = None,
    ) -> None:
        self.feature_names = [str(f) for f in feature_names]
        d = len(self.feature_names)
        self.categories = {str(k): [str(c) for c in v] for k, v in (categories or {}).items()}
        self._codes = {k: {c: i for i, c in enumerate(v)} for k, v in self.categories.items()}
        if unknown := sorted(set(self.categories) - set(self.feature_names)):
            raise ValueError(f"TabularPreprocessor: categories for unknown columns {unknown}")
        self.mean = np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = np.ones(d) if std is None else np.asarray(std, dtype=np.float64)
        if self.mean.shape != (d,) or self.std.shape != (d,):
            raise ValueError(f"TabularPreprocessor: {d} columns but mean {self.mean.shape} and std {self.std.shape}")
        self.fill = dict(fill or {})
        self.target = target
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.ignored = [str(c) for c in ignored]
        # Far outside = beyond twice the training range, and never below Z_LIMIT.
        z_max = np.zeros(d) if train_z_max is None else np.broadcast_to(np.asarray(train_z_max, np.float64), (d,))
        self.limits = torch.from_numpy(np.maximum(Z_LIMIT, 2.0 * z_max)).float()

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def from_data_info(cls, info: Any) -> TabularPreprocessor:
        """The preprocessing recorded in a `data_info` (dict, or object with `to_dict`).

        Raises:
            ValueError: not a tabular data set (no `feature_names`).
        """
        d = info.to_dict() if hasattr(info, "to_dict") else dict(info)
        names = d.get("feature_names")
        if not names or len(d.get("input_shape", [len(names)])) != 1:
            raise ValueError(f"data set {d.get('name')!r} is not tabular (no feature names): nothing to preprocess")
        record = d.get("preprocessing") or {}
        standardize = record.get("standardize") or {}
        missing = record.get("missing") or {}
        z_max = standardize.get("z_max")
        if z_max is None:  # not recorded: the largest |z| n training values can have is sqrt(n)
            n_train = (d.get("split") or {}).get("sizes", {}).get("train")
            z_max = math.sqrt(n_train) if n_train else None
        return cls(
            names,
            categories=record.get("categories"),
            mean=standardize.get("mean"),
            std=standardize.get("std"),
            fill=missing.get("fill") if missing.get("policy", "impute") == "impute" else None,
            target=record.get("target"),
            class_names=d.get("class_names"),
            ignored=record.get("dropped_columns", ()),
            train_z_max=z_max,
        )

    # ---------------------------------------------------------------------------------------------- encoding
    def encode_value(self, column: str, value: Any, where: str) -> float:
        """One raw cell -> its unstandardised number (category code for categorical columns).

        Args:
            column: the column name (one of `feature_names`).
            value: the raw cell.
            where: "file, row N (line M)" prefix for messages.

        Raises:
            PreprocessingError: a missing cell without a fill value, an unknown category, a non-number in a
                numeric column; naming `where` and the column.
        """
        if is_missing(value):
            if column not in self.fill:
                raise PreprocessingError(f"{where}, column {column!r}: the value is missing and this model has no "
                                         "fill value for it (its training data had none missing)")
            value = self.fill[column]
        codes = self._codes.get(column)
        if codes is not None:
            text = _cell_text(value)
            if text not in codes:
                cats = self.categories[column]
                shown = ", ".join(repr(c) for c in cats[:12]) + (" ..." if len(cats) > 12 else "")
                raise PreprocessingError(f"{where}, column {column!r}: {text!r} is not a category seen in training "
                                         f"({shown})")
            return float(codes[text])
        number = parse_number(value)
        if number is None:
            raise PreprocessingError(f"{where}, column {column!r}: {value!r} is not a number (a numeric column)")
        return number

    def encode(self, rows: Any, source: str | None = None) -> tuple[Tensor, list[int | None]]:
        """Raw rows -> (`(N, D)` float32 model input, label per row or `None` where the target is absent).

        Args:
            rows: a CSV path, a mapping of one row, an iterable of mappings, or a pandas DataFrame.
            source: name used in messages (default: the file name, or "rows").

        Raises:
            PreprocessingError: columns that differ from the training ones, or a bad cell (file, row, column).

        Warns:
            OutOfRangeWarning: once, when standardised values exceed `limits` (see `check_range`).
        """
        columns, records, source = self._records(rows, source)
        self._check_columns(columns, source)
        x = np.empty((len(records), len(self.feature_names)))
        labels: list[int | None] = []
        for r, (line, row) in enumerate(records):
            where = f"{source}: row {r + 1}" + (f" (line {line})" if line is not None else "")
            for j, name in enumerate(self.feature_names):
                x[r, j] = self.encode_value(name, row[name], where)
            labels.append(self._label(row, where))
        z = (x - self.mean) / self.std
        out = torch.from_numpy(z.astype(np.float32))
        self.check_range(out, source=source, given="raw")
        return out, labels

    def transform(self, rows: Any, source: str | None = None) -> Tensor:
        """Raw rows -> `(N, D)` float32 model input (see `encode`, which also returns the labels)."""
        return self.encode(rows, source)[0]

    __call__ = transform

    def inverse(self, x: Tensor | np.ndarray) -> list[list[float | str]]:
        """Model input `(N, D)` -> raw values per row (numbers, category names for categorical columns)."""
        values = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64)
        raw = values.reshape(-1, len(self.feature_names)) * self.std + self.mean
        out: list[list[float | str]] = []
        for row in raw:
            decoded: list[float | str] = []
            for name, value in zip(self.feature_names, row):
                cats = self.categories.get(name)
                decoded.append(cats[int(np.clip(np.rint(value), 0, len(cats) - 1))] if cats else float(value))
            out.append(decoded)
        return out

    # ---------------------------------------------------------------------------------------------- the guard
    def out_of_range(self, x: Tensor) -> dict[str, float]:
        """Columns whose standardised values exceed their `limits` in `x` (`(N, D)` model input) -> largest |z|."""
        if x.dim() != 2 or x.shape[1] != len(self.feature_names) or not len(x):
            return {}
        worst = x.detach().abs().amax(0).float().cpu()
        return {self.feature_names[j]: float(worst[j]) for j in torch.nonzero(worst > self.limits).flatten().tolist()}

    def _first_rows(self, x: Tensor, names: Iterable[str]) -> dict[str, int]:
        """1-based index of the first row exceeding the limit, per named column."""
        far = x.detach().abs().float().cpu() > self.limits
        return {n: int(far[:, self.feature_names.index(n)].nonzero()[0, 0]) + 1 for n in names}

    def check_range(self, x: Tensor, *, source: str = "inputs", given: str = "standardised") -> dict[str, float]:
        """Warn (one `OutOfRangeWarning`) when model input `x` lies far outside the training range.

        Args:
            x: `(N, D)` model input.
            source: what the rows are, for the message.
            given: `"raw"` when `x` came from raw rows through this preprocessor (then the likely cause is
                values already standardised or in other units), `"standardised"` when `x` was given to the model
                directly (then the likely cause is raw values).

        Returns:
            The offending columns and their largest |z| (empty: nothing to report).
        """
        found = self.out_of_range(x)
        if found:
            first = self._first_rows(x, found)
            limit = {name: float(self.limits[self.feature_names.index(name)]) for name in found}
            listed = ", ".join(f"{name} (|z| up to {z:.3g} > {limit[name]:.3g}, first in row {first[name]})"
                               for name, z in sorted(found.items(), key=lambda t: -t[1]))
            if given == "raw":
                cause = ("the rows were read as raw values; were they already standardised, or in other units than "
                         "the training file?")
            else:
                cause = ("the model expects standardised input; were raw values given? Pass raw rows through "
                         "model.preprocess(rows) (or `shapnets explain RUN --input rows.csv`)")
            warnings.warn(
                f"{source}: {len(found)} feature(s) lie far outside the training range (|z| = distance from the "
                f"training mean in training standard deviations, limit max({Z_LIMIT:g}, twice the training "
                f"maximum)): {listed}. Likely cause: {cause}",
                OutOfRangeWarning,
                stacklevel=3,
            )
        return found

    # ---------------------------------------------------------------------------------------------- helpers
    def _records(self, rows: Any, source: str | None) -> tuple[list[str], list[tuple[int | None, Mapping]], str]:
        if isinstance(rows, (str, os.PathLike)):
            path = Path(rows)
            if not path.is_file():
                raise PreprocessingError(f"no such CSV file: {path}")
            header, cells = read_csv_rows(path)
            return header, [(line, dict(zip(header, c))) for line, c in cells], source or str(path)
        if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
            return [str(c) for c in rows.columns], [(None, r) for r in rows.to_dict("records")], source or "rows"
        if isinstance(rows, Mapping):
            rows = [rows]
        if not isinstance(rows, Iterable):
            raise PreprocessingError(f"rows must be a CSV path, a mapping, mappings or a DataFrame; got "
                                     f"{type(rows).__name__}")
        records = list(rows)
        if not records:
            raise PreprocessingError(f"{source or 'rows'}: no rows given")
        if not all(isinstance(r, Mapping) for r in records):
            raise PreprocessingError("rows must be mappings of column name -> value (one per row), so that columns "
                                     "are matched by name")
        columns = sorted({str(k) for r in records for k in r}, key=lambda c: (c not in self.feature_names, c))
        for r, row in enumerate(records):
            if lacking := [c for c in self.feature_names if c not in row]:
                raise PreprocessingError(f"{source or 'rows'}: row {r + 1} lacks column(s) {lacking}")
        return columns, [(None, r) for r in records], source or "rows"

    def _check_columns(self, columns: Sequence[str], source: str) -> None:
        allowed = {*self.feature_names, *self.ignored, *([self.target] if self.target else [])}
        missing = [c for c in self.feature_names if c not in columns]
        unexpected = [c for c in columns if c not in allowed]
        if missing or unexpected:
            raise PreprocessingError(
                f"{source}: the columns differ from the training ones: missing {missing}, unexpected {unexpected} "
                f"(training columns: {', '.join(self.feature_names)}"
                + (f"; target {self.target!r} optional" if self.target else "") + ")"
            )

    def _label(self, row: Mapping, where: str) -> int | None:
        if not self.target or self.target not in row or is_missing(row[self.target]) or self.class_names is None:
            return None
        text = _cell_text(row[self.target])
        number = parse_number(text)
        if text not in self.class_names and number is not None and number.is_integer():
            text = str(int(number))  # integer classes: "1.0" and "1" name the same class
        if text not in self.class_names:
            raise PreprocessingError(f"{where}, column {self.target!r}: {text!r} is not one of the training classes "
                                     f"({', '.join(self.class_names)})")
        return self.class_names.index(text)

    def __repr__(self) -> str:
        cats = ", ".join(self.categories) or "none"
        return f"TabularPreprocessor({len(self.feature_names)} columns; categorical: {cats}; target: {self.target})"


class _RangeGuard:
    """The out-of-range check shared by `model(x)` (forward pre-hook) and `model.explain(x)`.

    A class rather than a closure so that `copy.deepcopy` and pickling carry it along with the model. Only the
    first `GUARD_CALLS` calls are checked (a mix-up shows at once), so later batches, on a GPU especially, do not
    pay the host-device sync the check needs.
    """

    def __init__(self, pre: TabularPreprocessor) -> None:
        self.pre, self.calls, self.done = pre, 0, False

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.done or not args or not isinstance(args[0], Tensor):
            return
        self.calls += 1
        found = self.pre.check_range(args[0], source=f"{type(module).__name__} input", given="standardised")
        self.done = bool(found) or self.calls >= GUARD_CALLS


class _GuardedExplain:
    """`model.explain` with the range check first; keeps the class's signature otherwise."""

    def __init__(self, model: nn.Module, guard: _RangeGuard) -> None:
        self.model, self.guard = model, guard

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        self.guard(self.model, (x,))
        return type(self.model).explain(self.model, x, *args, **kwargs)


def attach_preprocessing(model: nn.Module, info: Any) -> TabularPreprocessor | None:
    """Give a loaded tabular model `model.preprocess` and a guard against out-of-range inputs.

    `model.preprocess(rows)` turns raw rows into model input. `model(x)` and `model.explain(x)` warn once (per
    model) when `x` lies far beyond the training range (`TabularPreprocessor.limits`) - raw values where
    standardised ones were expected; the first `GUARD_CALLS` calls are checked. Models of non-tabular data are
    left unchanged.

    Returns:
        The preprocessor, or `None` for a non-tabular data set.
    """
    try:
        pre = TabularPreprocessor.from_data_info(info)
    except (ValueError, TypeError):
        return None
    model.preprocess = pre
    guard = _RangeGuard(pre)
    model.register_forward_pre_hook(guard)
    if callable(getattr(type(model), "explain", None)):
        model.explain = _GuardedExplain(model, guard)
    return pre
