"""The training loop on tiny in-memory data: it learns, resumes exactly, stops on NaN, guards its output folder."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from shapnets import DeepShapNet, ShallowShapNet
from training.checkpoint import load_checkpoint
from training.config import ConfigError, ExperimentConfig, ModelConfig, UserError, load_config
from training.data import ArrayDataset, DataBundle, DatasetInfo
from training.losses import LOSS_TERMS, StepOutput, register_loss_term
from training.trainer import (
    TrainingDiverged,
    apply_freeze,
    build_model,
    build_optimizer,
    initialize_from,
    train,
    warmup_cosine,
)

D = 4


def toy_bundle(n_train: int = 48, n_eval: int = 32, seed: int = 0, flip_val: bool = False) -> DataBundle:
    """XOR-like labels from a feature interaction (a linear model cannot fit them; a ShapNet with pairs can)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int, flip: bool = False) -> ArrayDataset:
        x = torch.randn(n, D, generator=g)
        y = (x[:, 0] * x[:, 1] > 0).long()
        return ArrayDataset(x, 1 - y if flip else y)

    info = DatasetInfo(name="toy", num_classes=2, input_shape=(D,), class_names=["neg", "pos"],
                       feature_names=[f"f{i}" for i in range(D)], reference=[0.0] * D)
    return DataBundle(train=split(n_train), val=split(n_eval, flip_val), test=split(n_eval), info=info)


def toy_config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    base = [f"output_dir={tmp_path / 'run'}", "name=toy", "model.name=shapnet_shallow", "model.args.hidden=[16]",
            "data.batch_size=8", "optim.lr=0.01", "optim.warmup_epochs=0.5", "train.epochs=3"]
    return load_config(None, [*base, *overrides])


