"""The model contract (`shapnets.contract`): every self-explaining family meets it, renamed arguments still work."""

from __future__ import annotations

import warnings

import pytest
import torch

import zoo
from shapnets import CapsNet, LossTerm, SelfExplaining, ShallowShapNet, StepOutput
from shapnets.contract import rename_args
from training.config import ModelConfig
from training.losses import LossTerm as TrainingLossTerm
from training.losses import ModelStep
from training.trainer import build_model

# One small instance per self-explaining generic name (baselines have no explain(): not in the contract).
SMALL = {
    "shapnet_shallow": dict(in_features=4, num_classes=3, hidden=(4,)),
    "shapnet_deep": dict(in_features=4, num_classes=3, channels=4, hidden=(4,)),
    "shapnet_conv": dict(in_chans=1, num_classes=3, channels=(4,), hidden=(4,)),
    "capsnet": dict(in_chans=1, image_size=12, num_classes=3, conv_channels=8, conv_kernel=5, primary_types=2,
                    primary_dim=4, primary_kernel=3, primary_stride=2, class_dim=4, decoder_widths=(8,),
                    input_mean=0.5, input_std=0.25),
    "icnn_vgg_small": dict(in_chans=1, num_classes=3, num_filters=4,
                           backbone_args=dict(channels=(4, 8), convs_per_stage=(1, 1))),
}
LAYERED = {"shapnet_deep", "shapnet_conv"}


def _input(name: str) -> torch.Tensor:
    if name in ("shapnet_shallow", "shapnet_deep"):
        return torch.randn(2, 4)
    return torch.rand(2, 1, 12, 12) if name == "capsnet" else torch.randn(2, 1, 8, 8)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_family_meets_the_contract(name: str) -> None:
    model = zoo.create_model(name, **SMALL[name]).eval()
    assert isinstance(model, SelfExplaining) and model.num_classes == 3
    x = _input(name)
    explanation = model.explain(x)
    torch.testing.assert_close(explanation.output, model(x), atol=1e-5, rtol=1e-5)
    if name in LAYERED:
        assert model.explain(x, layers=True).layers  # every layer's representation
    else:
        with pytest.raises(TypeError, match=rf"per-layer explanations from {type(model).__name__}"):
            model.explain(x, layers=True)


def test_loss_terms_share_one_base() -> None:
    assert TrainingLossTerm is LossTerm  # one class, re-exported by the trainer's losses
    terms = CapsNet(**SMALL["capsnet"]).loss_terms()
    assert [t.name for t in terms] == ["margin", "reconstruction"] and all(isinstance(t, LossTerm) for t in terms)
    with pytest.raises(NotImplementedError, match="must implement"):
        LossTerm()(StepOutput(logits=torch.zeros(1, 2)), torch.zeros(1, dtype=torch.long))


def test_model_step_refuses_layer_explanations_of_a_family_without_layers() -> None:
    step = ModelStep(ShallowShapNet(4, 3, hidden=(4,)))
    logits, explanation, _ = step(torch.randn(2, 4), need_explanation=True)
    torch.testing.assert_close(explanation.output, logits)
    with pytest.raises(TypeError, match="per-layer explanations from ShallowShapNet"):
        step(torch.randn(2, 4), need_explanation=True, layers=True)


def test_out_features_still_works_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match="'out_features' is renamed 'num_classes'"):
        old = ShallowShapNet(in_features=4, out_features=3, hidden=(4,))
    torch.manual_seed(0)
    new = ShallowShapNet(in_features=4, num_classes=3, hidden=(4,))
    assert old.num_classes == new.num_classes == 3
    assert old.state_dict().keys() == new.state_dict().keys()
    with pytest.warns(DeprecationWarning):
        via_zoo = zoo.create_model("shapnet_shallow", in_features=4, out_features=3, hidden=(4,))
    assert via_zoo.model_args["num_classes"] == 3
    with pytest.raises(TypeError, match="out_features=3 and num_classes=2 both given"):
        ShallowShapNet(in_features=4, num_classes=2, out_features=3)
    with pytest.raises(TypeError, match="needs num_classes"):
        ShallowShapNet(in_features=4)


def test_recorded_old_names_load_silently() -> None:
    # A config.json written before the rename records out_features: rebuilding it must not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert rename_args(ShallowShapNet, {"out_features": 2}, warn=False) == {"num_classes": 2}
        model = zoo.create_model("shapnet_shallow_yeast", pretrained=True)
    assert model.num_classes == 10


def test_trainer_fills_only_the_data_args_a_class_takes() -> None:
    info = type("Info", (), dict(input_shape=(1, 8, 8), num_classes=3, feature_names=None, reference=[0.5]))()
    conv = build_model(ModelConfig(name="shapnet_conv", args=dict(channels=[4], hidden=[4])), info)
    assert conv.in_chans == 1 and conv.num_classes == 3 and float(conv.reference.flatten()[0]) == 0.5
    # icnn takes no reference: the data set's is not passed (it would be an unexpected argument).
    icnn = build_model(ModelConfig(name="icnn_vgg_small", args=dict(
        num_filters=4, backbone_args=dict(channels=[4, 8], convs_per_stage=[1, 1]))), info)
    assert icnn.num_classes == 3 and "reference" not in icnn.model_args
