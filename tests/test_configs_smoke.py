"""Every shipped config parses and runs one optimisation step (tiny data, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

import zoo
from training.config import load_config
from training.data import DataBundle
from training.trainer import load_data, train

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# Data sets that read files from SHAPNETS_DATA, and the synthetic stand-in of the same kind used without them.
NEEDS_FILES = {"adult": "synthetic_tabular", "yeast": "synthetic_tabular", "mnist": "synthetic_images",
               "fashion_mnist": "synthetic_images", "cifar10": "synthetic_images"}


def test_there_are_configs_for_every_planned_model() -> None:
    names = {p.stem for p in CONFIGS}
    planned = {"shallow_breast_cancer", "deep_breast_cancer", "shallow_yeast", "deep_yeast", "shallow_adult",
               "deep_adult", "conv_mnist"}
    assert planned <= names, f"missing configs: {sorted(planned - names)}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs_one_step(path: Path, tmp_path: Path, data_root_or_none: Path | None) -> None:
    cfg = load_config(path, [f"output_dir={tmp_path / 'run'}", "data.limit=8", "data.batch_size=4",
                             "train.max_steps=1", "data.num_workers=0", "train.device=cpu"])
    assert cfg.name == path.stem, "name a config after its file so that runs/<name> is predictable"
    assert cfg.train.max_steps == 1 and cfg.data.limit == 8
    init = cfg.model.init_from
    if init and not Path(init).exists() and init not in zoo.list_models(pretrained=True):
        pytest.skip(f"model.init_from={init!r} has no weights here (zoo/weights/{init} is not shipped)")
    if cfg.data.name in NEEDS_FILES:
        if data_root_or_none is None and cfg.model.name.startswith("capsnet"):
            pytest.skip(f"{cfg.model.name} takes 28x28 images (9x9 kernels) and the synthetic stand-in is 8x8; "
                        f"the data folder (SHAPNETS_DATA) is absent")
        if data_root_or_none is None:
            cfg.data.name = NEEDS_FILES[cfg.data.name]
            cfg.model.strict_init = False  # the stand-in's classes/features differ from the weights' data set
        else:
            cfg.data.root = str(data_root_or_none)
    if cfg.data.name in ("csv", "image_folder"):  # the user's own data: a small stand-in of that shape
        cfg.data.path = str(_own_data_stand_in(cfg.data, tmp_path))
    if cfg.train.track_interactions:  # keep the interaction tracking of one step cheap (and within 8 features)
        cfg.train.track_interactions.update(samples=2, players=min(cfg.train.track_interactions["players"], 4))
    bundle = load_data(cfg)
    # Keep evaluation tiny as well (data.limit only cuts the training split).
    small = DataBundle(bundle.train, Subset(bundle.val, range(min(4, len(bundle.val)))),
                       Subset(bundle.test, range(min(4, len(bundle.test)))), bundle.info)
    result = train(cfg, data=small)
    assert result["steps"] == 1
    assert result["test"] and 0.0 <= result["test"]["acc"] <= 1.0
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.fixture
def data_root_or_none() -> Path | None:
    """The real data folder when present (else the configs run on synthetic stand-ins)."""
    candidates = [os.environ.get("SHAPNETS_DATA"), Path(__file__).resolve().parents[1].parent / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def _own_data_stand_in(data, folder: Path) -> Path:
    """A generated CSV with the columns a csv config names, or an image folder of two classes."""
    import numpy as np

    rng = np.random.default_rng(0)
    if data.name == "csv":
        extra = [c for c in [*(data.categorical or []), *data.drop] if c != data.target]
        header = ["a", "b", "colour", *extra, data.target]
        rows = [[f"{rng.normal():.3f}", f"{rng.normal():.3f}", rng.choice(["red", "blue"]), *(str(i) for _ in extra),
                 rng.choice(["yes", "no"])] for i in range(40)]
        path = folder / "table.csv"
        path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
        return path
    from PIL import Image

    for name in ("cats", "dogs"):
        (folder / "images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "images" / name / f"{i}.png")
    return folder / "images"
