"""The types every loader returns, and where data files are looked for.

One place for: the `DatasetInfo` record (what a checkpoint must remember about its data), the `DataBundle`
of train / val / test splits, the tensor-backed `ArrayDataset`, and the root-folder resolution with its
error messages.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DATA_ENV", "ArrayDataset", "DataBundle", "DatasetInfo", "json_native", "require_files", "resolve_root"]

DATA_ENV = "SHAPNETS_DATA"
"""Environment variable naming the folder that holds the real data sets (`mnist/`, `adult/`, `yeast/`, ...)."""


def json_native(value: Any, where: str = "value") -> Any:
    """Convert `value` to plain JSON types (dict / list / str / int / float / bool / None).

    Tuples become lists and numpy scalars become Python numbers, so a record compares equal to itself after a
    `json.dumps` / `json.loads` round trip.

    Raises:
        TypeError: a value JSON cannot hold (naming where it sits), or a non-string dict key.
        ValueError: a NaN or infinite float (JSON has no spelling for them).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            raise ValueError(f"{where}: JSON cannot hold the non-finite number {value}")
        return float(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: dict keys must be str for JSON, got {type(key).__name__} {key!r}")
            out[key] = json_native(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [json_native(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.ndarray):
        return json_native(value.tolist(), where)
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable")


@dataclass
class DatasetInfo:
    """What a model must remember about the data it was trained on; JSON-able via `to_dict` / `from_dict`.

    Attributes:
        name: the registry name (`load_dataset(name)`).
        num_classes: number of classes; labels are `0 .. num_classes - 1`.
        input_shape: per-sample shape of `x`, e.g. `(30,)` for tabular or `(1, 28, 28)` for images.
        feature_names: one name per tabular feature; `None` for images.
        class_names: one name per class, in label order.
        preprocessing: how raw data became model input (statistics, category maps, constants), JSON-able.
        reference: suggested Shapley reference in model-input space - one value per feature (tabular) or per
            channel (images, the form `ConvShapNet(reference=...)` takes); `None` when there is no better
            choice than the model's default.
        split: how train / val / test were made (seed, fractions, sizes, whether the test set is official).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]
    feature_names: list[str] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    reference: list[float] | None = None
    split: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.class_names = [str(c) for c in self.class_names]
        if self.num_classes < 1 or len(self.class_names) != self.num_classes:
            raise ValueError(
                f"DatasetInfo({self.name!r}): num_classes={self.num_classes} but {len(self.class_names)} class names"
            )
        if self.feature_names is not None:
            self.feature_names = [str(f) for f in self.feature_names]
            if len(self.input_shape) != 1 or len(self.feature_names) != self.input_shape[0]:
                raise ValueError(
                    f"DatasetInfo({self.name!r}): {len(self.feature_names)} feature names for input shape "
                    f"{self.input_shape}; feature names need a 1-D input with one name per feature"
                )
        if self.reference is not None:
            self.reference = [float(r) for r in self.reference]
            if len(self.reference) != self.input_shape[0]:
                raise ValueError(
                    f"DatasetInfo({self.name!r}): reference has {len(self.reference)} values, expected "
                    f"{self.input_shape[0]} (one per feature or channel, the first axis of {self.input_shape})"
                )
        self.preprocessing = json_native(self.preprocessing, f"DatasetInfo({self.name!r}).preprocessing")
        self.split = json_native(self.split, f"DatasetInfo({self.name!r}).split")

    def to_dict(self) -> dict[str, Any]:
        """A plain-JSON dict (tuples as lists) that `from_dict` turns back into an equal `DatasetInfo`."""
        return json_native(asdict(self), "DatasetInfo")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        """Rebuild from `to_dict()` output (or its JSON round trip).

        Raises:
            ValueError: missing required keys or unknown keys, both named.
        """
        names = {f.name for f in fields(cls)}
        required = {"name", "num_classes", "input_shape", "class_names"}
        unknown, missing = sorted(set(d) - names), sorted(required - set(d))
        if unknown or missing:
            raise ValueError(f"DatasetInfo.from_dict: unknown keys {unknown}, missing keys {missing}")
        return cls(**d)

    def to_json(self) -> str:
        """`to_dict()` as a JSON string."""
        return json.dumps(self.to_dict())


class ArrayDataset(TensorDataset):
    """In-memory `(x, y)` pairs: `x` float32 of the documented per-sample shape, `y` an int64 scalar tensor.

    A plain `TensorDataset` (no lambdas, no open files), so it pickles for DataLoader workers and DDP. The
    whole split is available as `features` / `labels` for full-batch evaluation.
    """

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        if features.dtype != torch.float32:
            raise TypeError(f"ArrayDataset: features must be float32, got {features.dtype}")
        if labels.dtype != torch.int64 or labels.dim() != 1:
            raise TypeError(
                f"ArrayDataset: labels must be a 1-D int64 tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        if len(features) != len(labels):
            raise ValueError(f"ArrayDataset: {len(features)} samples but {len(labels)} labels")
        super().__init__(features, labels)

    @property
    def features(self) -> Tensor:
        """All inputs, `(N, *input_shape)` float32."""
        return self.tensors[0]

    @property
    def labels(self) -> Tensor:
        """All labels, `(N,)` int64."""
        return self.tensors[1]

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, x={tuple(self.features.shape[1:])})"


@dataclass
class DataBundle:
    """A data set's three splits plus the `DatasetInfo` describing them.

    Attributes:
        train: training split (possibly cut to `limit` samples).
        val: validation split carved from the training data (may be empty when `val_fraction=0`).
        test: held-out test split (the official one where the data set has it).
        info: shapes, names, preprocessing, reference and split record.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    info: DatasetInfo

    def sizes(self) -> dict[str, int]:
        """Number of samples per split."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}  # type: ignore[arg-type]

    @classmethod
    def from_split(cls, make: Any, x: Any, y: Any, test_x: Any, test_y: Any, idx: Any, info: DatasetInfo) -> DataBundle:
        """Train and validation carved from `(x, y)` by `idx.train` / `idx.val`, test from `(test_x, test_y)` by
        `idx.test`, each built by `make(features, labels, indices)`."""
        return cls(train=make(x, y, idx.train), val=make(x, y, idx.val), test=make(test_x, test_y, idx.test),
                   info=info)


def resolve_root(name: str, root: str | os.PathLike | None, needed: str) -> Path:
    """The data folder for `name`: `root`, else `$SHAPNETS_DATA`.

    Args:
        name: data set name, for messages.
        root: the folder the caller passed, or `None`.
        needed: what the folder should hold, for messages (e.g. `"mnist/train-images-idx3-ubyte.gz, ..."`).

    Raises:
        FileNotFoundError: neither is set, or the folder does not exist; names the data set, the folder looked
            in and `SHAPNETS_DATA`.
    """
    if root is None:
        env = os.environ.get(DATA_ENV)
        if not env:
            raise FileNotFoundError(
                f"data set {name!r} needs files ({needed}) but no folder was given: pass root=... or set the "
                f"{DATA_ENV} environment variable to the folder holding them (looked in: nothing, {DATA_ENV} unset)"
            )
        root, origin = env, f"${DATA_ENV}"
    else:
        origin = "root"
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data set {name!r}: the data folder {str(path)!r} (from {origin}) does not exist; it should hold "
            f"{needed}. Pass root=... or set {DATA_ENV}"
        )
    return path


def require_files(name: str, folder: Path, files: Sequence[str]) -> list[Path]:
    """Paths of `files` under `folder`, all of which must exist.

    Raises:
        FileNotFoundError: naming the data set, the folder looked in, the missing files and `SHAPNETS_DATA`.
    """
    paths = [folder / f for f in files]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"data set {name!r}: missing {missing} in {str(folder)!r} (expected {list(files)}). Point root=... or "
            f"{DATA_ENV} at the folder that holds the data sets; nothing is downloaded"
        )
    return paths
