"""timm's model conventions on every registered name, after timm's own tests/test_models.py.

Every name builds bare with its documented defaults, its cfg says what timm reads (`num_classes`, `input_size`,
`first_conv`, `classifier`, `mean` / `std` for images), and a forward / backward pass gives finite outputs and a
gradient for every parameter. The head interface (`forward_features`, `forward_head`, `get_classifier`,
`reset_classifier`, `num_features`, `head_hidden_size`) and timm's fine-tuning call (`pretrained=True,
num_classes=N`) are checked where a family has a replaceable head: Deep and Conv ShapNets (the head is the last
stage) and the plain baselines; the others refuse with an error that says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import shapnets
import zoo

HEAVY = {"icnn_vgg16", "icnn_resnet34"}  # the same checks as the others, ~10 s each on a CPU: run with --runslow
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in zoo.list_models()]
GENERIC = [p for p in NAMES if zoo.VARIANT_DEFAULTS.get(getattr(p, "values", [p])[0], (None,))[0] is None]
BARE_NEEDS = {"icnn_timm": dict(backbone="resnet18")}  # the one generic name whose cfg says it needs an argument
HEADS = {"shapnet_deep", "shapnet_conv", "shapnet_shallow", "icnn_vgg_small", "capsnet", "baseline_mlp",
         "baseline_cnn"}  # one generic name per family: every family has a replaceable head
NO_POOLED = {"capsnet", "capsnet_mnist", "capsnet_small_mnist"}  # num_classes=0: a clear error (no pooled features)
MAX_SIDE = 64  # timm's tests cap the input size too; a fixed-size model gets exactly its cfg size


def _input(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    size = tuple(model.pretrained_cfg["input_size"])
    if len(size) == 3 and not model.pretrained_cfg.get("fixed_input_size"):
        size = (size[0], min(size[1], MAX_SIDE), min(size[2], MAX_SIDE))
    return torch.randn(batch, *size)


def _create(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **{**BARE_NEEDS.get(name, {}), **kwargs})


def test_generic_names_say_what_they_need() -> None:
    with pytest.raises(TypeError, match="icnn_timm needs backbone"):
        timm.create_model("icnn_timm")
    assert "needs backbone" in timm.get_pretrained_cfg("icnn_timm").description


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds_bare_with_a_complete_cfg_and_runs_forward(name: str) -> None:
    model = _create(name).eval()
    cfg = model.pretrained_cfg
    for key in ("num_classes", "input_size", "first_conv", "classifier"):
        assert cfg.get(key) is not None, f"{name}: cfg lacks {key}"
    assert cfg["num_classes"] == model.num_classes
    if len(cfg["input_size"]) == 3:  # images: the normalisation the weights expect
        assert len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0]
    model.get_submodule(cfg["first_conv"])  # names a real module (timm adapts it for another in_chans)
    model.get_submodule(cfg["classifier"])
    with torch.no_grad():
        out = model(_input(model))
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", GENERIC)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = _create(name).train()
    x = _input(model)
    if name == "capsnet":
        # The decoder only serves the reconstruction loss: `forward` (the class scores) never uses it, as in the
        # paper; the training forward (`forward_train(x, target)`) does, and that is what the trainer calls.
        logits, extras = model.forward_train(x, torch.arange(2) % model.num_classes)
        loss = logits.mean() + extras["reconstruction"].mean()
    else:
        loss = model(x).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_interface(name: str) -> None:
    model = _create(name).eval()
    x = _input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), model(x))
        pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, model.head_hidden_size)
    if name != "capsnet":  # no pre-logits layer: the pooled features are what the head reads
        assert model.head_hidden_size == model.num_features
    assert model.get_classifier() is model.get_submodule(model.pretrained_cfg["classifier"])
    model.reset_classifier(5)
    with torch.no_grad():
        assert model.num_classes == 5 and model(x).shape == (2, 5)
    if name == "capsnet":
        with pytest.raises(ValueError, match="no pooled features"):
            model.reset_classifier(0)
        return
    model.reset_classifier(0)  # timm's num_classes=0: the pooled features
    with torch.no_grad():
        assert model.num_classes == 0 and model(x).shape == (2, model.num_features)
        model.reset_classifier(3)  # and a head again, shaped like the dropped one
        assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        model.reset_classifier(-1)


@pytest.mark.parametrize("name", ["shapnet_deep", "shapnet_conv", "baseline_mlp"])
def test_num_classes_at_creation(name: str) -> None:
    model = _create(name, num_classes=3)
    assert model.num_classes == model.pretrained_cfg["num_classes"] == model.model_args["num_classes"] == 3


@pytest.mark.parametrize("name", ["shapnet_deep_yeast", "shapnet_conv_mnist"])
def test_pretrained_with_a_new_head_keeps_every_earlier_stage_and_the_guarantees(name: str) -> None:
    pretrained = timm.create_model(name, pretrained=True)
    tuned = timm.create_model(name, pretrained=True, num_classes=3).eval()
    assert tuned.num_classes == tuned.pretrained_cfg["num_classes"] == tuned.model_args["num_classes"] == 3
    assert tuned.pretrained_cfg["label_names"] is None  # the old classes' names no longer apply
    report = tuned.pretrained_load_report
    head = tuned.pretrained_cfg["classifier"]
    assert report["new"] and all(k.startswith(head + ".") for k in report["new"])
    old = pretrained.state_dict()
    for key in report["kept"]:
        assert torch.equal(tuned.state_dict()[key], old[key]), key
    x = _input(tuned, batch=3)
    explanation = tuned.explain(x)
    assert explanation.output.shape == (3, 3)
    explanation.check_local_accuracy()
    reference = tuned.reference.reshape(x[:1].shape) if x.dim() == 2 else tuned.reference[:, None, None]
    at_reference = tuned.explain(reference.expand_as(x[:1]))
    assert at_reference.attributions.abs().max() == 0  # missingness: nothing to attribute at the reference


@pytest.mark.parametrize("name", ["shapnet_shallow_yeast", "icnn_vgg_small_parts", "capsnet_small_mnist"])
def test_a_new_head_on_shallow_icnn_and_capsnet_keeps_the_rest_and_the_guarantees(name: str) -> None:
    pretrained = timm.create_model(name, pretrained=True)
    tuned = timm.create_model(name, pretrained=True, num_classes=3).eval()
    assert tuned.num_classes == tuned.pretrained_cfg["num_classes"] == 3
    report = tuned.pretrained_load_report
    old, new = pretrained.state_dict(), tuned.state_dict()
    assert report["new"] and sorted(report["kept"] + report["new"]) == sorted(new)
    for key in report["kept"]:
        assert torch.equal(new[key], old[key]), key
    for key in report["new"]:  # a new head: other shapes (or fresh values) than the pretrained one's
        assert key not in old or new[key].shape != old[key].shape or not torch.equal(new[key], old[key]), key
    x = _input(tuned, batch=2)
    with torch.no_grad():
        explanation = tuned.explain(x)
        assert explanation.output.shape == (2, 3)
        explanation.check_local_accuracy()
    if name.startswith("shapnet_shallow"):  # the new head keeps the network exactly Shapley
        assert all(not k.endswith((".weights.0", ".biases.0")) for k in report["new"])  # hidden layers kept
        oracle = shapnets.exact_shapley(tuned.double(), x.double(), tuned.reference.double())
        torch.testing.assert_close(tuned.explain(x.double()).attributions, oracle.attributions)


@pytest.mark.parametrize("hidden", [(8,), (8, 4), ()])
def test_shallow_new_head_and_no_head_stay_exact(hidden: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = shapnets.ShallowShapNet(5, 2, groups=[(0, 1), (1, 2, 3), (4,)], hidden=hidden).double().eval()
    x, reference = torch.randn(3, 5, dtype=torch.double), model.reference
    model.reset_classifier(4)
    torch.testing.assert_close(model.explain(x).attributions, shapnets.exact_shapley(model, x, reference).attributions)
    if not hidden:
        with pytest.raises(ValueError, match="no hidden layer"):
            model.reset_classifier(0)
        return
    model.reset_classifier(0)  # the modules' last hidden layers summed: still a sum of module games
    assert model(x).shape == (3, hidden[-1]) == (3, model.num_features)
    explanation = model.explain(x)
    torch.testing.assert_close(explanation.attributions, shapnets.exact_shapley(model, x, reference).attributions)
    at_reference = model.explain(reference.reshape(1, 5))
    assert at_reference.attributions.abs().max() == 0  # missingness


# The resnet18-backed ICNNs repeat icnn_vgg_small's head at 5 s each on a CPU: with --runslow.
POOLED_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY | {"icnn_resnet18", "icnn_timm"} else n
                for n in zoo.list_models()]


@pytest.mark.parametrize("name", POOLED_NAMES)
def test_num_classes_0_gives_the_pooled_features_or_a_clear_error(name: str) -> None:
    if name in NO_POOLED:
        with pytest.raises(ValueError, match="no pooled features"):
            _create(name, num_classes=0)
        return
    model = _create(name, num_classes=0).eval()
    x = _input(model)
    with torch.no_grad():
        out = model(x)
        assert model.num_classes == 0 and out.shape == (2, model.num_features)
        torch.testing.assert_close(out, model.forward_head(model.forward_features(x), pre_logits=True))
        if callable(getattr(model, "explain", None)):  # the pooled features are explained like logits were
            model.explain(x).check_local_accuracy()


def test_pretrained_with_num_classes_0_drops_the_head_and_keeps_the_rest() -> None:
    pretrained = timm.create_model("shapnet_conv_mnist", pretrained=True)
    pooled = timm.create_model("shapnet_conv_mnist", pretrained=True, num_classes=0).eval()
    report = pooled.pretrained_load_report
    assert report["new"] == [] and report["dropped"] and all(k.startswith("stages.4.") for k in report["dropped"])
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in pooled.state_dict().items())
    x = _input(pooled)
    with torch.no_grad():
        torch.testing.assert_close(pooled(x), pretrained.forward_head(pretrained.forward_features(x), pre_logits=True))


def test_a_checkpoint_whose_head_does_not_fit_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    # A bare weights file (no config.json to say its classes): the model is built with the default 2 classes.
    source = timm.create_model("shapnet_deep", num_classes=3)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatches: stages\.2\.weights\.1"):
        timm.create_model("shapnet_deep", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))


@pytest.mark.slow  # dynamo traces every coalition loop: 338 s on the 2-core CI machine under load, hence --runslow
def test_torch_compile() -> None:
    torch._dynamo.reset()
    model = timm.create_model("shapnet_deep", num_classes=3).eval()
    x = torch.randn(4, 8)
    compiled = torch.compile(model, backend="aot_eager")  # graph capture and autograd tracing, no C++ toolchain
    torch.testing.assert_close(compiled(x), model(x))
    train = timm.create_model("shapnet_conv", channels=(4,), hidden=(4,)).train()
    loss = torch.compile(train, backend="aot_eager")(torch.randn(2, 1, 8, 8)).sum()
    loss.backward()
    assert all(p.grad is not None for p in train.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shapnet_deep_yeast", "shapnet_conv_mnist", "icnn_vgg_small_mnist"])
def test_torch_compile_inductor(name: str) -> None:
    torch._dynamo.reset()
    model = timm.create_model(name, pretrained=True).eval()
    x = _input(model)
    torch.testing.assert_close(torch.compile(model)(x), model(x), atol=1e-5, rtol=1e-5)


# features_only: the image families (timm's test_model_forward_features); tabular families are refused clearly.
FEATURE_NAMES = ["shapnet_conv", "shapnet_conv_mnist", "icnn_vgg_small", "icnn_vgg_small_parts", "capsnet_small_mnist"]


@pytest.mark.parametrize("name", FEATURE_NAMES)
def test_features_only_gives_per_stage_maps_matching_feature_info(name: str) -> None:
    model = _create(name, features_only=True, pretrained=name in zoo.list_models(pretrained=True)).eval()
    channels, reduction = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) == len(reduction) >= 2 and reduction == sorted(reduction)
    x = _input(model)
    with torch.no_grad():
        outputs = model(x)
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reduction, outputs):  # timm's assertions, NCHW
        assert o.shape[:2] == (2, c) and torch.isfinite(o).all()
        assert o.shape[2] <= math.ceil(x.shape[2] / r) + 1 and o.shape[3] <= math.ceil(x.shape[3] / r) + 1
    last = _create(name, features_only=True, out_indices=(-1,)).eval()
    assert last.feature_info.channels() == channels[-1:]
    assert [m.shape[1] for m in last(x)] == channels[-1:]


def test_conv_shapnet_features_are_its_stage_representations() -> None:
    model = timm.create_model("shapnet_conv_mnist", pretrained=True).eval()
    features = timm.create_model("shapnet_conv_mnist", pretrained=True, features_only=True).eval()
    x = _input(model)
    with torch.no_grad():
        reps = model.representations(x)[:-1]  # every stage before the head
        maps = features(x)
    assert len(maps) == len(reps)
    for rep, m in zip(reps, maps):
        torch.testing.assert_close(m, rep.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="outside the model's 4"):
        timm.create_model("shapnet_conv", features_only=True, out_indices=(4,))


@pytest.mark.parametrize("name", ["shapnet_deep", "shapnet_shallow_yeast", "baseline_mlp"])
def test_features_only_on_a_tabular_family_is_refused_clearly(name: str) -> None:
    with pytest.raises(ValueError, match=r"features_only=True needs feature maps.*tabular data"):
        timm.create_model(name, features_only=True)


# pretrained_cfg_overlay=dict(file=...) and checkpoint_path=: a saved state dict recreates the same model. The
# resnet18 ICNNs and the paper-size CapsNets take 5-15 s each on a CPU (two more builds of 8-11 M parameters), and
# the same code path is covered by their small siblings: with --runslow.
ROUND_TRIP_SLOW = HEAVY | {"icnn_resnet18", "icnn_timm", "capsnet", "capsnet_mnist"}
ROUND_TRIP_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in ROUND_TRIP_SLOW else n for n in zoo.list_models()]


@pytest.mark.parametrize("name", ROUND_TRIP_NAMES)
def test_state_dict_round_trips_through_overlay_file_and_checkpoint_path(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _create(name).eval()
    file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    torch.manual_seed(1)  # another initialisation: only the loaded weights can make the outputs equal
    overlaid = _create(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file))).eval()
    pt = tmp_path / "model.pth"
    torch.save(source.state_dict(), pt)
    from_path = _create(name, checkpoint_path=str(pt)).eval()
    x = _input(source)
    with torch.no_grad():
        expected = source(x)
        torch.testing.assert_close(overlaid(x), expected)
        torch.testing.assert_close(from_path(x), expected)


def test_no_head_on_a_model_whose_only_stage_is_the_head_is_refused() -> None:
    model = shapnets.DeepShapNet(2, 3, channels=[])  # 2 features: one butterfly stage, which is the head
    assert model.num_stages == 1
    with pytest.raises(ValueError, match="the head is the model's only stage"):
        model.reset_classifier(0)
    model.reset_classifier(4)  # a new head is fine: it reads the input game, as the old one did
    x = torch.randn(3, 2)
    model.explain(x).check_local_accuracy()
    assert model(x).shape == (3, 4)
