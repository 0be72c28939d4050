"""Fine-tuning a zoo model on a new label set is one command: `shapnets train` with `model.init_from: <zoo name>`.

The shipped `configs/finetune_conv_mnist_shapes.yaml` starts from `shapnet_conv_mnist` (10 classes) and trains on
the synthetic shapes (4 classes): every stage but the head keeps the zoo's weights, the head is new, the reference
is the new data set's, and the run says so (train.log, init_from.json, summary.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import Subset

import zoo
from shapnets import DeepShapNet
from training.checkpoint import load_checkpoint
from training.config import UserError, load_config
from training.data import DataBundle, load_dataset
from training.trainer import build_model, initialize_from, load_data, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "finetune_conv_mnist_shapes.yaml"


def test_init_from_a_zoo_name_with_other_classes_keeps_the_stages_and_renews_the_head() -> None:
    cfg = load_config(CONFIG)
    info = load_dataset(cfg.data.name, limit=8).info
    assert info.num_classes != zoo.create_model(cfg.model.init_from).num_classes  # a new label set indeed
    model = build_model(cfg.model, info)
    data_reference = model.reference.clone()
    report = initialize_from(model, cfg.model.init_from, strict=True)
    pretrained = zoo.create_model(cfg.model.init_from, pretrained=True).state_dict()
    head = f"stages.{model.num_stages - 1}."
    assert report["new"] and all(k.startswith(head) for k in report["new"])
    assert sorted(report["kept"] + report["new"] + report["from_data"]) == sorted(model.state_dict())
    for key in report["kept"]:
        assert not key.startswith(head) and torch.equal(model.state_dict()[key], pretrained[key]), key
    assert report["from_data"] == ["reference"] and torch.equal(model.reference, data_reference)
    assert model(torch.rand(2, *info.input_shape)).shape == (2, info.num_classes)
    explanation = model.explain(torch.rand(2, *info.input_shape))
    explanation.check_local_accuracy()


def test_a_mismatch_outside_the_head_is_still_refused(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    save_file(DeepShapNet(8, 3, channels=4, hidden=(8,)).state_dict(), str(file))
    other = DeepShapNet(8, 2, channels=6, hidden=(8,))  # other widths too: not only a new label set
    with pytest.raises(UserError, match=r"shape mismatch: \['stages\.0"):
        initialize_from(other, str(file), strict=True)
    report = initialize_from(DeepShapNet(8, 2, channels=4, hidden=(8,)), str(file), strict=True)
    assert report["new"] == ["stages.2.weights.0", "stages.2.weights.1", "stages.2.biases.0"]


def test_shipped_finetune_config_runs_end_to_end_and_reports_kept_and_new(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Tiny: 2 steps on 16 images, 8 to validate and test. The earlier stages are frozen here so that "kept" can be
    # checked after training (the shipped config trains them too).
    frozen = "[" + ", ".join(f"'stages.{s}.*'" for s in range(4)) + "]"
    cfg = load_config(CONFIG, [f"output_dir={out}", "data.limit=16", "data.batch_size=8", "train.max_steps=2",
                               "train.device=cpu", f"model.freeze={frozen}"])
    bundle = load_data(cfg)
    small = DataBundle(bundle.train, Subset(bundle.val, range(8)), Subset(bundle.test, range(8)), bundle.info)
    assert train(cfg, data=small)["steps"] == 2
    report = json.loads((out / "init_from.json").read_text())
    assert report["source"] == "shapnet_conv_mnist" and report["missing"] == report["mismatched"] == []
    assert report["new"] and all(k.startswith("stages.4.") for k in report["new"])
    assert report["kept"] and not any(k.startswith("stages.4.") for k in report["kept"])
    log = (out / "train.log").read_text()
    assert f"{len(report['kept'])} entries kept" in log and "new head" in log and report["new"][0] in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init_from"]["new"] == report["new"] and summary["init_from"]["kept"] == len(report["kept"])
    tuned = load_checkpoint(out / "last.pt")["model"]
    pretrained = zoo.create_model("shapnet_conv_mnist", pretrained=True).state_dict()
    for key in report["kept"]:
        assert torch.equal(tuned[key], pretrained[key]), key
    assert tuned["stages.4.bank.weights.1"].shape[-1] == 4  # the new label set's classes
