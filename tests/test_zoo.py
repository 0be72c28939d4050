"""The zoo: timm registration, safetensors round trips, refusal of bad checkpoints, model info and cards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load, save_file
from torch import nn

import zoo
import zoo._paths
from shapnets import ConvShapNet, DeepShapNet, ShallowShapNet
from zoo.hub import sha256_of
from zoo.shapnets_models import VARIANT_DEFAULTS

GENERIC_KWARGS = {
    "shapnet_shallow": dict(in_features=5, out_features=3, hidden=(8,)),
    "shapnet_deep": dict(in_features=5, num_classes=3, channels=4, hidden=(8,)),
    "shapnet_conv": dict(in_chans=2, num_classes=3, channels=(4,), hidden=(8,)),
}
# VARIANT_DEFAULTS holds every family's trained variants once `zoo` is imported; these tests are about the ShapNets.
SHAPNET_VARIANTS = sorted(n for n in VARIANT_DEFAULTS if n.startswith("shapnet_"))
ALL_NAMES = sorted([*GENERIC_KWARGS, *SHAPNET_VARIANTS])


def _input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    if isinstance(model, ConvShapNet):
        return torch.rand(batch, model.in_chans, 6, 5)
    return torch.randn(batch, model.in_features)


def _attribution_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    if isinstance(model, ConvShapNet):
        return (x.shape[0], x.shape[2], x.shape[3], model.num_classes)
    return (x.shape[0], model.in_features, model.num_classes)


@pytest.fixture
def no_shipped_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the package's weights folder at an empty temporary one (and cards next to it)."""
    root = tmp_path / "weights"
    root.mkdir()
    monkeypatch.setattr(zoo._paths, "WEIGHTS_ROOT", root)
    monkeypatch.setattr(zoo._paths, "CARDS_ROOT", tmp_path / "cards")
    return root


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A small saved Deep ShapNet with a non-zero reference and a non-default activation."""
    model = zoo.create_model(
        "shapnet_deep",
        in_features=5,
        num_classes=3,
        channels=4,
        hidden=(8,),
        reference=torch.randn(5),
        act_layer="relu",
    )
    return zoo.save_pretrained(model, tmp_path / "ckpt", metadata={"metrics": {"test_accuracy": 0.75}})


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rehash(directory: Path) -> None:
    """Make config.json's sha256 match the (edited) weights file, so the check under test is reached."""
    _edit_config(directory, sha256=sha256_of(directory / "model.safetensors"))


# --- registry ---------------------------------------------------------------------------------


def test_every_zoo_name_is_registered_with_timm() -> None:
    assert zoo.list_models("shapnet_*") == ALL_NAMES
    assert set(ALL_NAMES) <= set(timm.list_models("shapnet_*"))
    assert zoo.list_models("shapnet_deep*") == [n for n in ALL_NAMES if n.startswith("shapnet_deep")]
    everything = zoo.list_models("")  # every family, as timm
    assert everything == sorted({*zoo.ARCHITECTURES, *VARIANT_DEFAULTS}) and set(ALL_NAMES) < set(everything)
    assert set(everything) <= set(timm.list_models())


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_name_builds_through_zoo_and_timm(name: str) -> None:
    kwargs = GENERIC_KWARGS.get(name, {})
    model = zoo.create_model(name, **kwargs)
    via_timm = timm.create_model(name, **kwargs)
    assert type(model) is type(via_timm)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in via_timm.state_dict().items()}
    assert model.pretrained_cfg["architecture"] == name
    assert set(kwargs) <= set(model.model_args)
    x = _input(model)
    logits = model(x)
    assert logits.shape == (2, model.num_classes)
    explanation = model.explain(x)
    assert explanation.attributions.shape == _attribution_shape(model, x)
    explanation.check_local_accuracy()
    assert torch.allclose(explanation.output, logits, atol=1e-5)


