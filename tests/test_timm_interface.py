"""timm's model conventions on every registered name, after timm's own tests/test_models.py.

Every name builds bare with its documented defaults, its cfg says what timm reads (`num_classes`, `input_size`,
`first_conv`, `classifier`, `mean` / `std` for images), and a forward / backward pass gives finite outputs and a
gradient for every parameter. The head interface (`forward_features`, `forward_head`, `get_classifier`,
`reset_classifier`, `num_features`, `head_hidden_size`) and timm's fine-tuning call (`pretrained=True,
num_classes=N`) are checked where a family has a replaceable head: Deep and Conv ShapNets (the head is the last
stage) and the plain baselines; the others refuse with an error that says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import zoo

HEAVY = {"icnn_vgg16", "icnn_resnet34"}  # the same checks as the others, ~10 s each on a CPU: run with --runslow
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in zoo.list_models()]
GENERIC = [p for p in NAMES if zoo.VARIANT_DEFAULTS.get(getattr(p, "values", [p])[0], (None,))[0] is None]
BARE_NEEDS = {"icnn_timm": dict(backbone="resnet18")}  # the one generic name whose cfg says it needs an argument
HEADS = {"shapnet_deep", "shapnet_conv", "baseline_mlp", "baseline_cnn"}  # families with a replaceable head
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
    assert pooled.shape == (2, model.num_features) and model.head_hidden_size == model.num_features
    assert model.get_classifier() is model.get_submodule(model.pretrained_cfg["classifier"])
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(x).shape == (2, 5)
    if name.startswith("shapnet"):
        with pytest.raises(ValueError, match="head cannot be dropped"):
            model.reset_classifier(0)
    else:  # timm's num_classes=0: the pooled features
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)


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
def test_families_without_a_replaceable_head_refuse_a_new_one_clearly(name: str) -> None:
    with pytest.raises(ValueError, match=r"needs a new head, but \w+ has none to replace"):
        timm.create_model(name, pretrained=True, num_classes=3)


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
