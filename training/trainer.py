"""The training loop: one plain function, `train(cfg)`, readable top to bottom.

nanoGPT in spirit, timm in its checkpoint conventions: AdamW (no decay on biases and 1-d parameters), linear
warm-up then cosine per step, gradient clipping, bf16 autocast on CUDA (fp32 on CPU), optional torch.compile and
EMA, DDP via torchrun, evaluation every epoch with torchmetrics, early stopping on validation accuracy, a final
test evaluation with the best weights, `metrics.csv` and atomic `last.pt` / `best.pt` checkpoints from which a
killed run resumes bit for bit (on CPU). Progress: a tqdm bar with the epoch's ETA on a terminal, and always one
log line per epoch with its metrics, its time and the run's ETA (what a piped or logged run shows).

Run folder (`output_dir`): config.yaml, data_info.json, last.pt, best.pt, metrics.csv, train.log, summary.json,
curves.png (the learning curves, drawn from metrics.csv at the end of the run).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fnmatch
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

import zoo
from shapnets.contract import rename_args

from . import checkpoint as ckpt
from .config import ExperimentConfig, ModelConfig, OptimConfig, UserError, config_to_dict, save_config
from .curves import format_duration, plot_curves
from .data.augment import random_shift
from .distributed import (
    DistInfo,
    ResumableDistributedSampler,
    ShardSampler,
    all_gather_objects,
    all_reduce_flag,
    barrier,
    init_distributed,
)
from .interaction_tracking import InteractionTracker
from .losses import ModelStep, Objective, build_loss_terms

__all__ = [
    "RUN_FILES",
    "TrainingDiverged",
    "apply_freeze",
    "build_model",
    "build_optimizer",
    "evaluate",
    "initialize_from",
    "load_data",
    "log_init_report",
    "seed_everything",
    "train",
    "warmup_cosine",
]

log = logging.getLogger("training")

BUDGET_PROBE_STEPS = (5, 35)
"""With `train.time_budget_s`, the step time is measured from the first to the second of these steps (the steps
before it pay for warm-ups: cuDNN autotuning, lazy allocation)."""

RUN_FILES = ("last.pt", "best.pt", "config.yaml", "data_info.json", "metrics.csv", "train.log", "summary.json",
             "explanation_effect.json", "init_from.json", "curves.png")
"""Files a run writes into its output folder (the ones `--overwrite` replaces)."""

class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------ building blocks
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # Each DataLoader worker gets a distinct, reproducible seed derived from the loader's generator.
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def load_data(cfg: ExperimentConfig) -> Any:
    """`training.data.load_dataset` for the config's data section; loader errors become one-line `UserError`s."""
    from .data import load_dataset

    d = cfg.data
    options: dict[str, Any] = {}
    if d.name == "csv":
        options = dict(path=d.path, target=d.target, categorical=d.categorical, drop=d.drop, missing=d.missing,
                       test_fraction=d.test_fraction)
    elif d.name == "image_folder":
        options = dict(path=d.path, image_size=d.image_size, channels=d.channels, test_fraction=d.test_fraction)
    try:
        return load_dataset(d.name, d.root, seed=d.seed, val_fraction=d.val_fraction, limit=d.limit, **options)
    except (FileNotFoundError, NotADirectoryError, KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UserError(f"data ({d.name}): {message}") from e


def _model_kwargs(model_cls: type[nn.Module], model_cfg: ModelConfig, info: Any) -> dict[str, Any]:
    """Config args plus what the data set implies: classes and input size, and the class's `data_args`.

    Every family takes `num_classes` and `in_features` (tabular) or `in_chans` (images); `feature_names`, the data
    set's `reference` and its normalisation (`input_mean` / `input_std`) only where the class lists them in
    `data_args` (the contract in `shapnets.contract`).
    """
    kwargs = rename_args(model_cls, model_cfg.args)
    tabular = len(info.input_shape) == 1
    defaults: dict[str, Any] = {"num_classes": info.num_classes}
    defaults["in_features" if tabular else "in_chans"] = info.input_shape[0]
    optional = set(getattr(model_cls, "data_args", ()))
    if tabular and info.feature_names is not None and "feature_names" in optional:
        defaults["feature_names"] = list(info.feature_names)
    if info.reference is not None and "reference" in optional:
        defaults["reference"] = torch.tensor(info.reference, dtype=torch.float32)
    preprocessing = getattr(info, "preprocessing", None)
    normalize = preprocessing.get("normalize") if isinstance(preprocessing, dict) else None
    if isinstance(normalize, dict) and {"mean", "std"} <= set(normalize) and "input_mean" in optional:
        # Models that un-normalise their input (CapsNet's reconstruction target) take the data's constants.
        defaults["input_mean"], defaults["input_std"] = list(normalize["mean"]), list(normalize["std"])
    for key, value in defaults.items():
        kwargs.setdefault(key, value)
    return kwargs


def build_model(model_cfg: ModelConfig, info: Any) -> nn.Module:
    """Build the configured zoo model for a data set.

    Fills `num_classes`, `in_features` (tabular) or `in_chans` (images), and `feature_names` and the data set's
    `reference` where the class takes them, unless `model.args` gives them.

    Raises:
        UserError: unknown model name or constructor arguments it rejects.
    """
    try:
        kwargs = _model_kwargs(zoo.model_class(model_cfg.name), model_cfg, info)
        return zoo.create_model(model_cfg.name, pretrained=False, **kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UserError(f"model {model_cfg.name!r}: {message}") from e


def _state_dict_from(source: str) -> dict[str, Tensor]:
    """Weights from a training checkpoint, a run folder, a pretrained folder, a .safetensors file or a zoo name."""
    path = Path(source)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return ckpt.load_checkpoint(path / name)["model"]
        if (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        else:
            raise UserError(f"model.init_from={source!r}: the folder holds neither best.pt/last.pt nor "
                            "model.safetensors")
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return ckpt.load_checkpoint(path)["model"]
    try:
        return zoo.load_pretrained(source).state_dict()
    except (KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
        raise UserError(f"model.init_from={source!r}: not a file, a folder or a zoo model with weights ({e})") from e


def initialize_from(model: nn.Module, source: str, strict: bool = True) -> dict[str, list[str]]:
    """Load initial weights (fine-tuning), giving the model a new head when the label set changed.

    A source whose entries differ from the model's only in the head (another number of classes: a fine-tune on a new
    label set) is timm's `pretrained=True, num_classes=N`: the whole head is newly initialised
    (`zoo.replace_head`), every other entry is loaded, and the data set's own `data_args` buffers (a ShapNet's
    `reference`: what "absent" means in the new data) are kept as the data set gave them. Otherwise, with `strict`,
    every parameter and buffer must match by name and shape; without it, entries that are missing, unexpected or
    of another shape are skipped and reported.

    Returns:
        The names of `missing`, `unexpected` and `mismatched` entries (skipped), `kept` (loaded from the source),
        `new` (a newly initialised head) and `from_data` (kept as the data set gave them).

    Raises:
        UserError: an unreadable source, or (with `strict`) one that does not match beyond the head.
    """
    state = _state_dict_from(source)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    report: dict[str, list[str]] = {"missing": [], "unexpected": [], "mismatched": [], "kept": [], "new": [],
                                    "from_data": []}
    head = _new_head_keys(model, mismatched)
    if head:
        from_data = [k for k in getattr(model, "data_args", ()) if k in own and k not in head]
        skip = set(head) | set(from_data)
        state = {k: v for k, v in state.items() if k not in skip}
        own = {k: v for k, v in own.items() if k not in skip}
        mismatched = [k for k in mismatched if k not in skip]
        report.update(new=head, from_data=from_data)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected or mismatched):
        details = [f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}"
                   for label, names in (("missing", missing), ("unexpected", unexpected),
                                        ("shape mismatch", mismatched)) if names]
        raise UserError(f"model.init_from={source!r} does not match the model ({'; '.join(details)}); "
                        "set model.strict_init=false to load what matches")
    loaded = {k: v for k, v in state.items() if k in own and k not in mismatched}
    model.load_state_dict(loaded, strict=False)
    report.update(missing=missing, unexpected=unexpected, mismatched=mismatched,
                  kept=[k for k in model.state_dict() if k in loaded])
    for label in ("missing", "unexpected", "mismatched"):
        if report[label]:
            log.info("init_from: %d %s entries skipped: %s", len(report[label]), label,
                     ", ".join(report[label][:8]))
    return report


def _new_head_keys(model: nn.Module, mismatched: list[str]) -> list[str]:
    """The head's entries, newly initialised, when every mismatch lies in the model's head; else `[]` (untouched).

    The head is what `zoo.replace_head` renews (the family's `reset_classifier`): a ShapNet's last stage, the
    output layers of a Shallow ShapNet's inner nets, a linear classifier.
    """
    classes = getattr(model, "num_classes", None)
    if not mismatched or not callable(getattr(model, "reset_classifier", None)) or not isinstance(classes, int):
        return []
    probe = copy.deepcopy(model)  # find the head without touching the model unless it is the only mismatch
    head = zoo.replace_head(probe, classes)["new"]
    if not set(mismatched) <= set(head):
        return []
    return zoo.replace_head(model, classes)["new"]


def log_init_report(source: str, report: dict[str, list[str]]) -> None:
    """Say in the run's log which entries came from `source`, which are new and which are the data set's."""
    log.info("initialised from %s: %d entries kept", source, len(report["kept"]))
    if report["new"]:
        log.info("init_from: new head for the new label set, %d entries newly initialised: %s",
                 len(report["new"]), ", ".join(report["new"]))
    if report["from_data"]:
        log.info("init_from: kept as the data set gives them: %s", ", ".join(report["from_data"]))


def apply_freeze(model: nn.Module, patterns: list[str]) -> int:
    """Set `requires_grad=False` on parameters whose names match any fnmatch pattern; return how many were frozen.

    Raises:
        UserError: a pattern that matches no parameter (almost always a typo).
    """
    names = [n for n, _ in model.named_parameters()]
    frozen = 0
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise UserError(f"model.freeze pattern {pattern!r} matches no parameter (names look like: "
                            f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            p.requires_grad_(False)
            frozen += 1
    return frozen


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and 1-d parameters (norm scales) get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # "bias" also catches the batched `biases.<i>` of ShapleyModuleBank, which are 2-d (groups x out).
        is_bias = any("bias" in part for part in name.split("."))
        (no_decay if p.ndim <= 1 or is_bias else decay).append(p)
    if not decay and not no_decay:
        raise UserError("no trainable parameters: model.freeze froze every parameter")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas))


def ema_with_warmup(decay: float):
    """An EMA update for `AveragedModel` whose decay warms up as `min(decay, (1 + n) / (10 + n))` after `n` updates.

    Why: a plain EMA starts from the first weights, and after `n` steps they still carry `decay ** n` of its mass
    (0.999 ** 157 = 0.85): a short fine-tune evaluated through it reports, and exports, mostly its start point. The
    warm-up (as timm's ModelEmaV3 and TensorFlow's ExponentialMovingAverage with num_updates) lets the average follow
    the weights early and reach `decay` after `~10 / (1 - decay)` updates.
    """

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        n = int(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, 1.0 - d)
            else:
                a.copy_(c)  # counters and integer buffers follow the model

    return update


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier per step: linear warm-up to 1 over `warmup_steps`, then cosine down to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             autocast: Any = contextlib.nullcontext) -> dict[str, float]:
    """Cross-entropy, accuracy (micro and macro) and expected calibration error over a loader.

    torchmetrics reduces over DDP processes in `compute()`, so every rank returns the global numbers.
    """
    # Imported here: torchmetrics pulls in torchvision, seconds that `shapnets --help` should not pay.
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

    was_training = model.training
    model.eval()
    loss = MeanMetric().to(device)
    acc = MulticlassAccuracy(num_classes, average="micro").to(device)
    acc_macro = MulticlassAccuracy(num_classes, average="macro").to(device)
    ece = MulticlassCalibrationError(num_classes, n_bins=15, norm="l1").to(device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        logits = logits.float()
        loss.update(F.cross_entropy(logits, y, reduction="none"))
        acc.update(logits, y)
        acc_macro.update(logits, y)
        ece.update(logits.softmax(-1), y)
    model.train(was_training)
    return {"loss": float(loss.compute()), "acc": float(acc.compute()), "acc_macro": float(acc_macro.compute()),
            "ece": float(ece.compute())}


EXPLANATION_EFFECT_SAMPLES = 1000
"""Validation samples on which a fine-tune with an explanation term measures its explanations before and after."""


@torch.no_grad()
def explanation_effect(model: nn.Module, loader: DataLoader, device: torch.device,
                       autocast: Any = contextlib.nullcontext,
                       max_samples: int = EXPLANATION_EFFECT_SAMPLES) -> dict[str, float]:
    """Accuracy and mean sparsity (n90, peak share, Gini of the predicted class's map, `shapnets.sparsity`) of the
    model's own explanations on the first `max_samples` samples of `loader` (this process's shard)."""
    from shapnets.sparsity import explanation_sparsity

    was_training = model.training
    model.eval()
    correct, seen, sums = 0, 0, {"n90": 0.0, "peak_share": 0.0, "gini": 0.0}
    counts = dict.fromkeys(sums, 0)
    for x, y in loader:
        x, y = x[: max_samples - seen].to(device), y[: max_samples - seen].to(device)
        with autocast():
            expl = model.explain(x)
        correct += int((expl.output.argmax(1) == y).sum())
        seen += len(y)
        for name, values in explanation_sparsity(expl).items():
            kept = values[~values.isnan()]
            sums[name] += float(kept.sum())
            counts[name] += kept.numel()
        if seen >= max_samples:
            break
    model.train(was_training)
    return {"samples": seen, "acc": correct / max(seen, 1),
            **{name: sums[name] / counts[name] if counts[name] else math.nan for name in sums}}


def _effect_line(before: dict[str, float], after: dict[str, float]) -> str:
    changes = [f"accuracy {_pct(before['acc'])} -> {_pct(after['acc'])}",
               f"n90 {before['n90']:.1f} -> {after['n90']:.1f} players",
               f"peak share {before['peak_share']:.4f} -> {after['peak_share']:.4f}",
               f"Gini {before['gini']:.3f} -> {after['gini']:.3f}"]
    return f"explanations on {after['samples']} validation samples, before -> after: " + ", ".join(changes)


# ------------------------------------------------------------------------------------------------ run-folder helpers
def _check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over an existing run unless asked to, before anything expensive happens."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        if not (out / "last.pt").is_file():
            raise UserError(f"--resume: no last.pt in {out} (nothing to resume; drop --resume to start a new run)")
        return
    if existing and not overwrite:
        raise UserError(f"output folder {out} already holds a run ({', '.join(existing)}): pass --overwrite to "
                        "replace it, --resume to continue it, or choose another --output")


def _clear_run_files(out: Path, dist_info: DistInfo) -> None:
    """Create the run folder and delete an earlier run's files (only those: other files in it are kept)."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    barrier()  # every rank has checked the folder before rank 0 deletes anything
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name in existing:
            (out / name).unlink()
    barrier()


def _config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            diffs.append(f"{prefix}{key}: {vb!r} -> {va!r}")
    return diffs


class _CsvLog:
    """`metrics.csv`, one row per epoch; on resume, rows of epochs that are about to be redone are dropped."""

    def __init__(self, path: Path, columns: list[str], keep_epochs: int | None) -> None:
        self.path, self.columns = path, columns
        rows: list[dict[str, str]] = []
        if keep_epochs is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_epochs]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()}
            )


def _progress(iterable: Any, total: int, enabled: bool, desc: str) -> Iterator[Any]:
    if not enabled:
        return iter(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iter(iterable)
    return iter(tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True))


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (`None`: plain fp32)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise UserError("train.precision='bf16' needs a CUDA device; use 'auto' or 'fp32' on CPU")
    if not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise UserError("train.precision='bf16' but this GPU does not support bf16; use 'fp32'")
        return None
    return torch.bfloat16


# ------------------------------------------------------------------------------------------------ the loop
def train(cfg: ExperimentConfig, *, output_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, data: Any = None) -> dict[str, Any]:
    """Train, validate, checkpoint and test one experiment.

    Args:
        cfg: the experiment.
        output_dir: run folder; defaults to `cfg.output_dir` (or `runs/<name>`).
        resume: continue from `output_dir/last.pt`.
        overwrite: replace an existing run in `output_dir`.
        data: a ready `DataBundle` (train/val/test datasets + info) instead of `training.data.load_dataset`.

    Returns:
        A summary dict: best validation accuracy and epoch, test metrics, epochs and steps run, wall time,
        samples per second, the output folder, and with `model.init_from` what it kept (a count) and initialised
        anew (`init_from.json` in the run folder lists every entry).

    Raises:
        UserError: bad config values, an existing output folder, missing data, unknown model.
        TrainingDiverged: a non-finite loss or gradient (the last good checkpoint stays in place).
    """
    t_start = time.perf_counter()
    out = Path(output_dir) if output_dir is not None else cfg.resolved_output_dir()
    tc, dc = cfg.train, cfg.data
    dist_info, device = init_distributed(tc.device)
    rank, world = dist_info.rank, dist_info.world_size
    if dc.batch_size % world:
        raise UserError(f"data.batch_size={dc.batch_size} must be divisible by the {world} DDP processes")
    per_rank_batch = dc.batch_size // world
    amp_dtype = _resolve_precision(tc.precision, device)

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    _check_output_dir(out, resume, overwrite)
    file_handler = None
    curves_due = False  # set once this run owns metrics.csv: from then on curves.png is drawn however it ends
    try:
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # ---- data and model (same init on every rank; DDP would broadcast rank 0's anyway)
        seed_everything(tc.seed)
        bundle = data if data is not None else load_data(cfg)
        info = bundle.info
        if dc.shift_pixels and len(info.input_shape) != 3:
            raise UserError(f"data.shift_pixels={dc.shift_pixels} needs images, but {info.name} has inputs of shape "
                            f"{tuple(info.input_shape)}; set it to 0")
        model = build_model(cfg.model, info)
        init_report = None
        if cfg.model.init_from:
            init_report = initialize_from(model, cfg.model.init_from, cfg.model.strict_init)
        apply_freeze(model, cfg.model.freeze)
        model.to(device)
        # Checked now (players, input layout), not after the first epoch; runs on the main process only.
        tracker = (InteractionTracker(tc.track_interactions, model, bundle, device, out)
                   if tc.track_interactions is not None and dist_info.is_main else None)
        objective = Objective(build_loss_terms(cfg.loss, model), cfg.loss.label_smoothing)
        optimizer = build_optimizer(model, cfg.optim)
        seed_everything(tc.seed + rank)  # from here on each rank has its own random stream

        # ---- the run folder: replaced only now that the config has proven buildable
        if not resume:
            _clear_run_files(out, dist_info)
        if dist_info.is_main:
            file_handler = logging.FileHandler(out / "train.log")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(file_handler)
            if log.getEffectiveLevel() > logging.INFO:
                log.setLevel(logging.INFO)
        if init_report is not None:
            log_init_report(cfg.model.init_from, init_report)
            if dist_info.is_main and not resume:
                report = {"source": cfg.model.init_from, **init_report}
                ckpt.atomic_write_bytes(json.dumps(report, indent=2).encode(), out / "init_from.json")
        n_total = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model %s: %d parameters, %d trainable", cfg.model.name, n_total, n_trainable)

        # ---- loaders: the shuffle order is a pure function of (seed, epoch), see ResumableDistributedSampler
        sampler = ResumableDistributedSampler(bundle.train, num_replicas=world, rank=rank, shuffle=True,
                                              seed=tc.seed)
        loader_generator = torch.Generator()
        loader_kwargs = dict(num_workers=dc.num_workers, worker_init_fn=_seed_worker,
                             pin_memory=device.type == "cuda", generator=loader_generator)
        train_loader = DataLoader(bundle.train, batch_size=per_rank_batch, sampler=sampler, **loader_kwargs)

        def eval_loader(dataset: Any) -> DataLoader | None:
            if dataset is None or len(dataset) == 0:
                return None
            return DataLoader(dataset, batch_size=dc.eval_batch_size, sampler=ShardSampler(len(dataset), world, rank),
                              num_workers=dc.num_workers, pin_memory=device.type == "cuda",
                              generator=torch.Generator().manual_seed(0))

        val_loader, test_loader = eval_loader(bundle.val), eval_loader(bundle.test)
        # A fine-tune with an explanation term reports what the term did to the explanations (before vs after).
        effect_file = out / "explanation_effect.json"
        track_effect = bool(cfg.model.init_from and objective.needs_explanation and val_loader is not None
                            and dist_info.is_main)
        if track_effect and not (resume and effect_file.is_file()):
            before = explanation_effect(model, val_loader, device, autocast)
            ckpt.atomic_write_bytes(json.dumps({"before": before}, indent=2).encode(), effect_file)
        steps_per_epoch = math.ceil(sampler.num_samples / per_rank_batch)
        total_steps = tc.epochs * steps_per_epoch
        warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(warmup_steps, total_steps, cfg.optim.min_lr_ratio))
        ema = (AveragedModel(model, multi_avg_fn=ema_with_warmup(tc.ema_decay), use_buffers=True)
               if tc.ema_decay is not None else None)

        # ---- state that a resume restores
        epoch, step, batch_in_epoch = 0, 0, 0
        planned_epochs = tc.epochs  # lowered once by train.time_budget_s
        best = {"acc": -math.inf, "epoch": 0, "evals_since": 0}
        best_weights: dict[str, Tensor] | None = None
        sums: dict[str, float] = {}
        if resume:
            state = ckpt.load_checkpoint(out / "last.pt", map_location="cpu")
            diffs = _config_differences(config_to_dict(cfg), state.get("config", {}))
            if diffs:
                log.warning("resuming with a changed config: %s", "; ".join(diffs))
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            epoch, step, batch_in_epoch = int(state["epoch"]), int(state["step"]), int(state["batch_in_epoch"])
            planned_epochs = int(state.get("planned_epochs", tc.epochs))
            if planned_epochs != tc.epochs:
                scheduler.lr_lambdas[0] = warmup_cosine(warmup_steps, planned_epochs * steps_per_epoch,
                                                        cfg.optim.min_lr_ratio)
            best = dict(state["best"])
            per_rank = state["per_rank"]
            if len(per_rank) == world:
                ckpt.restore_rng_state(per_rank[rank]["rng"], loader_generator)
                sums = dict(per_rank[rank]["sums"])
            else:
                log.warning("checkpoint written by %d processes, resuming with %d: RNG streams are reseeded",
                            len(per_rank), world)
            if (out / "best.pt").is_file():
                best_weights = ckpt.load_checkpoint(out / "best.pt")["model"]
            log.info("resumed from %s at epoch %d, batch %d (step %d)", out / "last.pt", epoch + 1, batch_in_epoch,
                     step)
        elif dist_info.is_main:
            save_config(cfg, out / "config.yaml")
            (out / "data_info.json").write_text(json.dumps(info.to_dict(), indent=2))

        # ---- wrap for the forward pass: ModelStep (explain-aware) -> compile -> DDP
        step_module: nn.Module = ModelStep(model)
        if tc.compile:
            step_module = torch.compile(step_module)
        if dist_info.distributed:
            step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda"
                                                  else None)
        trainable = [p for p in model.parameters() if p.requires_grad]
        eval_model = ema.module if ema is not None else model

        parts = objective.part_names
        columns = ["epoch", "step", "lr", *[f"train_{p}" for p in parts], "val_loss", "val_acc", "val_acc_macro",
                   "val_ece", "epoch_time_s", "samples_per_s"]
        csv_log = _CsvLog(out / "metrics.csv", columns, keep_epochs=epoch if resume else 0) if dist_info.is_main \
            else None
        curves_due = dist_info.is_main

        def save_last(at_epoch: int, at_batch: int, metrics: dict[str, Any]) -> None:
            # Collective (every rank's RNG goes into the checkpoint), so every rank calls it at the same steps.
            per_rank = all_gather_objects({"rng": ckpt.capture_rng_state(loader_generator), "sums": dict(sums)})
            if dist_info.is_main:
                ckpt.save_checkpoint({
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "epoch": at_epoch,
                    "step": step,
                    "batch_in_epoch": at_batch,
                    "per_rank": per_rank,
                    "planned_epochs": planned_epochs,
                    "config": config_to_dict(cfg),
                    "data_info": info.to_dict(),
                    "metrics": metrics,
                    "best": best,
                }, out / "last.pt")

        # ---- train
        log.info("training %s on %s: %d epochs x %d steps, batch %d (%d per process x %d), device %s%s",
                 cfg.name, info.name, tc.epochs, steps_per_epoch, dc.batch_size, per_rank_batch, world, device,
                 f", {amp_dtype}" if amp_dtype is not None else "")
        show_progress = dist_info.is_main and sys.stderr.isatty()
        epoch_walls: list[float] = []  # wall time of each epoch run by this process (train, eval, checkpoints)
        samples_seen, train_time = 0, 0.0
        stop_reason = None
        last_row: dict[str, Any] = {}
        probe_start: float | None = None
        if tracker is not None:
            tracker.start(eval_model, resume)
        model.train()
        while epoch < planned_epochs and stop_reason is None:
            sampler.set_epoch(epoch)
            loader_generator.manual_seed(tc.seed * 1_000_003 + epoch)  # worker seeds: a function of (seed, epoch)
            if batch_in_epoch:
                sampler.set_start(batch_in_epoch * per_rank_batch)
            else:
                sums = {}
            t_epoch = time.perf_counter()
            epoch_samples = 0
            for x, y in _progress(train_loader, steps_per_epoch - batch_in_epoch, show_progress,
                                  f"epoch {epoch + 1}/{planned_epochs}"):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if dc.shift_pixels:
                    x = random_shift(x, dc.shift_pixels)
                with autocast():
                    out_step = objective.forward(step_module, x, y)
                    loss, values = objective(out_step, y)
                if all_reduce_flag(not bool(torch.isfinite(loss)), device):
                    raise _diverged(f"non-finite loss ({float(loss.detach())})", epoch, step, out)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
                    if not bool(torch.isfinite(grad_norm)):  # gradients are all-reduced: every rank agrees
                        raise _diverged(f"non-finite gradient norm ({float(grad_norm)})", epoch, step, out)
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                batch_in_epoch += 1
                n = len(y)
                epoch_samples += n
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * n
                sums["_count"] = sums.get("_count", 0.0) + n
                if tc.log_every and step % tc.log_every == 0:
                    log.info("step %d  loss %.4f  lr %.3g", step, float(values["loss"]), scheduler.get_last_lr()[0])
                if tc.time_budget_s is not None and not resume and step in BUDGET_PROBE_STEPS:
                    if step == BUDGET_PROBE_STEPS[0]:
                        probe_start = time.perf_counter()
                    elif probe_start is not None:
                        now = time.perf_counter()
                        step_time = (now - probe_start) / (BUDGET_PROBE_STEPS[1] - BUDGET_PROBE_STEPS[0])
                        fitted = _epochs_within_budget(
                            tc.time_budget_s - (now - t_start), step_time, steps_per_epoch, epoch, batch_in_epoch,
                            _eval_steps(bundle, dc.eval_batch_size, per_rank_batch), tc.epochs)
                        if fitted != planned_epochs:
                            planned_epochs = fitted
                            scheduler.lr_lambdas[0] = warmup_cosine(warmup_steps, planned_epochs * steps_per_epoch,
                                                                    cfg.optim.min_lr_ratio)
                        log.info("time budget %.0fs: %.3fs per step -> %d of %d epochs", tc.time_budget_s,
                                 step_time, planned_epochs, tc.epochs)
                if tc.max_steps is not None and step >= tc.max_steps:
                    stop_reason = f"reached train.max_steps={tc.max_steps}"
                    break
                if (tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0
                        and batch_in_epoch < steps_per_epoch):
                    save_last(epoch, batch_in_epoch, {})
            epoch_finished = batch_in_epoch >= steps_per_epoch
            epoch_time = time.perf_counter() - t_epoch
            train_time += epoch_time
            global_samples = epoch_samples * world
            samples_seen += global_samples

            # ---- per-epoch metrics (train means reduced over ranks), evaluation, early stopping
            totals = torch.tensor([sums.get(p, 0.0) for p in parts] + [sums.get("_count", 0.0)], dtype=torch.float64,
                                  device=device)
            if dist_info.distributed:
                torch.distributed.all_reduce(totals)
            count = max(float(totals[-1]), 1.0)
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0]}
            row.update({f"train_{p}": float(totals[i]) / count for i, p in enumerate(parts)})
            row.update(epoch_time_s=epoch_time, samples_per_s=global_samples / max(epoch_time, 1e-9))
            is_last = epoch + 1 >= planned_epochs or stop_reason is not None
            improved = False
            if val_loader is not None and ((epoch + 1) % tc.eval_every == 0 or is_last):
                val = evaluate(eval_model, val_loader, info.num_classes, device, autocast)
                row.update({f"val_{k}": v for k, v in val.items()})
                # Ties in accuracy (common on small validation sets) go to the lower validation loss.
                improved = (val["acc"], -val["loss"]) > (best["acc"], -best.get("loss", math.inf))
                if improved:
                    best.update(acc=val["acc"], loss=val["loss"], epoch=epoch + 1, evals_since=0)
                else:
                    best["evals_since"] += 1
            elif val_loader is None:
                improved = True  # nothing to select on: the latest weights are the best we know
                best.update(epoch=epoch + 1)
            if improved:
                best_weights = {k: v.detach().clone() for k, v in eval_model.state_dict().items()}
            # Time and ETA: the mean wall time of this process's epochs (eval included) times the epochs left
            # (an upper bound when early stopping may end the run sooner; train.time_budget_s may lower the plan).
            wall = time.perf_counter() - t_epoch
            per_epoch = (sum(epoch_walls) + wall) / (len(epoch_walls) + 1)
            epochs_to_run = planned_epochs if tc.max_steps is None else min(
                planned_epochs, math.ceil(tc.max_steps / steps_per_epoch))
            left = 0 if stop_reason is not None else max(0, epochs_to_run - (epoch + 1))
            log.info("epoch %d/%d  %s  time %s  ETA %s", epoch + 1, planned_epochs, "  ".join(
                f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("train_", "val_")) and v == v),
                format_duration(wall), format_duration(per_epoch * left))
            last_row = row
            if tc.early_stopping_patience is not None and best["evals_since"] >= tc.early_stopping_patience:
                stop_reason = f"early stopping: no better val accuracy for {best['evals_since']} evaluations"
            if dist_info.is_main:
                if improved:
                    ckpt.save_checkpoint({"model": best_weights, "epoch": epoch + 1, "step": step,
                                          "config": config_to_dict(cfg), "data_info": info.to_dict(), "metrics": row},
                                         out / "best.pt")
                csv_log.write(row)
                if tracker is not None and epoch_finished:
                    tracker.after_epoch(eval_model, epoch + 1, row, is_last or stop_reason is not None)
            if epoch_finished:
                epoch, batch_in_epoch = epoch + 1, 0
            save_last(epoch, batch_in_epoch, row)
            epoch_walls.append(time.perf_counter() - t_epoch)

        if stop_reason:
            log.info("stopped: %s", stop_reason)
        if tracker is not None:
            tracker.finish()
        # ---- test with the best weights
        if best_weights is not None:
            eval_model.load_state_dict(best_weights)
        test = evaluate(eval_model, test_loader, info.num_classes, device, autocast) if test_loader else {}
        effect = None
        if track_effect:
            effect = {"before": json.loads(effect_file.read_text())["before"],
                      "after": explanation_effect(eval_model, val_loader, device, autocast)}
            ckpt.atomic_write_bytes(json.dumps(effect, indent=2).encode(), effect_file)
            log.info("%s", _effect_line(effect["before"], effect["after"]))
        wall = time.perf_counter() - t_start
        result = {
            "name": cfg.name,
            "best_val_acc": best["acc"] if best["acc"] > -math.inf else None,
            "best_epoch": best["epoch"],
            "test": test,
            "last": last_row,
            "epochs": epoch,
            "steps": step,
            "stopped": stop_reason,
            "wall_time_s": wall,
            "samples_per_s": samples_seen / max(train_time, 1e-9),
            "trainable_params": n_trainable,
            "total_params": n_total,
            "output_dir": str(out),
            "explanation_effect": effect,
            "init_from": None if init_report is None else {
                "source": cfg.model.init_from, "kept": len(init_report["kept"]), "new": init_report["new"],
                "from_data": init_report["from_data"]},
        }
        summary = (f"{cfg.name}: best val acc {_pct(result['best_val_acc'])} (epoch {best['epoch']}), "
                   f"test acc {_pct(test.get('acc'))}, macro {_pct(test.get('acc_macro'))}, "
                   f"ECE {test.get('ece', float('nan')):.4f}, {step} steps in {wall:.1f}s "
                   f"({result['samples_per_s']:.0f} samples/s)")
        result["summary"] = summary
        log.info("%s", summary)
        if dist_info.is_main:
            ckpt.atomic_write_bytes(json.dumps(result, indent=2).encode(), out / "summary.json")
        return result
    finally:
        if curves_due:
            _write_curves(out, cfg.name)
        if file_handler is not None:
            log.removeHandler(file_handler)
            file_handler.close()


def _eval_steps(bundle: Any, eval_batch_size: int, batch_size: int) -> tuple[float, float]:
    """One validation pass and the final test pass, in training steps: an evaluation batch is costed as
    `eval_batch_size / batch_size / 2` steps (forward only, ~1/3 of a step per sample; rounded up to 1/2)."""
    per_batch = max(1.0, eval_batch_size / batch_size / 2)

    def steps(dataset: Any) -> float:
        return math.ceil(len(dataset) / eval_batch_size) * per_batch if dataset is not None else 0.0
    return steps(bundle.val), steps(bundle.test)


def _epochs_within_budget(remaining_s: float, step_time: float, steps_per_epoch: int, epoch: int,
                          batch_in_epoch: int, eval_batches: tuple[float, float], max_epochs: int) -> int:
    """How many epochs (at least the current one, at most `max_epochs`) fit into `remaining_s` seconds.

    `eval_batches` are the validation and test passes in training steps (`_eval_steps`); 10% of the budget is
    held back for checkpoints and start-up noise.
    """
    val_batches, test_batches = eval_batches
    epoch_s = (steps_per_epoch + val_batches) * step_time
    left_in_epoch = (steps_per_epoch - batch_in_epoch + val_batches) * step_time
    usable = 0.9 * remaining_s - test_batches * step_time - left_in_epoch
    more = math.floor(usable / epoch_s) if usable > 0 else 0
    return max(epoch + 1, min(max_epochs, epoch + 1 + more))


def _write_curves(out: Path, name: str) -> None:
    """`curves.png` from the run's metrics.csv; a failure to draw is a warning, never the run's error."""
    try:
        written = plot_curves(out / "metrics.csv", out / "curves.png", title=f"{name} ({out})")
    except Exception as e:  # the run itself is done: a figure must not turn it into a failure
        log.warning("could not draw %s: %s", out / "curves.png", e)
        return
    if written is None and (out / "metrics.csv").is_file():
        log.info("no curves.png: %s", "matplotlib is not installed (the viz extra)" if _no_matplotlib()
                 else "no epoch finished")


def _no_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is None


def _diverged(what: str, epoch: int, step: int, out: Path) -> TrainingDiverged:
    kept = f"the last good checkpoint {out / 'last.pt'} is kept" if (out / "last.pt").is_file() else \
        "no checkpoint was written yet"
    return TrainingDiverged(f"{what} at epoch {epoch + 1}, step {step + 1}: stopped; {kept}. Try a lower optim.lr "
                            "or optim.grad_clip")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
