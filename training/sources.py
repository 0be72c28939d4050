"""Where the CLI, the benchmarks and the export find a trained model and its data: checkpoints, folders, zoo names.

`load_source` turns a training checkpoint (`.pt`), a run folder, a pretrained folder or a registered zoo name
into a `LoadedModel` (the model in eval mode, its data set's `DatasetInfo`, the training config when known);
`load_split` loads one split of the data that model was trained on, preprocessed the same way.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, ExperimentConfig, UserError, config_from_dict

__all__ = ["LoadedModel", "load_source", "load_split"]

log = logging.getLogger("training")


class LoadedModel:
    """A model ready for inference plus what is known about its data and training config."""

    def __init__(self, model: nn.Module, info: Any, cfg: ExperimentConfig | None, source: str) -> None:
        self.model, self.info, self.cfg, self.source = model, info, cfg, source


def _dataset_info_from_dict(d: dict[str, Any]) -> Any:
    from .data import DatasetInfo

    return DatasetInfo.from_dict(d)


def load_source(source: str, device: torch.device) -> LoadedModel:
    """A training checkpoint (.pt), a run folder (best.pt/last.pt), a pretrained folder or a zoo name."""
    from . import checkpoint as ckpt
    from .trainer import build_model

    path = Path(source)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if path.is_file():
        state = ckpt.load_checkpoint(path)
        if "config" not in state or "data_info" not in state:
            raise UserError(f"{path} has no config/data_info: not written by `shapnets train`")
        try:
            cfg = config_from_dict(state["config"])
        except ConfigError as e:
            raise UserError(f"{path}: the stored config is invalid: {e}") from e
        info = _dataset_info_from_dict(state["data_info"])
        model = build_model(cfg.model, info)
        model.load_state_dict(state["model"])
        _attach_preprocessing(model, info)
        return LoadedModel(model.to(device).eval(), info, cfg, str(path))
    if not path.exists() and (path.suffix in (".pt", ".pth") or path.parent != Path(".")):
        raise UserError(f"no such checkpoint or folder: {source}")
    import zoo  # a pretrained folder (model.safetensors + config.json) or a registered name

    try:
        model = zoo.load_pretrained(source)
    except (KeyError, ValueError, RuntimeError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UserError(f"cannot load {source!r}: {message}") from e
    info = getattr(model, "data_info", None)
    if isinstance(info, dict):
        info = _dataset_info_from_dict(info)
    if info is None:
        raise UserError(f"{source!r} does not say which data set it was trained on (no data_info)")
    if not hasattr(model, "preprocess"):
        _attach_preprocessing(model, info)
    return LoadedModel(model.to(device).eval(), info, None, source)


def _attach_preprocessing(model: nn.Module, info: Any) -> None:
    """`model.preprocess(rows)` and the out-of-range guard on `model(x)`, for tabular models."""
    from zoo.preprocessing import attach_preprocessing

    attach_preprocessing(model, info)


def load_split(loaded: LoadedModel, split: str, data_root: str | None) -> Any:
    from .trainer import load_data

    if loaded.cfg is None and loaded.info.name in ("csv", "image_folder"):
        hint = " (explain raw rows with --input rows.csv)" if loaded.info.name == "csv" else ""
        raise UserError(f"{loaded.source} was trained on the user's own {loaded.info.name} data, which an exported "
                        f"model does not carry: use the training run folder{hint}")
    # A copy: the caller's config must keep describing the run (export records it).
    cfg = copy.deepcopy(loaded.cfg) if loaded.cfg is not None else ExperimentConfig()
    cfg.data.name = loaded.info.name
    cfg.data.limit = None
    if data_root is not None:
        cfg.data.root = data_root
    if loaded.cfg is None:  # a zoo model: use the split its data_info recorded
        cfg.data.seed = int(loaded.info.split.get("seed", 0))
        cfg.data.val_fraction = float(loaded.info.split.get("val_fraction", cfg.data.val_fraction))
    bundle = load_data(cfg)
    if bundle.info.preprocessing != loaded.info.preprocessing:
        log.warning("the data's preprocessing differs from the one the model was trained with: results may be off")
    dataset = getattr(bundle, split)
    if dataset is None or len(dataset) == 0:
        raise UserError(f"the {split} split of {loaded.info.name} is empty")
    return dataset
