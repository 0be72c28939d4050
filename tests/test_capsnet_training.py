"""CapsNet through the project's trainer, export and figure command (tiny model, synthetic 8x8 images, seconds)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import zoo
from training.config import load_config
from training.figures import capsule_poses_figure
from training.figures import main as figures_main
from training.trainer import train

TINY = ["model.name=capsnet", "model.args.image_size=8", "model.args.conv_channels=8", "model.args.conv_kernel=3",
        "model.args.primary_types=4", "model.args.primary_dim=4", "model.args.primary_kernel=3",
        "model.args.class_dim=4", "model.args.decoder_widths=[16]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("capsnet") / "run"
    cfg = load_config(None, [f"output_dir={out}", "name=capsnet_tiny", "data.name=synthetic_images", "data.limit=96",
                             "data.batch_size=16", "optim.lr=0.01", "train.epochs=2", "train.device=cpu", *TINY])
    train(cfg)
    return out


def test_the_margin_loss_replaces_the_cross_entropy_and_the_reconstruction_is_added(run: Path) -> None:
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"train_margin", "train_reconstruction", "train_ce"} <= set(rows[0])
    for row in rows:
        margin, reconstruction = float(row["train_margin"]), float(row["train_reconstruction"])
        # The total is the model's own terms only (no cross-entropy), each with its weight.
        assert float(row["train_loss"]) == pytest.approx(margin + 0.0005 * reconstruction, rel=1e-4)
    assert float(rows[-1]["train_margin"]) < float(rows[0]["train_margin"])


def test_a_trained_capsnet_exports_with_a_card_and_reloads(run: Path, tmp_path: Path) -> None:
    from training.export import export_to_zoo

    out = export_to_zoo(str(run), "capsnet", tmp_path / "exported", fidelity_samples=4, notes=["tiny"])
    config = zoo.read_config(out)
    assert config["fidelity"]["local_accuracy_residual"] < 1e-9
    assert "missingness_residual" not in config["fidelity"]  # a CapsNet has no reference input
    card = (out / "README.md").read_text()
    assert "Sabour" in card and "**Note:** tiny" in card
    model = zoo.load_pretrained(out)
    x = torch.randn(3, 1, 8, 8)
    model.explain(x).check_local_accuracy()


def test_capsule_poses_figure(run: Path, tmp_path: Path) -> None:
    path = capsule_poses_figure(str(run), tmp_path / "poses.png", index=1, dims=[0, 2])
    assert path.is_file() and path.stat().st_size > 1000


def test_capsule_poses_figure_refuses_bad_requests(run: Path, tmp_path: Path, capsys) -> None:
    assert figures_main(["capsule-poses", "--model", str(run), "--out", str(tmp_path / "x.png"),
                         "--index", "100000"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert figures_main(["capsule-poses", "--model", str(run), "--out", str(tmp_path / "x.png"),
                         "--dims", "99"]) == 2
    assert "dims" in capsys.readouterr().err
