"""Interpretable CNNs: templates, the peak mask, the filter loss, class assignment, explanations, the zoo
entry points, the parts data set and the location-instability metric."""

from __future__ import annotations

import copy
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import zoo
import zoo.icnn_models  # registers the icnn_* names
from shapnets.icnn import (
    FilterLossTerm,
    InterpretableCNN,
    InterpretableConv2d,
    feature_to_pixel,
    filter_loss,
    filter_mutual_information,
    location_instability,
    mask_at_peak,
    part_templates,
)
from training.config import LossConfig, load_config
from training.data.core import DatasetInfo
from training.data.parts import PART_COLOURS, PARTS_CLASSES, PARTS_MEAN, PARTS_STD, load_parts, make_parts_images
from training.losses import LossTerm, ModelStep, Objective, build_loss_terms

TINY_VGG = dict(channels=(8, 16, 16), convs_per_stage=(1, 1, 1))


def small_model(pool: str = "avg", **kwargs) -> InterpretableCNN:
    """A 2-pool conv backbone (stride 4) with 6 interpretable filters and 4 classes."""
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    return InterpretableCNN(backbone, 4, feature_channels=8, num_filters=6, pool=pool, **kwargs)


@pytest.fixture(scope="module")
def parts_bundle():
    return load_parts(num_train=96, num_test=24, image_size=32, val_fraction=0.25)


# ------------------------------------------------------------------------------------------------ templates and mask
def test_templates_on_a_hand_worked_3x3_case() -> None:
    tau = 0.5 / 9
    templates = part_templates(3, 3, dtype=torch.float64)           # beta = 4, tau = 0.5 / n^2
    # Centre: L1 distance / n is 1/3 for the 4 neighbours (1 - 4/3 = -1/3) and 2/3 for corners (floored at -1).
    centre = torch.tensor([[-1, -1 / 3, -1], [-1 / 3, 1, -1 / 3], [-1, -1 / 3, -1]], dtype=torch.float64)
    torch.testing.assert_close(templates[4], tau * centre)
    # Top-left corner (row-major index 0): only the corner and its two neighbours are above the floor.
    corner = torch.full((3, 3), -1.0, dtype=torch.float64)
    corner[0, 0], corner[0, 1], corner[1, 0] = 1.0, -1 / 3, -1 / 3
    torch.testing.assert_close(templates[0], tau * corner)
    # A gentler decay reaches further: beta = 1 gives 1 - d.
    torch.testing.assert_close(part_templates(3, 3, tau=1.0, beta=1.0, dtype=torch.float64)[4],
                               1 - torch.tensor([[2, 1, 2], [1, 0, 1], [2, 1, 2]], dtype=torch.float64) / 3)


def test_mask_is_centred_on_each_maps_peak_and_detached_from_the_gradient() -> None:
    maps = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    maps[0, 1, 4, 2] = 5.0
    maps[1, 2, 0, 5] = 7.0
    maps.requires_grad_(True)
    masked, mask, peaks = mask_at_peak(maps, beta=4.0)
    assert peaks[0, 1].tolist() == [4, 2] and peaks[1, 2].tolist() == [0, 5]
    flat_peak = maps.detach().flatten(2).argmax(-1)
    assert torch.equal(peaks[..., 0] * 6 + peaks[..., 1], flat_peak)
    assert bool((mask.flatten(2).gather(2, flat_peak[..., None]) == 1).all())           # 1 at the peak
    assert masked[0, 1, 4, 2] == 5.0 and masked.max() == maps.max()
    assert bool((masked[0, 1, 0, :] == 0).all())                                          # far rows are silenced
    assert bool((masked <= maps).all()) and bool((masked >= 0).all())
    assert not mask.requires_grad
    upstream = torch.randn_like(masked)
    masked.backward(upstream)
    # The mask is a constant of the backward pass: d masked / d maps = max(mask, 0), nothing through the argmax.
    torch.testing.assert_close(maps.grad, upstream * mask.clamp(min=0))