def test_variant_defaults_are_documented_and_overridable() -> None:
    default = zoo.create_model("shapnet_deep_yeast")
    assert (default.in_features, default.num_classes) == (8, 10)
    smaller = zoo.create_model("shapnet_deep_yeast", hidden=(4,), act_layer="tanh")
    assert smaller.model_args["hidden"] == (4,)
    assert smaller.model_args["act_layer"] is nn.Tanh
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in default.parameters())


@pytest.mark.reliability("weights")
def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'shapnet_deap'.*shapnet_deep"):
        zoo.create_model("shapnet_deap")


@pytest.mark.reliability("weights")
def test_hub_names_are_refused_offline() -> None:
    with pytest.raises(ValueError, match="never downloads"):
        zoo.create_model("hf-hub:someone/shapnet")


def test_unknown_constructor_argument_is_named() -> None:
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['num_layers'\]"):
        zoo.create_model("shapnet_deep", in_features=4, num_classes=2, num_layers=3)


def test_unknown_activation_name_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown act_layer 'swishy'; known: \["):
        zoo.create_model("shapnet_shallow", in_features=3, out_features=2, act_layer="swishy")


@pytest.mark.usefixtures("no_shipped_weights")
@pytest.mark.parametrize("name", ["shapnet_deep_yeast", "shapnet_shallow"])
def test_pretrained_without_weights_names_those_with_weights(name: str) -> None:
    with pytest.raises(RuntimeError, match=rf"{name} has no shipped weights.*names with weights: none yet"):
        zoo.create_model(name, pretrained=True, **GENERIC_KWARGS.get(name, {}))
    assert zoo.list_models(pretrained=True) == []


# --- save / load round trips ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GENERIC_KWARGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_is_bit_exact(name: str, dtype: torch.dtype, tmp_path: Path) -> None:
    kwargs = dict(GENERIC_KWARGS[name], act_layer="silu")
    channels = kwargs.get("in_chans") or kwargs["in_features"]
    model = zoo.create_model(name, reference=torch.randn(channels), **kwargs).to(dtype)
    directory = zoo.save_pretrained(model, tmp_path / name)
    loaded = zoo.load_pretrained(directory)
    assert type(loaded) is type(model)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = _input(model).to(dtype)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.explain(x).attributions, model.explain(x).attributions)
    # Saving what was loaded reproduces the checkpoint byte for byte (same config, same hash).
    again = zoo.save_pretrained(loaded, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (directory / "model.safetensors").read_bytes()
    assert (again / "config.json").read_text() == (directory / "config.json").read_text()


def test_files_are_self_describing(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["sha256"] == sha256_of(checkpoint / "model.safetensors")
    assert config["model_args"]["act_layer"] == "relu"
    assert config["game"]["reference_shape"] == [5, 1]
    assert config["metrics"] == {"test_accuracy": 0.75}
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    assert metadata["architecture"] == "shapnet_deep"
    embedded = json.loads(metadata["config"])
    assert embedded == {k: v for k, v in config.items() if k != "sha256"}


def test_model_not_built_by_the_zoo_needs_model_args(tmp_path: Path) -> None:
    args = dict(in_features=4, out_features=2, groups="singles", hidden=(4,))
    model = ShallowShapNet(**args)
    with pytest.raises(ValueError, match=r"not built through the zoo.*model_args="):
        zoo.save_pretrained(model, tmp_path / "a")
    loaded = zoo.load_pretrained(zoo.save_pretrained(model, tmp_path / "b", model_args=args))
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), model(x))


