"""Regularizers that change explanations, pruning modes that skip work, and the measurements behind them.

* the sparsity measures (n90, peak share, Gini) on maps whose values are known;
* a stronger L1 weight gives sparser maps on a tiny problem;
* `prune_mode="active"` prunes exactly floor(p * active) players per sample, `"threshold"` those below a share of
  the largest, and both keep local accuracy and missingness while the evaluation counts show the skipped work;
* a fine-tune with an explanation term reports before/after sparsity in its run folder;
* `train.time_budget_s` fits whole epochs into a budget; bad values are refused with the accepted range;
* `benchmarks/gpu_run.py --dry-run` runs a training job end to end on a stand-in MNIST folder.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from test_data import write_fake_idx_set

from shapnets import ConvShapNet, DeepShapNet, ShallowShapNet, configure_pruning, explanation_penalty
from shapnets.pruning import prune_players
from shapnets.sparsity import explanation_sparsity, gini, mass_count, peak_share
from training.cli import main
from training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ measures
def test_sparsity_measures_on_known_maps() -> None:
    one_hot = torch.zeros(1, 20)
    one_hot[0, 3] = -2.0
    uniform = torch.ones(1, 20)
    ramp = torch.tensor([[5.0, 3.0, 1.0, 1.0, 0.0]])  # 90% of 10 is 9: the two largest hold 8, three hold 9
    assert mass_count(one_hot).item() == 1 and peak_share(one_hot).item() == 1.0
    assert gini(one_hot).item() == pytest.approx(19 / 20)
    assert mass_count(uniform).item() == 18 and peak_share(uniform).item() == pytest.approx(1 / 20)
    assert gini(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert mass_count(ramp).item() == 3 and peak_share(ramp).item() == pytest.approx(0.5)
    zero = torch.zeros(2, 4)
    assert mass_count(zero).tolist() == [0, 0] and peak_share(zero).isnan().all() and gini(zero).isnan().all()
    with pytest.raises(ValueError, match=r"share must lie in \(0, 1\]"):
        mass_count(uniform, 0.0)


def test_scale_free_penalties_ignore_the_scale_and_have_gradients_at_zero() -> None:
    from shapnets import l1_sparsity, linf_spreading

    z = torch.randn(3, 7, 2, dtype=torch.float64)
    for penalty in (l1_sparsity, linf_spreading):
        torch.testing.assert_close(penalty(5 * z, normalize=True), penalty(z, normalize=True))
        assert not torch.allclose(penalty(5 * z), penalty(z))
        zero = torch.zeros(2, 4, 3, requires_grad=True)
        penalty(zero, normalize=True).backward()
        assert torch.isfinite(zero.grad).all()
    flat, peaked = torch.ones(1, 16, 1), torch.zeros(1, 16, 1)
    peaked[0, 0] = 16.0
    assert l1_sparsity(peaked, normalize=True) < l1_sparsity(flat, normalize=True)  # 1 < sqrt(16)
    assert linf_spreading(flat, normalize=True) < linf_spreading(peaked, normalize=True)  # 1/16 < 1


def test_explanation_sparsity_reads_the_predicted_class_map() -> None:
    model = DeepShapNet(6, 3, channels=4, reference=torch.zeros(6))
    x = torch.randn(5, 6)
    expl = model.explain(x)
    stats = explanation_sparsity(expl)
    predicted = expl.output.argmax(1)
    maps = expl.attributions[torch.arange(5), :, predicted]
    torch.testing.assert_close(stats["n90"], mass_count(maps))
    torch.testing.assert_close(stats["peak_share"], peak_share(maps))
    other = (predicted + 1) % 3
    torch.testing.assert_close(explanation_sparsity(expl, other)["gini"], gini(expl.attributions[torch.arange(5), :,
                                                                                                  other]))
    with pytest.raises(ValueError, match="one class per sample"):
        explanation_sparsity(expl, torch.zeros(3, dtype=torch.long))


def _fit(weight: float, layers: str, normalize: bool = False, steps: int = 60) -> tuple[float, float]:
    """Accuracy and mean n90 of a tiny Deep ShapNet trained with L1 (of `weight`) on 2 relevant of 6 features."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=generator)
    y = ((x[:, 0] + x[:, 1]) > 0).long()
    torch.manual_seed(0)
    model = DeepShapNet(6, 2, channels=4, hidden=(8,))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        expl = model.explain(x, layers=layers == "all")
        loss = torch.nn.functional.cross_entropy(expl.output, y) + weight * explanation_penalty(expl, "l1", layers,
                                                                                       normalize=normalize)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        expl = model.eval().explain(x)
    return float((expl.output.argmax(1) == y).float().mean()), float(explanation_sparsity(expl)["n90"].mean())


