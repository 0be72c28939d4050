"""Reliability catalogue, category "cli": user errors through the `shapnets` CLI, beyond tests/test_cli.py's cases.

Each case must exit with code 2 and print one line that names what is wrong and what is valid, never a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from training.cli import main

pytestmark = pytest.mark.reliability("cli")

CONFIG = "{config}"  # replaced by an empty config file: every default, breast_cancer from scikit-learn
OUT = "{out}"  # replaced by a fresh output folder

CASES = [
    ("misspelt_optim_key", ["train", CONFIG, "--set", "optim.learning_rate=0.1"],
     ["unknown key 'learning_rate' in section 'optim'", "valid keys: lr,"]),
    ("misspelt_section", ["train", CONFIG, "--set", "modle.name=x"],
     ["unknown key 'modle'", "did you mean 'model'?"]),
    ("misspelt_model_key", ["train", CONFIG, "--set", "model.nmae=x"], ["'nmae'", "did you mean 'name'?"]),
    ("misspelt_loss_key", ["train", CONFIG, "--set", "loss.label_smooth=0.1"], ["did you mean 'label_smoothing'?"]),
    ("list_for_float", ["train", CONFIG, "--set", "optim.lr=[1,2]"], ["optim.lr: expected float, got list"]),
    ("bool_for_int", ["train", CONFIG, "--set", "data.batch_size=true"], ["data.batch_size: expected int, got bool"]),
    ("string_for_float", ["train", CONFIG, "--set", "optim.lr=fast"], ["optim.lr: expected float, got str"]),
    ("value_out_of_range", ["train", CONFIG, "--set", "data.val_fraction=1.5"],
     ["data.val_fraction must lie in [0, 1)"]),
    ("negative_epochs", ["train", CONFIG, "--set", "train.epochs=-1"], ["train.epochs must be >= 1"]),
    ("choice_not_offered", ["train", CONFIG, "--set", "train.precision=fp8"],
     ["train.precision: expected one of auto, fp32, bf16"]),
    ("unknown_dataset", ["train", CONFIG, "--output", OUT, "--set", "data.name=mnistt"],
     ["unknown data set 'mnistt'", "valid names:", "mnist"]),
    ("unknown_loss_term", ["train", CONFIG, "--output", OUT, "--set", "loss.terms=[{name: l3}]"],
     ["unknown loss term 'l3'", "registered:", "explanation_l1"]),
    ("shift_augmentation_on_tabular_data", ["train", CONFIG, "--output", OUT, "--set", "data.shift_pixels=2"],
     ["data.shift_pixels=2 needs images", "set it to 0"]),
    ("resume_without_a_run", ["train", CONFIG, "--output", OUT, "--resume"],
     ["--resume: no last.pt", "drop --resume"]),
    ("zoo_info_unknown_name", ["zoo", "info", "shapnet_nope"], ["'shapnet_nope'", "Did you mean"]),
    ("explain_unknown_model", ["explain", "shapnet_nope", "--index", "0"], ["cannot load 'shapnet_nope'"]),
    ("export_missing_run", ["export", OUT, "--name", "shapnet_deep_yeast"], ["no such checkpoint or folder"]),
]


def _fill(argv: list[str], tmp_path: Path) -> list[str]:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    return [a.replace(CONFIG, str(config)).replace(OUT, str(tmp_path / "run")) for a in argv]


@pytest.mark.parametrize(("argv", "fragments"), [pytest.param(a, f, id=i) for i, a, f in CASES])
def test_user_error_exits_2_with_one_line_and_no_traceback(argv: list[str], fragments: list[str], tmp_path: Path,
                                                            capsys) -> None:
    """A user error: exit code 2, one line naming the problem and what is valid, no traceback."""
    assert main(_fill(argv, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_config_that_is_not_a_mapping(tmp_path: Path, capsys) -> None:
    """A YAML list where a mapping of sections is expected."""
    config = tmp_path / "list.yaml"
    config.write_text("- a\n- b\n")
    assert main(["train", str(config)]) == 2
    assert "a config must be a mapping of sections, got list" in capsys.readouterr().err


def test_the_installed_command_exits_2_without_traceback(tmp_path: Path) -> None:
    """The same through a real process (`python -m training`): exit status 2 and no traceback on stderr."""
    argv = _fill(["train", CONFIG, "--set", "optim.learning_rate=0.1"], tmp_path)
    proc = subprocess.run([sys.executable, "-m", "training", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown key 'learning_rate'" in proc.stderr
