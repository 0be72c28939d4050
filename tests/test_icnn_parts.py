"""The part measure, the hard parts data set, the exact -MI and the bad-input errors of issue 23 (ICNN, CapsNet)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shapnets.capsnet import CapsNet
from shapnets.icnn import (
    InterpretableConv2d,
    check_template_support,
    filter_loss,
    filter_mutual_information,
    location_instability,
    part_localization,
    part_templates,
)
from training.config import ModelConfig, UserError
from training.data.core import DatasetInfo
from training.data.parts_hard import HARD_PARTS_CLASSES, make_hard_parts_images
from training.trainer import build_model


def scene(n: int = 60, filters: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 3-landmark objects in a 64x64 image: `(landmarks (n, 3, 2), centres (n, 2))`."""
    g = torch.Generator().manual_seed(seed)
    centres = 20 + 24 * torch.rand(n, 2, generator=g)
    offsets = torch.tensor([[-12.0, 0.0], [8.0, -10.0], [8.0, 10.0]])
    landmarks = centres[:, None, :] + offsets + torch.randn(n, 3, 2, generator=g)
    return landmarks, landmarks.mean(dim=1)


def snap(points: torch.Tensor, cell: float) -> torch.Tensor:
    """Points -> the centre of the `cell`-pixel cell holding them (what a peak on a top map can report)."""
    return ((points + 0.5) / cell).floor() * cell + cell / 2 - 0.5


# ------------------------------------------------------------------------------------------------ part measure
def test_part_measure_separates_a_part_tracker_from_a_centre_and_a_dead_filter() -> None:
    landmarks, centres = scene()
    n, cell = len(landmarks), 4.0
    tracker = snap(landmarks[:, [0, 1, 2, 0]], cell)                   # filters 0..3 each follow one landmark
    centre = snap(centres, cell)[:, None, :].expand(n, 4, 2)
    dead = torch.full((n, 4, 2), cell / 2 - 0.5)                       # always cell 0
    activations = torch.rand(n, 4)
    results = {name: part_localization(loc, landmarks, cell, activations, image_size=(64, 64), top_k=50)
               for name, loc in (("tracker", tracker), ("centre", centre), ("dead", dead))}
    track = results["tracker"]
    assert track.landmark.tolist() == [0, 1, 2, 0]
    # Quantised to 4-pixel cells, a perfect tracker is at most half a cell diagonal away: all within one cell.
    assert bool((track.median_distance <= cell * math.sqrt(2) / 2 + 1e-5).all())
    assert bool((track.within_cell == 1).all()) and bool(track.localized.all())
    assert bool(track.nearer_landmark_than_centre.all()) and int(track.images[0]) == 50
    # Every landmark is ~10 px from the centroid: a centre detector is never within one cell, a dead filter far off.
    assert not bool(results["centre"].localized.any()) and bool((results["centre"].median_distance > 8).all())
    assert not bool(results["dead"].localized.any()) and bool((results["dead"].mean_distance > 15).all())
    summary = track.summary()
    assert summary["share_localized"] == 1.0 and summary["filters"] == 4 and summary["cell_size"] == cell
    assert results["centre"].summary()["share_nearer_landmark_than_centre"] == 0.0
    # A filter that fires 7 px beside its part every time is not localised, but is up to its fixed offset.
    beside = part_localization(landmarks[:, :1] + torch.tensor([7.0, 0.0]), landmarks, cell, top_k=50)
    assert not bool(beside.localized.any()) and beside.summary()["share_localized_up_to_offset"] == 1.0
    assert results["dead"].summary()["share_localized_up_to_offset"] == 0.0
    # The paper's instability cannot tell the centre detector from the tracker here (both ~ the landmark jitter).
    instability = {name: location_instability(loc, landmarks, (64, 64), top_k=50).item()
                   for name, loc in (("tracker", tracker), ("centre", centre))}
    assert abs(instability["tracker"] - instability["centre"]) < 0.02


