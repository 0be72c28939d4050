"""Tests of `training.data`: shapes and class counts, splits, train-only statistics, records, errors.

Real data sets go through the `data_root` fixture (skipped when absent); Fashion-MNIST, CIFAR-10, MNIST's
IDX checks and Adult's category fallback are tested on tiny stand-ins written in a tmp dir.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.data import (
    DATA_ENV,
    ArrayDataset,
    DatasetInfo,
    list_datasets,
    load_dataset,
    raw_values,
    read_idx,
    synthetic_tabular_scores,
)
from training.data.images import MNIST_MEAN, MNIST_STD
from training.data.splits import TEST_FRACTION, split_indices

NO_FILES = ["breast_cancer", "digits", "wine", "synthetic_tabular", "synthetic_images"]
REAL = ["adult", "yeast", "mnist"]

# name -> (per-sample input shape, classes, total samples in train + val + test)
DOCUMENTED = {
    "breast_cancer": ((30,), 2, 569),
    "digits": ((64,), 10, 1797),
    "wine": ((13,), 3, 178),
    "synthetic_tabular": ((8,), 3, 1500),
    "synthetic_images": ((1, 8, 8), 4, 1250),
    "yeast": ((8,), 10, 1484),
    "adult": ((12,), 2, 30162 + 15061),  # rows without '?' in this copy's train / test files
    "mnist": ((1, 28, 28), 10, 70000),
}


def rows_of(ds: ArrayDataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in ds.features}


def check_bundle(bundle, name: str) -> None:
    """Documented shape / classes / size, sample dtypes, and a self-consistent info record."""
    shape, classes, total = DOCUMENTED[name]
    info = bundle.info
    assert info.name == name and info.input_shape == shape and info.num_classes == classes
    assert len(info.class_names) == classes
    assert sum(bundle.sizes().values()) == total
    x, y = bundle.train[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == shape
    assert y.dtype == torch.int64 and y.dim() == 0
    for part in (bundle.train, bundle.val, bundle.test):
        assert part.labels.min() >= 0 and part.labels.max() < classes
        assert torch.isfinite(part.features).all()
    assert set(bundle.train.labels.tolist()) == set(range(classes)), "every class appears in train"
    if len(shape) == 1:
        assert info.feature_names is not None and len(info.feature_names) == shape[0]
    assert info.reference is not None and len(info.reference) == shape[0]
    assert info.split["sizes"] == bundle.sizes()


@pytest.fixture(scope="module")
def real_bundles(data_root: Path) -> dict:
    return {name: load_dataset(name, data_root) for name in REAL}


# ---------------------------------------------------------------- registry and errors


def test_list_datasets_names_every_documented_set() -> None:
    assert list_datasets() == sorted([*DOCUMENTED, "fashion_mnist", "cifar10", "parts", "parts_hard", "csv",
                                      "image_folder"])


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown data set 'mnsit'.*breast_cancer.*yeast"):
        load_dataset("mnsit")


@pytest.mark.parametrize("name", ["mnist", "adult", "yeast", "fashion_mnist", "cifar10"])
def test_missing_root_names_dataset_and_env(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=f"{name}.*{DATA_ENV}"):
        load_dataset(name)


def test_missing_files_name_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=rf"'mnist'.*train-images-idx3-ubyte.gz.*{tmp_path / 'mnist'}"):
        load_dataset("mnist", tmp_path)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"nowhere.*\${DATA_ENV}"):
        load_dataset("yeast")


def test_file_free_sets_ignore_a_missing_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert load_dataset("wine").info.num_classes == 3


@pytest.mark.parametrize(("kwargs", "match"), [({"val_fraction": 1.0}, "val_fraction"), ({"limit": 0}, "limit")])
def test_bad_split_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset("wine", **kwargs)


# ---------------------------------------------------------------- shapes, splits, statistics


@pytest.mark.parametrize("name", NO_FILES)
def test_file_free_sets_have_documented_shapes(name: str) -> None:
    check_bundle(load_dataset(name), name)


@pytest.mark.parametrize("name", REAL)
def test_real_sets_have_documented_shapes(name: str, real_bundles: dict) -> None:
    check_bundle(real_bundles[name], name)


def test_real_split_sizes(real_bundles: dict) -> None:
    adult, yeast, mnist = (real_bundles[n] for n in REAL)
    assert adult.info.split["official_test"] and len(adult.test) == 15061
    assert len(adult.train) + len(adult.val) == 30162
    assert adult.info.preprocessing["dropped_missing_rows"] == {"train_file": 32561 - 30162, "test_file": 1220}
    assert yeast.sizes() == {"train": 1068, "val": 119, "test": 297}
    assert not yeast.info.split["official_test"] and yeast.info.split["test_fraction"] == TEST_FRACTION
    assert mnist.sizes() == {"train": 54000, "val": 6000, "test": 10000}


@pytest.mark.parametrize("name", ["breast_cancer", "synthetic_tabular"])
def test_splits_are_disjoint(name: str) -> None:
    bundle = load_dataset(name)
    parts = [rows_of(p) for p in (bundle.train, bundle.val, bundle.test)]
    assert sum(map(len, parts)) == sum(bundle.sizes().values()), "no duplicated rows, so rows identify samples"
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def class_shares(ds: ArrayDataset, num_classes: int) -> np.ndarray:
    return np.bincount(ds.labels.numpy(), minlength=num_classes) / len(ds)


@pytest.mark.parametrize("name", ["breast_cancer", "synthetic_tabular", "digits"])
def test_splits_are_stratified(name: str) -> None:
    bundle = load_dataset(name)
    shares = [class_shares(p, bundle.info.num_classes) for p in (bundle.train, bundle.val, bundle.test)]
    assert np.abs(shares[0] - shares[2]).max() < 0.02 and np.abs(shares[0] - shares[1]).max() < 0.05
    assert bundle.info.split["stratified"]


def test_real_splits_are_stratified(real_bundles: dict) -> None:
    for name, bundle in real_bundles.items():
        held = bundle.test if name == "yeast" else bundle.val  # adult / mnist: only val is drawn by us
        diff = class_shares(bundle.train, bundle.info.num_classes) - class_shares(held, bundle.info.num_classes)
        assert np.abs(diff).max() < 0.01, name
        assert bundle.info.split["stratified"], name


def test_split_indices_partition_and_stratify() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 30, 140])
    idx = split_indices(labels, seed=3, val_fraction=0.25)
    every = np.concatenate([idx.train, idx.val, idx.test])
    assert np.array_equal(np.sort(every), np.arange(len(labels)))
    assert len(idx.test) == round(TEST_FRACTION * len(labels))
    for part in (idx.train, idx.val, idx.test):
        share = np.bincount(labels[part], minlength=4) / len(part)
        assert np.allclose(share, np.bincount(labels) / len(labels), atol=0.03)


@pytest.mark.parametrize("name", ["breast_cancer", "digits", "synthetic_tabular"])
def test_standardisation_uses_train_statistics_only(name: str) -> None:
    bundle = load_dataset(name)
    train, test = bundle.train.features.double(), bundle.test.features.double()
    varying = train.std(0) > 0  # digits has always-blank border pixels
    assert torch.allclose(train.mean(0), torch.zeros(train.shape[1], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(
        train[:, varying].std(0, unbiased=False), torch.ones(int(varying.sum()), dtype=torch.float64), atol=1e-4
    )
    assert test.mean(0)[varying].abs().max() > 1e-3, "test statistics were not used"
    record = bundle.info.preprocessing["standardize"]
    assert record["fitted_on"] == "train split" and len(record["mean"]) == train.shape[1]


def test_limit_keeps_preprocessing_and_classes() -> None:
    full, small = load_dataset("digits"), load_dataset("digits", limit=50)
    assert len(small.train) == 50 and len(small.val) == len(full.val) and len(small.test) == len(full.test)
    assert set(small.train.labels.tolist()) == set(range(10)), "stratified subsample"
    assert small.info.preprocessing == full.info.preprocessing
    assert rows_of(small.train) <= rows_of(full.train)
    assert small.info.split["limit"] == 50 and small.info.split["sizes"]["train"] == 50


def test_val_fraction_zero_gives_an_empty_val() -> None:
    bundle = load_dataset("wine", val_fraction=0.0)
    assert len(bundle.val) == 0 and len(bundle.train) + len(bundle.test) == 178


@pytest.mark.parametrize("name", ["wine", "synthetic_images"])
def test_same_seed_same_data_other_seed_other_split(name: str) -> None:
    a, b, c = load_dataset(name, seed=7), load_dataset(name, seed=7), load_dataset(name, seed=8)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part).features, getattr(b, part).features)
        assert torch.equal(getattr(a, part).labels, getattr(b, part).labels)
    assert a.info == b.info
    assert a.info.split["fingerprint"] != c.info.split["fingerprint"]
    assert not torch.equal(a.train.features, c.train.features)


# ---------------------------------------------------------------- records


@pytest.mark.parametrize("name", NO_FILES)
def test_info_round_trips_through_json(name: str) -> None:
    info = load_dataset(name).info
    assert DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    assert DatasetInfo.from_dict(json.loads(info.to_json())) == info


def test_real_info_round_trips_through_json(real_bundles: dict) -> None:
    for bundle in real_bundles.values():
        assert DatasetInfo.from_dict(json.loads(bundle.info.to_json())) == bundle.info


def test_info_rejects_inconsistent_records() -> None:
    good = load_dataset("wine").info.to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        DatasetInfo.from_dict({**good, "colour": "red"})
    with pytest.raises(ValueError, match=r"missing keys \['num_classes'\]"):
        DatasetInfo.from_dict({k: v for k, v in good.items() if k != "num_classes"})
    with pytest.raises(ValueError, match="num_classes=4 but 3 class names"):
        DatasetInfo.from_dict({**good, "num_classes": 4})
    with pytest.raises(ValueError, match="reference has 2 values, expected 13"):
        DatasetInfo.from_dict({**good, "reference": [0.0, 0.0]})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        DatasetInfo.from_dict({**good, "preprocessing": {"fn": object()}})


def test_datasets_pickle_and_batch() -> None:
    bundle = load_dataset("synthetic_images")
    clone = pickle.loads(pickle.dumps(bundle.train))
    assert torch.equal(clone.features, bundle.train.features)
    x, y = next(iter(DataLoader(bundle.train, batch_size=16)))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (16,) and y.dtype == torch.int64


# ---------------------------------------------------------------- synthetic sets


def test_synthetic_tabular_labels_follow_the_rule() -> None:
    bundle = load_dataset("synthetic_tabular")
    record = bundle.info.preprocessing["standardize"]
    for part in (bundle.train, bundle.test):
        raw = part.features.double().numpy() * np.array(record["std"]) + np.array(record["mean"])
        assert np.array_equal(synthetic_tabular_scores(raw).argmax(1), part.labels.numpy())


def test_synthetic_images_background_is_the_reference() -> None:
    bundle = load_dataset("synthetic_images")
    x = bundle.train.features
    lit = x != bundle.info.reference[0]
    assert (lit.flatten(1).sum(1) == 4).all(), "one 4-pixel shape per image, everything else background"
    assert x.min() == 0 and x.max() <= 1


def test_image_reference_gives_background_exactly_zero_attribution() -> None:
    from shapnets import ConvShapNet

    bundle = load_dataset("synthetic_images")
    model = ConvShapNet(in_chans=1, num_classes=4, channels=(8,), reference=bundle.info.reference)
    x = bundle.test.features[:8]
    explanation = model.explain(x)
    background = x[:, 0] == bundle.info.reference[0]
    assert background.any() and (~background).any()
    assert torch.equal(explanation.attributions[background], torch.zeros_like(explanation.attributions[background]))


# ---------------------------------------------------------------- adult and yeast specifics


def test_adult_recipe(real_bundles: dict) -> None:
    info = real_bundles["adult"].info
    assert "fnlwgt" not in info.feature_names and "education" not in info.feature_names
    assert info.class_names == ["<=50K", ">50K"]
    categories = info.preprocessing["categories"]
    assert categories["sex"] == ["Female", "Male"] and "?" not in categories["workclass"]
    shown = raw_values(info, real_bundles["adult"].test[0][0])
    assert shown[info.feature_names.index("sex")] in ("Female", "Male")
    assert isinstance(shown[info.feature_names.index("age")], float)


ADULT_HEADER = (
    "age,workclass,fnlwgt,education,education-num,marital-status,occupation,relationship,race,sex,"
    "capital-gain,capital-loss,hours-per-week,native-country,class"
)


def adult_row(age: int, workclass: str, country: str, label: str) -> str:
    return f"{age},{workclass},1,Bachelors,13,Never-married,Sales,Own-child,White,Male,0,0,40,{country},{label}"


def test_adult_fallback_for_unseen_categories(tmp_path: Path) -> None:
    folder = tmp_path / "adult"
    folder.mkdir()
    train = [
        adult_row(20 + i, "Private" if i % 3 else "State-gov", "Peru", ("<=50K", ">50K")[i % 2]) for i in range(20)
    ]
    train.append(adult_row(50, "?", "Peru", ">50K"))
    test = [adult_row(30, "Never-worked", "Peru", ">50K."), adult_row(31, "State-gov", "Peru", "<=50K")]
    (folder / "adult.data.csv").write_text("\n".join([ADULT_HEADER, *train]) + "\n")
    (folder / "adult.test.csv").write_text("\n".join([ADULT_HEADER, *test]) + "\n")
    bundle = load_dataset("adult", tmp_path, val_fraction=0.2)
    info = bundle.info
    assert info.preprocessing["dropped_missing_rows"] == {"train_file": 1, "test_file": 0}
    assert info.preprocessing["categories"]["workclass"] == ["Private", "State-gov"]
    assert info.preprocessing["unknown_category_fallback"]["workclass"] == "Private"
    assert info.preprocessing["unknown_categories"]["workclass"] == 1
    shown = [raw_values(info, x) for x in bundle.test.features]
    column = info.feature_names.index("workclass")
    assert [s[column] for s in shown] == ["Private", "State-gov"]
    assert [round(s[0]) for s in shown] == [30, 31]
    assert bundle.test.labels.tolist() == [1, 0], "the trailing dot of '>50K.' is accepted"


def test_adult_rejects_unknown_labels(tmp_path: Path) -> None:
    folder = tmp_path / "adult"
    folder.mkdir()
    rows = [adult_row(20 + i, "Private", "Peru", ("<=50K", ">50K")[i % 2]) for i in range(10)]
    (folder / "adult.data.csv").write_text("\n".join([ADULT_HEADER, *rows]) + "\n")
    (folder / "adult.test.csv").write_text("\n".join([ADULT_HEADER, adult_row(30, "Private", "Peru", "rich")]))
    with pytest.raises(ValueError, match=r"class values \['rich'\]"):
        load_dataset("adult", tmp_path)


# ---------------------------------------------------------------- images: MNIST, Fashion-MNIST, CIFAR-10


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in IDX format (gzipped when the name ends with .gz)."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_fake_idx_set(folder: Path, gz: bool, n_train: int = 40, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    arrays["train-images-idx3-ubyte"][:, :4] = 0  # a black band: background pixels
    for base, array in arrays.items():
        write_idx(folder / (f"{base}.gz" if gz else base), array)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_loader_on_fake_idx(tmp_path: Path, gz: bool) -> None:
    arrays = write_fake_idx_set(tmp_path / "mnist", gz)
    bundle = load_dataset("mnist", tmp_path, val_fraction=0.25)
    assert bundle.sizes() == {"train": 30, "val": 10, "test": 20}
    assert bundle.info.input_shape == (1, 28, 28)
    expected_test = (torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float() / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(bundle.test.features[:, 0], expected_test, atol=1e-6)
    background = bundle.train.features[:, 0, :4]
    assert torch.equal(background, torch.full_like(background, bundle.info.reference[0])), "black == reference"
    assert bundle.info.preprocessing["normalize"] == {"mean": [MNIST_MEAN], "std": [MNIST_STD], "per": "channel"}


def test_idx_reader_rejects_bad_files(tmp_path: Path) -> None:
    good = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "good", good)
    assert np.array_equal(read_idx(tmp_path / "good"), good)
    (tmp_path / "magic").write_bytes(b"\x12\x34\x08\x03" + (tmp_path / "good").read_bytes()[4:])
    with pytest.raises(ValueError, match="not an IDX file: magic bytes 12340803"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes((tmp_path / "good").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"payload has 23 bytes.*needs 24.*truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="declares 3 dimensions, expected 1"):
        read_idx(tmp_path / "good", expected_ndim=1)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a valid gzip file"):
        read_idx(tmp_path / "bad.gz")


def test_mnist_rejects_mismatched_counts(tmp_path: Path) -> None:
    write_fake_idx_set(tmp_path / "mnist", gz=True)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))
    with pytest.raises(ValueError, match="mnist test: 20 images but 19 labels"):
        load_dataset("mnist", tmp_path)


def test_fashion_mnist_via_torchvision_on_fake_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_fake_idx_set(tmp_path / "FashionMNIST" / "raw", gz=False)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))  # root=None falls back to the env variable
    bundle = load_dataset("fashion_mnist", val_fraction=0.25)
    assert bundle.sizes() == {"train": 30, "val": 10, "test": 20}
    assert bundle.info.input_shape == (1, 28, 28) and bundle.info.class_names[0] == "T-shirt/top"
    assert torch.equal(bundle.test.labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    reference = bundle.info.reference[0]
    assert torch.equal(bundle.train.features[:, 0, :4], torch.full((30, 4, 28), reference)), "black == reference"


def test_fashion_mnist_explains_gzipped_files(tmp_path: Path) -> None:
    write_fake_idx_set(tmp_path / "FashionMNIST" / "raw", gz=True)
    with pytest.raises(FileNotFoundError, match="gunzip"):
        load_dataset("fashion_mnist", tmp_path)


def write_fake_cifar(root: Path, per_batch: int = 10, n_test: int = 10) -> dict[str, str]:
    """Tiny CIFAR-10 python batches; returns each file's md5 (torchvision verifies them)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        # Channel c of every image holds the constant 40 * (c + 1), so the channel order is checkable.
        data = np.repeat(np.array([40, 80, 120], dtype=np.uint8), 1024)[None].repeat(n, 0)
        data[:, :16] = rng.integers(0, 256, (n, 16))
        return {"data": data, "labels": (np.arange(n) % 10).tolist()}

    contents = {f"data_batch_{i}": batch(per_batch) for i in range(1, 6)}
    contents["test_batch"] = batch(n_test)
    contents["batches.meta"] = {"label_names": [f"class{k}" for k in range(10)]}
    md5 = {}
    for name, obj in contents.items():
        (folder / name).write_bytes(pickle.dumps(obj))
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return md5


