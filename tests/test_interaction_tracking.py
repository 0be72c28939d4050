"""`train.track_interactions`: config checks, errors before training, records, figure, structure vs oracle."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from shapnets import DeepShapNet, ShallowShapNet, exact_interactions
from training.config import ConfigError, UserError, load_config, track_interactions_options
from training.data import ArrayDataset, DataBundle, DatasetInfo
from training.data.synthetic import load_synthetic_images
from training.interaction_tracking import InteractionTracker, grid_players, read_records
from training.trainer import build_model, train

D = 5


def toy_bundle(n: int = 40) -> DataBundle:
    g = torch.Generator().manual_seed(0)

    def split() -> ArrayDataset:
        x = torch.randn(n, D, generator=g)
        return ArrayDataset(x, ((x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 1).long()).clamp(max=2))

    info = DatasetInfo(name="toy", num_classes=3, input_shape=(D,), class_names=["a", "b", "c"],
                       feature_names=[f"f{i}" for i in range(D)], reference=[0.0] * D)
    return DataBundle(train=split(), val=split(), test=split(), info=info)


def toy_config(tmp_path: Path, *overrides: str):
    base = [f"output_dir={tmp_path / 'run'}", "name=toy", "model.name=baseline_mlp", "model.args.hidden=[16]",
            "data.batch_size=8", "optim.lr=0.01", "train.epochs=3", "train.device=cpu"]
    return load_config(None, [*base, *overrides])


def test_config_fills_defaults_and_names_bad_values(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, "train.track_interactions={}")
    assert cfg.train.track_interactions == {"samples": 32, "players": 10, "every": "auto", "budget": 0.25,
                                            "kind": "and_or", "split": "half", "tau": 0.05, "output": "log_odds"}
    assert toy_config(tmp_path).train.track_interactions is None
    for bad, message in [("{players: 17}", "above the exact oracle's limit of 16"),
                         ("{kind: xor}", "kind: expected one of and, or, and_or"),
                         ("{sample: 3}", "did you mean 'samples'"),
                         ("{every: 0}", "every must be >= 1"),
                         ("{every: often}", "every must be an integer >= 1 or 'auto'"),
                         ("{budget: 0}", "budget .* must be a finite number > 0"),
                         ("{split: sparse, players: 14}", "at most 12 players"),
                         ("{samples: many}", "samples: expected int")]:
        with pytest.raises(ConfigError, match=message):
            toy_config(tmp_path, f"train.track_interactions={bad}")


def test_auto_schedule_keeps_tracking_within_the_budget(tmp_path: Path) -> None:
    """`every: auto` tracks an epoch only while tracking time + the next evaluation <= budget x training time."""
    options = track_interactions_options({"samples": 4, "players": 3, "budget": 0.5})
    model = build_model(toy_config(tmp_path).model, toy_bundle().info)
    tracker = InteractionTracker(options, model, toy_bundle(), torch.device("cpu"), tmp_path)
    tracker.start(model, resume=False)
    assert [r["epoch"] for r in read_records(tmp_path / "interactions.jsonl")] == [0]
    # Pretend 10 s of training since the first record, 3 s of tracking so far, each evaluation costing 2 s.
    tracker._clock, tracker.total_cost, tracker._last_cost = time.perf_counter() - 10.0, 3.0, 2.0
    assert tracker._due(1, is_last=False)  # 3 + 2 <= 0.5 x 10
    tracker.total_cost = 3.5
    assert not tracker._due(2, is_last=False)  # 5.5 > 5
    assert tracker._due(3, is_last=True)  # the last epoch always
    tracker.after_epoch(model, 2, {"epoch_time_s": 1.0}, is_last=False)
    assert tracker.skipped == 1 and [r["epoch"] for r in read_records(tmp_path / "interactions.jsonl")] == [0]


def test_too_many_players_fails_before_training(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, "train.track_interactions={players: 6}")
    with pytest.raises(UserError, match="players=6, but the inputs of toy have only 5 features"):
        train(cfg, data=toy_bundle())
    assert not (tmp_path / "run" / "metrics.csv").exists()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_tracked_run_writes_records_and_the_figure(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, "train.track_interactions={samples: 6, players: 4, every: 2}")
    result = train(cfg, data=toy_bundle())
    out = Path(result["output_dir"])
    records = read_records(out / "interactions.jsonl")
    assert [r["epoch"] for r in records] == [0, 2, 3]  # the initial model, every 2nd epoch, and the last one
    assert records[0]["loss_gap"] is None
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert records[1]["train_loss"] is not None and records[1]["loss_gap"] == pytest.approx(
        records[1]["val_loss"] - records[1]["train_loss"])
    assert len(metrics) == 4
    for r in records:
        assert r["matching_error"] < 1e-9  # float64 games
        for kind in ("and", "or", "and_or"):
            for split in ("train", "test"):
                assert len(r[kind][split]["positive"]) == 4
                assert sum(r[kind][split]["distribution"]) == pytest.approx(1.0)
                assert all(v <= 0 for v in r[kind][split]["negative"])
            assert len(r[kind]["jaccard"]) == 4
        assert r["cost_s"] > 0
    assert (out / "interaction_dynamics.png").stat().st_size > 10_000
    assert "interactions at epoch 2" in (out / "train.log").read_text()
    json.loads((out / "interactions.jsonl").read_text().splitlines()[0])


def test_tabular_game_keeps_unchosen_features_at_the_reference(tmp_path: Path) -> None:
    bundle = toy_bundle()
    bundle.train.tensors[0][:, 3] *= 5  # feature 3 varies most: it must be chosen
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    options = {"samples": 4, "players": 2, "every": 1, "kind": "and", "split": "half", "tau": 0.05,
               "output": "logit"}
    tracker = InteractionTracker(options, model, bundle, torch.device("cpu"), tmp_path)
    assert 3 in tracker.chosen.tolist()
    values = tracker._values(model, tracker.train_x, tracker.train_y)  # (4, B, 1)
    x = tracker.train_x
    masked = torch.zeros_like(x)
    masked[:, tracker.chosen[0]] = x[:, tracker.chosen[0]]  # coalition {player 0}: row 1
    expected = model(masked).gather(1, tracker.train_y[:, None]).double()
    torch.testing.assert_close(values[1], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(values[0], model(torch.zeros(1, D)).expand(len(x), -1).gather(
        1, tracker.train_y[:, None]).double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("output", ["logit", "log_odds"])
def test_shallow_shapnet_structure_gives_the_oracle_game(tmp_path: Path, output: str) -> None:
    torch.manual_seed(0)
    model = ShallowShapNet(D, 3, groups="pairs", hidden=[8]).double()
    bundle = toy_bundle()
    options = {"samples": 5, "players": 3, "every": 1, "kind": "and_or", "split": "half", "tau": 0.05,
               "output": output}
    tracker = InteractionTracker(options, model, bundle, torch.device("cpu"), tmp_path)
    assert tracker.structural
    x, y = tracker.train_x.double(), tracker.train_y
    from_structure = tracker._values(model, x, y)
    tracker.structural = False
    from_oracle = tracker._values(model, x, y)
    torch.testing.assert_close(from_structure, from_oracle, atol=1e-10, rtol=0)
    if output == "log_odds":
        return
    # And both are the oracle's dividends of the restricted game.
    chosen = tracker.chosen

    def restricted(z: torch.Tensor) -> torch.Tensor:
        return model(torch.zeros(z.shape[0], D, dtype=z.dtype).index_copy(1, chosen, z))

    oracle = exact_interactions(restricted, x[:, chosen], model.reference[chosen])
    from shapnets import moebius_transform

    dividends = moebius_transform(from_structure, 3)
    for t, subset in enumerate(oracle.subsets):
        row = sum(1 << i for i in subset)
        expected = oracle.dividends[:, t].gather(1, y[:, None])
        torch.testing.assert_close(dividends[row], expected, atol=1e-10, rtol=0)


def test_image_players_are_a_grid_of_patches(tmp_path: Path) -> None:
    pixel_map, grid = grid_players(28, 28, 9)
    assert grid == (3, 3)
    sizes = pixel_map.flatten().bincount()
    assert len(sizes) == 9 and sizes.min() >= 81 and sizes.sum() == 784
    assert grid_players(8, 8, 10)[1] == (2, 5)
    with pytest.raises(UserError, match="does not fit"):
        grid_players(2, 2, 3)
    bundle = load_synthetic_images(limit=16)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * bundle.info.input_shape[0], 4))
    options = {"samples": 4, "players": 4, "every": 1, "kind": "and", "split": "half", "tau": 0.05,
               "output": "log_odds"}
    tracker = InteractionTracker(options, model, bundle, torch.device("cpu"), tmp_path)
    record = tracker.evaluate(model, 0)
    assert record["matching_error"] < 1e-4 and len(record["and"]["jaccard"]) == 4
    with pytest.raises(UserError, match="only 64 pixels"):
        InteractionTracker({**options, "players": 65}, model, bundle, torch.device("cpu"), tmp_path)


@pytest.mark.parametrize("split", ["half", "sparse"])
def test_tracker_split_agrees_with_the_library(tmp_path: Path, split: str) -> None:
    from shapnets import and_or_interactions

    model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    options = {"samples": 3, "players": 3, "every": 1, "kind": "and_or", "split": split, "tau": 0.05,
               "output": "log_odds"}
    tracker = InteractionTracker(options, model, toy_bundle(), torch.device("cpu"), tmp_path)
    values = tracker._values(model, tracker.train_x.double(), tracker.train_y)
    found, err = tracker._records(values)
    assert err < 1e-12
    library = and_or_interactions(values, split)
    for kind, record in (("and", library.and_), ("or", library.or_)):
        rows = [sum(1 << i for i in s) - 1 for s in record.subsets]  # the tracker lists subsets in row order
        torch.testing.assert_close(found[kind][0][:, rows], record.dividends[..., 0], atol=1e-9, rtol=0)
        assert found[kind][1][rows].tolist() == record.orders.tolist()
    assert found["and_or"][0].shape == (3, 14)


def test_deep_shapnet_structure_gives_the_oracle_game(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DeepShapNet(D, 3, channels=4, hidden=[8]).double()
    options = {"samples": 5, "players": 4, "every": 1, "kind": "and", "split": "half", "tau": 0.05,
               "output": "log_odds"}
    tracker = InteractionTracker(options, model, toy_bundle(), torch.device("cpu"), tmp_path)
    assert tracker.structural == "deep"
    x, y = tracker.train_x.double(), tracker.train_y
    from_structure = tracker._values(model, x, y)
    tracker.structural = None
    torch.testing.assert_close(from_structure, tracker._values(model, x, y), atol=1e-10, rtol=0)
    # Pruning couples the rows of a sample: such a model goes to the oracle.
    model.prune = [0.2] * model.num_stages
    assert InteractionTracker(options, model, toy_bundle(), torch.device("cpu"), tmp_path).structural is None