def test_layer_keeps_the_maps_of_its_last_forward_and_the_baseline_does_not_mask() -> None:
    torch.manual_seed(1)
    layer = InterpretableConv2d(4, 5, 3)
    features = torch.randn(2, 4, 6, 6)
    masked = layer(features)
    torch.testing.assert_close(layer.last_maps, F.relu(layer.conv(features)))
    assert layer.last_maps.requires_grad and masked is layer.last_masked
    plain = InterpretableConv2d(4, 5, 3, interpretable=False)
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(plain(features), layer.last_maps)
    assert float(plain.filter_loss(torch.tensor([0, 1]))) == 0.0
    # Copies (export, EMA) drop the kept maps, which hold the graph of one forward pass.
    clone = copy.deepcopy(layer)
    assert clone.last_maps is None and layer.last_maps is not None
    torch.testing.assert_close(clone(features), masked)


# ------------------------------------------------------------------------------------------------ filter loss
def test_filter_loss_matches_the_hand_worked_1x1_case() -> None:
    # One cell: T+ = tau = 0.5, T- = -0.5, p(T+) = p(T-) = 1/2. Image 0 has activation a, image 1 none.
    # Image 0 of the filter's class targets T+: p(x0|T+) = e^(a/2) / (e^(a/2) + 1) = s; image 1 targets T-:
    # p(x1|T-) = 1 / (e^(-a/2) + 1) = s. Loss = -sum_x p(T_x) log(1/p(T_x)) p(x|T_x) = -s log 2; with the labels
    # swapped both likelihoods are 1 - s. The gradient is the paper's, Z_T held constant: -p(T) log(1/p(T)) p T.
    for a in (0.0, 1.0, 4.0, 10.0):
        maps = torch.tensor([a, 0.0], dtype=torch.float64).view(2, 1, 1, 1).requires_grad_(True)
        s = 1 / (1 + math.exp(-a / 2))
        right = filter_loss(maps, torch.tensor([0, 1]), torch.tensor([0]))
        wrong = filter_loss(maps, torch.tensor([1, 0]), torch.tensor([0]))
        assert right.item() == pytest.approx(-s * math.log(2), abs=1e-12)
        assert wrong.item() == pytest.approx(-(1 - s) * math.log(2), abs=1e-12)
        (grad,) = torch.autograd.grad(right, maps)
        half_log2 = 0.5 * math.log(2)
        torch.testing.assert_close(grad.flatten(), torch.tensor([-half_log2 * s * 0.5, half_log2 * s * 0.5],
                                                                dtype=torch.float64))
    # The loss approaches its floor -H(T) = -log 2 (both templates used, each image fully explained).
    assert filter_loss(torch.tensor([[[[60.0]]], [[[0.0]]]]), torch.tensor([0, 1]), torch.tensor([0])).item() \
        == pytest.approx(-math.log(2), abs=1e-6)


def test_a_single_peak_of_the_right_class_beats_a_diffuse_or_wrong_class_map() -> None:
    height = width = 5
    negatives = torch.rand(3, 1, height, width, dtype=torch.float64)       # silent-ish images of other classes
    peaked = torch.zeros(1, 1, height, width, dtype=torch.float64)
    peaked[0, 0, 1, 3] = 100.0
    diffuse = torch.full_like(peaked, 100.0 / (height * width))            # the same total activation, spread out
    two_peaks = torch.zeros_like(peaked)
    two_peaks[0, 0, 1, 3] = two_peaks[0, 0, 4, 0] = 50.0
    own, other = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 2, 3])   # image 0 of the filter's class 0, or not
    filters = torch.tensor([0])

    def loss(first: torch.Tensor, labels: torch.Tensor) -> float:
        return filter_loss(torch.cat([first, negatives]), labels, filters).item()

    assert loss(peaked, own) < loss(two_peaks, own) < loss(diffuse, own)
    assert loss(peaked, own) < loss(peaked, other)
    assert loss(peaked, own) < 0


