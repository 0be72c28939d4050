"""The pruning benchmark (benchmarks/pruning.py), the regularizer figure (training/figures.py) and the MNIST
fine-tuning configs, end to end on tiny runs trained on synthetic data (seconds, CPU)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from torch.utils.data import Subset

from shapnets import ShallowShapNet
from training import figures
from training.cli import load_source, load_split, main
from training.config import load_config
from training.data import DataBundle
from training.trainer import load_data, train

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = [0.0, 0.5, 0.9]
SAMPLES = 16
COMMON = ["data.limit=64", "data.batch_size=16", "train.max_steps=6", "optim.lr=0.02", "train.device=cpu"]
TINY = {
    "conv": ["data.name=synthetic_images", "model.name=shapnet_conv", "model.args.channels=[4,4]",
             "model.args.hidden=[8]"],
    "deep": ["data.name=synthetic_tabular", "model.name=shapnet_deep", "model.args.channels=4",
             "model.args.hidden=[8]"],
}


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """benchmarks/pruning.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("pruning_benchmark", ROOT / "benchmarks" / "pruning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny trained run per architecture: a Conv ShapNet on 1x8x8 images, a Deep ShapNet on 8 features."""
    folder = tmp_path_factory.mktemp("pruning_runs")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny"}))
    out = {}
    for kind, overrides in TINY.items():
        out[kind] = folder / kind
        assert main(["--quiet", "train", str(config), "--output", str(out[kind]), *sets(*COMMON, *overrides)]) == 0
    return out


@pytest.fixture(scope="module")
def benchmark(bench, runs, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("pruning_out")
    result = bench.main([str(runs["conv"]), str(runs["deep"]), "--labels", "conv", "deep", "--samples", str(SAMPLES),
                         "--fractions", *map(str, FRACTIONS), "--time-samples", "8", "--repeats", "1", "--warmup", "0",
                         "--out", str(out)])
    return result, out


# ------------------------------------------------------------------------------------------------ benchmark
def test_every_model_has_a_table_row_per_fraction(benchmark) -> None:
    result, out = benchmark
    assert list(result["models"]) == ["conv", "deep", "headline"]
    sections = result["report"].split("### ")[1:]
    for label, section in zip(["conv", "deep"], sections):
        assert section.startswith(label)
        table = [line for line in section.splitlines() if line.startswith("|")]
        assert len(table) == 2 + len(FRACTIONS), section  # header, rule, one row per p
        assert [float(line.split("|")[1]) for line in table[2:]] == FRACTIONS
        assert [r["p"] for r in result["models"][label]["rows"]] == FRACTIONS
    assert "Sparsity" in sections[-2] and all(f"| {label} |" in sections[-2] for label in ("conv", "deep"))
    assert sections[-1].startswith("Largest p within 0.5 pt of conv")
    headline = {row["model"]: row for row in result["models"]["headline"]}
    assert "conv" in headline  # the start model qualifies at least at p = 0
    for row in headline.values():
        assert row["accuracy - start"] >= -0.005 - 1e-12
        assert math.isclose(row["speed-up (start / this)"], row["start ms"] / row["explain ms"], rel_tol=1e-9)
    assert (out / "pruning.md").read_text().strip() == result["report"].strip()
    assert (out / "pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pruning.json").is_file()


@pytest.mark.parametrize("kind", ["conv", "deep"])
def test_accuracy_at_p0_is_the_unpruned_accuracy(benchmark, runs, kind) -> None:
    loaded = load_source(str(runs[kind]), torch.device("cpu"))
    assert loaded.model.prune == [0.0] * loaded.model.num_stages  # trained without pruning
    test = load_split(loaded, "test", None)
    x = torch.stack([test[i][0] for i in range(SAMPLES)])
    y = torch.tensor([int(test[i][1]) for i in range(SAMPLES)])
    with torch.no_grad():
        accuracy = float((loaded.model(x).argmax(1) == y).double().mean())
    rows = benchmark[0]["models"][kind]["rows"]
    assert rows[0]["p"] == 0 and rows[0]["accuracy"] == accuracy
    assert benchmark[0]["models"][kind]["sparsity"]["accuracy"] == accuracy


@pytest.mark.parametrize("kind", ["conv", "deep"])
def test_skipped_work_grows_with_p_and_skipping_predicts_what_masking_predicts(benchmark, kind) -> None:
    rows = benchmark[0]["models"][kind]["rows"]
    for key in ("modules skipped", "coalitions skipped"):
        values = [r[key] for r in rows]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert values == sorted(values), f"{key} decreases with p: {values}"
    kept = [r["players kept"] for r in rows]
    assert kept == sorted(kept, reverse=True)
    assert rows[-1]["coalitions skipped"] > 0  # p = 0.9 leaves at most 10% of the players: work must be skipped
    # Unpruned, skipping is exact up to float32 rounding. Pruned, a decision between players whose norms tie exactly
    # (the synthetic images are symmetric) may fall differently on the two paths' roundings: most predictions agree.
    assert rows[0]["p"] == 0.0 and rows[0]["same predictions (share)"] == 1.0
    assert rows[0]["max logit diff / max |logit|"] < 1e-5
    for r in rows:
        assert r["same predictions (share)"] >= 0.75, r
        assert r["skip ms"] > 0 and r["masked ms"] > 0
        assert math.isclose(r["speed-up (masked / skip)"], r["masked ms"] / r["skip ms"], rel_tol=1e-9)
        assert r["evaluation_stats"]["module_evals"] > 0


def test_benchmark_restores_the_models_settings(bench, runs) -> None:
    loaded = load_source(str(runs["deep"]), torch.device("cpu"))
    model = loaded.model
    model.prune, model.skip_inactive = [0.25] * model.num_stages, False
    x = torch.randn(4, 8)
    rows, sparsity = bench.benchmark_model(model, x, torch.zeros(4, dtype=torch.long), [0.5], time_samples=2,
                                           repeats=1, warmup=0, batch_size=2)
    assert model.prune == [0.25] * model.num_stages and model.skip_inactive is False and not model.training
    assert len(rows) == 1 and sparsity["samples"] == 4  # p = 0 not asked for: sparsity still measured unpruned


def test_input_fraction_prunes_the_input_for_p_above_zero_and_is_restored(bench, runs) -> None:
    model = load_source(str(runs["conv"]), torch.device("cpu")).model
    x, y = torch.randn(6, 1, 8, 8), torch.zeros(6, dtype=torch.long)
    done = {}
    for fraction in (0.0, 0.5):
        rows, _ = bench.benchmark_model(model, x, y, [0.0, 0.2], time_samples=2, repeats=1, warmup=0, batch_size=3,
                                        mode="active", masked=False, input_fraction=fraction)
        done[fraction] = [r["coalition evals / sample"] for r in rows]
        assert model.prune_input == 0.0  # restored
    assert done[0.5][0] == done[0.0][0]  # p = 0 is the unpruned model either way
    assert done[0.5][1] < done[0.0][1]  # the input's pixels pruned: the first stage skips them too
    deep = load_source(str(runs["deep"]), torch.device("cpu")).model
    with pytest.raises(bench.BenchmarkError, match="no input pruning"):
        bench.apply_pruning(deep, 0.2, "active", 0.3)
    with pytest.raises(SystemExit):
        bench.parse_args(["run", "--input-fraction", "1.0"])


def test_sparsity_measures(bench) -> None:
    n = 20
    one_hot = torch.zeros(1, n, dtype=torch.float64)
    one_hot[0, 3] = 2.0
    uniform = torch.ones(1, n, dtype=torch.float64)
    assert bench.top_share(one_hot).item() == 1.0
    assert bench.gini(one_hot).item() == pytest.approx((n - 1) / n)
    assert bench.top_share(uniform).item() == pytest.approx(2 / n)  # ceil(0.1 * 20) = 2 players
    assert bench.gini(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert bench.top_share(torch.zeros(1, 3)).isnan().all() and bench.gini(torch.zeros(1, 3)).isnan().all()
    assert bench.top_share(torch.ones(1, 3)).item() == pytest.approx(1 / 3)  # at least one player


def test_benchmark_rejects_what_it_cannot_prune(bench) -> None:
    with pytest.raises(bench.BenchmarkError, match="ShallowShapNet has no instance-based pruning"):
        bench.check_prunable(ShallowShapNet(4, 2), "shallow.pt")
    with pytest.raises(SystemExit):
        bench.parse_args(["run", "--fractions", "0.5", "1.5"])
    with pytest.raises(SystemExit):
        bench.parse_args(["a", "b", "--labels", "only_one"])


# ------------------------------------------------------------------------------------------------ figure
def test_regularizers_figure_writes_a_png(runs, tmp_path: Path) -> None:
    out = tmp_path / "fig.png"
    assert figures.main(["regularizers", "--models", str(runs["conv"]), str(runs["conv"] / "last.pt"),
                         "--labels", "best", "last", "--out", str(out), "--samples", "4"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regularizers_figure_refuses_a_tabular_model(runs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fig.png"
    capsys.readouterr()
    assert figures.main(["regularizers", "--models", str(runs["conv"]), str(runs["deep"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "DeepShapNet" in err and "synthetic_tabular" in err and "image" in err
    assert not out.exists()
    with pytest.raises(figures.UserError, match="2 models need 2 labels, got 1"):
        figures.regularizers_figure([str(runs["conv"])] * 2, out, labels=["one"])


def test_columns_show_every_class_before_repeating_one() -> None:
    labels = [2, 2, 0, 1, 0, 3, 1]
    assert figures.pick_columns(labels, 4) == [2, 3, 0, 5]  # first 0, 1, 2, 3
    assert figures.pick_columns(labels, 6) == [2, 3, 0, 5, 4, 6]
    assert sorted(figures.pick_columns(labels, 100)) == list(range(len(labels)))


# ------------------------------------------------------------------------------------------------ configs
FINETUNE = ["finetune_conv_mnist_l1_final", "finetune_conv_mnist_l1_all", "finetune_conv_mnist_linf"]
TERMS = {"finetune_conv_mnist_l1_final": "explanation_l1", "finetune_conv_mnist_l1_all": "explanation_l1_all_layers",
         "finetune_conv_mnist_linf": "explanation_linf"}
SMOKE = ["data.name=synthetic_images", "data.limit=8", "data.batch_size=4", "train.max_steps=1", "data.num_workers=0",
         "train.device=cpu"]


def _one_step(config: Path, out: Path, *overrides: str) -> dict:
    cfg = load_config(config, [*SMOKE, f"output_dir={out}", *overrides])
    bundle = load_data(cfg)
    small = DataBundle(bundle.train, Subset(bundle.val, range(4)), Subset(bundle.test, range(4)), bundle.info)
    return train(cfg, data=small)


@pytest.mark.parametrize("name", FINETUNE)
def test_finetune_configs_match_conv_mnist_and_train_from_a_start_point(name: str, tmp_path_factory) -> None:
    """Same architecture and data as conv_mnist (so `init_from: shapnet_conv_mnist` loads strictly), and one step of
    each runs with its penalty, starting from a conv_mnist-architecture run (the zoo weights may not be shipped)."""
    base = yaml.safe_load((ROOT / "configs" / "conv_mnist.yaml").read_text())
    tuned = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    assert tuned["model"]["init_from"] == "shapnet_conv_mnist"
    assert tuned["model"]["name"] == base["model"]["name"]
    architecture = {k: v for k, v in base["model"]["args"].items() if k != "zero_init_output"}
    assert tuned["model"]["args"] == architecture
    assert {k: v for k, v in tuned["data"].items() if k != "limit"} == base["data"]  # same data and split
    assert tuned["optim"]["lr"] < base["optim"]["lr"]
    start = tmp_path_factory.getbasetemp() / "conv_mnist_start"
    if not (start / "last.pt").is_file():
        _one_step(ROOT / "configs" / "conv_mnist_stage1.yaml", start)
    out = tmp_path_factory.mktemp(name)
    result = _one_step(ROOT / "configs" / f"{name}.yaml", out, f"model.init_from={start}")
    assert result["steps"] == 1
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert f"train_{TERMS[name]}" in header