def test_reference_set_after_construction_is_what_config_records(tmp_path: Path) -> None:
    model = zoo.create_model("shapnet_shallow", in_features=3, out_features=2, hidden=(4,))
    model.reference.fill_(0.5)  # e.g. a trainer setting the reference to the data mean
    directory = zoo.save_pretrained(model, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_args"]["reference"] == config["game"]["reference"] == [[0.5]] * 3
    assert torch.equal(zoo.load_pretrained(directory).reference, model.reference)


def test_training_wrappers_are_unwrapped(tmp_path: Path) -> None:
    model = zoo.create_model("shapnet_shallow", in_features=3, out_features=2, hidden=(4,))
    loaded = zoo.load_pretrained(zoo.save_pretrained(nn.DataParallel(model), tmp_path))
    assert loaded.state_dict().keys() == model.state_dict().keys()  # no "module." prefix


@pytest.mark.reliability("weights")
def test_model_args_that_do_not_describe_the_model_are_refused(tmp_path: Path) -> None:
    model = DeepShapNet(in_features=4, num_classes=2, channels=4, hidden=(8,))
    with pytest.raises(
        ValueError,
        match=r"model_args do not describe this model: shape mismatches: .*model \(2, 8\) vs model_args \(2, 6\)",
    ):
        zoo.save_pretrained(model, tmp_path, model_args=dict(in_features=4, num_classes=2, channels=4, hidden=(6,)))


def test_unsaveable_arguments_and_metadata_are_refused(tmp_path: Path) -> None:
    class Swish(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(x)

    custom = zoo.create_model("shapnet_shallow", in_features=3, out_features=2, act_layer=Swish)
    with pytest.raises(TypeError, match=r"model_args\['act_layer'\] is the class Swish, which has no saved name"):
        zoo.save_pretrained(custom, tmp_path)
    model = zoo.create_model("shapnet_shallow", in_features=3, out_features=2)
    with pytest.raises(ValueError, match=r"reserved config.json key\(s\) \['sha256'\]"):
        zoo.save_pretrained(model, tmp_path, metadata={"sha256": "0" * 64})
    with pytest.raises(TypeError, match="metadata cannot be written as JSON"):
        zoo.save_pretrained(model, tmp_path, metadata={"when": object()})
    with pytest.raises(ValueError, match=r"builds a DeepShapNet, not a ShallowShapNet"):
        zoo.save_pretrained(model, tmp_path, architecture="shapnet_deep")


# --- refusing bad checkpoints -----------------------------------------------------------------


@pytest.mark.reliability("weights")
def test_tampered_bytes_are_a_hash_mismatch(checkpoint: Path) -> None:
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"hash mismatch .*expects sha256 [0-9a-f]{64}, the file has [0-9a-f]{64}"):
        zoo.load_pretrained(checkpoint)


@pytest.mark.reliability("weights")
def test_truncated_file_is_refused(checkpoint: Path) -> None:
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ValueError, match="hash mismatch"):
        zoo.load_pretrained(checkpoint)
    _rehash(checkpoint)
    with pytest.raises(ValueError, match=r"is truncated: its header describes \d+ bytes of tensor data but only \d+"):
        zoo.load_pretrained(checkpoint)
    path.write_bytes(b"\x01\x02")
    _rehash(checkpoint)
    with pytest.raises(ValueError, match="not a safetensors file: 2 bytes"):
        zoo.load_pretrained(checkpoint)


@pytest.mark.reliability("weights")
def test_pickle_renamed_to_safetensors_is_refused(checkpoint: Path) -> None:
    state = load((checkpoint / "model.safetensors").read_bytes())
    torch.save(state, checkpoint / "model.safetensors")
    _rehash(checkpoint)
    with pytest.raises(ValueError, match=r"not a safetensors file \(it looks like a pickle"):
        zoo.load_pretrained(checkpoint)


@pytest.mark.reliability("weights")
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: {**s, "extra.weight": torch.zeros(2)}, r"unexpected keys \['extra.weight'\]"),
        (lambda s: {k: v for k, v in s.items() if k != "reference"}, r"missing keys \['reference'\]"),
        (lambda s: {**s, "reference": torch.zeros(6, 1)}, r"shape mismatches: reference: checkpoint \(6, 1\) vs model"),
        (lambda s: {**s, "reference": s["reference"].half()}, r"dtype mismatches: reference: checkpoint torch.float16"),
    ],
    ids=["extra", "missing", "shape", "dtype"],
)
def test_state_dict_that_does_not_fit_is_refused(checkpoint: Path, edit, message: str) -> None:
    path = checkpoint / "model.safetensors"
    save_file(edit(load(path.read_bytes())), path)  # from bytes: never overwrite an mmapped file
    _rehash(checkpoint)
    with pytest.raises(ValueError, match=message):
        zoo.load_pretrained(checkpoint)