def test_filter_loss_gradient_is_the_papers_and_points_the_right_way() -> None:
    torch.manual_seed(3)
    maps = (torch.rand(4, 2, 3, 3, dtype=torch.float64) * 10).requires_grad_(True)
    labels, classes = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1])
    loss = filter_loss(maps, labels, classes)
    (grad,) = torch.autograd.grad(loss, maps)
    # Paper (Z_T constant): dLoss/dx = -p(T_x) log(1/p(T_x)) p(x|T_x) T_x, where every template has prior 1/10.
    templates = torch.cat([part_templates(3, 3, dtype=torch.float64), torch.full((1, 3, 3), -0.5 / 9,
                                                                                 dtype=torch.float64)])
    scores = torch.einsum("bmhw,thw->bmt", maps.detach(), templates)
    likelihood = (scores - scores.logsumexp(0)).exp()
    peaks = maps.detach().flatten(2).argmax(-1)
    target = torch.where(labels[:, None] == classes[None, :], peaks, torch.full_like(peaks, 9))
    weight = math.log(10) / 10 * likelihood.gather(-1, target[..., None]).squeeze(-1)
    torch.testing.assert_close(grad, -weight[..., None, None] * templates[target])
    # Descent lowers every activation of a negative image and raises a positive image's peak.
    negative = labels[:, None] != classes[None, :]
    assert bool((grad[negative] > 0).all())
    positive_peak_grad = grad.flatten(2).gather(-1, peaks[..., None]).squeeze(-1)
    assert bool((positive_peak_grad[~negative] < 0).all())
    # Through the batch normaliser: the same value, a gradient that sums to zero over each template's images.
    batch_loss = filter_loss(maps, labels, classes, normalizer="batch")
    torch.testing.assert_close(batch_loss, loss)
    (batch_grad,) = torch.autograd.grad(batch_loss, maps)
    assert not torch.allclose(batch_grad, grad)
    per_filter = filter_loss(maps, labels, classes, reduction="none")
    assert per_filter.shape == (2,)
    torch.testing.assert_close(loss, per_filter.sum())
    torch.testing.assert_close(filter_loss(maps, labels, classes, reduction="mean"), per_filter.mean())
    # Each filter's loss only depends on its own maps.
    torch.testing.assert_close(filter_loss(maps[:, :1], labels, classes[:1], reduction="none"), per_filter[:1])


def test_filter_loss_is_computed_in_float32_under_autocast() -> None:
    model = small_model()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        loss = model.filter_loss(y)
    maps = model.interpretable_layer.last_maps
    assert maps.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, filter_loss(maps.float(), y, model.filter_classes))


# ------------------------------------------------------------------------------------------------ class assignment
def test_class_assignment_follows_the_running_per_class_activation() -> None:
    layer = InterpretableConv2d(2, 3, 3, momentum=0.9)
    assert layer.filter_classes.tolist() == [0, 1, 2]                     # round robin before any data
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    maps = torch.zeros(6, 3, 4, 4)
    for f in range(3):  # filter f peaks on images of class (f + 1) % 3
        maps[labels == (f + 1) % 3, f, 2, 2] = 5.0
    layer.update_assignment(maps, labels)
    assert layer.filter_classes.tolist() == [1, 2, 0]
    assert float(layer.class_activation[0, 1]) == 5.0                     # first sight of a class: no blending
    # The running average moves by (1 - momentum) per batch: one opposite batch does not flip the assignment.
    layer.update_assignment(maps.roll(1, dims=1), labels)
    assert float(layer.class_activation[0, 1]) == pytest.approx(0.9 * 5.0)
    assert layer.filter_classes.tolist() == [1, 2, 0]
    for _ in range(20):
        layer.update_assignment(maps.roll(1, dims=1), labels)
    assert layer.filter_classes.tolist() == [0, 1, 2]
    fixed = InterpretableConv2d(2, 5, 3, assignment="fixed")
    fixed.update_assignment(torch.rand(6, 5, 4, 4), labels)
    assert fixed.filter_classes.tolist() == [0, 1, 2, 0, 1]


