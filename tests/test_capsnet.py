"""CapsNet: squash, primary-capsule grouping, dynamic routing, losses, the paper's parameter count, training,
the routing attribution, the decoder views, the zoo entry points and input validation."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from shapnets import CapsNet, dynamic_routing, margin_loss, reconstruction_loss, squash
from shapnets.capsnet import (
    MarginLossTerm,
    PrimaryCapsules,
    ReconstructionLossTerm,
    capsule_lengths,
    group_capsules,
    receptive_field_shares,
)
from training.config import LossConfig
from training.losses import LossTerm, ModelStep, Objective, build_loss_terms
from zoo.cards import render_model_card

# 16x16 -> conv1 5x5 -> 12x12 -> primary 5x5 stride 2 -> 4x4 grid, 4 types x 4D = 64 capsules, 4 classes x 8D.
TINY = dict(in_chans=1, image_size=16, num_classes=4, conv_channels=16, conv_kernel=5, primary_types=4, primary_dim=4,
            primary_kernel=5, primary_stride=2, class_dim=8, decoder_widths=(32, 64), input_mean=0.0, input_std=1.0)


def tiny(**kwargs) -> CapsNet:
    return CapsNet(**{**TINY, **kwargs})


def blob_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes: a bright 4x4 blob near one corner (jittered by up to 2 px) on faint noise."""
    labels = torch.arange(n) % 4
    images = torch.rand(n, 1, 16, 16, generator=generator) * 0.2
    corners = [(2, 2), (2, 9), (9, 2), (9, 9)]
    jitter = torch.randint(0, 3, (n, 2), generator=generator)
    for i in range(n):
        row, col = corners[int(labels[i])]
        row, col = row + int(jitter[i, 0]), col + int(jitter[i, 1])
        images[i, 0, row:row + 4, col:col + 4] = 1.0
    return images, labels


