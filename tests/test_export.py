"""`shapnets export`: a trained run becomes zoo weights + config.json with re-measured metrics + a model card.

Tiny runs on `synthetic_tabular` (8 features, 3 classes) for a Shallow and a Deep ShapNet, and one on Breast Cancer
(30 features, more than the oracle's 12) for the subset-of-features fidelity check. Every export goes to a temporary
folder (`--out` / `out_dir`): nothing is written into zoo/weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import assert_one_line_error  # the CLI tests' check of a one-line error message

import zoo
from training.cli import load_source, load_split, main
from training.config import config_to_dict, load_config
from training.export import ORACLE_MAX_PLAYERS, export_to_zoo

TINY = ["data.name=synthetic_tabular", "data.limit=48", "data.batch_size=16", "train.epochs=2", "optim.lr=0.01",
        "train.device=cpu"]
ARCHITECTURES = {
    "shapnet_shallow": ["model.name=shapnet_shallow", "model.args.hidden=[8]"],
    "shapnet_deep": ["model.name=shapnet_deep", "model.args.channels=4", "model.args.hidden=[8]"],
}
FIDELITY_SAMPLES = 8


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def train_run(folder: Path, *overrides: str) -> Path:
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny"}))
    run = folder / "run"
    assert main(["--quiet", "train", str(config), "--output", str(run), *sets(*overrides)]) == 0
    return run


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def exported(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(architecture, run folder, export folder): one tiny run per architecture, exported once."""
    architecture = request.param
    folder = tmp_path_factory.mktemp(architecture)
    run = train_run(folder, *TINY, *ARCHITECTURES[architecture])
    out = export_to_zoo(str(run), architecture, folder / "export", fidelity_samples=FIDELITY_SAMPLES)
    return architecture, run, out


def exported_config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def test_export_writes_weights_config_and_card(exported) -> None:
    architecture, _, out = exported
    assert (out / "model.safetensors").is_file()
    config = zoo.read_config(out)  # validated: required keys, types, a registered architecture
    assert config["architecture"] == architecture
    assert config["sha256"] == zoo.sha256_of(out / "model.safetensors")
    assert config["dataset"] == "synthetic_tabular"


def test_loaded_export_computes_what_the_runs_best_checkpoint_computes(exported) -> None:
    _, run, out = exported
    from_run = load_source(str(run), torch.device("cpu"))
    assert Path(from_run.source).name == "best.pt"
    test = load_split(from_run, "test", None)
    x = torch.stack([test[i][0] for i in range(len(test))])
    model = zoo.load_pretrained(out).eval()
    assert type(model) is type(from_run.model)
    with torch.no_grad():
        assert torch.equal(model(x), from_run.model(x))
        assert torch.equal(model.explain(x[:16]).attributions, from_run.model.explain(x[:16]).attributions)


def test_recorded_test_accuracy_is_what_eval_reports(exported, capsys) -> None:
    _, run, out = exported
    metrics = exported_config(out)["metrics"]
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["test_accuracy"] == reported["acc"]
    assert metrics["test_accuracy_macro"] == reported["acc_macro"]
    assert metrics["test_samples"] == reported["samples"]
    # The export itself evaluates the same: its data_info rebuilds the same test split.
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["acc"] == metrics["test_accuracy"]


def test_recorded_fidelity(exported) -> None:
    architecture, _, out = exported
    fidelity = exported_config(out)["fidelity"]
    assert fidelity["samples"] == FIDELITY_SAMPLES and fidelity["precision"] == "float64"
    assert fidelity["local_accuracy_residual"] < 1e-9
    assert fidelity["missingness_residual"] < 1e-9
    assert fidelity["oracle_players"] == 8 and fidelity["oracle_setting"] == "all features"
    error = fidelity["max_abs_error_vs_exact_shapley"]
    if architecture == "shapnet_shallow":
        assert fidelity["exact_by_construction"] is True
        assert error < 1e-9
    else:
        # A Deep ShapNet's explanation is layer-wise, not the network's exact Shapley value: the error is measured,
        # not zero (an error of exactly 0 would mean the oracle was compared with itself).
        assert fidelity["exact_by_construction"] is False
        assert math.isfinite(error) and error > 1e-9