def test_classes_never_seen_are_not_assigned() -> None:
    layer = InterpretableConv2d(2, 2, 3)
    maps = torch.rand(4, 2, 3, 3)
    layer.update_assignment(maps, torch.tensor([1, 1, 1, 1]))
    assert layer.filter_classes.tolist() == [1, 1]
    assert layer.class_seen.tolist() == [False, True, False]


def test_the_loss_term_reads_the_same_forward_pass_and_updates_the_assignment() -> None:
    torch.manual_seed(0)
    model = small_model()
    model.train()
    terms = build_loss_terms(LossConfig(), model)
    assert len(terms) == 2 and isinstance(terms[0], LossTerm) and isinstance(terms[0], FilterLossTerm)
    assert terms[0].name == "filter_loss_approx_neg_mi" and not terms[0].needs_explanation and not terms[0].needs_layers
    assert terms[1].name == "filter_neg_mi_exact" and terms[1].weight == 0.0  # logged only
    objective = Objective(terms)
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3] * 2)
    out = objective.forward(ModelStep(model), x)
    maps = model.interpretable_layer.last_maps
    total, parts = objective(out, y)
    assert bool(model.interpretable_layer.class_seen.all())
    expected = filter_loss(maps, y, model.filter_classes)
    torch.testing.assert_close(parts["filter_loss_approx_neg_mi"], expected.detach())
    torch.testing.assert_close(parts["filter_neg_mi_exact"], -filter_mutual_information(maps.detach()))
    total.backward()
    assert model.interpretable_layer.conv.weight.grad is not None
    assert small_model(interpretable=False).loss_terms() == [] and small_model(filter_loss_weight=0).loss_terms() == []
    assert small_model(filter_loss_weight=2.5).loss_terms()[0].weight == 2.5
    assert terms[0].weight == model.filter_loss_weight == 0.1