@pytest.mark.reliability("weights")
def test_architecture_args_that_do_not_fit_the_weights_are_listed(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    _edit_config(checkpoint, model_args={**config["model_args"], "hidden": [6]})
    with pytest.raises(ValueError, match=r"shape mismatches: stages.0.*checkpoint \(\d+, 8.*\) vs model \(\d+, 6"):
        zoo.load_pretrained(checkpoint)


@pytest.mark.reliability("weights")
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architecture": "resnet_foo"}, r"unknown architecture 'resnet_foo': not registered"),
        ({"architecture": "shapnet_dep"}, r"unknown architecture 'shapnet_dep'.*Did you mean \['shapnet_deep'"),
        ({"architecture": "resnet18"}, r"unknown ShapNet architecture 'resnet18'"),
        ({"model_args": [1, 2]}, r"key 'model_args' must be an object, got a list"),
        ({"num_params": "many"}, r"key 'num_params' must be an integer, got a string"),
        ({"metrics": 0.9}, r"key 'metrics' must be an object, got a number"),
        ({"sha256": "abc"}, r"sha256 must be 64 lowercase hex digits"),
        ({"game": {"reference_shape": "5x1"}}, r"game.reference_shape must be a list of integers"),
    ],
)
def test_invalid_config_is_refused(checkpoint: Path, changes: dict, message: str) -> None:
    _edit_config(checkpoint, **changes)
    with pytest.raises(ValueError, match=message):
        zoo.load_pretrained(checkpoint)


@pytest.mark.reliability("weights")
def test_config_missing_keys_or_not_json_is_refused(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    del config["model_args"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['model_args'\]"):
        zoo.load_pretrained(checkpoint)
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        zoo.load_pretrained(checkpoint)


@pytest.mark.reliability("weights")
def test_game_metadata_must_match_the_reference_buffer(checkpoint: Path) -> None:
    game = json.loads((checkpoint / "config.json").read_text())["game"]
    _edit_config(checkpoint, game={**game, "reference": [[0.0]] * 5})
    with pytest.raises(ValueError, match=r"game\.reference disagrees with the reference buffer"):
        zoo.load_pretrained(checkpoint)
    _edit_config(checkpoint, game={**game, "reference_shape": [5]})
    with pytest.raises(ValueError, match=r"game.reference_shape \[5\] does not match the model's reference buffer"):
        zoo.load_pretrained(checkpoint)


@pytest.mark.reliability("weights")
def test_missing_checkpoint_is_reported(tmp_path: Path, no_shipped_weights: Path) -> None:
    with pytest.raises(FileNotFoundError, match="shapnet_conv_mnist has no shipped weights"):
        zoo.load_pretrained("shapnet_conv_mnist")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a registered ShapNet"):
        zoo.load_pretrained(tmp_path / "nowhere")


# --- shipped weights (in a temporary package folder) ------------------------------------------


def test_shipped_weights_load_offline_with_their_own_architecture(no_shipped_weights: Path) -> None:
    trained = zoo.create_model("shapnet_deep_yeast", hidden=(8,))  # differs from the documented default
    zoo.save_pretrained(
        trained, no_shipped_weights / "shapnet_deep_yeast", metadata={"metrics": {"test_accuracy": 0.6}}
    )
    assert zoo.list_models(pretrained=True) == ["shapnet_deep_yeast"]
    for model in (
        zoo.create_model("shapnet_deep_yeast", pretrained=True),
        timm.create_model("shapnet_deep_yeast", pretrained=True),
        zoo.load_pretrained("shapnet_deep_yeast"),
    ):
        assert model.model_args["hidden"] == [8]  # config.json is the single source of truth
        for key, value in trained.state_dict().items():
            assert torch.equal(model.state_dict()[key], value)
    info = zoo.model_info("shapnet_deep_yeast")
    assert (info["source"], info["has_weights"], info["sha256_verified"]) == ("shipped", True, True)
    assert info["metrics"] == {"test_accuracy": 0.6}
    card = zoo.write_model_card("shapnet_deep_yeast")
    assert card == zoo._paths.card_path("shapnet_deep_yeast")
    assert "**Test accuracy:** 0.6" in card.read_text()


def test_timm_local_dir_and_file_overlay_load_a_checkpoint(checkpoint: Path) -> None:
    reference = zoo.load_pretrained(checkpoint)
    via_local_dir = timm.create_model(f"local-dir:{checkpoint}", pretrained=True)
    via_overlay = zoo.create_model(
        "shapnet_deep",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(checkpoint / "model.safetensors")),
        **json.loads((checkpoint / "config.json").read_text())["model_args"],
    )
    for model in (via_local_dir, via_overlay):
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize("name", sorted(VARIANT_DEFAULTS))
def test_shipped_checkpoint_loads_and_verifies(name: str) -> None:
    folder = zoo._paths.shipped_dir(name)
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"no shipped weights for {name} in {folder} yet")
    model = zoo.load_pretrained(name)
    info = zoo.model_info(name)
    assert info["sha256_verified"] is True
    size = model.pretrained_cfg["input_size"]
    x = torch.rand(2, *size) if len(size) == 3 else torch.randn(2, *size)
    model.explain(x).check_local_accuracy()