def test_card_reports_the_measured_accuracy(exported) -> None:
    _, _, out = exported
    config = exported_config(out)
    card = (out / "README.md").read_text()  # an export outside zoo/weights puts its card next to the weights
    assert f"**Test accuracy:** {config['metrics']['test_accuracy']:.4g}" in card
    assert config["sha256"] in card


def test_recorded_training_config_is_the_runs_config(exported) -> None:
    _, run, out = exported
    recorded = exported_config(out)["training"]["config"]
    assert recorded == config_to_dict(load_config(run / "config.yaml"))


def test_more_players_than_the_oracle_takes_are_checked_on_a_subset(tmp_path: Path) -> None:
    """Breast Cancer has 30 features: 12 are kept, the others sit at the reference and must get exactly 0."""
    run = train_run(tmp_path, "data.name=breast_cancer", "data.limit=48", "data.batch_size=16", "train.epochs=1",
                    "train.device=cpu", "model.name=shapnet_shallow", "model.args.hidden=[4]")
    out = export_to_zoo(str(run), "shapnet_shallow", tmp_path / "export", fidelity_samples=4)
    fidelity = exported_config(out)["fidelity"]
    assert fidelity["oracle_players"] == ORACLE_MAX_PLAYERS < 30
    assert "12 of 30 features kept" in fidelity["oracle_setting"]
    assert fidelity["max_abs_error_vs_exact_shapley"] < 1e-9
    assert fidelity["others_max_abs_attribution"] < 1e-9
    assert fidelity["local_accuracy_residual"] < 1e-9 and fidelity["missingness_residual"] < 1e-9


def test_cli_export(exported, tmp_path: Path, capsys) -> None:
    architecture, run, _ = exported
    out = tmp_path / "cli_export"
    assert main(["--quiet", "export", str(run), "--name", architecture, "--out", str(out),
                 "--fidelity-samples", "2", "--note", "two stages", "--note", "on CPU"]) == 0
    assert f"exported {architecture} to {out}" in capsys.readouterr().out
    assert zoo.read_config(out)["fidelity"]["samples"] == 2
    assert zoo.read_config(out)["notes"] == ["two stages", "on CPU"]
    card = (out / "README.md").read_text()
    assert "**Note:** two stages" in card and "**Note:** on CPU" in card


def test_exporting_what_is_not_a_run_exits_2_with_one_line(exported, tmp_path: Path, capsys) -> None:
    architecture, _, out = exported
    target = ["--out", str(tmp_path / "never")]
    assert main(["export", str(tmp_path / "no_such_run"), "--name", architecture, *target]) == 2
    assert_one_line_error(capsys, "no such checkpoint or folder", "no_such_run")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(empty), "--name", architecture, *target]) == 2
    assert_one_line_error(capsys, str(empty), "config.json")
    not_a_checkpoint = tmp_path / "weights.pt"
    torch.save({"model": {}}, not_a_checkpoint)
    assert main(["export", str(not_a_checkpoint), "--name", architecture, *target]) == 2
    assert_one_line_error(capsys, "weights.pt", "not written by `shapnets train`")
    # A zoo export is loadable but has no training config: it cannot be re-exported as a run.
    assert main(["export", str(out), "--name", architecture, *target]) == 2
    assert_one_line_error(capsys, "not a training run")
    assert not (tmp_path / "never").exists()


def test_exporting_under_a_name_of_another_architecture_exits_2(exported, tmp_path: Path, capsys) -> None:
    architecture, run, _ = exported
    other = "shapnet_deep" if architecture == "shapnet_shallow" else "shapnet_shallow"
    assert main(["export", str(run), "--name", other, "--out", str(tmp_path / "x")]) == 2
    assert_one_line_error(capsys, other)
    assert main(["export", str(run), "--name", "shapnet_shalow", "--out", str(tmp_path / "y")]) == 2
    assert_one_line_error(capsys, "shapnet_shalow")
