"""Typed experiment configuration: YAML in, dataclasses out, with errors that name the problem.

A config file has the sections of `ExperimentConfig` (model, data, optim, train, loss) plus the top-level keys
`name` and `output_dir`. Every key is checked: an unknown key is an error naming the section, the valid keys and the
closest match; a value of the wrong type is an error naming the key, the expected and the given type. Command-line
overrides `section.key=value` are parsed with `yaml.safe_load`, so `train.epochs=5`, `optim.betas=[0.9,0.99]` and
`model.init_from=null` all mean what they say.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "UserError",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "track_interactions_options",
]


class UserError(Exception):
    """A mistake in what the user asked for (bad config, missing file, unknown name): the CLI prints one line."""


class ConfigError(UserError, ValueError):
    """An invalid configuration: unknown key, wrong type, bad value or malformed override."""


@dataclass
class ModelConfig:
    """Which model to build and how to initialise it.

    Attributes:
        name: a zoo model name or a generic architecture (`shapnet_shallow`, `shapnet_deep`, `shapnet_conv`).
        args: constructor keyword arguments; `num_classes`, `in_features`/`in_chans`, `feature_names` and
            `reference` are filled from the data set unless given here.
        init_from: fine-tuning start point: a training checkpoint (`.pt`), a pretrained folder
            (`model.safetensors` + `config.json`) or a zoo name; `None` trains from scratch.
        freeze: fnmatch patterns of parameter names that are not trained (e.g. `"banks.0.*"`).
        strict_init: with `init_from`, require every parameter to match by name and shape, except a head for another
            number of classes (a fine-tune on a new label set): that head is newly initialised and reported, as
            timm's `pretrained=True, num_classes=N` does.
    """

    name: str = "shapnet_shallow"
    args: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    freeze: list[str] = field(default_factory=list)
    strict_init: bool = True


@dataclass
class DataConfig:
    """Which data set to load and how to batch it.

    Attributes:
        name: data set name understood by `training.data.load_dataset`; `csv` and `image_folder` read the
            user's own data from `path` (see `training.data.own`).
        root: folder of the raw files; `None` uses `$SHAPNETS_DATA` (or the loader's default). For `csv` /
            `image_folder`, a relative `path` is resolved against it (`None`: the current folder).
        batch_size: global batch size (split evenly across DDP processes).
        eval_batch_size: batch size for validation and test.
        val_fraction: fraction of the training split held out for validation.
        seed: seed of the train/val split (separate from the training seed so that the split is stable).
        num_workers: DataLoader worker processes.
        limit: keep at most this many samples per split (smoke runs).
        shift_pixels: translate each training image by a random offset of up to this many pixels per axis
            (edges replicated; the CapsNet paper's 2-pixel shifts); 0 = no augmentation. Images only.
        path: `csv`: the CSV file (header row); `image_folder`: the folder with one subfolder per class.
        target: `csv`: the column holding the class.
        categorical: `csv`: columns treated as categories even when numeric (text columns always are).
        drop: `csv`: columns left out (ids, leaks).
        missing: `csv`: `impute` missing cells with train-split median / most frequent value, or `error`.
        test_fraction: `csv` / `image_folder`: share held out for test (`None`: 0.2).
        image_size: `image_folder`: size every image is resized to, an int or `[height, width]`.
        channels: `image_folder`: 1 (grayscale) or 3 (RGB).
    """

    name: str = "breast_cancer"
    root: str | None = None
    batch_size: int = 64
    eval_batch_size: int = 512
    val_fraction: float = 0.1
    seed: int = 0
    num_workers: int = 0
    limit: int | None = None
    shift_pixels: int = 0
    path: str | None = None
    target: str | None = None
    categorical: list[str] | None = None
    drop: list[str] = field(default_factory=list)
    missing: str = "impute"
    test_fraction: float | None = None
    image_size: int | list[int] = 32
    channels: int = 3


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (per step).

    Attributes:
        lr: peak learning rate.
        weight_decay: decoupled weight decay (not applied to biases and 1-d parameters).
        betas: Adam betas.
        warmup_epochs: length of the linear warm-up, in epochs (fractions allowed).
        min_lr_ratio: final learning rate as a fraction of `lr`.
        grad_clip: clip the global gradient norm to this value; `None` disables clipping.
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: float | None = 1.0


@dataclass
class TrainConfig:
    """The training loop.

    Attributes:
        epochs: number of passes over the training set.
        seed: training seed (model init, shuffling); each DDP process uses `seed + rank` for its own RNGs.
        device: `auto` (CUDA when available), `cpu` or `cuda`.
        precision: `auto` (bf16 autocast on CUDA, fp32 on CPU), `fp32` or `bf16` (CUDA only).
        compile: wrap the model in `torch.compile`.
        ema_decay: keep an exponential moving average of the weights with this decay and evaluate with it; the decay
            warms up as `min(ema_decay, (1 + n) / (10 + n))` after `n` steps, so short fine-tunes are not
            reported (and exported) as mostly their start point.
        early_stopping_patience: stop after this many evaluations without a better validation accuracy.
        eval_every: evaluate on the validation set every this many epochs (and after the last one).
        log_every: log the running training loss every this many steps (0: only per epoch).
        deterministic: `torch.use_deterministic_algorithms(True)` and no cuDNN benchmarking.
        max_steps: stop after this many optimisation steps (smoke runs); `None` runs all epochs.
        checkpoint_every_steps: also write `last.pt` every this many steps mid-epoch; `None`: once per epoch.
        time_budget_s: fit the run into this many seconds of wall time: after `BUDGET_PROBE_STEPS` steps the
            trainer measures the step time and lowers `epochs` (at least 1) to what fits, keeping the whole
            warm-up + cosine schedule; `None` runs `epochs` as given. For a machine lent for minutes (a GPU).
        track_interactions: watch AND/OR interactions during training (`training.interaction_tracking`):
            `{samples: 32, players: 10, every: 1}` plus optional `kind` (`and`, `or`, `and_or`), `split`
            (`half`, `sparse`), `tau` (salience threshold) and `output` (`log_odds`, `logit`); `every` defaults
            to `auto`: track whenever the tracking time stays within `budget` (default 0.25) x the training time so
            far (`TRACK_INTERACTIONS_DEFAULTS`); `None`: off.
    """

    epochs: int = 50
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    ema_decay: float | None = None
    early_stopping_patience: int | None = None
    eval_every: int = 1
    log_every: int = 0
    deterministic: bool = False
    max_steps: int | None = None
    checkpoint_every_steps: int | None = None
    time_budget_s: float | None = None
    track_interactions: dict[str, Any] | None = None


@dataclass
class LossConfig:
    """Cross-entropy plus weighted extra terms.

    Attributes:
        label_smoothing: label smoothing of the cross-entropy.
        terms: extra loss terms, each `{name: <registered term>, weight: <float>, ...kwargs}`
            (see `training.losses.LOSS_TERMS`).
    """

    label_smoothing: float = 0.0
    terms: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    """A whole experiment: what to train, on what, how, and where the results go."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    output_dir: str | None = None
    name: str = "experiment"

    def resolved_output_dir(self) -> Path:
        """`output_dir`, or `runs/<name>` when it is not set."""
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


# Allowed values of string options, checked after parsing so that errors name the choices.
_CHOICES = {
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "precision"): ("auto", "fp32", "bf16"),
    ("data", "missing"): ("impute", "error"),
    ("data", "channels"): (1, 3),
}
# Data keys that only the own-data loaders read: set for another data set they would be silently ignored.
_OWN_DATA_KEYS = {
    "csv": ("path", "target", "categorical", "drop", "missing", "test_fraction"),
    "image_folder": ("path", "test_fraction", "image_size", "channels"),
}
_SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(ExperimentConfig) if f.name in
                              ("model", "data", "optim", "train", "loss")}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _given_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float, tuple -> list)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_given_name(value)} ({value!r})")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string: accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp) or (Any,)
            return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, value_tp = typing.get_args(tp) or (Any, Any)
            return {_coerce(k, key_tp, f"{where} key"): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    else:  # pragma: no cover - only reached if a new annotation kind is added to the dataclasses
        raise TypeError(f"unsupported annotation {tp!r} for {where}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_given_name(value)} ({value!r})")


def _unknown_key_error(key: str, section: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f"section {section!r}" if section else "the top level"
    return ConfigError(f"unknown key {key!r} in {where}{hint} (valid keys: {', '.join(valid)})")


def _as_mapping(values: Any, what: str) -> dict[str, Any]:
    """`values` as a dict (`None`: empty), or a `ConfigError` saying `what` it must be and what it is."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{what}, got {_given_name(values)}")
    return values


def _build_section(cls: type, values: Any, section: str) -> Any:
    values = _as_mapping(values, f"section {section!r} must be a mapping of keys to values")
    hints = _hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key_error(str(key), section, valid)
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
        choices = _CHOICES.get((section, key))
        if choices is not None and kwargs[key] not in choices:
            raise ConfigError(f"{section}.{key}: expected one of {', '.join(map(str, choices))}, got {kwargs[key]!r}")
    return cls(**kwargs)


#: `train.track_interactions` keys and their defaults. `every: auto` tracks an epoch whenever the tracking time so
#: far, plus the last evaluation's cost, stays within `budget` x the training time so far (the first and the last
#: epoch always): a run then takes at most about `1 + budget` times as long as without tracking, whatever one
#: evaluation costs against an epoch. An integer `every` tracks every that many epochs regardless of cost.
TRACK_INTERACTIONS_DEFAULTS: dict[str, Any] = {
    "samples": 32, "players": 10, "every": "auto", "budget": 0.25, "kind": "and_or", "split": "half", "tau": 0.05,
    "output": "log_odds",
}
_TRACK_TYPES: dict[str, Any] = {"every": int | str}
_TRACK_CHOICES = {"kind": ("and", "or", "and_or"), "split": ("half", "sparse"), "output": ("log_odds", "logit")}


def track_interactions_options(values: dict[str, Any]) -> dict[str, Any]:
    """`train.track_interactions` with defaults filled in, or a `ConfigError` naming the bad key or value."""
    from shapnets.interactions import MAX_ORACLE_PLAYERS

    where = "train.track_interactions"
    options = dict(TRACK_INTERACTIONS_DEFAULTS)
    for key, value in values.items():
        if key not in options:
            raise _unknown_key_error(str(key), where, list(TRACK_INTERACTIONS_DEFAULTS))
        expected = _TRACK_TYPES.get(key, type(TRACK_INTERACTIONS_DEFAULTS[key]))
        options[key] = _coerce(value, expected, f"{where}.{key}")
    if isinstance(options["every"], str) and options["every"] != "auto":
        raise ConfigError(f"{where}.every must be an integer >= 1 or 'auto', got {options['every']!r}")
    for key in ("samples", "players", "every"):
        if options[key] != "auto" and options[key] < 1:
            raise ConfigError(f"{where}.{key} must be >= 1, got {options[key]}")
    if not options["budget"] > 0 or not math.isfinite(options["budget"]):
        raise ConfigError(f"{where}.budget (tracking time / training time with every: auto) must be a finite number "
                          f"> 0, got {options['budget']}")
    if options["players"] > MAX_ORACLE_PLAYERS:
        raise ConfigError(f"{where}.players={options['players']} is above the exact oracle's limit of "
                          f"{MAX_ORACLE_PLAYERS} players (2^players coalitions per sample)")
    if options["split"] == "sparse" and options["players"] > 12:
        raise ConfigError(f"{where}.split=sparse solves a linear program per sample: at most 12 players, got "
                          f"{options['players']}")
    if not 0.0 <= options["tau"] < 1.0:
        raise ConfigError(f"{where}.tau must lie in [0, 1), got {options['tau']}")
    for key, choices in _TRACK_CHOICES.items():
        if options[key] not in choices:
            raise ConfigError(f"{where}.{key}: expected one of {', '.join(choices)}, got {options[key]!r}")
    return options


def _validate(cfg: ExperimentConfig) -> None:
    """Value checks that types alone cannot express."""
    checks = [
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.eval_batch_size >= 1, "data.eval_batch_size must be >= 1"),
        (0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must lie in [0, 1)"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.data.limit is None or cfg.data.limit >= 1, "data.limit must be >= 1 or null"),
        (cfg.data.shift_pixels >= 0, "data.shift_pixels must be >= 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
         "optim.betas must be two numbers in [0, 1)"),
        (cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must lie in [0, 1]"),
        (cfg.optim.grad_clip is None or cfg.optim.grad_clip > 0, "optim.grad_clip must be > 0 or null"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.ema_decay is None or 0.0 < cfg.train.ema_decay < 1.0, "train.ema_decay must lie in (0, 1)"),
        (cfg.train.early_stopping_patience is None or cfg.train.early_stopping_patience >= 1,
         "train.early_stopping_patience must be >= 1 or null"),
        (cfg.train.eval_every >= 1, "train.eval_every must be >= 1"),
        (cfg.train.log_every >= 0, "train.log_every must be >= 0"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps must be >= 1 or null"),
        (cfg.train.checkpoint_every_steps is None or cfg.train.checkpoint_every_steps >= 1,
         "train.checkpoint_every_steps must be >= 1 or null"),
        (cfg.train.time_budget_s is None or cfg.train.time_budget_s > 0, "train.time_budget_s must be > 0 or null"),
        (0.0 <= cfg.loss.label_smoothing < 1.0, "loss.label_smoothing must lie in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_own_data(cfg)
    if cfg.train.track_interactions is not None:
        cfg.train.track_interactions = track_interactions_options(cfg.train.track_interactions)
    for i, term in enumerate(cfg.loss.terms):
        if "name" not in term:
            raise ConfigError(f"loss.terms[{i}] needs a 'name' key, got keys {sorted(term)}")
        weight = term.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            raise ConfigError(f"loss.terms[{i}] ({term['name']}): weight must be a number >= 0, got {weight!r}")


def _validate_own_data(cfg: ExperimentConfig) -> None:
    d, defaults = cfg.data, DataConfig()
    if d.name == "csv" and (not d.path or not d.target):
        raise ConfigError("data.name=csv needs data.path (the CSV file) and data.target (the class column)")
    if d.name == "image_folder" and not d.path:
        raise ConfigError("data.name=image_folder needs data.path (a folder with one subfolder per class)")
    used = _OWN_DATA_KEYS.get(d.name, ())
    stray = [k for k in dict.fromkeys(k for keys in _OWN_DATA_KEYS.values() for k in keys)
             if k not in used and getattr(d, k) != getattr(defaults, k)]
    if stray:
        owners = " / ".join(n for n, keys in _OWN_DATA_KEYS.items() if stray[0] in keys)
        raise ConfigError(f"data.{stray[0]} only applies to data.name={owners}, not to data.name={d.name!r}")
    if d.test_fraction is not None and not 0.0 < d.test_fraction < 1.0:
        raise ConfigError("data.test_fraction must lie in (0, 1) or be null")
    size = [d.image_size] if isinstance(d.image_size, int) else d.image_size
    if not 1 <= len(size) <= 2 or min(size) < 1:
        raise ConfigError(f"data.image_size must be a positive int or [height, width], got {d.image_size!r}")


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an `ExperimentConfig` from a nested dict (as read from YAML).

    Raises:
        ConfigError: unknown key (with the valid keys and a suggestion), wrong type, or invalid value.
    """
    values = _as_mapping(values, "a config must be a mapping of sections")
    top_hints = _hints(ExperimentConfig)
    valid = [f.name for f in dataclasses.fields(ExperimentConfig)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in _SECTIONS:
            kwargs[key] = _build_section(top_hints[key], value, key)
        elif key in top_hints:
            kwargs[key] = _coerce(value, top_hints[key], key)
        else:
            raise _unknown_key_error(str(key), "", valid)
    cfg = ExperimentConfig(**kwargs)
    _validate(cfg)
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML- and JSON-safe)."""
    return dataclasses.asdict(cfg)


def _parse_override(override: str) -> tuple[list[str], Any]:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. train.epochs=5)")
    dotted, raw = override.split("=", 1)
    path = [p.strip() for p in dotted.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {override!r} has an empty key: use section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({e.__class__.__name__})") from e
    return path, value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a nested dict (in place, also returned).

    `model.args.hidden=[64]` sets a nested key of a dict-valued option; the key names of the sections are checked
    later by `config_from_dict`, so a misspelt override gets the same "did you mean" error as a misspelt YAML key.
    """
    for override in overrides:
        path, value = _parse_override(override)
        node = values
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"override {override!r}: {where} is the value {child!r}, not a section")
            node = child
        node[path[-1]] = value
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config, apply overrides and validate.

    Args:
        path: the YAML file; `None` starts from the defaults.
        overrides: `section.key=value` strings applied after the file.

    Raises:
        UserError: the file does not exist.
        ConfigError: invalid YAML, unknown key, wrong type or invalid value.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections, got {_given_name(values)}")
    apply_overrides(values, list(overrides or []))
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    path = Path(path)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