def params(model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in model_state.items()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ learning
def test_overfits_a_tiny_data_set(tmp_path: Path) -> None:
    bundle = toy_bundle(n_train=32)
    bundle = DataBundle(bundle.train, bundle.train, bundle.train, bundle.info)  # evaluate on the training data
    cfg = toy_config(tmp_path, "train.epochs=40", "optim.lr=0.02", "optim.weight_decay=0", "optim.min_lr_ratio=0.1")
    result = train(cfg, data=bundle)
    assert result["last"]["train_ce"] < 0.05, result["last"]
    assert result["test"]["acc"] == 1.0
    out = Path(result["output_dir"])
    for name in ("last.pt", "best.pt", "config.yaml", "data_info.json", "metrics.csv", "train.log", "summary.json"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, 41))
    assert {"train_loss", "train_ce", "val_acc", "val_acc_macro", "val_ece", "lr", "samples_per_s"} <= set(rows[0])
    assert load_config(out / "config.yaml") == cfg
    assert "test acc 100.00%" in result["summary"]


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    f = warmup_cosine(warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    values = [f(s) for s in range(21)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(values[4:])), "cosine part must not increase"
    assert values[-1] == pytest.approx(0.1)
    assert warmup_cosine(0, 10, 0.0)(0) == 1.0


def test_no_weight_decay_on_biases_and_vectors() -> None:
    model = ShallowShapNet(D, 2, hidden=(8,))
    opt = build_optimizer(model, load_config(None, ["optim.weight_decay=0.1"]).optim)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == ("weights" in name), name


# ------------------------------------------------------------------------------------------------ model building
def test_build_model_fills_sizes_names_and_reference_from_the_data() -> None:
    info = toy_bundle().info
    shallow = build_model(ModelConfig(name="shapnet_shallow", args={"groups": "singles"}), info)
    assert isinstance(shallow, ShallowShapNet)
    assert (shallow.in_features, shallow.num_classes, shallow.feature_names) == (D, 2, info.feature_names)
    deep = build_model(ModelConfig(name="shapnet_deep", args={"channels": 4}), info)
    assert isinstance(deep, DeepShapNet) and deep.num_classes == 2 and deep.in_features == D
    explicit = build_model(ModelConfig(name="shapnet_shallow", args={"out_features": 5}), info)
    assert explicit.num_classes == 5, "config args win over what the data implies"


def test_build_model_errors_are_user_errors() -> None:
    info = toy_bundle().info
    with pytest.raises(UserError, match="shapnet_shallw"):
        build_model(ModelConfig(name="shapnet_shallw"), info)
    with pytest.raises(UserError, match="groups"):
        build_model(ModelConfig(name="shapnet_shallow", args={"groups": "triples"}), info)


def test_freeze_patterns(tmp_path: Path) -> None:
    model = ShallowShapNet(D, 2, hidden=(8,))
    assert apply_freeze(model, ["banks.0.weights.*"]) == 2
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["banks.0.weights.0", "banks.0.weights.1"]
    with pytest.raises(UserError, match=r"'bank\.\*' matches no parameter .*banks\.0\.weights\.0"):
        apply_freeze(model, ["bank.*"])


def test_frozen_parameters_do_not_move_and_trainable_count_is_logged(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, "model.freeze=['banks.0.weights.0']", "train.epochs=1")
    result = train(cfg, data=toy_bundle())
    torch.manual_seed(0)  # the trainer seeds with train.seed=0 before building: rebuild the same initial model
    initial = build_model(cfg.model, toy_bundle().info).state_dict()
    final = load_checkpoint(Path(result["output_dir"]) / "last.pt")["model"]
    assert torch.equal(final["banks.0.weights.0"], initial["banks.0.weights.0"])
    assert not torch.equal(final["banks.0.weights.1"], initial["banks.0.weights.1"])
    assert result["trainable_params"] == result["total_params"] - initial["banks.0.weights.0"].numel()
    assert f"{result['trainable_params']} trainable" in (Path(result["output_dir"]) / "train.log").read_text()


def test_init_from_checkpoint_strict_and_partial(tmp_path: Path) -> None:
    result = train(toy_config(tmp_path, "train.epochs=1"), data=toy_bundle())
    best = Path(result["output_dir"]) / "best.pt"
    trained = load_checkpoint(best)["model"]
    model = ShallowShapNet(D, 2, hidden=(16,))
    initialize_from(model, str(best))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    initialize_from(ShallowShapNet(D, 2, hidden=(16,)), str(best.parent))  # a run folder works too

    # Another number of classes (a new label set): a new head, the output layers of the inner nets; the rest loads.
    other_head = ShallowShapNet(D, 3, hidden=(16,))
    report = initialize_from(other_head, str(best))
    assert report["new"] and all("weights.1" in k or "biases.1" in k for k in report["new"])
    assert torch.equal(other_head.state_dict()["banks.0.weights.0"], trained["banks.0.weights.0"])
    other_width = ShallowShapNet(D, 2, hidden=(8,))  # a mismatch beyond the head: refused unless strict=false
    with pytest.raises(UserError, match=r"shape mismatch.*strict_init=false"):
        initialize_from(other_width, str(best))
    report = initialize_from(other_width, str(best), strict=False)
    assert report["mismatched"] and all("weights" in k or "biases" in k for k in report["mismatched"])
    with pytest.raises(UserError, match="no-such-thing"):
        initialize_from(model, str(tmp_path / "no-such-thing"))


def test_fine_tuning_run_starts_from_the_given_weights(tmp_path: Path) -> None:
    first = train(toy_config(tmp_path, "train.epochs=1"), data=toy_bundle())
    best = Path(first["output_dir"]) / "best.pt"
    cfg = toy_config(tmp_path / "ft", f"model.init_from={best}", "train.max_steps=1", "optim.lr=1e-6",
                     "optim.warmup_epochs=0")
    tuned = load_checkpoint(Path(train(cfg, data=toy_bundle())["output_dir"]) / "last.pt")["model"]
    start = load_checkpoint(best)["model"]
    assert all(torch.allclose(tuned[k], v, atol=1e-4) for k, v in start.items())


# ------------------------------------------------------------------------------------------------ loss terms
class _MeanAbsAttribution:
    name, needs_explanation, needs_layers = "mean_abs_phi", True, False

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight
        self.calls = 0

    def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
        assert out.explanation is not None and torch.equal(out.logits, out.explanation.output)
        self.calls += 1
        return out.explanation.attributions.abs().mean()


@pytest.fixture
def registered_term():
    created: list[_MeanAbsAttribution] = []

    def factory(weight: float = 1.0) -> _MeanAbsAttribution:
        created.append(_MeanAbsAttribution(weight))
        return created[-1]

    register_loss_term("mean_abs_phi")(factory)
    yield created
    LOSS_TERMS.pop("mean_abs_phi", None)


def test_explanation_terms_use_one_explain_pass_and_are_logged(tmp_path: Path, registered_term) -> None:
    cfg = toy_config(tmp_path, "loss.terms=[{name: mean_abs_phi, weight: 0.5}]", "train.epochs=2")
    result = train(cfg, data=toy_bundle())
    assert registered_term[0].calls == result["steps"]
    rows = read_csv(Path(result["output_dir"]) / "metrics.csv")
    for row in rows:
        total, ce, term = (float(row[k]) for k in ("train_loss", "train_ce", "train_mean_abs_phi"))
        assert term > 0 and total == pytest.approx(ce + 0.5 * term, rel=1e-4)


def test_model_provided_loss_terms_are_included(tmp_path: Path, monkeypatch) -> None:
    term = _MeanAbsAttribution(0.1)
    monkeypatch.setattr(ShallowShapNet, "loss_terms", lambda self: [term], raising=False)
    result = train(toy_config(tmp_path, "train.epochs=1"), data=toy_bundle())
    assert term.calls == result["steps"] > 0
    assert "train_mean_abs_phi" in read_csv(Path(result["output_dir"]) / "metrics.csv")[0]


class _HingeFromExtras:
    """Replaces the cross-entropy and reads what `forward_train` put in the step's extras (as CapsNet's terms do)."""

    name, weight, needs_explanation, needs_layers, replaces_cross_entropy = "hinge", 1.0, False, False, True

    def __init__(self) -> None:
        self.seen_targets: list[Tensor] = []

    def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
        self.seen_targets.append(out.extras["target_seen"])
        true_score = out.logits.gather(1, target[:, None])
        return torch.relu(1.0 - true_score + out.logits).mean()


def test_forward_train_extras_reach_the_terms_and_a_term_can_replace_the_cross_entropy(
        tmp_path: Path, monkeypatch) -> None:
    from training.losses import ModelStep, Objective

    def forward_train(self, x: Tensor, target: Tensor) -> tuple[Tensor, dict]:
        return self(x), {"target_seen": target}

    monkeypatch.setattr(ShallowShapNet, "forward_train", forward_train, raising=False)
    term = _HingeFromExtras()
    net = ShallowShapNet(D, 2, hidden=(8,))
    objective = Objective([term])
    x, y = torch.randn(6, D), torch.tensor([0, 1, 1, 0, 1, 0])
    out = objective.forward(ModelStep(net), x, y)
    total, parts = objective(out, y)
    assert torch.equal(term.seen_targets[-1], y)
    assert total.item() == pytest.approx(parts["hinge"].item())       # no cross-entropy in the total ...
    assert parts["ce"].item() > 0                                      # ... but still logged
    # Without the target (evaluation), the plain forward runs.
    assert objective.forward(ModelStep(net), x).extras == {}
    with pytest.raises(ConfigError, match="only one loss term can replace the cross-entropy"):
        Objective([_HingeFromExtras(), _HingeFromExtras()])
    monkeypatch.setattr(ShallowShapNet, "loss_terms", lambda self: [term], raising=False)
    result = train(toy_config(tmp_path, "train.epochs=1"), data=toy_bundle())
    assert len(term.seen_targets) > result["steps"] > 0


def test_loss_term_errors(tmp_path: Path, registered_term) -> None:
    with pytest.raises(ConfigError, match=r"unknown loss term 'nope' \(registered: .*mean_abs_phi"):
        train(toy_config(tmp_path, "loss.terms=[{name: nope}]"), data=toy_bundle())
    with pytest.raises(ConfigError, match=r"mean_abs_phi.*strength"):
        train(toy_config(tmp_path, "loss.terms=[{name: mean_abs_phi, strength: 2}]", "train.epochs=1"),
              data=toy_bundle(), overwrite=True)


def test_layer_terms_need_an_explain_with_layers(tmp_path: Path, monkeypatch) -> None:
    term = _MeanAbsAttribution()
    term.needs_layers = True
    monkeypatch.setattr(ShallowShapNet, "loss_terms", lambda self: [term], raising=False)
    with pytest.raises(TypeError, match=r"per-layer explanations.*ShallowShapNet"):
        train(toy_config(tmp_path, "train.epochs=1"), data=toy_bundle())


# ------------------------------------------------------------------------------------------------ robustness
@pytest.mark.reliability("runs")
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    steps_per_epoch = 6  # 48 samples / batch 8

    class NanAfter(_MeanAbsAttribution):
        name, needs_explanation = "nan_after", False

        def __call__(self, out: StepOutput, target: Tensor) -> Tensor:
            self.calls += 1
            return out.logits.sum() * (math.nan if self.calls > 2 * steps_per_epoch + 3 else 0.0)

    monkeypatch.setattr(ShallowShapNet, "loss_terms", lambda self: [NanAfter()], raising=False)
    cfg = toy_config(tmp_path, "train.epochs=5")
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at epoch 3, step 16.*last good checkpoint"):
        train(cfg, data=toy_bundle())
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (2, 12, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert len(read_csv(tmp_path / "run" / "metrics.csv")) == 2


@pytest.mark.reliability("runs")
def test_existing_output_folder_needs_overwrite(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, "train.max_steps=1")
    train(cfg, data=toy_bundle())
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already holds a run.*--overwrite"):
        train(cfg, data=toy_bundle())
    with pytest.raises(UserError, match="shapnet_shallw"):  # a config that cannot be built deletes nothing
        train(toy_config(tmp_path, "train.max_steps=1", "model.name=shapnet_shallw"), data=toy_bundle(),
              overwrite=True)
    assert (tmp_path / "run" / "last.pt").is_file()
    train(cfg, data=toy_bundle(), overwrite=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine", "--overwrite only replaces the run's own files"
    with pytest.raises(UserError, match=r"no last\.pt"):
        train(cfg, data=toy_bundle(), output_dir=tmp_path / "empty", resume=True)
    with pytest.raises(UserError, match="contradict"):
        train(cfg, data=toy_bundle(), resume=True, overwrite=True)


def test_bf16_on_cpu_and_missing_cuda_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"bf16.*CUDA"):
        train(toy_config(tmp_path, "train.precision=bf16", "train.device=cpu"), data=toy_bundle())
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            train(toy_config(tmp_path, "train.device=cuda"), data=toy_bundle())


def test_batch_size_must_split_across_processes(tmp_path: Path, monkeypatch) -> None:
    import training.trainer as trainer_module
    from training.distributed import DistInfo

    monkeypatch.setattr(trainer_module, "init_distributed",
                        lambda device: (DistInfo(rank=0, world_size=3), torch.device("cpu")))
    with pytest.raises(UserError, match="batch_size=8 must be divisible by the 3 DDP processes"):
        train(toy_config(tmp_path), data=toy_bundle())


def test_early_stopping_on_validation_accuracy(tmp_path: Path) -> None:
    # Validation labels are the opposite of the training rule: learning only makes validation worse.
    cfg = toy_config(tmp_path, "train.epochs=30", "train.early_stopping_patience=2", "optim.lr=0.03")
    result = train(cfg, data=toy_bundle(flip_val=True))
    assert result["stopped"].startswith("early stopping")
    assert result["epochs"] == result["best_epoch"] + 2 < 30


def test_ema_weights_are_evaluated_and_checkpointed(tmp_path: Path) -> None:
    result = train(toy_config(tmp_path, "train.ema_decay=0.9", "train.epochs=2"), data=toy_bundle())
    state = load_checkpoint(Path(result["output_dir"]) / "last.pt")
    best = load_checkpoint(Path(result["output_dir"]) / "best.pt")["model"]
    ema_weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    assert int(state["ema"]["n_averaged"]) == result["steps"]
    assert not torch.equal(ema_weights["banks.0.weights.0"], state["model"]["banks.0.weights.0"])
    if result["best_epoch"] == result["epochs"]:
        assert torch.equal(best["banks.0.weights.0"], ema_weights["banks.0.weights.0"])


@pytest.mark.reliability("runs")
def test_resume_after_max_steps_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """In-process version of the kill-and-resume test (the subprocess one is in test_checkpoint.py)."""
    full = train(toy_config(tmp_path / "a", "train.ema_decay=0.9"), data=toy_bundle())
    partial_cfg = toy_config(tmp_path / "b", "train.ema_decay=0.9", "train.max_steps=9")  # stops mid epoch 2
    train(partial_cfg, data=toy_bundle())
    state = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 3)
    resumed = train(toy_config(tmp_path / "b", "train.ema_decay=0.9"), data=toy_bundle(), resume=True)
    a = load_checkpoint(tmp_path / "a" / "run" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert resumed["steps"] == full["steps"] and resumed["test"] == full["test"]
    rows_a, rows_b = (read_csv(p / "run" / "metrics.csv") for p in (tmp_path / "a", tmp_path / "b"))
    drop = ("epoch_time_s", "samples_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows_a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows_b]


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path: Path) -> None:
    eager = train(toy_config(tmp_path / "eager", "train.epochs=1"), data=toy_bundle())
    compiled = train(toy_config(tmp_path / "compiled", "train.epochs=1", "train.compile=true"), data=toy_bundle())
    a = load_checkpoint(Path(eager["output_dir"]) / "last.pt")["model"]
    b = load_checkpoint(Path(compiled["output_dir"]) / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_cuda_bf16_run(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, "train.device=cuda", "train.precision=auto", "train.epochs=2", "train.ema_decay=0.9")
    result = train(cfg, data=toy_bundle())
    state = load_checkpoint(Path(result["output_dir"]) / "last.pt")
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in state["model"].values())
    assert result["test"]["acc"] >= 0.0 and "bfloat16" in (Path(result["output_dir"]) / "train.log").read_text()


def test_ema_warms_up_so_that_a_short_run_is_not_reported_as_its_start_point() -> None:
    from torch.optim.swa_utils import AveragedModel

    from training.trainer import ema_with_warmup

    model = torch.nn.Linear(3, 2)
    start = model.weight.detach().clone()
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.999), use_buffers=True)
    for _ in range(157):  # one epoch of a 10,000-image fine-tune at batch 64; weights drift by 1 per step
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
    drift = float((ema.module.weight - start).mean())
    # A plain 0.999 EMA would sit at ~15% of the drift (0.999 ** 157 = 0.85 of its mass on the start); the warmed-up
    # one lags the weights by ~10 steps only.
    assert 140 < drift <= 157
    # ... and reaches the configured decay for long runs: one more update moves it by (1 - 0.999) of the gap.
    for _ in range(20_000):
        ema.update_parameters(model)
    gap = float((model.weight - ema.module.weight).mean())
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    assert float((model.weight - ema.module.weight).mean()) == pytest.approx((gap + 1.0) * 0.999, rel=1e-3)