@pytest.mark.parametrize("layers,normalize", [("final", False), ("all", False), ("final", True)])
def test_a_stronger_l1_weight_gives_sparser_maps(layers: str, normalize: bool) -> None:
    results = [_fit(w, layers, normalize) for w in (0.0, 0.1)]
    (_, n90_0), (acc_1, n90_1) = results
    assert n90_1 < 0.9 * n90_0, results  # a tenth fewer players hold 90% of the mass
    assert acc_1 > 0.85, results


# ------------------------------------------------------------------------------------------------ pruning modes
def test_active_mode_prunes_a_share_of_the_active_players_only() -> None:
    z = torch.zeros(3, 10, 2)
    z[0, :8] = torch.arange(1.0, 9.0)[:, None]  # 8 active players
    z[1, 5:7] = 1.0                             # 2 active players, tied
    pruned = prune_players(z, 0.5, mode="active")
    active = pruned.abs().sum(-1).ne(0).sum(1).tolist()
    assert active == [4, 1, 0]  # floor(0.5 * 8) and floor(0.5 * 2) pruned; an all-zero sample stays all zero
    assert pruned[0, 4:8].ne(0).all() and pruned[1, 6].ne(0).all()  # the largest kept; ties: lower index first
    all_mode = prune_players(z, 0.5, mode="all")  # floor(0.5 * 10) = 5 of all players: 2 zeros + 3 active
    assert all_mode.abs().sum(-1).ne(0).sum(1).tolist() == [5, 2, 0]
    threshold = prune_players(z, 0.5, mode="threshold")  # below half of each sample's largest norm (16 in sample 0)
    assert threshold.abs().sum(-1).ne(0).sum(1).tolist() == [5, 2, 0]


def _images() -> torch.Tensor:
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    x[:, :, :5] = 0.0  # reference rows: missing players
    return x


@pytest.mark.parametrize("mode,p", [("active", 0.5), ("threshold", 0.3), ("all", 0.7)])
def test_pruning_modes_keep_local_accuracy_and_missingness(mode: str, p: float) -> None:
    torch.manual_seed(0)
    conv = ConvShapNet(1, 3, channels=(4, 4), hidden=(8,), prune=[p, p, 0.0], prune_mode=mode).double().eval()
    x = _images().double()
    expl = conv.explain(x, layers=True)
    expl.check_local_accuracy(atol=1e-10)
    assert expl.attributions[:, :5].abs().max() == 0  # players at the reference: exactly zero
    deep = DeepShapNet(7, 3, channels=4, prune=p, prune_mode=mode, reference=torch.zeros(7)).double().eval()
    xt = torch.randn(6, 7, dtype=torch.float64)
    xt[:, 2] = 0.0
    e = deep.explain(xt)
    e.check_local_accuracy(atol=1e-10)
    assert e.attributions[:, 2].abs().max() == 0


def test_active_pruning_skips_work_the_counts_show() -> None:
    torch.manual_seed(0)
    model = ConvShapNet(1, 3, channels=(4, 4), hidden=(8,)).eval()
    x = _images()
    with torch.no_grad():
        active = model.representations(x)[0].abs().sum(-1).ne(0).flatten(1).sum(1).tolist()
    done = {}
    for p in (0.0, 0.5, 0.8):
        configure_pruning(model, [p, p, 0.0], "active")
        model.evaluation_stats(reset=True)
        expl = model.explain(x, layers=True)
        stats = model.evaluation_stats(reset=True)
        done[p] = stats["coalition_evals"] - stats["coalition_evals_skipped"]
        # after stage 0, each sample keeps exactly its active count minus floor(p * active)
        kept = expl.layers[0].abs().sum(-1).ne(0).flatten(1).sum(1)
        assert kept.tolist() == [a - math.floor(p * a) for a in active]
    assert done[0.0] > done[0.5] > done[0.8], done


def test_pruning_values_out_of_range_are_refused_with_the_range() -> None:
    model = ConvShapNet(1, 3, channels=(4,))
    with pytest.raises(ValueError, match=r"fraction of active players must lie in \[0, 1\), got 1.0"):
        configure_pruning(model, 1.0, "active")
    with pytest.raises(ValueError, match=r"threshold .* must lie in \[0, 1\), got -0.1"):
        configure_pruning(model, -0.1, "threshold")
    with pytest.raises(ValueError, match="unknown pruning mode 'most'"):
        configure_pruning(model, 0.5, "most")
    with pytest.raises(ValueError, match="ShallowShapNet has no stages to prune"):
        configure_pruning(ShallowShapNet(4, 2), 0.5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        ConvShapNet(1, 3, channels=(4,), prune=1.0, prune_mode="active")


# ------------------------------------------------------------------------------------------------ training side
def _config(tmp_path: Path, **sections: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"name": "t", **sections}))
    return path


