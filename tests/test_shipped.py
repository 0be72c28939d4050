"""The checkpoints shipped in zoo/weights: they load by name through the zoo and timm, and what their config.json and
model card claim (test accuracy, fidelity of the explanations) is reproduced here from the weights and the data.

Parametrized over `zoo.list_models(pretrained=True)` (every family) at collection time: nothing to check (skipped, with
a message) before any checkpoint is exported. Yeast, Adult and MNIST need the real data (`data_root` fixture).
The hash-mismatch (tamper) test lives in test_zoo.py.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import timm
import torch

import zoo
from shapnets import ConvShapNet, ShallowShapNet
from training.data import DataBundle, load_dataset
from zoo._paths import card_path, shipped_dir

SHIPPED = zoo.list_models(pretrained=True)
TABULAR = [n for n in SHIPPED if n.startswith(("shapnet_shallow_", "shapnet_deep_"))]
IMAGE = [n for n in SHIPPED if n not in TABULAR]


def shipped(names: list[str], what: str = "") -> list:
    reason = f"no shipped {what}checkpoints in zoo/weights/ yet (export runs with `shapnets export RUN --name NAME`)"
    return names or [pytest.param(None, marks=pytest.mark.skip(reason=reason))]


@functools.cache
def _bundle(name: str, root: str | None, seed: int, val_fraction: float, limit: int | None) -> DataBundle:
    return load_dataset(name, root, seed=seed, val_fraction=val_fraction, limit=limit)


def recorded_split(name: str, request: pytest.FixtureRequest) -> tuple[dict, DataBundle]:
    """The checkpoint's config.json and the data rebuilt with its recorded split (real data only when needed)."""
    config = zoo.read_config(shipped_dir(name))
    info = config["data_info"]
    seed, val_fraction = int(info["split"]["seed"]), float(info["split"]["val_fraction"])
    limit = info["split"].get("limit")  # a fine-tune on a subset of the training split (the test split is whole)
    try:
        bundle = _bundle(info["name"], None, seed, val_fraction, limit)
    except FileNotFoundError:  # the data set needs files: the fixture skips with a message when they are absent
        bundle = _bundle(info["name"], str(request.getfixturevalue("data_root")), seed, val_fraction, limit)
    # The rebuilt data must be what the model was trained and tested on: same split, same preprocessing statistics.
    if "fingerprint" in info["split"]:
        assert bundle.info.split["fingerprint"] == info["split"]["fingerprint"], f"{name}: the split differs"
    assert bundle.info.preprocessing == info["preprocessing"], f"{name}: the preprocessing differs"
    return config, bundle


def stacked(dataset, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[dataset[i] for i in range(min(count or len(dataset), len(dataset)))])
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)


def binomial_tolerance(p: float, n: int) -> float:
    """How far an accuracy on n samples may stray from the full test set's p: 4 standard errors plus one sample."""
    return 4 * math.sqrt(max(p * (1 - p), 1e-4) / n) + 1 / n


@pytest.mark.parametrize("name", shipped(SHIPPED))
def test_loads_by_name_through_zoo_and_timm(name: str) -> None:
    config = zoo.read_config(shipped_dir(name))
    assert config["sha256"] == zoo.sha256_of(shipped_dir(name) / "model.safetensors")
    assert zoo.model_info(name)["sha256_verified"] is True
    from_zoo = zoo.create_model(name, pretrained=True).eval()
    from_timm = timm.create_model(name, pretrained=True).eval()
    from_folder = zoo.load_pretrained(name).eval()
    assert config["architecture"] == name
    for model in (from_timm, from_folder):
        assert type(model) is type(from_zoo)
        assert model.state_dict().keys() == from_zoo.state_dict().keys()
        for key, value in from_zoo.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), f"{name}: {key} differs"
    shape = (2, *config["data_info"]["input_shape"])
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(from_timm(x), from_zoo(x))


@pytest.mark.parametrize("name", shipped(TABULAR, "tabular "))
def test_reproduces_recorded_test_accuracy(name: str, request: pytest.FixtureRequest) -> None:
    config, bundle = recorded_split(name, request)
    model = zoo.create_model(name, pretrained=True).eval()
    x, y = stacked(bundle.test)
    assert len(y) == config["metrics"]["test_samples"]
    # Counted here (argmax == label), not through the trainer's torchmetrics evaluation that the export used.
    assert accuracy(model, x, y) == pytest.approx(config["metrics"]["test_accuracy"], abs=1e-6)