def test_part_measure_uses_the_top_images_the_valid_mask_and_an_assigned_landmark() -> None:
    landmarks, _ = scene(n=40)
    locations = landmarks[:, :1, :].clone()                              # one filter on landmark 0 ...
    locations[20:] = landmarks[20:, 2:3, :]                              # ... but on landmark 2 in the last 20 images
    activations = torch.zeros(40, 1)
    activations[20:] = 1.0                                               # whose activations are the top ones
    top = part_localization(locations, landmarks, 4.0, activations, top_k=20)
    assert top.landmark.tolist() == [2] and top.within_cell.tolist() == [1.0]
    valid = torch.zeros(40, 1, dtype=torch.bool)
    valid[:20] = True                                                    # only the first 20 may count
    first = part_localization(locations, landmarks, 4.0, activations, top_k=20, valid=valid)
    assert first.landmark.tolist() == [0] and int(first.images[0]) == 20
    forced = part_localization(locations, landmarks, 4.0, activations, top_k=20, valid=valid,
                               assigned=torch.tensor([1]))
    assert forced.landmark.tolist() == [1] and forced.within_cell.tolist() == [0.0]
    none = part_localization(locations, landmarks, 4.0, valid=torch.zeros(40, 1, dtype=torch.bool))
    assert none.landmark.tolist() == [-1] and none.summary()["filters"] == 0
    # Summaries over a subset of filters (e.g. the live ones) only count those.
    two = part_localization(torch.cat([locations, locations + 30], dim=1), landmarks, 4.0, top_k=40)
    assert two.summary(torch.tensor([True, False]))["filters"] == 1


def test_part_measure_bad_input_errors() -> None:
    landmarks, _ = scene(n=10)
    locations = landmarks[:, :2, :]
    with pytest.raises(ValueError, match="no landmarks"):
        part_localization(locations, None, 4.0)
    with pytest.raises(ValueError, match="every landmark is missing"):
        part_localization(locations, torch.full_like(landmarks, float("nan")), 4.0)
    with pytest.raises(ValueError, match="covers the whole"):
        part_localization(locations, landmarks, 64.0, image_size=(64, 64))
    with pytest.raises(ValueError, match="cell_size must be > 0"):
        part_localization(locations, landmarks, 0.0)
    with pytest.raises(ValueError, match=r"landmarks must be \(10, K, 2\)"):
        part_localization(locations, landmarks[:5], 4.0)
    with pytest.raises(ValueError, match="assigned must be"):
        part_localization(locations, landmarks, 4.0, assigned=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="top_k"):
        part_localization(locations, landmarks, 4.0, top_k=0)