@pytest.fixture(scope="module")
def blob_model() -> tuple[CapsNet, torch.Tensor, torch.Tensor]:
    """A tiny CapsNet trained briefly (60 Adam steps, about a second) on the blob data; held-out images."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images, labels = blob_images(64, generator)
    model = tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        lengths, extras = model.forward_train(images, labels)
        loss = margin_loss(lengths, labels) + 0.0005 * reconstruction_loss(extras["reconstruction"], extras["image"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_images, test_labels = blob_images(32, generator)
    return model.eval(), test_images, test_labels


# ------------------------------------------------------------------------------------------------ squash
def test_squash_norms_are_below_one_increasing_and_keep_the_direction() -> None:
    direction = F.normalize(torch.randn(16, dtype=torch.float64), dim=0)
    scales = torch.logspace(-3, 3, 50, dtype=torch.float64)
    squashed = squash(scales[:, None] * direction)
    norms = squashed.norm(dim=-1)
    assert bool((norms < 1).all()) and bool((norms > 0).all())
    assert bool((norms.diff() > 0).all())
    torch.testing.assert_close(F.normalize(squashed, dim=-1), direction.expand_as(squashed))
    # The textbook value |s|^2 / (1 + |s|^2) away from 0 (eps is negligible there).
    torch.testing.assert_close(norms[-10:], (scales**2 / (1 + scales**2))[-10:])


def test_squash_and_lengths_are_finite_at_zero_with_finite_gradients() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        zeros = torch.zeros(3, 8, dtype=dtype, requires_grad=True)
        out = squash(zeros)
        assert out.dtype == dtype and bool(torch.isfinite(out).all()) and bool((out == 0).all())
        (out.sum() + capsule_lengths(out).sum()).backward()
        assert bool(torch.isfinite(zeros.grad).all())


# ------------------------------------------------------------------------------------------------ primary capsules
def test_a_primary_capsule_is_the_channels_of_one_grid_cell() -> None:
    types, dim, height, width = 3, 4, 5, 6
    channel = torch.arange(types * dim, dtype=torch.float64)[:, None, None]
    cell = torch.arange(height * width, dtype=torch.float64).reshape(height, width)
    maps = (1000.0 * (cell + 1) + channel).expand(2, -1, -1, -1)     # value = 1000 (cell + 1) + channel
    capsules = group_capsules(maps, dim)
    assert capsules.shape == (2, types * height * width, dim)
    cells_of, channels_of = capsules // 1000, capsules % 1000
    assert bool((cells_of == cells_of[..., :1]).all()), "a capsule mixes grid cells"
    index = 0
    for capsule_type in range(types):                             # type-major, then row, then column
        for row in range(height):
            for col in range(width):
                assert cells_of[0, index, 0] == row * width + col + 1
                expected = torch.arange(capsule_type * dim, (capsule_type + 1) * dim, dtype=torch.float64)
                torch.testing.assert_close(channels_of[0, index], expected)
                index += 1
    # The layer itself groups the same way: with an identity "conv", its capsules point along those vectors.
    layer = PrimaryCapsules(types * dim, types, dim)
    layer.conv = nn.Identity()
    torch.testing.assert_close(F.normalize(layer(maps), dim=-1), F.normalize(capsules, dim=-1))


# ------------------------------------------------------------------------------------------------ routing
def test_couplings_are_a_softmax_over_parents_at_every_iteration() -> None:
    batch, children, parents, dim = 2, 7, 3, 5                   # children != parents: the axes cannot be confused
    votes = torch.randn(batch, children, parents, dim)
    routing = dynamic_routing(votes, iterations=4)
    assert len(routing.couplings) == 4 and routing.coupling is routing.couplings[-1]
    torch.testing.assert_close(routing.couplings[0], torch.full((batch, children, parents), 1 / parents))
    for coupling in routing.couplings:
        assert bool((coupling >= 0).all())
        torch.testing.assert_close(coupling.sum(dim=2), torch.ones(batch, children))   # each child over parents
    assert not torch.allclose(routing.coupling.sum(dim=1), torch.ones(batch, parents))  # not over children
    assert routing.poses.shape == (batch, parents, dim) and bool((capsule_lengths(routing.poses) < 1).all())


def test_routing_sends_children_to_the_parent_they_agree_with() -> None:
    torch.manual_seed(1)
    children, parents, dim = 40, 4, 6
    votes = 0.1 * torch.randn(1, children, parents, dim)        # parents 1..3: votes in random directions
    votes[:, :, 0] = 0.5 * F.normalize(torch.ones(dim), dim=0)    # parent 0: every child votes the same pose
    routing = dynamic_routing(votes, iterations=3)
    first, last = routing.couplings[0][0, :, 0], routing.couplings[-1][0, :, 0]
    assert bool((last > first).all()), "agreeing votes must gain coupling"
    lengths = capsule_lengths(routing.poses)[0]
    assert int(lengths.argmax()) == 0


def test_detached_routing_differentiates_through_the_final_weighted_sum_only() -> None:
    votes = torch.randn(2, 9, 3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, 4, dtype=torch.float64)
    routing = dynamic_routing(votes, iterations=3, bias=bias, detach=True)
    assert not routing.coupling.requires_grad
    grad, = torch.autograd.grad((routing.poses * weights).sum(), votes)
    # The same poses with the couplings frozen: identical gradient.
    frozen = squash(torch.einsum("bnj,bnjd->bjd", routing.coupling, votes) + bias)
    torch.testing.assert_close(frozen, routing.poses)
    frozen_grad, = torch.autograd.grad((frozen * weights).sum(), votes)
    torch.testing.assert_close(grad, frozen_grad)
    # Differentiating through every iteration (the official code's choice) gives another gradient.
    full = dynamic_routing(votes, iterations=3, bias=bias, detach=False)
    torch.testing.assert_close(full.poses, routing.poses)
    full_grad, = torch.autograd.grad((full.poses * weights).sum(), votes)
    assert not torch.allclose(full_grad, grad)


def test_routing_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"votes must be \(B, N, J, D\), got \(3, 4, 5\)"):
        dynamic_routing(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="iterations must be an int >= 1, got 0"):
        dynamic_routing(torch.randn(1, 2, 3, 4), iterations=0)
    with pytest.raises(ValueError, match=r"bias must be \(3, 4\), got \(4, 3\)"):
        dynamic_routing(torch.randn(1, 2, 3, 4), bias=torch.zeros(4, 3))


# ------------------------------------------------------------------------------------------------ losses
def test_margin_loss_on_a_hand_worked_case() -> None:
    lengths = torch.tensor([[0.95, 0.05, 0.3], [0.5, 0.2, 0.0]])
    target = torch.tensor([0, 1])
    # Row 0: true 0.95 >= 0.9 -> 0; 0.05 <= 0.1 -> 0; 0.5 * (0.3 - 0.1)^2 = 0.02.
    # Row 1: true (0.9 - 0.2)^2 = 0.49; 0.5 * (0.5 - 0.1)^2 = 0.08; 0.0 -> 0.  Mean: (0.02 + 0.57) / 2.
    torch.testing.assert_close(margin_loss(lengths, target), torch.tensor(0.295))
    torch.testing.assert_close(margin_loss(lengths, target, m_plus=1.0, m_minus=0.0, lam=1.0),
                               torch.tensor((0.05**2 + 0.05**2 + 0.3**2 + 0.8**2 + 0.5**2) / 2))


def test_reconstruction_loss_sums_over_pixels_and_averages_over_the_batch() -> None:
    image = torch.zeros(2, 1, 3, 3)
    recon = torch.zeros(2, 1, 3, 3)
    recon[0] = 1.0                                              # 9 pixels off by 1 in the first image
    torch.testing.assert_close(reconstruction_loss(recon, image), torch.tensor(4.5))
    with pytest.raises(ValueError, match=r"reconstruction \(2, 1, 3, 3\) and image \(2, 9\)"):
        reconstruction_loss(recon, image.flatten(1))


def test_margin_loss_rejects_bad_targets() -> None:
    with pytest.raises(ValueError, match=r"target must be \(2,\) integer class indices, got \(3,\)"):
        margin_loss(torch.rand(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\), got range \[0, 4\]"):
        margin_loss(torch.rand(2, 4), torch.tensor([0, 4]))


def test_loss_terms_follow_the_trainer_protocol() -> None:
    model = tiny(reconstruction_weight=0.001)
    margin, recon = model.loss_terms()
    assert isinstance(margin, LossTerm) and isinstance(recon, LossTerm)
    assert (margin.name, margin.weight, margin.replaces_cross_entropy) == ("margin", 1.0, True)
    assert (recon.name, recon.weight) == ("reconstruction", 0.001)
    assert not any(t.needs_explanation or t.needs_layers for t in (margin, recon))
    assert [t.name for t in tiny(decoder_widths=None).loss_terms()] == ["margin"]
    assert [t.name for t in tiny(reconstruction_weight=0.0).loss_terms()] == ["margin"]
    with pytest.raises(RuntimeError, match=r"needs extras\['reconstruction'\] and extras\['image'\]"):
        ReconstructionLossTerm()(type("Out", (), {"logits": torch.rand(2, 4), "extras": {}})(), torch.tensor([0, 1]))
    assert repr(MarginLossTerm(2.0)) == "MarginLossTerm(weight=2.0)"


# ------------------------------------------------------------------------------------------------ the paper model
def test_paper_architecture_has_the_papers_parameter_count() -> None:
    model = CapsNet(input_mean=0.1307, input_std=0.3081)
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())
    assert count(model.conv1) == 9 * 9 * 1 * 256 + 256 == 20_992
    assert count(model.primary) == 9 * 9 * 256 * 256 + 256 == 5_308_672
    assert model.num_primary == 32 * 6 * 6 == 1152 and model.grid_size == (6, 6)
    assert model.digits.weight.numel() == 1152 * 10 * 16 * 8 == 1_474_560 and model.digits.bias.numel() == 160
    assert count(model.decoder) == (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784) == 1_411_344
    # 8.2M with the decoder and 6.8M without, as the paper says (the 160 DigitCaps biases included).
    assert count(model) == 8_215_728
    assert count(CapsNet(decoder_widths=None)) == count(model) - count(model.decoder) == 6_804_384


def test_forward_train_reconstructs_from_the_true_class_and_unnormalises_the_target() -> None:
    model = tiny(input_mean=0.5, input_std=0.25)
    with torch.no_grad():
        model.digits.weight.mul_(30)                             # poses of a trained size, not the init's ~0.001
    x = torch.randn(3, 1, 16, 16)
    target = torch.tensor([0, 3, 1])
    lengths, extras = model.forward_train(x, target)
    torch.testing.assert_close(lengths, model(x))
    assert extras["poses"].shape == (3, 4, 8)
    assert extras["reconstruction"].shape == (3, 1, 16, 16) == extras["image"].shape
    assert bool((extras["reconstruction"] >= 0).all()) and bool((extras["reconstruction"] <= 1).all())
    torch.testing.assert_close(extras["image"], x * 0.25 + 0.5)
    torch.testing.assert_close(extras["reconstruction"], model.decode(extras["poses"], target))
    other = model.decode(extras["poses"], torch.tensor([1, 0, 2]))
    assert not torch.allclose(other, extras["reconstruction"])
    # At test time the mask is the predicted (longest) class.
    torch.testing.assert_close(model.reconstruct(x), model.decode(extras["poses"], lengths.argmax(1)))
    torch.testing.assert_close(model.reconstruct(x, target), extras["reconstruction"])


def test_a_tiny_capsnet_overfits_a_small_batch_through_the_trainers_objective() -> None:
    images, labels = torch.rand(32, 1, 16, 16), torch.randint(0, 4, (32,))
    model = tiny()
    objective = Objective(build_loss_terms(LossConfig(), model))
    assert not objective.uses_cross_entropy and objective.part_names == ["loss", "ce", "margin", "reconstruction"]
    step = ModelStep(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss, parts = objective(objective.forward(step, images, labels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        torch.testing.assert_close(loss.detach(), parts["margin"] + 0.0005 * parts["reconstruction"])
    assert losses[-1] < 0.1 * losses[0]
    assert bool((model(images).argmax(1) == labels).all())


# ------------------------------------------------------------------------------------------------ explanation
def test_explanation_shapes_and_exact_local_accuracy() -> None:
    model = tiny().double()
    with torch.no_grad():
        model.digits.bias.normal_(0, 0.1)                        # a bias share in the base, too
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    explanation = model.explain(x)
    assert explanation.attributions.shape == (3, 16, 16, 4) and explanation.player_axes == ("height", "width")
    assert not explanation.exact and "routing" in explanation.method
    torch.testing.assert_close(explanation.output, model(x))
    explanation.check_local_accuracy(atol=1e-12)
    assert explanation.base.abs().max() > 1e-4
    extras = explanation.extras
    assert extras["poses"].shape == (3, 4, 8) and extras["coupling"].shape == (3, 64, 4)
    assert extras["reconstruction"].shape == (3, 1, 16, 16)
    torch.testing.assert_close(extras["coupling"].sum(-1), torch.ones(3, 64, dtype=torch.float64))
    # The capsule shares add up too, before they are spread over pixels.
    torch.testing.assert_close(extras["capsule_attributions"].sum(1) + explanation.base, explanation.output)
    # With a zero bias the base is zero: every bit of a class score is on the pixels.
    with torch.no_grad():
        model.digits.bias.zero_()
    assert model.explain(x).base.abs().max() == 0
    model.explain(x).check_local_accuracy(atol=1e-12)


def test_receptive_field_shares_cover_each_cells_footprint_and_sum_to_one() -> None:
    shares = receptive_field_shares((28, 28), 9, 9, 2)           # the paper: 6x6 grid on 28x28 pixels
    assert shares.shape == (36, 784)
    torch.testing.assert_close(shares.sum(1), torch.ones(36))
    grid = shares.reshape(6, 6, 28, 28)
    for row, col in [(0, 0), (2, 3), (5, 5)]:
        support = (grid[row, col] > 0).nonzero()
        # Cell (r, c) sees conv1 rows 2r .. 2r + 8, which see pixel rows 2r .. 2r + 16 (17 pixels).
        assert support[:, 0].min() == 2 * row and support[:, 0].max() == 2 * row + 16
        assert support[:, 1].min() == 2 * col and support[:, 1].max() == 2 * col + 16
        peak = (grid[row, col] == grid[row, col].max()).nonzero()[0]
        assert tuple(peak.tolist()) == (2 * row + 8, 2 * col + 8)   # the footprint's centre weighs most


def test_masking_the_top_attributed_pixels_lowers_the_score_more_than_random_ones(blob_model) -> None:
    model, images, labels = blob_model
    with torch.no_grad():
        explanation = model.explain(images)
    predicted = explanation.predicted
    assert (predicted == labels).float().mean() >= 0.9
    attributions = explanation.for_class(predicted).flatten(1)
    generator = torch.Generator().manual_seed(1)
    count = 16
    top = attributions.topk(count, dim=1).indices
    random = torch.stack([torch.randperm(256, generator=generator)[:count] for _ in range(len(images))])

    def drop(pixels: torch.Tensor) -> float:
        masked = images.flatten(1).scatter(1, pixels, 0.0).view_as(images)
        with torch.no_grad():
            after = model(masked).gather(1, predicted[:, None])[:, 0]
        return float((explanation.output.gather(1, predicted[:, None])[:, 0] - after).mean())

    assert drop(top) > drop(random) + 0.05


def test_perturb_poses_moves_one_dimension_of_the_predicted_class() -> None:
    model = tiny()
    x = torch.randn(2, 1, 16, 16)
    steps = torch.tensor([-0.2, 0.0, 0.2])
    images = model.perturb_poses(x, dims=[0, 5], steps=steps)
    assert images.shape == (2, 2, 3, 1, 16, 16)
    for dim in range(2):
        torch.testing.assert_close(images[:, dim, 1], model.reconstruct(x))   # a zero shift changes nothing
    assert not torch.allclose(images[:, 0, 0], images[:, 0, 2])
    assert model.perturb_poses(x).shape == (2, 8, 11, 1, 16, 16)            # every dimension, 11 paper steps
    with pytest.raises(ValueError, match=r"dims must be a non-empty list in \[0, 8\), got \[8\]"):
        model.perturb_poses(x, dims=[8])
    with pytest.raises(RuntimeError, match="decoder_widths=None"):
        tiny(decoder_widths=None).perturb_poses(x)


# ------------------------------------------------------------------------------------------------ validation
def test_bad_inputs_raise_clear_errors() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, 16, 16\), got \(2, 3, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, 16, 16\), got \(2, 1, 28, 28\)"):
        model.explain(torch.randn(2, 1, 28, 28))
    bad = torch.randn(2, 1, 16, 16)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"1 non-finite value"):
        model(bad)
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\), got range \[0, 7\]"):
        model.forward_train(torch.randn(2, 1, 16, 16), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"target must be \(2,\) integer class indices, got \(2, 1\)"):
        model.forward_train(torch.randn(2, 1, 16, 16), torch.tensor([[0], [1]]))
    with pytest.raises(RuntimeError, match="no decoder"):
        tiny(decoder_widths=None).reconstruct(torch.randn(1, 1, 16, 16))


def test_bad_constructor_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"12x12 image leaves a 4x4 conv1 map .* smaller than the 9x9 PrimaryCaps"):
        CapsNet(image_size=12)
    with pytest.raises(ValueError, match="primary_dim must be a positive int, got 0"):
        tiny(primary_dim=0)
    with pytest.raises(ValueError, match=r"input_mean must be one finite number or 1 \(one per channel\)"):
        tiny(input_mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="input_std must be > 0"):
        tiny(input_std=0.0)
    with pytest.raises(ValueError, match=r"image_size must be a positive int or \(H, W\)"):
        tiny(image_size=(16, 16, 16))


# ------------------------------------------------------------------------------------------------ zoo
@pytest.mark.parametrize("name", ["capsnet_mnist", "capsnet_small_mnist"])
def test_zoo_names_build_through_timm(name: str) -> None:
    assert name in zoo.list_models("capsnet*") and name in timm.list_models("capsnet*")
    model = timm.create_model(name)
    assert isinstance(model, CapsNet) and model.pretrained_cfg["architecture"] == name
    assert model.model_args["num_classes"] == 10 and tuple(model.image_size) == (28, 28)
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    expected = 8_215_728 if name == "capsnet_mnist" else 2_817_712
    assert sum(p.numel() for p in model.parameters()) == expected
    assert zoo.create_model(name, num_classes=5).num_classes == 5


def test_save_and_load_pretrained_round_trip_bit_exact(tmp_path) -> None:
    model = zoo.create_model("capsnet_small_mnist").eval()
    x = torch.randn(2, 1, 28, 28)
    zoo.save_pretrained(model, tmp_path / "caps")
    loaded = zoo.load_pretrained(tmp_path / "caps").eval()
    assert type(loaded) is CapsNet and loaded.model_args["conv_channels"] == 64
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert torch.equal(model(x), loaded(x))
    assert torch.equal(model.explain(x).attributions, loaded.explain(x).attributions)
    via_timm = timm.create_model("capsnet_small_mnist", pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "caps")))
    assert torch.equal(via_timm(x), model(x))


def test_zoo_capsnet_without_weights_and_its_card() -> None:
    with pytest.raises(RuntimeError, match="capsnet has no shipped weights"):
        zoo.create_model("capsnet", pretrained=True, input_mean=0.5, input_std=0.25)
    card = render_model_card(zoo.model_info("capsnet_mnist"))
    assert "Dynamic Routing Between Capsules" in card and "Sabour" in card and "wang2021shapley" not in card
    assert "Shapley-based" not in card and "torch.rand(4, 1, 28, 28)" in card
    icnn_card = render_model_card(zoo.model_info("icnn_vgg_small"))
    assert "zhang2018interpretable" in icnn_card and "wang2021shapley" not in icnn_card
    assert "wang2021shapley" in render_model_card(zoo.model_info("shapnet_deep_yeast"))