def test_cifar10_via_torchvision_on_fake_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    md5 = write_fake_cifar(tmp_path)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    bundle = load_dataset("cifar10", tmp_path, val_fraction=0.2)
    assert bundle.sizes() == {"train": 40, "val": 10, "test": 10}
    assert bundle.info.input_shape == (3, 32, 32) and bundle.info.class_names == [f"class{k}" for k in range(10)]
    norm = bundle.info.preprocessing["normalize"]
    expected = [(v / 255 - m) / s for v, m, s in zip([40, 80, 120], norm["mean"], norm["std"])]
    assert torch.allclose(bundle.test.features[:, :, -1, -1], torch.tensor(expected).expand(10, 3), atol=1e-6)
    assert bundle.info.reference == [0.0, 0.0, 0.0]


def test_cifar10_checksum_failure_is_explained(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)  # the real md5s do not match the fakes
    with pytest.raises(ValueError, match="failed torchvision's MD5 check"):
        load_dataset("cifar10", tmp_path)


def test_mnist_real_reference_is_background(real_bundles: dict) -> None:
    bundle = real_bundles["mnist"]
    reference = bundle.info.reference[0]
    assert reference == pytest.approx((0 - MNIST_MEAN) / MNIST_STD)
    assert bundle.train.features.min() == pytest.approx(reference)
    assert (bundle.test.features == reference).float().mean() > 0.5, "most MNIST pixels are background"
    assert abs(bundle.train.features.mean().item()) < 0.02 and abs(bundle.train.features.std().item() - 1) < 0.02