def test_negative_loss_weights_and_budgets_are_refused(tmp_path: Path) -> None:
    bad = _config(tmp_path, loss={"terms": [{"name": "explanation_l1", "weight": -0.1}]})
    with pytest.raises(ConfigError, match=r"weight must be a number >= 0, got -0.1"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"train\.time_budget_s must be > 0"):
        load_config(_config(tmp_path, train={"time_budget_s": 0}))


def test_epochs_within_budget() -> None:
    from training.trainer import _epochs_within_budget

    # 100 steps per epoch at 0.01 s + 10 steps of validation: 1.1 s per epoch. 20 s left: 0.9 * 20 = 18 s, less
    # the test (0.2 s) and the rest of this epoch (65 + 10 steps: 0.75 s) leaves 17.05 s: 15 more epochs, 16 in all
    assert _epochs_within_budget(20.0, 0.01, 100, 0, 35, (10.0, 20.0), 50) == 16
    assert _epochs_within_budget(20.0, 0.01, 100, 0, 35, (10.0, 20.0), 5) == 5   # never more than asked
    assert _epochs_within_budget(0.5, 0.01, 100, 2, 35, (10.0, 20.0), 50) == 3   # at least the current epoch


def test_budgeted_run_shortens_its_schedule(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = _config(tmp_path, data={"name": "synthetic_tabular", "batch_size": 4, "limit": 160},
                     model={"name": "shapnet_deep", "args": {"channels": 4}},
                     train={"epochs": 10000, "time_budget_s": 2.0, "device": "cpu"})
    assert main(["--quiet", "train", str(config), "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 1 <= summary["epochs"] < 10000
    assert "time budget 2s" in (out / "train.log").read_text()


def test_finetune_with_an_explanation_term_reports_its_effect(tmp_path: Path) -> None:
    base = tmp_path / "base"
    data = {"name": "synthetic_tabular", "batch_size": 16, "limit": 64}
    config = _config(tmp_path, data=data, model={"name": "shapnet_deep", "args": {"channels": 4}},
                     train={"epochs": 1, "device": "cpu"})
    assert main(["--quiet", "train", str(config), "--output", str(base)]) == 0
    tuned = tmp_path / "tuned"
    assert main(["--quiet", "train", str(config), "--output", str(tuned), "--set", f"model.init_from={base}/best.pt",
                 "--set", "loss.terms=[{name: explanation_l1, weight: 0.5}]"]) == 0
    effect = json.loads((tuned / "explanation_effect.json").read_text())
    assert set(effect) == {"before", "after"}
    for part in effect.values():
        assert {"samples", "acc", "n90", "peak_share", "gini"} <= set(part) and part["samples"] > 0
    assert json.loads((tuned / "summary.json").read_text())["explanation_effect"] == effect
    assert "n90" in (tuned / "train.log").read_text()
    assert not (base / "explanation_effect.json").exists()  # no explanation term: nothing to report


def test_gpu_script_dry_run_on_a_stand_in_mnist(tmp_path: Path) -> None:
    write_fake_idx_set(tmp_path / "data" / "mnist", gz=True, n_train=80, n_test=20)
    work, pack = tmp_path / "work", tmp_path / "pack"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--work", str(work), "--pack",
                             str(pack), "--dry-run", "--data-root", str(tmp_path / "data"), "--deadline", "300",
                             "--jobs", "ft_l1_all_0.001_prune", "--skip", "tests", "bench"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((work / "runs" / "ft_l1_all_0.001_prune" / "summary.json").read_text())
    assert summary["steps"] == 2
    with tarfile.open(pack / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/ft_l1_all_0.001_prune/summary.json" in names and "env.json" in names


def test_gpu_script_jobs_use_valid_configs() -> None:
    spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "benchmarks" / "gpu_run.py")
    gpu_run = importlib.util.module_from_spec(spec)
    sys.modules["gpu_run"] = gpu_run  # dataclasses look their module up there
    spec.loader.exec_module(gpu_run)
    for job in gpu_run.jobs(480.0, dry_run=False):
        overrides = [*job.overrides, f"train.time_budget_s={job.budget_s}"]
        cfg = load_config(ROOT / "configs" / f"{job.config}.yaml", overrides)
        assert cfg.train.time_budget_s == job.budget_s
