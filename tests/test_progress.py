"""Feedback while work runs: training's per-epoch lines (time, ETA) and tqdm bar, curves.png, bench progress."""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

import matplotlib
import pytest
import torch

from shapnets import ShallowShapNet
from training import bench
from training.curves import curves_figure, format_duration, plot_curves, read_metrics
from training.trainer import train

matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import toy_bundle, toy_config

EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)  train_loss \d+\.\d+ .* time (\S+)  ETA (\S+)$")


@pytest.mark.parametrize(("seconds", "text"), [(0.04, "0.0s"), (3.25, "3.2s"), (42.4, "42s"), (187, "3m07s"),
                                               (7500, "2h05m"), (float("nan"), "?"), (-1, "?")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_a_run_logs_time_and_eta_per_epoch_and_draws_its_curves(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, "train.epochs=3", "loss.terms=[{name: explanation_l1, weight: 0.01}]")
    result = train(cfg, data=toy_bundle())
    out = Path(result["output_dir"])
    # What a piped run shows: the log (train.log holds the same lines as the terminal handler).
    lines = [m for line in (out / "train.log").read_text().splitlines() if (m := EPOCH_LINE.search(line))]
    assert [(int(m[1]), int(m[2])) for m in lines] == [(1, 3), (2, 3), (3, 3)]
    assert all(re.fullmatch(r"\d+(\.\d)?s|\d+m\d\ds|\d+h\d\dm", m[k]) for m in lines for k in (3, 4))
    assert lines[-1][4] == "0.0s", "nothing is left after the last epoch"
    curves = out / "curves.png"
    assert curves.is_file() and curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    columns = read_metrics(out / "metrics.csv")
    assert columns["epoch"] == [1.0, 2.0, 3.0] and "train_explanation_l1" in columns
    fig = curves_figure(columns, "toy")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "accuracy (%)", "regularizer terms (unweighted, train)"]
    assert [line.get_label() for line in fig.axes[2].lines] == ["explanation_l1"]
    assert list(fig.axes[2].lines[0].get_ydata()) == pytest.approx(columns["train_explanation_l1"])


def test_curves_without_terms_have_two_panels_and_skip_unevaluated_epochs(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,lr,train_loss,train_ce,val_loss,val_acc,val_acc_macro\n"
                        "1,4,0.1,0.9,0.9,,,\n2,8,0.1,0.7,0.7,0.8,0.5,0.5\n")
    fig = curves_figure(read_metrics(csv_path))
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy (%)"]
    validation = next(line for line in fig.axes[0].lines if line.get_label() == "validation")
    assert list(validation.get_xdata()) == [2.0]  # epoch 1 was not evaluated
    assert plot_curves(csv_path) == tmp_path / "curves.png"
    empty = tmp_path / "empty" / "metrics.csv"
    empty.parent.mkdir()
    empty.write_text("epoch,train_loss\n")
    assert plot_curves(empty) is None and not (empty.parent / "curves.png").exists()
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no 'epoch' column"):
        read_metrics(tmp_path / "bad.csv")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_with_an_eta(tmp_path: Path, monkeypatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(toy_config(tmp_path, "train.epochs=2"), data=toy_bundle())
    shown = terminal.getvalue()
    # tqdm redraws at most every 0.1 s: a fast toy epoch may only show its first frame, whose ETA slot is "<?".
    assert "epoch 2/2" in shown and re.search(r"\d+/6 \[\d\d:\d\d<(\?|\d\d:\d\d)", shown), shown[-400:]


def test_bench_progress_lines_carry_elapsed_time_and_eta(capsys, monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    progress = bench.Progress("speed", 3, verbose=True)
    for name, at in (("a", 100.0), ("b", 110.0), ("c", 130.0)):
        now[0] = at
        progress(name)
    assert capsys.readouterr().err.splitlines() == [
        "[bench] speed 1/3: a (elapsed 0.0s, ETA ?)",
        "[bench] speed 2/3: b (elapsed 10s, ETA 20s)",  # 10 s per item, 2 items left (this one included)
        "[bench] speed 3/3: c (elapsed 30s, ETA 15s)",
    ]
    bench.Progress("quiet", 1, verbose=False)("x")
    assert capsys.readouterr().err == ""


def test_named_models_replace_the_synthetic_ones_in_fidelity(monkeypatch) -> None:
    def small_case(name: str) -> bench.Case:
        model = ShallowShapNet(4, 2, "pairs").eval()
        return bench.Case(name, "Shallow ShapNet", model, torch.randn(1, 4), torch.zeros(4), torch.arange(4), "test")

    asked = []

    def fake_zoo_cases(names, *args, **kwargs):
        asked.append(list(names))
        return [small_case("named_model")]

    monkeypatch.setattr(bench, "zoo_cases", fake_zoo_cases)
    monkeypatch.setattr(bench, "synthetic_cases", lambda *args, **kwargs: [small_case("synthetic")])
    monkeypatch.setattr(bench, "captum_methods", lambda budgets=None: [])  # own explain() and the oracle only
    rows = bench.fidelity(quick=True, samples=1, zoo_models=["named_model"])
    assert asked == [["named_model"]]
    assert {r["model"] for r in rows} == {"named_model"}
    assert {r["model"] for r in bench.fidelity(quick=True, samples=1)} == {"synthetic"}
