"""Config loading: YAML -> typed dataclasses, overrides, and error messages that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import (
    ConfigError,
    ExperimentConfig,
    UserError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


def write(tmp_path: Path, values: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def test_defaults_round_trip(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    assert config_from_dict(config_to_dict(cfg)) == cfg
    path = save_config(cfg, tmp_path / "c.yaml")
    assert load_config(path) == cfg


def test_yaml_values_land_in_typed_fields(tmp_path: Path) -> None:
    path = write(tmp_path, {
        "name": "x",
        "model": {"name": "shapnet_deep", "args": {"channels": 16}, "freeze": ["stages.0.*"]},
        "optim": {"lr": 1, "betas": [0.9, 0.95]},  # an int lr is a float
        "train": {"epochs": 3, "ema_decay": 0.99, "max_steps": None},
        "loss": {"terms": [{"name": "t", "weight": 0.5}]},
    })
    cfg = load_config(path)
    assert cfg.model.args == {"channels": 16} and cfg.model.freeze == ["stages.0.*"]
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.train.epochs == 3 and cfg.train.ema_decay == 0.99 and cfg.train.max_steps is None
    assert cfg.loss.terms == [{"name": "t", "weight": 0.5}]


def test_saved_config_reloads_equal_after_overrides(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.epochs=7", "model.args.hidden=[64, 64]", "data.root=/data"])
    again = load_config(save_config(cfg, tmp_path / "resolved.yaml"))
    assert again == cfg and again.model.args["hidden"] == [64, 64]


@pytest.mark.reliability("cli")
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"train": {"epoch": 3}}, ["'epoch'", "section 'train'", "did you mean 'epochs'", "valid keys:", "max_steps"]),
        ({"optim": {"learning_rate": 1e-3}}, ["'learning_rate'", "section 'optim'", "valid keys:", "lr"]),
        ({"trian": {}}, ["'trian'", "top level", "did you mean 'train'"]),
    ],
)
def test_unknown_key_names_key_section_and_suggestion(tmp_path: Path, values: dict, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, values))
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, message


@pytest.mark.reliability("cli")
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"train": {"epochs": "ten"}}, ["train.epochs", "expected int", "got str"]),
        ({"train": {"epochs": 2.5}}, ["train.epochs", "expected int", "got float"]),
        ({"train": {"compile": "yes"}}, ["train.compile", "expected bool", "got str"]),
        ({"train": {"epochs": True}}, ["train.epochs", "expected int", "got bool"]),
        ({"optim": {"betas": 0.9}}, ["optim.betas", "expected list[float]", "got float"]),
        ({"model": {"args": [1, 2]}}, ["model.args", "expected dict", "got list"]),
        ({"optim": {"grad_clip": "x"}}, ["optim.grad_clip", "float or null", "got str"]),
        ({"optim": {"lr": [1]}}, ["optim.lr", "expected float", "got list"]),
        ({"train": ["epochs"]}, ["section 'train'", "mapping"]),
    ],
)
def test_wrong_type_names_key_expected_and_given(tmp_path: Path, values: dict, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, values))
    for fragment in expected:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.reliability("cli")
@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.epochs", "section.key=value"),
        ("=3", "empty key"),
        ("train..epochs=3", "empty key"),
        ("train.epochs=[1", "not valid YAML"),
        ("train.epochs=abc", "expected int"),
        ("train.epoch=3", "did you mean 'epochs'"),
        ("train.device=tpu", "expected one of auto, cpu, cuda"),
        ("train.epochs.x=1", "train.epochs: expected int, got dict"),
    ],
)
def test_bad_override_is_a_clear_error(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert fragment in str(info.value), str(info.value)


def test_override_values_are_parsed_as_yaml() -> None:
    cfg = load_config(None, ["train.epochs=5", "optim.grad_clip=null", "train.compile=true", "data.root=some/dir",
                             "optim.lr=1e-4", "train.ema_decay=0.999"])
    assert cfg.train.epochs == 5 and cfg.optim.grad_clip is None and cfg.train.compile is True
    assert cfg.data.root == "some/dir" and cfg.optim.lr == pytest.approx(1e-4) and cfg.train.ema_decay == 0.999


@pytest.mark.reliability("cli")
def test_scalar_where_a_section_is_expected_in_an_override(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"epochs": 3}})
    with pytest.raises(ConfigError, match=r"train\.epochs is the value 3, not a section"):
        load_config(path, ["train.epochs.x=1"])


def test_overrides_do_not_touch_other_keys() -> None:
    values = {"train": {"epochs": 2, "seed": 3}}
    apply_overrides(values, ["train.epochs=9"])
    assert values == {"train": {"epochs": 9, "seed": 3}}


@pytest.mark.reliability("cli")
@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.batch_size=0", "data.batch_size"),
        ("optim.lr=-1", "optim.lr"),
        ("data.val_fraction=1.0", "data.val_fraction"),
        ("train.ema_decay=1.5", "train.ema_decay"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("loss.terms=[{weight: 1}]", "needs a 'name'"),
    ],
)
def test_invalid_values_are_rejected(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


@pytest.mark.reliability("cli")
def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


@pytest.mark.reliability("cli")
def test_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"epochz": 1}}, "named.yaml")
    with pytest.raises(ConfigError, match=r"named\.yaml"):
        load_config(path)


def test_output_dir_defaults_to_runs_name() -> None:
    assert load_config(None, ["name=abc"]).resolved_output_dir() == Path("runs") / "abc"
    assert load_config(None, ["output_dir=/tmp/x"]).resolved_output_dir() == Path("/tmp/x")