# --- model info and cards ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_model_info_is_json_able(name: str) -> None:
    info = zoo.model_info(name)
    assert json.loads(json.dumps(info)) == info
    assert info["name"] == name
    assert info["pretrained_cfg"]["paper_ids"] == "arXiv:2104.02297"


def test_model_info_of_unknown_name_or_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Did you mean \['shapnet_conv_mnist'"):
        zoo.model_info("shapnet_conv_mnsit")
    with pytest.raises(ValueError, match=r"folder without config.json: not a checkpoint"):
        zoo.model_info(tmp_path)


def test_loaded_model_carries_its_config_and_data_info(checkpoint: Path) -> None:
    model = zoo.load_pretrained(checkpoint)
    assert model.checkpoint_config["metrics"] == {"test_accuracy": 0.75}
    assert not hasattr(model, "data_info")
    data_info = {"name": "yeast", "num_features": 5, "class_names": ["a", "b", "c"]}
    zoo.save_pretrained(model, checkpoint, metadata={"data_info": data_info})
    assert zoo.load_pretrained(checkpoint).data_info == data_info


def test_model_card_shows_recorded_fields_and_never_invents_missing_ones(checkpoint: Path) -> None:
    card = zoo.write_model_card(checkpoint).read_text()
    assert "**Test accuracy:** 0.75" in card
    assert "## Explanation fidelity\n\nnot recorded" in card
    assert "| command | not recorded |" in card
    assert sha256_of(checkpoint / "model.safetensors") in card
    assert f'zoo.load_pretrained("{checkpoint}")' in card

    model = zoo.load_pretrained(checkpoint)
    zoo.save_pretrained(
        model,
        checkpoint,
        metadata={
            "fidelity": {"max_abs_error_vs_exact_shapley": 1.5e-7, "num_samples": 64},
            "training": {"command": "shapnets train configs/x.yaml", "time_s": 90.0},
        },
    )
    card = zoo.write_model_card(checkpoint).read_text()
    assert "| max_abs_error_vs_exact_shapley | 1.5e-07 |" in card
    assert "`shapnets train configs/x.yaml`" in card
    assert "90 s (1.5 min)" in card
    assert "**Test accuracy:** not recorded" in card