def test_loss_without_or_after_a_different_forward_is_an_error() -> None:
    model = small_model()
    with pytest.raises(RuntimeError, match="forward pass first"):
        model.filter_loss(torch.tensor([0]))
    model(torch.randn(3, 3, 8, 8))
    with pytest.raises(RuntimeError, match="batch of 3"):
        model.filter_loss(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        model.filter_loss(torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match="integer tensor"):
        model.filter_loss(torch.tensor([0.0, 1.0, 2.0]))


# ------------------------------------------------------------------------------------------------ explanations
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_explain_shapes_extras_and_exact_local_accuracy(pool: str) -> None:
    torch.manual_seed(0)
    model = small_model(pool).double().eval()
    x = torch.randn(3, 3, 17, 19, dtype=torch.float64)                    # 17x19 -> a 4x4 map: uneven blocks
    expl = model.explain(x)
    assert expl.attributions.shape == (3, 17, 19, 4) and expl.player_axes == ("height", "width")
    torch.testing.assert_close(expl.output, model(x))
    torch.testing.assert_close(expl.base, model.head.bias.expand(3, -1))
    expl.check_local_accuracy(atol=1e-10)
    extras = expl.extras
    assert extras["part_locations"].shape == (3, 6, 2) and extras["peak_activations"].shape == (3, 6)
    assert extras["filter_classes"].shape == (3, 6) and extras["masked_maps"].shape == (3, 6, 4, 4)
    torch.testing.assert_close(extras["filter_contributions"].sum(1), expl.output - expl.base)
    locations = extras["part_locations"]
    assert bool((locations >= 0).all()) and bool((locations <= torch.tensor([16.0, 18.0], dtype=torch.float64)).all())
    # Every filter's contribution lives on the pixels its masked map covers; with max pooling on its peak block.
    peaks = model.interpretable_layer.last_peaks
    torch.testing.assert_close(locations, feature_to_pixel(peaks, (4, 4), (17, 19)).double())
    if pool == "max":
        support = expl.attributions.abs().sum(-1) > 0
        rows = torch.arange(17) * 4 // 17
        cols = torch.arange(19) * 4 // 19
        for b in range(3):
            peak_cells = {tuple(p) for p in peaks[b].tolist()}
            allowed = torch.tensor([[(int(r), int(c)) in peak_cells for c in cols] for r in rows])
            assert bool((support[b] <= allowed).all())
    single = expl[1]
    assert single.extras["part_locations"].shape == (1, 6, 2)
    single.check_local_accuracy(atol=1e-10)


def test_explain_in_float32_and_baseline_model() -> None:
    model = small_model(interpretable=False)
    expl = model.explain(torch.randn(2, 3, 16, 16))
    expl.check_local_accuracy()
    assert not expl.exact and expl.method == "InterpretableCNN"


# ------------------------------------------------------------------------------------------------ zoo models
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("icnn_vgg_small", dict(backbone_args=TINY_VGG)),
        ("icnn_resnet18", {}),
        ("icnn_resnet34", {}),
        ("icnn_timm", dict(backbone="convnext_atto")),
        ("icnn_timm", dict(backbone="efficientnet_b0")),
    ],
)
def test_zoo_models_build_forward_and_explain(name: str, kwargs: dict) -> None:
    model = zoo.create_model(name, num_classes=3, in_chans=1, num_filters=4, **kwargs).eval()
    x = torch.randn(2, 1, 64, 64)  # stride-32 backbones: a 2x2 top map (a 1x1 one is refused: nothing to localise)
    logits = model(x)
    assert logits.shape == (2, 3)
    expl = model.explain(x)
    assert expl.attributions.shape == (2, 64, 64, 3)
    expl.check_local_accuracy()
    args = json.loads(json.dumps(model.model_args))                       # plain JSON: config.json can hold it
    rebuilt = timm.create_model(name, **args)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert model.pretrained_cfg["paper_ids"] == "arXiv:1710.00935"


@pytest.mark.slow
def test_icnn_vgg16_builds() -> None:
    model = zoo.create_model("icnn_vgg16", num_classes=2, num_filters=4).eval()
    model.explain(torch.randn(1, 3, 64, 64)).check_local_accuracy()


def test_backbone_starts_from_a_local_checkpoint_file_only(tmp_path: Path) -> None:
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    model = zoo.create_model("icnn_resnet18", num_classes=3, backbone_checkpoint_path=str(path))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.model_args["backbone_checkpoint_path"] is None           # a rebuild does not need the file
    grey = zoo.create_model("icnn_resnet18", num_classes=3, in_chans=1, backbone_checkpoint_path=str(path))
    torch.testing.assert_close(grey.backbone.conv1.weight[:, 0], source.conv1.weight.sum(1))  # timm's adaptation
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.create_model("icnn_resnet18", num_classes=3, backbone_checkpoint_path=str(tmp_path / "missing.pth"))


def test_save_and_load_round_trip_once_the_hub_knows_the_icnn_names(tmp_path: Path, monkeypatch) -> None:
    # The hub rebuilds through zoo.shapnets_models.ARCHITECTURES; registering the icnn names there is all it needs.
    for name, cls in zoo.icnn_models.ICNN_ARCHITECTURES.items():
        monkeypatch.setitem(zoo.shapnets_models.ARCHITECTURES, name, cls)
    model = zoo.create_model("icnn_vgg_small", num_classes=3, num_filters=4, backbone_args=TINY_VGG)
    x = torch.randn(3, 3, 16, 16)
    model(x)
    model.filter_loss(torch.tensor([0, 1, 1]))                           # the assignment buffers hold data now
    model.eval()
    zoo.save_pretrained(model, tmp_path / "icnn")
    loaded = zoo.load_pretrained(tmp_path / "icnn").eval()
    torch.testing.assert_close(loaded(x), model(x))
    assert torch.equal(loaded.filter_classes, model.filter_classes)
    assert loaded.interpretable_layer.class_seen.tolist() == [True, True, False]