def test_a_top_map_inside_the_template_support_is_an_error() -> None:
    check_template_support(2, 2, 4.0)
    check_template_support(1, 2, 4.0)                                   # a 1x2 map still has a cell outside
    with pytest.raises(ValueError, match="smaller than the template support"):
        check_template_support(1, 1, 4.0)
    with pytest.raises(ValueError, match="smaller than the template support"):
        check_template_support(1, 3, 1.0)                                # a gentle decay covers a 1x3 map
    # The check agrees with the templates themselves: all positive <=> error.
    for (h, w, beta) in [(1, 1, 4.0), (1, 2, 4.0), (2, 2, 1.0), (1, 3, 1.0), (3, 3, 0.5)]:
        centre = part_templates(h, w, tau=1.0, beta=beta)[((h - 1) // 2) * w + (w - 1) // 2]
        if bool((centre > 0).all()):
            with pytest.raises(ValueError):
                check_template_support(h, w, beta)
        else:
            check_template_support(h, w, beta)
    layer = InterpretableConv2d(3, 4, 2)
    with pytest.raises(ValueError, match=r"top map \(1x1\) is smaller than the template support"):
        layer(torch.rand(2, 3, 1, 1))
    InterpretableConv2d(3, 4, 2, interpretable=False)(torch.rand(2, 3, 1, 1))  # the baseline has no mask


# ------------------------------------------------------------------------------------------------ exact -MI
def brute_force_mi(maps: torch.Tensor, tau: float, beta: float, alpha: float) -> torch.Tensor:
    """`MI(X; T)` per filter by the definition, one template and one image at a time."""
    batch, filters, h, w = maps.shape
    templates = [*part_templates(h, w, tau, beta, torch.float64), torch.full((h, w), -tau, dtype=torch.float64)]
    priors = [alpha / (h * w)] * (h * w) + [1 - alpha]
    out = torch.zeros(filters, dtype=torch.float64)
    for f in range(filters):
        like = torch.stack([torch.softmax(torch.stack([(maps[b, f] * t).sum() for b in range(batch)]), 0)
                            for t in templates])                           # (T, B): p(x | T)
        marginal = sum(p * like[i] for i, p in enumerate(priors))
        out[f] = sum(p * (like[i] * (like[i] / marginal).log()).sum() for i, p in enumerate(priors))
    return out


def test_exact_mutual_information_matches_the_definition_and_is_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    maps = 40 * torch.rand(4, 2, 3, 4, generator=g, dtype=torch.float64)
    tau, beta, alpha = 0.5 / 12, 4.0, 12 / 13
    exact = filter_mutual_information(maps, reduction="none")
    torch.testing.assert_close(exact, brute_force_mi(maps, tau, beta, alpha))
    prior_entropy = -(12 * (alpha / 12) * math.log(alpha / 12) + (1 - alpha) * math.log(1 - alpha))
    assert bool((exact >= -1e-12).all()) and bool((exact <= prior_entropy + 1e-12).all())
    torch.testing.assert_close(filter_mutual_information(maps), exact.sum())
    # The trained loss is an approximation: it is not the exact -MI.
    approx = filter_loss(maps, torch.zeros(4, dtype=torch.long), torch.zeros(2, dtype=torch.long), reduction="none")
    assert not torch.allclose(approx, -exact)
    with pytest.raises(ValueError, match="reduction"):
        filter_mutual_information(maps, reduction="max")


# ------------------------------------------------------------------------------------------------ hard parts data
def test_hard_parts_images_are_seeded_have_exact_landmarks_and_random_colours() -> None:
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    images, labels, landmarks, occluded = make_hard_parts_images(48, rng=rng())
    again = make_hard_parts_images(48, rng=rng())
    assert all(np.array_equal(a, b) for a, b in zip((images, labels, landmarks, occluded), again))
    assert images.shape == (48, 3, 64, 64) and images.dtype == np.uint8 and landmarks.shape == (48, 3, 2)
    assert set(labels.tolist()) <= set(range(8)) and len(set(labels.tolist())) >= 6
    assert set(occluded.tolist()) <= {-1, 0, 1, 2} and 0 < (occluded >= 0).mean() < 1
    assert bool(((landmarks >= 0) & (landmarks <= 63)).all())
    # The colour at an unoccluded landmark (the part's centre pixel; rings are hollow, so skip them) varies
    # across images of a class: colour does not name the part.
    colours = []
    for n in range(48):
        for k, (_, shape, _) in enumerate(HARD_PARTS_CLASSES[list(HARD_PARTS_CLASSES)[labels[n]]]):
            if shape not in ("ring", "bar") and occluded[n] != k:
                r, c = np.round(landmarks[n, k]).astype(int)
                colours.append(images[n, :, r, c].astype(float))
    assert np.std(np.stack(colours), axis=0).min() > 40


def test_hard_parts_classes_need_the_configuration_and_no_part_sits_at_the_centre() -> None:
    shape_sets = [frozenset(shape for _, shape, _ in parts) for parts in HARD_PARTS_CLASSES.values()]
    assert len(HARD_PARTS_CLASSES) == 8 and len(set(shape_sets)) == 8    # no two classes share their shapes
    for shape in set().union(*shape_sets):
        assert sum(shape in s for s in shape_sets) >= 3                 # no shape gives the class away
    for parts in HARD_PARTS_CLASSES.values():
        offsets = np.array([offset for _, _, offset in parts])
        assert np.linalg.norm(offsets - offsets.mean(axis=0), axis=1).min() > 0.26


# ------------------------------------------------------------------------------------------------ CapsNet
TINY_CAPS = dict(in_chans=1, image_size=16, num_classes=4, conv_channels=8, conv_kernel=5, primary_types=2,
                 primary_dim=4, primary_kernel=5, primary_stride=2, class_dim=4, decoder_widths=(16,))


def test_a_capsnet_with_a_decoder_needs_the_input_normalisation() -> None:
    with pytest.raises(ValueError, match="input normalisation is unknown"):
        CapsNet(**TINY_CAPS)
    with pytest.raises(ValueError, match="give both input_mean and input_std"):
        CapsNet(**TINY_CAPS, input_mean=0.5)
    net = CapsNet(**{**TINY_CAPS, "decoder_widths": None})                # nothing to un-normalise: allowed
    with pytest.raises(RuntimeError, match="built without input_mean"):
        net.unnormalize(torch.zeros(1, 1, 16, 16))
    net = CapsNet(**TINY_CAPS, input_mean=0.5, input_std=0.25)
    torch.testing.assert_close(net.unnormalize(torch.ones(1, 1, 16, 16)), torch.full((1, 1, 16, 16), 0.75))


def _info(preprocessing: dict) -> DatasetInfo:
    return DatasetInfo(name="toy", num_classes=4, input_shape=(1, 16, 16), class_names=[str(c) for c in range(4)],
                       preprocessing=preprocessing)


def test_the_trainer_gives_a_capsnet_the_data_configs_normalisation_or_a_clear_error() -> None:
    args = {k: v for k, v in TINY_CAPS.items() if k not in ("in_chans", "num_classes")}
    model = build_model(ModelConfig(name="capsnet", args=args),
                        _info({"normalize": {"mean": [0.3], "std": [0.2], "per": "channel"}}))
    assert model.input_mean.flatten().tolist() == pytest.approx([0.3])
    assert model.input_std.flatten().tolist() == pytest.approx([0.2])
    with pytest.raises(UserError, match="input normalisation is unknown"):
        build_model(ModelConfig(name="capsnet", args=args), _info({"source": "somewhere"}))
