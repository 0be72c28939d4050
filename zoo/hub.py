"""Saving and loading ShapNet weights: `model.safetensors` + `config.json`, verified on the way in.

A checkpoint folder holds:

* `model.safetensors` - the state dict (parameters and the reference buffer), contiguous, with
  `__metadata__ = {"format": "pt", "architecture": ..., "config": <config.json without sha256, as JSON>,
  "shapnets_version": ...}` so a lone file still describes itself;
* `config.json` - the single source of truth for rebuilding the model:

  | key | type | meaning |
  |---|---|---|
  | `architecture` | str | a registered name (`shapnet_deep`, `shapnet_conv_mnist`, ...) |
  | `model_args` | object | every constructor argument, JSON-able (reference as lists, act_layer by name) |
  | `sha256` | str | of `model.safetensors`, checked before any byte is deserialized |
  | `shapnets_version` | str | the library version that wrote the file |
  | `format_version` | int | this layout's version (1) |
  | `num_params` | int | trainable parameters |
  | `game` | object | `num_players`, `player_axes`, `reference_shape`, `reference`, `explanation` |
  | `pretrained_cfg` | object | timm-style per-weight metadata (also makes `timm.create_model("local-dir:...")` work) |

  plus the caller's `metadata`, merged in at the top level. Known metadata keys (types checked on
  load; model cards read them): `dataset` (str or object: name, split, seed, sizes), `preprocessing`
  (str or object), `metrics` (object, e.g. `test_accuracy`), `fidelity` (object: e.g.
  `max_abs_error_vs_exact_shapley`, `local_accuracy_residual`, `missingness_residual`, `num_samples`),
  `training` (object: `command`, `time_s`, `seed`, `device`, `date`, `config`), `license`, `paper`,
  `notes`, `data_info` (object: what the trainer needs to rebuild its data pipeline). Other metadata
  keys are kept as they are.

A loaded model carries the validated config.json as `model.checkpoint_config`, and the recorded
`data_info` (if any) as `model.data_info`.

Loading never unpickles: only safetensors is read, after the hash check, and the state dict must
match the rebuilt model exactly (missing / unexpected keys and shape or dtype differences are listed).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from timm.models import is_model
from torch import Tensor, nn

import shapnets

from ._args import encode_model_args, jsonable
from ._paths import CONFIG_NAME, WEIGHTS_NAME, shipped_dir
from ._registry import (
    ARCHITECTURES,
    VARIANT_DEFAULTS,
    ShapNetCfg,
    architecture_of,
    instantiate,
    known_names_hint,
    resolve_cfg,
    weights_available,
)

__all__ = [
    "FORMAT_VERSION",
    "RESERVED_KEYS",
    "build_model",
    "load_pretrained",
    "load_weights_into",
    "read_config",
    "resolve_checkpoint_dir",
    "save_pretrained",
    "sha256_of",
]

FORMAT_VERSION = 1

# Keys written by save_pretrained; metadata may not override them.
RESERVED_KEYS: dict[str, type | tuple[type, ...]] = {
    "architecture": str,
    "model_args": dict,
    "sha256": str,
    "shapnets_version": str,
    "format_version": int,
    "num_params": int,
    "game": dict,
    "pretrained_cfg": dict,
}
_REQUIRED = ("architecture", "model_args", "sha256")
# Metadata keys other code reads (cards, CLI): their types are checked on load.
_KNOWN_METADATA: dict[str, type | tuple[type, ...]] = {
    "dataset": (str, dict),
    "preprocessing": (str, dict),
    "metrics": dict,
    "fidelity": dict,
    "training": dict,
    "license": str,
    "paper": str,
    "notes": (str, list),
    "data_info": dict,
}
_TYPE_NAMES = {str: "a string", dict: "an object", int: "an integer", list: "a list"}


def _type_name(t: type | tuple[type, ...]) -> str:
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join(_TYPE_NAMES.get(x, x.__name__) for x in types)


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def validate_config(config: object, where: str = CONFIG_NAME) -> dict[str, Any]:
    """Check a parsed config.json: required keys, the types of known keys, a registered architecture.

    Raises:
        ValueError: a missing key, a key of the wrong type, a malformed sha256 or an unknown architecture.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object at the top level, got {_json_type(config)}")
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    for key, expected in {**RESERVED_KEYS, **_KNOWN_METADATA}.items():
        if key not in config:
            continue
        value = config[key]
        types = expected if isinstance(expected, tuple) else (expected,)
        # bool is an int in Python but never a valid count or version here
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{where}: key {key!r} must be {_type_name(expected)}, got {_json_type(value)}")
    sha = config["sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"{where}: sha256 must be 64 lowercase hex digits, got {sha!r}")
    architecture = config["architecture"]
    if not is_model(architecture):
        raise ValueError(
            f"{where}: unknown architecture {architecture!r}: not registered. " + known_names_hint(architecture)
        )
    architecture_of(architecture)  # registered but not a ShapNet -> ValueError with the known names
    game = config.get("game", {})
    if game.get("reference_shape") is not None and (
        not isinstance(game["reference_shape"], list) or not all(isinstance(s, int) for s in game["reference_shape"])
    ):
        raise ValueError(f"{where}: game.reference_shape must be a list of integers, got {game['reference_shape']!r}")
    return config


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate `<directory>/config.json`.

    Raises:
        FileNotFoundError: no config.json.
        ValueError: not valid JSON, or it fails `validate_config`.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {Path(directory)}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    return validate_config(config, str(path))


def _parse_safetensors(data: bytes, path: Path) -> dict[str, Tensor]:
    """Deserialize safetensors bytes, first rejecting what is not a complete safetensors file with a precise reason."""
    size = len(data)
    if size < 8:
        raise ValueError(f"{path} is not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(size - 8, 100_000_000):
        pickle_like = data[:2] == b"PK" or data[:1] == b"\x80"  # torch.save zip / raw pickle protocol byte
        kind = " (it looks like a pickle / torch.save file)" if pickle_like else ""
        raise ValueError(
            f"{path} is not a safetensors file{kind}: header length {header_len} does not fit in {size} bytes "
            f"(or the file is truncated)"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise ValueError(
            f"{path} is not a safetensors file: its header is not a valid safetensors JSON header"
        ) from None
    data_size = size - 8 - header_len
    if ends and max(ends) > data_size:
        raise ValueError(
            f"{path} is truncated: its header describes {max(ends)} bytes of tensor data but only {data_size} remain"
        )
    try:
        return load_safetensors_bytes(data)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file (or is corrupt): {err}") from None


def _state_differences(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor], labels: tuple[str, str] = ("checkpoint", "model")
) -> list[str]:
    """Every way `given` fails to fit `expected`: missing / unexpected keys, shape and dtype differences.

    `labels` name the two sides in the messages: (given, expected).
    """
    given_label, expected_label = labels
    problems = []
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    common = sorted(set(expected) & set(given))
    for what, of in (("shape", lambda t: tuple(t.shape)), ("dtype", lambda t: t.dtype)):
        differ = [f"{k}: {given_label} {of(given[k])} vs {expected_label} {of(expected[k])}"
                  for k in common if of(given[k]) != of(expected[k])]
        if differ:
            problems.append(f"{what} mismatches: " + "; ".join(differ))
    return problems


def _check_game(model: nn.Module, config: Mapping[str, Any], where: str) -> None:
    """The game recorded in config.json must be the model's: player count and reference buffer (shape, values)."""
    game = config.get("game") or {}
    reference = getattr(model, "reference", None)
    if reference is None:
        return
    num_players = getattr(model, "num_players", None)
    if game.get("num_players") is not None and num_players is not None and game["num_players"] != num_players:
        raise ValueError(
            f"{where}: game.num_players {game['num_players']!r} does not match the model's {num_players} players"
        )
    if "reference_shape" in game and list(game["reference_shape"]) != list(reference.shape):
        raise ValueError(
            f"{where}: game.reference_shape {game['reference_shape']} does not match the model's reference buffer "
            f"{list(reference.shape)}"
        )
    if game.get("reference") is not None:
        try:
            recorded = torch.tensor(game["reference"], dtype=reference.dtype)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: game.reference must be numbers, got {game['reference']!r}") from None
        if recorded.shape != reference.shape or not torch.allclose(recorded, reference.detach().cpu()):
            raise ValueError(
                f"{where}: game.reference disagrees with the reference buffer in {WEIGHTS_NAME} "
                f"(recorded shape {tuple(recorded.shape)}, buffer shape {tuple(reference.shape)})"
            )


def load_weights_into(
    model: nn.Module, location: str | os.PathLike, config: Mapping[str, Any] | None = None
) -> nn.Module:
    """Load a checkpoint into `model` in place: hash-checked, safetensors only, strict.

    Args:
        model: the rebuilt model.
        location: a checkpoint folder, or a `.safetensors` file (its folder's config.json, if any,
            supplies the hash).
        config: the already-read config.json; read from the folder when omitted.

    Raises:
        ValueError: "hash mismatch", "not a safetensors file", truncation, or a state dict that
            does not fit (every missing / unexpected key and shape difference listed).
    """
    location = Path(location)
    path = location / WEIGHTS_NAME if location.is_dir() else location
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if config is None and (path.parent / CONFIG_NAME).is_file():
        config = read_config(path.parent)
    # Read once: the bytes that are hashed are the bytes deserialized (no window for the file to change).
    data = path.read_bytes()
    if config is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != config["sha256"]:
            raise ValueError(
                f"hash mismatch for {path}: config.json expects sha256 {config['sha256']}, the file has {actual}"
            )
    state = _parse_safetensors(data, path)
    # A checkpoint saved in another float precision (e.g. float64) rebuilds in that precision.
    float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    model_param = next(iter(model.parameters()), None)
    if len(float_dtypes) == 1 and model_param is not None and model_param.dtype not in float_dtypes:
        model.to(next(iter(float_dtypes)))
    problems = _state_differences(model.state_dict(), state)
    if problems:
        raise ValueError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems))
    # A hash only proves the file is the one config.json names; NaN / inf weights would give NaN logits silently.
    broken = sorted(k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if broken:
        raise ValueError(f"{path}: tensor(s) {broken[:5]}{' ...' if len(broken) > 5 else ''} contain NaN or inf "
                         "values; refusing weights that cannot give finite outputs")
    model.load_state_dict(state, strict=True)
    if config is not None:
        _check_game(model, config, str(path.parent / CONFIG_NAME))
        model.checkpoint_config = dict(config)
        if "data_info" in config:
            model.data_info = config["data_info"]
            # Tabular models: `model.preprocess(rows)` (raw rows -> input) and a guard against raw inputs.
            from .preprocessing import attach_preprocessing

            attach_preprocessing(model, config["data_info"])
    return model


def build_model(architecture: str, model_args: Mapping[str, Any], pretrained_cfg: Any = None) -> nn.Module:
    """Instantiate a registered ShapNet from JSON-able `model_args`, without any weights."""
    return instantiate(architecture, model_args, resolve_cfg(architecture.split(".", 1)[0], pretrained_cfg, None))


def resolve_checkpoint_dir(dir_or_name: str | os.PathLike) -> Path:
    """A folder path as given, or a registered name's shipped folder.

    Raises:
        FileNotFoundError: neither an existing folder / file nor a name with shipped weights.
    """
    path = Path(dir_or_name)
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    name = str(dir_or_name).split(".", 1)[0]
    if is_model(name) and name in {*ARCHITECTURES, *VARIANT_DEFAULTS}:
        folder = shipped_dir(name)
        if (folder / CONFIG_NAME).is_file():
            return folder
        raise FileNotFoundError(
            f"{name} has no shipped weights (looked in {folder}); "
            f"names with weights: {weights_available() or 'none yet'}"
        )
    raise FileNotFoundError(
        f"{dir_or_name!r} is neither a checkpoint folder nor a registered ShapNet. {known_names_hint(name)}"
    )


def load_pretrained(dir_or_name: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a checkpoint folder (or a registered name's shipped weights) and load it.

    Args:
        dir_or_name: a folder with `config.json` + `model.safetensors`, a path to its
            `model.safetensors`, or a registered name with shipped weights.
        device: where to put the model.

    Raises:
        FileNotFoundError: nothing at that path / no shipped weights for that name.
        ValueError: invalid config.json, unknown architecture, hash mismatch, not a safetensors
            file, or a state dict that does not fit the architecture.
    """
    directory = resolve_checkpoint_dir(dir_or_name)
    config = read_config(directory)
    cfg = dict(config.get("pretrained_cfg") or {})
    cfg.pop("file", None)
    model = build_model(config["architecture"], config["model_args"], _merged_cfg(config["architecture"], cfg))
    load_weights_into(model, directory, config)
    model.pretrained_cfg = {**model.pretrained_cfg, "file": str(directory / WEIGHTS_NAME)}
    model.default_cfg = model.pretrained_cfg
    return model.to(device)


def _merged_cfg(architecture: str, recorded: Mapping[str, Any]) -> ShapNetCfg:
    """The registry cfg of `architecture` with the fields recorded in config.json on top."""
    base = resolve_cfg(architecture.split(".", 1)[0], None, None)
    known = {k: v for k, v in recorded.items() if hasattr(base, k)}
    for key in ("input_size", "mean", "std", "label_names", "player_axes", "paper_ids", "notes"):
        if isinstance(known.get(key), list):
            known[key] = tuple(known[key])
    return resolve_cfg(architecture.split(".", 1)[0], base, known)


def _game(model: nn.Module, cfg: Mapping[str, Any]) -> dict[str, Any]:
    reference = getattr(model, "reference", None)
    num_players = getattr(model, "num_players", None)
    if num_players is None:
        num_players = cfg.get("num_players")  # images: depends on the input size the cfg names
    return {
        "num_players": num_players,
        "players": cfg.get("players"),
        "player_axes": list(cfg.get("player_axes") or []),
        "reference_shape": list(reference.shape) if reference is not None else None,
        "reference": reference.detach().cpu().tolist() if reference is not None else None,
        "reference_meaning": cfg.get("reference"),
        "explanation": cfg.get("explanation"),
    }


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    model_args: Mapping[str, Any] | None = None,
    architecture: str | None = None,
) -> Path:
    """Write `model.safetensors` and `config.json` into `directory` (created if needed).

    Args:
        model: a ShapNet built through the zoo (it carries `model.model_args`), or any ShapNet
            when `model_args` is given; DDP / DataParallel / torch.compile wrappers are unwrapped.
        directory: the checkpoint folder.
        metadata: merged into config.json: data set, preprocessing, metrics, fidelity, training
            command and time ... (see the module docstring for the keys model cards read).
        model_args: the constructor arguments, for a model not built through the zoo.
        architecture: the registered name to record; default the one the model was built as.

    Returns:
        The folder.

    Raises:
        ValueError: a model not built through the zoo without `model_args`, an architecture that
            is not registered or not the model's class, model_args that do not rebuild this model,
            or metadata overriding a reserved key.
        TypeError: model_args / metadata with values that cannot be written as JSON.
    """
    model = _unwrap(model)
    if model_args is None:
        model_args = getattr(model, "model_args", None)
        if model_args is None:
            raise ValueError(
                f"{type(model).__name__} was not built through the zoo (it has no model_args): build it with "
                f"zoo.create_model(...) or pass save_pretrained(..., model_args=<constructor kwargs>)"
            )
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if architecture is None:
        architecture = cfg.get("architecture") or _architecture_for_class(model)
    if not is_model(architecture.split(".", 1)[0]):
        raise ValueError(f"architecture {architecture!r} is not registered. {known_names_hint(architecture)}")
    expected_cls = ARCHITECTURES[architecture_of(architecture)]
    if type(model) is not expected_cls:
        raise ValueError(
            f"architecture {architecture!r} builds a {expected_cls.__name__}, not a {type(model).__name__}"
        )
    reserved = sorted(set(metadata or {}) & set(RESERVED_KEYS))
    if reserved:
        raise ValueError(f"metadata may not set the reserved config.json key(s) {reserved}")

    encoded_args = encode_model_args(model_args)
    reference = getattr(model, "reference", None)
    if isinstance(reference, Tensor) and "reference" in encoded_args:
        # The buffer is the truth (a trainer may set it after construction, e.g. to the data mean).
        encoded_args["reference"] = reference.detach().cpu().tolist()
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    # The recorded args must rebuild exactly this state dict, or the checkpoint could never be loaded.
    rebuilt = build_model(architecture, encoded_args)
    rebuilt.to(next(iter(state.values())).dtype if state else torch.get_default_dtype())
    problems = _state_differences(rebuilt.state_dict(), state, ("model", "model_args"))
    if problems:
        raise ValueError("model_args do not describe this model: " + "; ".join(problems))

    registry_cfg = resolve_cfg(architecture.split(".", 1)[0], None, None).to_dict()
    pretrained_cfg = {**registry_cfg, **cfg, "architecture": architecture}
    for key in ("file", "url", "hf_hub_id", "hf_hub_filename", "source", "state_dict"):
        pretrained_cfg.pop(key, None)
    config: dict[str, Any] = {
        "architecture": architecture,
        "model_args": encoded_args,
        "shapnets_version": shapnets.__version__,
        "format_version": FORMAT_VERSION,
        "num_params": sum(p.numel() for p in model.parameters()),
        "game": _game(model, pretrained_cfg),
        "pretrained_cfg": jsonable(pretrained_cfg),
        **jsonable(dict(metadata or {})),
    }
    try:
        config_text = json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata cannot be written as JSON: {err}") from None

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    file_metadata = {
        "format": "pt",
        "architecture": architecture,
        "config": config_text,
        "shapnets_version": shapnets.__version__,
    }
    data = _deterministic_safetensors(state, file_metadata)
    # Write-then-rename: a crash never leaves a half-written file under the final name.
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        tmp_path.write_bytes(data)
        os.replace(tmp_path, directory / WEIGHTS_NAME)
    finally:
        tmp_path.unlink(missing_ok=True)
    config["sha256"] = sha256_of(directory / WEIGHTS_NAME)
    ordered = {k: config[k] for k in ("architecture", "sha256", "shapnets_version", "format_version")}
    ordered.update(config)
    (directory / CONFIG_NAME).write_text(json.dumps(ordered, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return directory


def _deterministic_safetensors(state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes whose header lists `__metadata__` keys sorted, so equal weights give an equal sha256.

    The library writes its metadata map in a random (hash) order; only the header is rewritten
    here, the tensor bytes and their offsets (relative to the data section) are the library's.
    """
    raw = save_safetensors_bytes(dict(state), metadata=dict(metadata))
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    canonical = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + raw[8 + header_len :]


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside training wrappers: (Distributed)DataParallel's `.module`, torch.compile's `._orig_mod`."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _architecture_for_class(model: nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(
        f"cannot save a {type(model).__name__}: the zoo knows {sorted(c.__name__ for c in ARCHITECTURES.values())}"
    )
