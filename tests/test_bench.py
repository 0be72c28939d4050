"""`training.bench`: every method row present, the game and the oracle agree, metrics, memory, the four tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from shapnets import DeepShapNet, ShallowShapNet, exact_shapley
from training import bench
from zoo.baselines import BaselineMLP

QUICK = bench.Budgets.quick()
ALL_METHODS = [bench.OWN, bench.ORACLE] + [m.name for m in bench.captum_methods(QUICK)]
needs_captum = pytest.mark.skipif(not bench.captum_available(),
                                  reason="captum is not installed (extra `baselines`): the post-hoc rows are empty")


def tabular_case(model: torch.nn.Module, features: int, samples: int = 2, scale: torch.Tensor | None = None,
                 name: str = "case") -> bench.Case:
    x = torch.randn(samples, features) * (scale if scale is not None else 1.0)
    return bench._tabular_case(name, bench._family(model), model, x, None, "N(0, 1) draws")


# ------------------------------------------------------------------------------------------------ the game
def test_game_keeps_the_most_moving_players_and_its_oracle_matches_a_shallow_shapnet() -> None:
    net = ShallowShapNet(6, 3, "pairs", hidden=(8,)).eval()
    scale = torch.tensor([0.1, 3.0, 0.2, 2.0, 1.5, 0.05])
    case = tabular_case(net, 6, samples=3, scale=scale)
    game = bench.make_game(case, max_players=3)
    assert game.kept.tolist() == [1, 3, 4]  # the three largest scales
    # The non-kept features sit at the reference in the game's input, the kept ones at x.
    assert torch.equal(game.full[:, [0, 2, 5]], torch.zeros(3, 3))
    assert torch.equal(game.full[:, game.kept], case.x[:, game.kept])
    # Shallow ShapNets are exact: their own explanation of the restricted input is the restricted game's oracle,
    # and the features at the reference get exactly nothing (missingness).
    own = bench._own_attributions(game)
    torch.testing.assert_close(own.double(), game.exact, atol=1e-5, rtol=1e-4)
    full_expl = net.explain(game.full).attributions
    assert full_expl[:, [0, 2, 5]].abs().max() < 1e-6
    # And the oracle of the restricted game is the full oracle on the restricted input (null players add nothing).
    full_oracle = exact_shapley(net.double(), game.full.double()).attributions
    torch.testing.assert_close(bench._for_target(full_oracle[:, game.kept], game.target), game.exact)


def test_game_target_is_the_predicted_class() -> None:
    net = DeepShapNet(4, 3, channels=4, hidden=(8,)).eval()
    game = bench.make_game(tabular_case(net, 4, samples=5), max_players=8)
    assert game.kept.tolist() == [0, 1, 2, 3]
    assert torch.equal(game.target, net(game.full).argmax(1))


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_on_known_cases() -> None:
    exact = torch.tensor([[3.0, -1.0, 0.5, 2.0], [1.0, 2.0, 3.0, 4.0]])
    assert bench.relative_l2(exact, exact) == 0.0
    assert bench.relative_l2(2 * exact, exact) == pytest.approx(1.0)
    assert bench.spearman(exact ** 3, exact) == pytest.approx(1.0)  # monotone: same ranking
    assert bench.spearman(-exact, exact) == pytest.approx(-1.0)
    assert bench.top_k_overlap(exact, exact, 2) == 1.0
    swapped = torch.tensor([[0.0, 5.0, 4.0, 0.0], [4.0, 3.0, 0.0, 0.0]])  # top-2 by |.|: disjoint from exact's
    assert bench.top_k_overlap(swapped, exact, 2) == 0.0


def test_peak_memory_sees_a_temporary_tensor() -> None:
    def allocate() -> None:
        block = torch.ones(2**21)  # 8 MiB, freed on return
        block.add_(1)

    peak = bench.peak_memory(allocate, torch.device("cpu"))
    assert 2**23 <= peak < 2**23 + 2**20
    assert bench.peak_memory(lambda: None, torch.device("cpu")) == 0


# ------------------------------------------------------------------------------------------------ fidelity
@needs_captum
def test_fidelity_has_every_method_row_and_writes_its_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cases = [tabular_case(ShallowShapNet(4, 2, "pairs", hidden=(8,)), 4, name="shallow"),
             tabular_case(BaselineMLP(4, 2, hidden=(8,)), 4, name="mlp")]
    rows = bench.fidelity(cases, out=tmp_path, quick=True, samples=2)
    for name in ("shallow", "mlp"):
        assert [r["method"] for r in rows if r["model"] == name] == ALL_METHODS
    by = {(r["model"], r["method"]): r for r in rows}
    assert by["shallow", bench.OWN]["rel. L2 error"] < 1e-5  # exact by construction
    assert by["shallow", bench.ORACLE]["rel. L2 error"] == 0.0
    assert by["mlp", bench.OWN]["status"].startswith("n/a")  # no explain(): the row says so
    assert by["mlp", "LRP"]["status"] == "ok"  # a ReLU MLP has LRP rules ...
    assert by["shallow", "LRP"]["status"].startswith("not supported")  # ... a ShapNet does not: a row, no crash
    for row in rows:
        if row["status"] in ("ok", "ground truth"):
            assert row["rel. L2 error"] >= 0 and row["ms / sample"] > 0
    report = (tmp_path / "fidelity.md").read_text()
    assert all(name in report for name in ALL_METHODS)
    payload = json.loads((tmp_path / "fidelity.json").read_text())
    assert len(payload["rows"]) == len(rows) and payload["environment"]["date"]
    assert (tmp_path / "fidelity.png").stat().st_size > 0


def test_fidelity_without_captum_says_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "captum_available", lambda: False)
    rows = bench.fidelity([tabular_case(ShallowShapNet(3, 2, "pairs", hidden=(4,)), 3)], out=tmp_path, quick=True)
    assert [r["method"] for r in rows] == ALL_METHODS
    posthoc = rows[2:]
    assert all(r["status"] == bench.CAPTUM_MISSING and r.get("rel. L2 error") is None for r in posthoc)
    assert "pip install" in bench.CAPTUM_MISSING
    assert bench.CAPTUM_MISSING in (tmp_path / "fidelity.md").read_text()


# ------------------------------------------------------------------------------------------------ speed, scaling
@needs_captum
def test_speed_rows_and_bars(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cases = [tabular_case(ShallowShapNet(4, 2, "pairs", hidden=(8,)), 4, name="shallow"),
             tabular_case(DeepShapNet(4, 2, channels=4, hidden=(8,)), 4, name="deep")]
    rows = bench.speed(cases, out=tmp_path, batch=8, kernel_samples=64, kernel_inputs=1, error_samples=2, repeats=1)
    assert [r["model"] for r in rows] == ["shallow", "deep"]
    for row in rows:
        assert row["explain ms / sample"] > 0 and row["forward ms / sample"] > 0
        assert row["speed-up (batched)"] == pytest.approx(row["KernelShap (64) ms / sample"]
                                                          / row["explain ms / sample"])
        assert row["bar met"] in ("yes", "no (speed)", "no (error)", "no (speed, error)")
    assert rows[0]["own rel. L2 error"] < 1e-5  # exact: the Shallow ShapNet can only miss on speed
    assert "error" not in rows[0]["bar met"]
    assert (tmp_path / "speed.md").is_file() and (tmp_path / "speed.png").is_file()


TINY_GRID = bench.ScalingGrid(shallow_k=(1, 2), shallow_features=4, deep_features=(8,), conv_sizes=(6,),
                              batches=(1, 8), conv_batches=(1, 2), oracle_batches=(1, 2), tabular_batch=4,
                              conv_batch=1, repeats=1, growth_features=8, growth_side=6, oracle_features=4)


def test_scaling_rows_cover_the_grid(tmp_path: Path) -> None:
    rows = bench.scaling(out=tmp_path, grid=TINY_GRID)
    settings = [(r["family"], r["setting"], r["batch"]) for r in rows]
    assert ("Shallow ShapNet", "groups of k=2 (D=4)", 4) in settings
    assert ("Deep ShapNet", "batch growth (D=8)", 8) in settings
    assert ("Conv ShapNet", "6x6", 1) in settings
    assert any(family == "exact_shapley" for family, _, _ in settings)
    assert all(r["peak MB"] > 0 and r["explain ms / sample"] > 0 for r in rows)
    assert (tmp_path / "scaling.md").is_file() and (tmp_path / "scaling.png").is_file()


def test_scaling_refuses_bf16_on_the_cpu() -> None:
    with pytest.raises(ValueError, match="bf16 runs on CUDA only"):
        bench.scaling(precisions=["bf16"], grid=TINY_GRID)


# ------------------------------------------------------------------------------------------------ accuracy
def test_accuracy_reads_runs_and_marks_untrained_baselines(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("baseline_mlp_trained", "baseline_mlp_missing"):
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "output_dir": f"runs/{name}", "model": {"name": "baseline_mlp"},
             "data": {"name": "breast_cancer"}}))
    run = tmp_path / "runs" / "baseline_mlp_trained"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"test": {"acc": 0.9512}, "trainable_params": 123}))
    rows = bench.accuracy(out=tmp_path / "out", configs_dir=configs)
    by = {r["model"]: r for r in rows}
    assert by["baseline_mlp_trained"]["test accuracy"] == 0.9512 and by["baseline_mlp_trained"]["params"] == 123
    assert by["baseline_mlp_missing"]["source"].startswith("not trained: shapnets train configs/")
    anchors = {(r["dataset"], r["test accuracy (%)"]) for r in rows if r["kind"] == "published anchor"}
    assert {("mnist", "98.79"), ("adult", "84.85"), ("mnist", "99.75")} <= anchors
    report = (tmp_path / "out" / "accuracy.md").read_text()
    assert "95.12" in report and "not trained" in report


# ------------------------------------------------------------------------------------------------ interactions
def test_interactions_rows_match_the_oracle_and_write_their_files(tmp_path: Path) -> None:
    from training.interactions_bench import interactions

    torch.manual_seed(0)
    cases = [tabular_case(ShallowShapNet(5, 3, "pairs", hidden=(8,)).eval(), 5, samples=4, name="shallow"),
             tabular_case(DeepShapNet(4, 2, channels=4, hidden=(8,)).eval(), 4, samples=4, name="deep")]
    rows = interactions(cases, out=tmp_path, oracle_samples=2)
    by = {(r["model"], r["game"]): r for r in rows}
    assert set(by) == {("shallow", "network (exact)"), ("deep", "last layer (per-layer game)"),
                       ("deep", "network (oracle)")}
    # A Shallow ShapNet's listed dividends are the whole network's: the float64 oracle agrees on every subset.
    assert by["shallow", "network (exact)"]["oracle diff"] < 1e-5
    assert by["shallow", "network (exact)"]["subsets"] == 5 + 10  # singletons and pairs
    assert by["deep", "network (oracle)"]["subsets"] == 2**4 - 1 and by["deep", "network (oracle)"]["samples"] == 2
    for row in rows:
        assert 0 < row["mass in top"] <= 1 and row["decomposition error"] < 1e-4
        assert row["order 1"] + row["order 2"] + row["order >= 3"] == pytest.approx(1.0)
    assert by["shallow", "network (exact)"]["order >= 3"] == 0  # pairs: nothing above order 2 by construction
    assert {p.name for p in tmp_path.glob("interactions.*")} == {"interactions.md", "interactions.json",
                                                                 "interactions.png"}
    assert all((tmp_path / row["chart"]).stat().st_size > 0 for row in rows)
    assert len(json.loads((tmp_path / "interactions.json").read_text())["rows"]) == len(rows)


def test_interactions_refuses_a_model_without_exact_interactions() -> None:
    from training.config import UserError
    from training.interactions_bench import interactions

    with pytest.raises(UserError, match="mlp is a BaselineMLP, not a tabular Shallow or Deep ShapNet"):
        interactions([tabular_case(BaselineMLP(4, 2, hidden=(8,)), 4, name="mlp")])
    with pytest.raises(UserError, match=r"share must lie in \(0, 1\], got 1.5"):
        interactions([], share=1.5)


def test_run_interactions_quick_has_a_row_per_shipped_model(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")  # breast cancer ships with scikit-learn: no data folder needed
    names = ["shapnet_shallow_breast_cancer", "shapnet_deep_breast_cancer"]
    rows = bench.run(["interactions"], quick=True, out=tmp_path, zoo_models=names, verbose=False)["interactions"]
    assert [r["model"] for r in rows] == names  # 30 features: no Deep oracle row (2^30 subsets)
    assert all(r["inputs"].startswith("first 8 test samples") for r in rows)
    report = (tmp_path / "interactions.md").read_text()
    assert all(f"| {name} |" in report for name in names)


def test_run_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown benchmark"):
        bench.run(["fidelty"])


# ------------------------------------------------------------------------------------------------ the plain baselines
def test_baselines_build_by_name_round_trip_and_reject_bad_input(tmp_path: Path) -> None:
    import zoo

    mlp = zoo.create_model("baseline_mlp", in_features=5, num_classes=3, hidden=[8])
    cnn = zoo.create_model("baseline_cnn", in_chans=1, num_classes=3, channels=[4, 8]).eval()
    assert not hasattr(mlp, "explain")  # post hoc only: the fidelity table explains them with captum
    for model, x in [(mlp, torch.randn(2, 5)), (cnn, torch.randn(2, 1, 8, 8))]:
        zoo.save_pretrained(model, tmp_path / type(model).__name__)
        loaded = zoo.load_pretrained(tmp_path / type(model).__name__).eval()
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"BaselineMLP expects input of shape \(B, 5\), got \(2, 4\)"):
        mlp(torch.randn(2, 4))
    with pytest.raises(ValueError, match="unknown act_layer 'swishy'"):
        zoo.create_model("baseline_mlp", in_features=5, num_classes=3, act_layer="swishy")


@pytest.mark.gpu
def test_scaling_on_cuda_measures_fp32_and_bf16() -> None:
    rows = bench.scaling(device="cuda", grid=TINY_GRID)
    assert {r["precision"] for r in rows} == {"fp32", "bf16"} and {r["device"] for r in rows} == {"cuda"}
    assert all(r["peak MB"] > 0 for r in rows)