@pytest.mark.parametrize("name", shipped(TABULAR, "tabular "))
def test_explanations_of_test_samples(name: str, request: pytest.FixtureRequest) -> None:
    """Local accuracy in float64 on real test samples, and the recorded fidelity numbers are those of an exact game."""
    config, bundle = recorded_split(name, request)
    model = zoo.create_model(name, pretrained=True).eval().double()
    x, _ = stacked(bundle.test, 32)
    with torch.no_grad():
        expl = model.explain(x.double())
    expl.check_local_accuracy(atol=1e-9, rtol=0.0)
    assert expl.attributions.shape == (len(x), *config["data_info"]["input_shape"], config["data_info"]["num_classes"])
    fidelity = config["fidelity"]
    assert fidelity["local_accuracy_residual"] < 1e-9
    assert fidelity["missingness_residual"] < 1e-9
    if isinstance(model, ShallowShapNet):  # exact Shapley values of the whole network
        assert fidelity["exact_by_construction"] is True and expl.exact
        assert fidelity["max_abs_error_vs_exact_shapley"] < 1e-9
        assert fidelity.get("others_max_abs_attribution", 0.0) < 1e-9


@pytest.mark.parametrize("name", shipped(SHIPPED))
def test_card_is_shipped_and_describes_these_weights(name: str) -> None:
    card = card_path(name)
    assert card.is_file(), f"{name} has weights but no card at {card}"
    text = card.read_text()
    config = zoo.read_config(shipped_dir(name))
    assert f"# {name}" in text
    assert f"**Test accuracy:** {config['metrics']['test_accuracy']:.4g}" in text
    assert config["sha256"] in text, f"{card} describes other weights (sha256 differs): regenerate it"


# --- image models: 10,000 MNIST test images take minutes on a CPU, so the default run checks the first 100 ----------
@functools.cache
def _image_model(name: str) -> torch.nn.Module:
    return zoo.create_model(name, pretrained=True).eval()


@pytest.mark.parametrize("name", shipped(IMAGE, "image "))
def test_image_model_explanations_add_up_to_the_logits(name: str, request: pytest.FixtureRequest) -> None:
    config, bundle = recorded_split(name, request)
    x, _ = stacked(bundle.test, 4)
    with torch.no_grad():
        expl = copy.deepcopy(_image_model(name)).double().explain(x.double())
    height, width = config["data_info"]["input_shape"][-2:]
    assert expl.attributions.shape == (4, height, width, config["data_info"]["num_classes"])
    expl.check_local_accuracy(atol=1e-9, rtol=0.0)
    if isinstance(_image_model(name), ConvShapNet):
        assert config["fidelity"]["missingness_residual"] < 1e-9


@pytest.mark.parametrize("name", shipped(IMAGE, "image "))
@pytest.mark.parametrize("count", [100, pytest.param(500, marks=pytest.mark.slow)])  # 500 images: ~20 s on a CPU
def test_image_model_accuracy_on_the_first_test_images(name: str, count: int, request: pytest.FixtureRequest) -> None:
    """The first `count` test images: within sampling error of the recorded accuracy on the whole test split."""
    config, bundle = recorded_split(name, request)
    x, y = stacked(bundle.test, count)
    recorded = config["metrics"]["test_accuracy"]
    assert abs(accuracy(_image_model(name), x, y, batch_size=250) - recorded) <= binomial_tolerance(recorded, count)


@pytest.mark.parametrize("name", shipped(IMAGE, "image "))
@pytest.mark.slow
def test_image_model_reproduces_recorded_test_accuracy(name: str, request: pytest.FixtureRequest) -> None:
    """The whole test split (MNIST: about 8 minutes on one busy CPU core for a Conv ShapNet)."""
    config, bundle = recorded_split(name, request)
    x, y = stacked(bundle.test)
    assert len(y) == config["metrics"]["test_samples"]
    assert accuracy(_image_model(name), x, y, batch_size=500) == pytest.approx(config["metrics"]["test_accuracy"],
                                                                               abs=1e-6)


def test_every_folder_in_zoo_weights_is_a_listed_checkpoint() -> None:
    """A folder exported under a name that is not a registered variant would never be listed nor loadable by name."""
    weights_root = shipped_dir("any").parent
    folders = sorted(p.name for p in weights_root.iterdir() if p.is_dir()) if weights_root.is_dir() else []
    listed = zoo.list_models(pretrained=True)
    for folder in folders:
        assert folder in listed, f"{weights_root / folder} is not a registered variant with weights: {listed}"
        assert (weights_root / folder / "config.json").is_file(), f"{weights_root / folder} has no config.json"