def test_zoo_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"close matches.*resnet18"):
        zoo.create_model("icnn_timm", backbone="resnt18", num_classes=3)
    with pytest.raises(ValueError, match="never downloads"):
        zoo.create_model("icnn_timm", backbone="hf-hub:timm/resnet18.a1_in1k", num_classes=3)
    with pytest.raises(TypeError, match="needs backbone"):
        zoo.create_model("icnn_timm", num_classes=3)
    with pytest.raises(ValueError, match="one output map"):
        zoo.create_model("icnn_vgg_small", out_index=-2, num_classes=3)
    with pytest.raises(ValueError, match="use icnn_timm"):
        zoo.create_model("icnn_resnet18", backbone="resnet50", num_classes=3)
    with pytest.raises(RuntimeError, match="no shipped weights"):
        zoo.create_model("icnn_vgg_small", pretrained=True, num_classes=3)
    with pytest.raises(ValueError, match="feature_channels"):
        InterpretableCNN(nn.Sequential(nn.Conv2d(3, 4, 3)), 2)


# ------------------------------------------------------------------------------------------------ training
def test_a_tiny_model_overfits_a_small_batch_of_the_parts_data(parts_bundle) -> None:
    torch.manual_seed(0)
    x, y = parts_bundle.train.features[:16], parts_bundle.train.labels[:16]
    model = zoo.create_model("icnn_vgg_small", num_classes=4, num_filters=8, backbone_args=dict(
        channels=(16, 32, 32), convs_per_stage=(1, 1, 1)))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    first_filter_loss = None
    for _ in range(80):
        logits = model(x)
        ce, fl = F.cross_entropy(logits, y), model.filter_loss(y)
        first_filter_loss = fl.item() if first_filter_loss is None else first_filter_loss
        optimizer.zero_grad()
        (ce + model.filter_loss_weight * fl).backward()
        optimizer.step()
    assert ce.item() < 0.2 and bool((logits.argmax(1) == y).all())
    assert fl.item() < first_filter_loss - 0.5
    # The filters of each image's own class stay alive (the filter loss did not silence them).
    own = y[:, None] == model.filter_classes[None, :]
    assert bool((model.interpretable_layer.last_maps.flatten(2).amax(-1)[own] > 0).float().mean() > 0.9)


def test_the_trainer_runs_an_icnn_with_its_filter_loss(tmp_path: Path, parts_bundle) -> None:
    from training.trainer import train  # imported here: the trainer pulls in torchmetrics

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "name=icnn_smoke", "model.name=icnn_vgg_small",
                             "model.args.num_filters=4", "model.args.backbone_args.channels=[8,8,8]",
                             "model.args.backbone_args.convs_per_stage=[1,1,1]", "data.batch_size=24",
                             "train.epochs=1"])
    summary = train(cfg, data=parts_bundle)
    header = (Path(summary["output_dir"]) / "metrics.csv").read_text().splitlines()[0]
    assert {"train_filter_loss_approx_neg_mi", "train_filter_neg_mi_exact"} <= set(header.split(","))
    assert math.isfinite(summary["test"]["acc"])


