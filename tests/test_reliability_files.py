"""Reliability catalogue, category "weights": hostile and broken weight files beyond tests/test_zoo.py's cases.

Every case goes through the loaders users call (`zoo.load_pretrained`, `training.checkpoint.load_checkpoint`, a
run's `model.init_from`) and must end in an error naming the problem; a pickle carrying code must never run it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

import zoo
from training import checkpoint as ckpt
from training.config import UserError, load_config
from training.data import DatasetInfo
from training.trainer import build_model, initialize_from
from zoo.hub import sha256_of

pytestmark = pytest.mark.reliability("weights")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = zoo.create_model("shapnet_deep", in_features=5, num_classes=3, channels=4, hidden=(8,),
                             reference=torch.randn(5))
    return zoo.save_pretrained(model, tmp_path / "ckpt")


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _write_config(directory: Path, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config))


def _replace_weights(directory: Path, data: bytes) -> None:
    """Write new weight bytes and a config.json hash that matches them, so that the check under test is reached."""
    (directory / "model.safetensors").write_bytes(data)
    _write_config(directory, {**_config(directory), "sha256": sha256_of(directory / "model.safetensors")})


class _Payload:
    """A pickle that runs code when unpickled: it would create a sentinel file."""

    sentinel: Path

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def _evil_pickle(path: Path, sentinel: Path) -> None:
    payload = _Payload()
    payload.sentinel = sentinel
    torch.save({"model": {"w": torch.zeros(1)}, "payload": payload}, path)


def test_pickle_with_code_as_model_safetensors_is_refused_and_never_run(saved: Path, tmp_path: Path) -> None:
    """A torch.save pickle carrying code, renamed model.safetensors (hash updated): refused, the code never runs."""
    sentinel = tmp_path / "pwned"
    _evil_pickle(tmp_path / "evil.bin", sentinel)
    _replace_weights(saved, (tmp_path / "evil.bin").read_bytes())
    with pytest.raises(ValueError, match=r"not a safetensors file \(it looks like a pickle"):
        zoo.load_pretrained(saved)
    assert not sentinel.exists()


def test_pickle_with_code_as_training_checkpoint_is_refused_and_never_run(tmp_path: Path) -> None:
    """The same payload as a .pt training checkpoint (resume / export): refused by weights_only, never run."""
    sentinel = tmp_path / "pwned"
    _evil_pickle(tmp_path / "last.pt", sentinel)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(tmp_path / "last.pt")
    assert not sentinel.exists()


def test_pickle_with_code_as_init_from_is_refused_and_never_run(tmp_path: Path) -> None:
    """The same payload given to a fine-tuning run's model.init_from: refused, never run."""
    sentinel = tmp_path / "pwned"
    _evil_pickle(tmp_path / "weights.pt", sentinel)
    cfg = load_config(None, ["model.name=shapnet_shallow", "data.name=breast_cancer"])
    info = DatasetInfo(name="toy", num_classes=2, input_shape=(4,), class_names=["a", "b"])
    model = build_model(cfg.model, info)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        initialize_from(model, str(tmp_path / "weights.pt"))
    assert not sentinel.exists()


def test_nan_weights_with_a_matching_hash_are_refused(saved: Path) -> None:
    """A file whose hash matches but whose tensors hold NaN: refused, naming the tensor."""
    state = load((saved / "model.safetensors").read_bytes())
    name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    _replace_weights(saved, save(state))
    with pytest.raises(ValueError, match=rf"tensor\(s\) \['{name}'\] contain NaN or inf"):
        zoo.load_pretrained(saved)


def test_inf_weights_are_refused(saved: Path) -> None:
    """The same with +inf."""
    state = load((saved / "model.safetensors").read_bytes())
    name = sorted(k for k, v in state.items() if v.is_floating_point())[-1]
    state[name] = torch.full_like(state[name], float("inf"))
    _replace_weights(saved, save(state))
    with pytest.raises(ValueError, match="contain NaN or inf"):
        zoo.load_pretrained(saved)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", r"0 bytes, shorter than the 8-byte header length", id="empty_file"),
        pytest.param(struct.pack("<Q", 2**60) + b"{}", r"header length 1152921504606846976 does not fit",
                     id="header_length_claims_an_exabyte"),
        pytest.param(struct.pack("<Q", 9) + b"not json!", r"header is not a valid safetensors JSON header",
                     id="header_not_json"),
        pytest.param(struct.pack("<Q", 2) + b"[]", r"header is not a valid safetensors JSON header",
                     id="header_json_but_not_an_object"),
        pytest.param(b"PK\x03\x04" + b"\0" * 64, r"looks like a pickle / torch.save file", id="zip_archive"),
    ],
)
def test_malformed_safetensors_bytes_are_refused_without_allocating(saved: Path, data: bytes, message: str) -> None:
    """Bytes that are not a safetensors file: refused before anything is allocated from the header's claims."""
    _replace_weights(saved, data)
    with pytest.raises(ValueError, match=message):
        zoo.load_pretrained(saved)


def test_tensor_offsets_past_the_end_are_refused(saved: Path) -> None:
    """A header whose offsets point beyond the file (data cut after the header was written)."""
    data = (saved / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    _replace_weights(saved, data[: 8 + header_len + 4])
    with pytest.raises(ValueError, match=r"is truncated: its header describes \d+ bytes of tensor data but only 4"):
        zoo.load_pretrained(saved)


def test_a_folder_in_place_of_the_weights_file_is_reported(saved: Path) -> None:
    """model.safetensors is a directory: a clear "no weights file" error, not an IsADirectoryError."""
    (saved / "model.safetensors").unlink()
    (saved / "model.safetensors").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        zoo.load_pretrained(saved)


def test_game_player_count_that_differs_from_the_model_is_refused(saved: Path) -> None:
    """config.json's game.num_players must be the model's."""
    config = _config(saved)
    config["game"]["num_players"] = 7
    _write_config(saved, config)
    with pytest.raises(ValueError, match=r"game.num_players 7 does not match the model's 5 players"):
        zoo.load_pretrained(saved)


def test_game_reference_with_nan_is_refused(saved: Path) -> None:
    """A recorded reference with NaN never matches the buffer: refused."""
    config = _config(saved)
    config["game"]["reference"] = [[float("nan")]] * 5
    _write_config(saved, config)
    with pytest.raises(ValueError, match=r"game.reference disagrees with the reference buffer"):
        zoo.load_pretrained(saved)


def test_weights_for_one_zoo_name_loaded_as_another_are_refused(saved: Path) -> None:
    """Loading a Deep ShapNet checkpoint through a Shallow ShapNet's builder: refused with the differences."""
    with pytest.raises(ValueError, match=r"holds a shapnet_deep but shapnet_shallow"):
        zoo.create_model("shapnet_shallow", pretrained=True, in_features=5, out_features=3,
                         pretrained_cfg_overlay={"file": str(saved / "model.safetensors")})


def test_loading_never_calls_torch_load(saved: Path, monkeypatch) -> None:
    """Pretrained weights are read by safetensors only: torch.load (pickle) is never reached."""

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load was called while loading pretrained weights")

    monkeypatch.setattr(torch, "load", forbidden)
    zoo.load_pretrained(saved)
    zoo.create_model("shapnet_shallow_yeast", pretrained=True)
    assert os.path.exists(saved / "model.safetensors")
