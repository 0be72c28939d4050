"""The `shapnets` command line: exit codes, one-line errors, and train -> eval -> explain on synthetic data."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.cli import main

TINY = ["data.name=synthetic_tabular", "data.limit=48", "data.batch_size=16", "model.name=shapnet_shallow",
        "model.args.hidden=[8]", "train.epochs=2", "optim.lr=0.01"]


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One tiny run shared by the eval/explain tests."""
    out = tmp_path_factory.mktemp("cli") / "run"
    config = out.parent / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny"}))
    assert main(["--quiet", "train", str(config), "--output", str(out), *sets(*TINY)]) == 0
    return out


def assert_one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_train_writes_a_run_and_prints_the_summary(trained_run: Path, capsys) -> None:
    for name in ("best.pt", "last.pt", "metrics.csv", "config.yaml", "summary.json"):
        assert (trained_run / name).is_file()
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["steps"] == 6 and 0 <= summary["test"]["acc"] <= 1


@pytest.mark.reliability("cli")
def test_bad_config_key_exits_2_with_a_suggestion(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    assert main(["train", str(config)]) == 2
    assert_one_line_error(capsys, "unknown key 'epoch'", "did you mean 'epochs'", "c.yaml")


@pytest.mark.reliability("cli")
@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["train", "no/such/config.yaml"], ["config file not found", "no/such/config.yaml"]),
        (["train", "-", "--set", "train.epochs=many"], ["train.epochs", "expected int"]),
        (["eval", "no/such/run/best.pt"], ["no such checkpoint"]),
        (["explain", "missing.pt"], ["no such checkpoint"]),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path: Path, capsys, argv: list[str], fragments: list[str]) -> None:
    if argv[1] == "-":
        argv[1] = str(tmp_path / "empty.yaml")
        Path(argv[1]).write_text("{}\n")
    assert main(argv) == 2
    assert_one_line_error(capsys, *fragments)


@pytest.mark.reliability("cli")
def test_unknown_model_and_missing_data_folder_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    out = str(tmp_path / "run")
    assert main(["train", str(config), "--output", out, *sets(*TINY, "model.name=shapnet_shallw")]) == 2
    assert_one_line_error(capsys, "shapnet_shallw")
    monkeypatch.delenv("SHAPNETS_DATA", raising=False)
    missing = tmp_path / "no-data-here"
    assert main(["train", str(config), "--output", out, "--overwrite",
                 *sets("data.name=mnist", f"data.root={missing}")]) == 2
    assert_one_line_error(capsys, "mnist", str(missing))


@pytest.mark.reliability("cli")
def test_existing_output_needs_overwrite(trained_run: Path, capsys) -> None:
    assert main(["train", str(trained_run / "config.yaml"), "--output", str(trained_run)]) == 2
    assert_one_line_error(capsys, "already holds a run", "--overwrite")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from training.config import UserError

    with pytest.raises(UserError, match="config file not found"):
        main(["--debug", "train", str(tmp_path / "nope.yaml")])
    with pytest.raises(UserError, match="config file not found"):
        main(["train", str(tmp_path / "nope.yaml"), "--debug"])


@pytest.mark.reliability("cli")
def test_argparse_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["eval", "x", "--split", "everything"])
    assert info.value.code == 2


