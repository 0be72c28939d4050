"""`make demo` (`python -m training.demo`): trains, checks the explanations against the exact oracle, plots one."""

from __future__ import annotations

import re
from pathlib import Path

from training.demo import main


def test_demo_runs_verifies_and_plots(tmp_path: Path, capsys) -> None:
    # main returns 1 when the network's explanation differs from the brute-force Shapley values by more than 1e-9.
    assert main(["--out", str(tmp_path), "--epochs", "30"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", out).group(1))
    assert 0.8 < accuracy <= 1.0, out  # above the 63% of always answering "benign", after 30 full-batch epochs
    error = float(re.search(r"max \|error\| = (\S+),", out).group(1))
    assert error < 1e-9, out
    written = [p for p in tmp_path.iterdir() if p.stem == "breast_cancer_explanation"]
    assert [p.suffix for p in written] in ([".png"], [".txt"]), written
    assert written[0].stat().st_size > 0
    assert f"wrote {written[0]}" in out
