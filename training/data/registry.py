"""The name -> loader table behind `load_dataset` and `list_datasets`."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from .core import DataBundle
from .images import load_cifar10, load_fashion_mnist, load_mnist
from .own import load_csv, load_image_folder
from .parts import load_parts
from .parts_hard import load_parts_hard
from .synthetic import load_synthetic_images, load_synthetic_tabular
from .tabular import load_adult, load_sklearn, load_yeast

__all__ = ["list_datasets", "load_dataset"]

# Every loader takes (root, *, seed, val_fraction, limit); those that need no files ignore root.
_Loader = Callable[..., DataBundle]


def _without_root(loader: Callable[..., DataBundle]) -> _Loader:
    def load(root: str | os.PathLike | None, **kwargs: object) -> DataBundle:
        return loader(**kwargs)

    return load


_LOADERS: dict[str, _Loader] = {
    "adult": load_adult,
    "breast_cancer": _without_root(functools.partial(load_sklearn, "breast_cancer")),
    "cifar10": load_cifar10,
    "digits": _without_root(functools.partial(load_sklearn, "digits")),
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "parts": _without_root(load_parts),
    "parts_hard": _without_root(load_parts_hard),
    "synthetic_images": _without_root(load_synthetic_images),
    "synthetic_tabular": _without_root(load_synthetic_tabular),
    "wine": _without_root(functools.partial(load_sklearn, "wine")),
    "yeast": load_yeast,
}
# The user's own data: these loaders also take options (path, target, ...), see `training.data.own`.
_OWN_LOADERS: dict[str, _Loader] = {"csv": load_csv, "image_folder": load_image_folder}


def list_datasets() -> list[str]:
    """Names accepted by `load_dataset`, sorted."""
    return sorted([*_LOADERS, *_OWN_LOADERS])


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    limit: int | None = None,
    **options: object,
) -> DataBundle:
    """Load a data set as train / val / test `ArrayDataset`s plus its `DatasetInfo`.

    Args:
        name: one of `list_datasets()`.
        root: folder holding the data files (`mnist/`, `adult/`, `yeast/`, `FashionMNIST/raw/`,
            `cifar-10-batches-py/`); `None` falls back to `$SHAPNETS_DATA`. Ignored by data sets that need no
            files (scikit-learn's bundled ones and the synthetic ones).
        seed: split seed; the same seed gives the same split (recorded in `info.split`).
        val_fraction: share of the training data held out for validation, in [0, 1).
        limit: keep at most this many train samples (a seeded stratified subsample) for smoke runs;
            preprocessing statistics are still those of the full train split.
        **options: for `csv` (`path`, `target`, `categorical`, `drop`, `missing`, `test_fraction`) and
            `image_folder` (`path`, `image_size`, `channels`, `test_fraction`); see `training.data.own`.

    Raises:
        ValueError: an unknown name (listing the valid ones), or a bad `val_fraction` / `limit`.
        FileNotFoundError: the data set needs files and they are not in `root` / `$SHAPNETS_DATA`.
    """
    own = _OWN_LOADERS.get(name)
    if own is not None:
        return own(root, seed=seed, val_fraction=val_fraction, limit=limit, **options)
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(list_datasets())}")
    if options:
        raise ValueError(f"data set {name!r} takes no options {sorted(options)} (they are for csv / image_folder)")
    return loader(root, seed=seed, val_fraction=val_fraction, limit=limit)