def test_resume_continues_the_run(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    out = str(tmp_path / "run")
    assert main(["--quiet", "train", str(config), "--output", out, *sets(*TINY, "train.max_steps=2")]) == 0
    assert main(["--quiet", "train", str(config), "--output", out, "--resume", *sets(*TINY)]) == 0
    assert json.loads((Path(out) / "summary.json").read_text())["steps"] == 6
    assert "resumed from" in (Path(out) / "train.log").read_text()


def test_eval_reports_accuracy_on_each_split(trained_run: Path, capsys) -> None:
    summary = json.loads((trained_run / "summary.json").read_text())
    assert main(["eval", str(trained_run / "best.pt"), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "synthetic_tabular/test" in lines[0] and "acc" in lines[0]
    metrics = json.loads(lines[-1])
    assert metrics["acc"] == pytest.approx(summary["test"]["acc"])
    assert main(["eval", str(trained_run), "--split", "val"]) == 0  # a run folder means its best.pt
    assert "synthetic_tabular/val" in capsys.readouterr().out


def test_eval_and_explain_a_pretrained_folder(trained_run: Path, tmp_path: Path, capsys) -> None:
    """A run exported with zoo.save_pretrained (weights + config.json with data_info) evaluates the same."""
    import torch

    from training.cli import load_source

    zoo = pytest.importorskip("zoo")
    if not hasattr(zoo, "save_pretrained"):
        pytest.skip("zoo.save_pretrained not written yet")
    loaded = load_source(str(trained_run), torch.device("cpu"))
    zoo.save_pretrained(loaded.model, tmp_path / "export", metadata={"data_info": loaded.info.to_dict()})
    assert main(["eval", str(trained_run), "--json"]) == 0
    from_checkpoint = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(tmp_path / "export"), "--json"]) == 0
    from_export = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_export["acc"] == from_checkpoint["acc"]
    assert from_export["loss"] == pytest.approx(from_checkpoint["loss"])
    assert main(["explain", str(tmp_path / "export"), "--index", "0", "--top", "1"]) == 0
    assert "test[0]: predicted" in capsys.readouterr().out


def test_explain_prints_top_features_by_index(trained_run: Path, capsys) -> None:
    assert main(["explain", str(trained_run / "best.pt"), "--index", "0", "--index", "3", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "test[0]: predicted class_" in out and "test[3]" in out
    ranked = [line for line in out.splitlines() if line.strip()[:2].strip().rstrip(".").isdigit()]
    assert len(ranked) == 6 and all(" x" in line for line in ranked), out


def test_explain_rows_of_a_csv(trained_run: Path, tmp_path: Path, capsys) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("x7,x6,x5,x4,x3,x2,x1,x0\n" + "0,0,0,0,0,0,2,2\n" + "1,1,1,1,1,1,1,1\n")
    assert main(["explain", str(trained_run / "best.pt"), "--input", str(rows), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "rows.csv row 1" in out and "rows.csv row 2" in out
    assert "x0 = 2" in out or "x1 = 2" in out, "the header maps columns onto features by name"
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")  # no header: the first row must name the training columns
    assert main(["explain", str(trained_run / "best.pt"), "--input", str(bad)]) == 2
    assert_one_line_error(capsys, "bad.csv", "the file has a header but no data rows")
    bad.write_text("x0,x1,x2\n1,2,3\n")
    assert main(["explain", str(trained_run / "best.pt"), "--input", str(bad)]) == 2
    assert_one_line_error(capsys, "bad.csv", "columns differ from the training ones", "missing ['x3'")


def test_explain_raw_rows_round_trip_to_the_printed_values(trained_run: Path, tmp_path: Path, capsys) -> None:
    rows = tmp_path / "raw.csv"
    rows.write_text("x0,x1,x2,x3,x4,x5,x6,x7\n3.5,-2,0,0,0,0,0,0\n")  # raw values, standardised by explain
    assert main(["explain", str(trained_run / "best.pt"), "--input", str(rows), "--top", "8"]) == 0
    out = capsys.readouterr().out
    assert "x0 = 3.5 " in out and "x1 = -2 " in out, out


@pytest.mark.reliability("cli")
def test_explain_index_out_of_range(trained_run: Path, capsys) -> None:
    assert main(["explain", str(trained_run / "best.pt"), "--index", "100000"]) == 2
    assert_one_line_error(capsys, "out of range", "samples")


@pytest.mark.skipif(importlib.util.find_spec("training.plots") is None, reason="training/plots.py not written yet")
def test_explain_writes_a_plot(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plot.png"
    assert main(["explain", str(trained_run / "best.pt"), "--index", "1", "--out", str(out)]) == 0
    written = [p for p in tmp_path.iterdir() if p.name.startswith("plot")]
    assert written and all(p.stat().st_size > 0 for p in written)


def test_interactions_prints_the_top_subsets_with_feature_names(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pairs.png"
    argv = ["interactions", str(trained_run / "best.pt"), "--index", "2", "--top", "4", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test[2]: predicted class_" in printed and "the network's exact game" in printed
    ranked = [line for line in printed.splitlines() if " order " in line]
    assert len(ranked) == 4 and all(line.split()[0].startswith("x") for line in ranked), printed
    assert out.is_file() and out.stat().st_size > 0
    assert main(["interactions", str(trained_run / "best.pt"), "--top", "20", "--max-order", "1"]) == 0
    assert all(" order 1 " in line for line in capsys.readouterr().out.splitlines() if " order " in line)


@pytest.mark.reliability("cli")
@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--index", "100000"], ["--index 100000 out of range", "samples"]),
        (["--layer", "0"], ["--layer", "Shallow ShapNet has one layer"]),
        (["--target", "7"], ["--target 7 out of range for 3 classes"]),
        (["--max-order", "0"], ["--max-order must be >= 1"]),
    ],
)
def test_interactions_bad_arguments_exit_2(trained_run: Path, capsys, extra: list[str], fragments: list[str]) -> None:
    assert main(["interactions", str(trained_run / "best.pt"), *extra]) == 2
    assert_one_line_error(capsys, *fragments)


def test_interactions_of_a_deep_layer_says_which_game(tmp_path: Path, capsys) -> None:
    out = tmp_path / "deep"
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    deep = [*TINY[:3], "model.name=shapnet_deep", "model.args.channels=4", "model.args.hidden=[8]", "train.epochs=1"]
    assert main(["--quiet", "train", str(config), "--output", str(out), *sets(*deep)]) == 0
    capsys.readouterr()
    assert main(["interactions", str(out), "--layer", "0", "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "per-layer game of layer 0" in printed and "channel " in printed  # a hidden layer: channels, not classes
    assert main(["interactions", str(out), "--top", "3"]) == 0
    assert "per-layer game of layer 2 of 0..2" in capsys.readouterr().out  # 8 features: 3 stages, the last shown
    assert main(["interactions", str(out), "--layer", "5"]) == 2
    assert_one_line_error(capsys, "--layer", "layer 5 out of range", "3 stages")


def test_zoo_list_and_info(capsys) -> None:
    zoo = pytest.importorskip("zoo")
    if not hasattr(zoo, "list_models") or not hasattr(zoo, "model_info"):
        pytest.skip("zoo.list_models / zoo.model_info not written yet")
    assert main(["zoo", "list", "shapnet_*"]) == 0
    names = capsys.readouterr().out.split()
    assert "shapnet_shallow" in names and all(n.startswith("shapnet_") for n in names)
    assert main(["zoo", "info", "shapnet_deep", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "shapnet_deep"
    assert main(["zoo", "info", "shapnet_dep"]) == 2
    assert_one_line_error(capsys, "shapnet_dep")


@pytest.mark.reliability("cli")
def test_module_entry_point_exit_code(tmp_path: Path) -> None:
    """`python -m training` (what the `shapnets` script and torchrun run) turns user errors into status 2."""
    proc = subprocess.run([sys.executable, "-m", "training", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "config file not found" in proc.stderr


def test_bench_quick_writes_tables_with_every_method_row(tmp_path: Path, capsys) -> None:
    from training.bench import ORACLE, OWN, Budgets, captum_methods

    out = tmp_path / "bench"
    assert main(["--quiet", "bench", "fidelity", "accuracy", "--quick", "--samples", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == ["fidelity:", f"{out}/fidelity.md", "accuracy:", f"{out}/accuracy.md"]
    for kind in ("fidelity", "accuracy"):
        assert {p.name for p in out.glob(f"{kind}.*")} == {f"{kind}.md", f"{kind}.json", f"{kind}.png"}
    report = (out / "fidelity.md").read_text()
    for method in [OWN, ORACLE, *(m.name for m in captum_methods(Budgets.quick()))]:
        assert f"| {method} |" in report, f"no {method} row"
    # The date, the hardware and the command that made the table head it.
    assert f"Command: `shapnets bench fidelity accuracy --out {out} --quick --samples 1`" in report
    assert "cores)" in report and report.splitlines()[2][:4].isdigit()


@pytest.mark.reliability("cli")
def test_bench_unknown_kind_exits_2(capsys) -> None:
    assert main(["bench", "fidelty"]) == 2
    assert_one_line_error(capsys, "unknown benchmark", "fidelty", "fidelity, speed, scaling, accuracy")


@pytest.mark.slow
def test_bench_all_kinds_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["--quiet", "bench", "--quick", "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.md")} == {"fidelity.md", "speed.md", "scaling.md", "accuracy.md",
                                                  "interactions.md"}