# ------------------------------------------------------------------------------------------------ metric
def test_location_instability_is_lower_for_a_filter_that_tracks_a_landmark() -> None:
    g = torch.Generator().manual_seed(0)
    n, size = 200, 64
    centre = torch.rand(n, 1, 2, generator=g) * 30 + 17
    landmarks = centre + torch.tensor([[-10.0, 0.0], [8.0, -8.0], [8.0, 8.0]]) + torch.randn(n, 3, 2, generator=g)
    tracking = landmarks[:, 0] + torch.randn(n, 2, generator=g)            # follows landmark 0, 1 px noise
    random = torch.rand(n, 2, generator=g) * (size - 1)
    locations = torch.stack([tracking, random], dim=1)                     # (N, 2 filters, 2)
    per_filter = location_instability(locations, landmarks, (size, size), reduction="none")
    assert per_filter[0] < per_filter[1] / 5
    torch.testing.assert_close(location_instability(locations, landmarks, (size, size)), per_filter.mean())
    # A rigid object and a filter at a fixed offset from it: every distance is constant, instability 0.
    rigid = centre + torch.tensor([[-10.0, 0.0], [8.0, -8.0], [8.0, 8.0]])
    assert location_instability(centre[:, :1] + 3.0, rigid, (size, size)).item() == pytest.approx(0.0, abs=1e-5)


def test_location_instability_hand_value_top_k_missing_landmarks_and_valid_images() -> None:
    # Two images, one landmark at the origin; the filter sits 3 and 7 px away: std = |3 - 7| / sqrt(2).
    locations = torch.tensor([[[3.0, 0.0]], [[0.0, 7.0]], [[50.0, 50.0]]])
    landmarks = torch.tensor([[[0.0, 0.0], [float("nan"), 0.0]]] * 3)       # the second landmark is missing
    activations = torch.tensor([[5.0], [4.0], [0.1]])                      # the third image is not in the top 2
    value = location_instability(locations, landmarks, (30, 40), activations, top_k=2)
    assert value.item() == pytest.approx(4 / math.sqrt(2) / 50)
    valid = torch.tensor([[True], [True], [False]])
    assert location_instability(locations, landmarks, (30, 40), valid=valid).item() == pytest.approx(value.item())
    assert location_instability(locations, landmarks, (30, 40)).item() > value.item()


def test_location_instability_rejects_bad_input() -> None:
    locations, landmarks = torch.rand(5, 2, 2), torch.rand(5, 3, 2)
    with pytest.raises(ValueError, match=r"landmarks must be \(5, K, 2\)"):
        location_instability(locations, torch.rand(4, 3, 2), (8, 8))
    with pytest.raises(ValueError, match="top_k must be an int >= 2"):
        location_instability(locations, landmarks, (8, 8), top_k=1)
    with pytest.raises(ValueError, match=r"activations must be \(5, 2\)"):
        location_instability(locations, landmarks, (8, 8), torch.rand(5))
    with pytest.raises(ValueError, match="image_size"):
        location_instability(locations, landmarks, (0, 8))


def test_the_metric_runs_on_a_models_explanations_of_the_parts_data(parts_bundle) -> None:
    model = zoo.create_model("icnn_vgg_small", num_classes=4, num_filters=4, backbone_args=TINY_VGG).eval()
    test = parts_bundle.test
    extras = model.explain(test.features).extras
    own_class = extras["filter_classes"] == test.labels[:, None]
    value = location_instability(extras["part_locations"], test.landmarks, (32, 32), extras["peak_activations"],
                                 top_k=10, valid=own_class)
    assert 0 <= value.item() < 1


# ------------------------------------------------------------------------------------------------ parts data
def test_parts_data_is_seeded_with_landmarks_on_the_parts(parts_bundle) -> None:
    again = load_parts(num_train=96, num_test=24, image_size=32, val_fraction=0.25)
    assert torch.equal(again.train.features, parts_bundle.train.features)
    assert torch.equal(again.test.landmarks, parts_bundle.test.landmarks)
    other_split = load_parts(num_train=96, num_test=24, image_size=32, val_fraction=0.25, seed=1)
    assert not torch.equal(other_split.train.labels, parts_bundle.train.labels)
    images, labels, landmarks = make_parts_images(40, image_size=48, rng=np.random.default_rng(5))
    assert images.shape == (40, 3, 48, 48) and images.dtype == np.uint8 and landmarks.shape == (40, 3, 2)
    assert set(labels.tolist()) == set(range(len(PARTS_CLASSES)))
    assert (landmarks >= 0).all() and (landmarks <= 47).all()
    # The pixel at every non-ring landmark (a ring's centre is hollow) has its part's colour.
    for image, label, points in zip(images, labels, landmarks):
        for (_, shape, _), (row, col) in zip(list(PARTS_CLASSES.values())[label], points):
            if shape == "ring":
                continue
            pixel = image[:, round(float(row)), round(float(col))].astype(float)
            colour = np.asarray(PART_COLOURS[shape], dtype=float)
            assert pixel @ colour / (np.linalg.norm(pixel) * np.linalg.norm(colour)) > 0.98


def test_parts_bundle_follows_the_data_bundle_api(parts_bundle) -> None:
    info = parts_bundle.info
    assert info.name == "parts" and info.num_classes == 4 and info.input_shape == (3, 32, 32)
    assert info.class_names == list(PARTS_CLASSES)
    assert DatasetInfo.from_dict(json.loads(info.to_json())) == info
    assert info.preprocessing["landmarks"]["per_class"]["face"] == ["left_eye", "right_eye", "mouth"]
    assert parts_bundle.sizes() == {"train": 72, "val": 24, "test": 24}
    x, y = parts_bundle.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    for split in (parts_bundle.train, parts_bundle.val, parts_bundle.test):
        assert split.landmarks.shape == (len(split), 3, 2)
    # Landmarks stay aligned with their images through the split: rebuild train from the raw draw.
    images, _, landmarks = make_parts_images(96, image_size=32)
    pixels = torch.from_numpy(images).float() / 255
    normalised = (pixels - PARTS_MEAN) / PARTS_STD
    for i in range(5):
        match = (normalised - parts_bundle.train.features[i]).abs().flatten(1).amax(1).argmin()
        assert torch.equal(torch.from_numpy(landmarks[match]), parts_bundle.train.landmarks[i])
    clone = pickle.loads(pickle.dumps(parts_bundle.train))                 # DataLoader workers pickle it
    assert torch.equal(clone.landmarks, parts_bundle.train.landmarks)
    limited = load_parts(num_train=96, num_test=24, image_size=32, limit=10)
    assert len(limited.train) == 10 and limited.train.landmarks.shape == (10, 3, 2)


def test_parts_data_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="image_size must be an int >= 16"):
        make_parts_images(3, image_size=8)
    with pytest.raises(ValueError, match="val_fraction"):
        load_parts(num_train=40, num_test=8, image_size=16, val_fraction=1.0)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors() -> None:
    model = small_model()
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, H, W\), got \(2, 1, 16, 16\)"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="expects input of shape"):
        model.explain(torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.long))
    bad = torch.randn(1, 3, 16, 16)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model.explain(bad)
    with pytest.raises(ValueError, match="pool must be one of"):
        small_model("sum")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        InterpretableConv2d(3, 4, 2, kernel_size=2)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        InterpretableConv2d(3, 4, 2, alpha=1.0)
    with pytest.raises(ValueError, match="assignment must be one of"):
        InterpretableConv2d(3, 4, 2, assignment="greedy")
    with pytest.raises(ValueError, match="normalizer must be one of"):
        filter_loss(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), torch.tensor([0, 1, 0]), normalizer="running")
    with pytest.raises(ValueError, match=r"maps must be \(B, M, H, W\)"):
        filter_loss(torch.rand(2, 3, 4), torch.tensor([0, 1]), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"labels must be \(2,\)"):
        filter_loss(torch.rand(2, 3, 4, 4), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"filter_classes must be \(3,\)"):
        filter_loss(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), torch.tensor([0, 1]))
