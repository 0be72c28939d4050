"""`Explanation`: shape validation, local-accuracy checks, class selection, indexing and conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shapnets import Explanation, LocalAccuracyError

B, C = 4, 3


def make_explanation(player_shape: tuple[int, ...] = (5,), dtype: torch.dtype = torch.float64, **kwargs) -> Explanation:
    """A random explanation whose output is exactly base + sum(attributions) up to rounding."""
    attributions = torch.randn(B, *player_shape, C, dtype=dtype)
    base = torch.randn(B, C, dtype=dtype)
    output = base + attributions.flatten(1, -2).sum(1)
    kwargs.setdefault("player_axes", tuple(f"axis{i}" for i in range(len(player_shape))))
    return Explanation(attributions=attributions, base=base, output=output, **kwargs)


# ---------------------------------------------------------------------------------------------
# __post_init__ validation
# ---------------------------------------------------------------------------------------------
def test_valid_explanation_shape_helpers() -> None:
    e = make_explanation((2, 3))
    assert (e.batch_size, e.num_outputs, e.player_shape, e.num_players) == (B, C, (2, 3), 6)


def test_output_must_be_2d() -> None:
    with pytest.raises(ValueError, match=r"output must be \(B, C_out\), got shape \(4,\)"):
        Explanation(attributions=torch.zeros(B, 5, 1), base=torch.zeros(B), output=torch.zeros(B))


def test_base_must_match_output() -> None:
    with pytest.raises(ValueError, match=r"base \(4, 2\) must have the shape of output \(4, 3\)"):
        Explanation(attributions=torch.zeros(B, 5, C), base=torch.zeros(B, 2), output=torch.zeros(B, C))


@pytest.mark.parametrize(
    "shape",
    [(B, C), (B + 1, 5, C), (B, 5, C + 1)],
    ids=["no-player-axis", "wrong-batch", "wrong-outputs"],
)
def test_attributions_shape_is_checked(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"attributions must be \(B, \*players, C_out\) = \(4, \.\.\., 3\)"):
        Explanation(attributions=torch.zeros(shape), base=torch.zeros(B, C), output=torch.zeros(B, C))


def test_player_axes_must_name_every_player_axis() -> None:
    with pytest.raises(ValueError, match=r"names 1 axes but attributions \(4, 2, 3, 3\) has 2 player axes"):
        make_explanation((2, 3), player_axes=("pixel",))


def test_player_names_must_match_players() -> None:
    with pytest.raises(ValueError, match="2 player names for 5 players"):
        make_explanation((5,), player_names=["a", "b"])


# ---------------------------------------------------------------------------------------------
# Local accuracy
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("player_shape", [(5,), (2, 3)])
def test_local_accuracy_holds_for_consistent_explanation(player_shape: tuple[int, ...]) -> None:
    e = make_explanation(player_shape)
    assert e.residual().shape == (B, C)
    assert e.local_accuracy_error() < 1e-12
    e.check_local_accuracy()


def test_check_local_accuracy_raises_on_corrupted_attributions() -> None:
    e = make_explanation((5,))
    e.attributions[2, 1, 0] += 1e-3
    assert e.local_accuracy_error() == pytest.approx(1e-3, rel=1e-6)
    with pytest.raises(LocalAccuracyError, match="local accuracy violated"):
        e.check_local_accuracy()
    # An explicit tolerance above the corruption accepts it.
    e.check_local_accuracy(atol=1e-2)


def test_check_local_accuracy_default_tolerance_depends_on_dtype() -> None:
    # 1e-6 is beyond float64's default tolerance (1e-9) but within float32's (1e-4).
    for dtype, should_raise in [(torch.float64, True), (torch.float32, False)]:
        e = make_explanation((5,), dtype=dtype)
        e.output[0, 0] += 1e-6
        if should_raise:
            with pytest.raises(LocalAccuracyError):
                e.check_local_accuracy(rtol=0.0)
        else:
            e.check_local_accuracy(rtol=0.0)


def test_local_accuracy_error_of_empty_batch_is_zero() -> None:
    e = Explanation(attributions=torch.zeros(0, 5, C), base=torch.zeros(0, C), output=torch.zeros(0, C))
    assert e.local_accuracy_error() == 0.0
    e.check_local_accuracy()


# ---------------------------------------------------------------------------------------------
# select / for_class
# ---------------------------------------------------------------------------------------------
def assert_selected(e: Explanation, selected: Explanation, classes: torch.Tensor) -> None:
    """`selected` keeps exactly channel classes[b] of sample b and still satisfies local accuracy."""
    assert selected.attributions.shape == (*e.attributions.shape[:-1], 1)
    assert selected.output.shape == selected.base.shape == (B, 1)
    for b in range(B):
        c = int(classes[b])
        torch.testing.assert_close(selected.attributions[b, ..., 0], e.attributions[b, ..., c], rtol=0, atol=0)
        assert selected.output[b, 0] == e.output[b, c]
        assert selected.base[b, 0] == e.base[b, c]
    selected.check_local_accuracy()


@pytest.mark.parametrize("target", [0, 2, -1])
def test_select_int_applies_to_whole_batch(target: int) -> None:
    e = make_explanation((2, 3), class_names=["a", "b", "c"])
    selected = e.select(target)
    assert_selected(e, selected, torch.full((B,), target % C))
    assert selected.class_names == [["a", "b", "c"][target]]
    assert selected.layers is None


@pytest.mark.parametrize(
    "target",
    [torch.tensor(1), np.int64(1), np.int32(1)],
    ids=["0-dim-tensor", "np.int64", "np.int32"],
)
def test_select_scalar_like_targets_mean_one_class_for_the_batch(target: object) -> None:
    e = make_explanation((5,))
    assert_selected(e, e.select(target), torch.ones(B, dtype=torch.long))
    torch.testing.assert_close(e.for_class(target), e.attributions[..., 1])


@pytest.mark.parametrize(
    "target",
    [[0, 2, 1, 2], torch.tensor([0, 2, 1, 2]), np.array([0, 2, 1, 2])],
    ids=["list", "tensor", "ndarray"],
)
def test_select_per_sample_targets(target: object) -> None:
    e = make_explanation((5,), class_names=["a", "b", "c"])
    selected = e.select(target)
    assert_selected(e, selected, torch.tensor([0, 2, 1, 2]))
    assert selected.class_names is None  # several classes: no single name applies


def test_select_predicted_class() -> None:
    e = make_explanation((5,))
    predicted = e.predicted
    assert predicted.shape == (B,)
    selected = e.select(predicted)
    torch.testing.assert_close(selected.output[:, 0], e.output.max(1).values)


@pytest.mark.parametrize("target", [True, False])
def test_select_rejects_bool(target: bool) -> None:
    # A bool is an int to Python, but `select(True)` is almost surely a bug (a mask, a flag).
    e = make_explanation((5,))
    with pytest.raises((TypeError, ValueError), match=r"(?i)bool"):
        e.select(target)
    with pytest.raises((TypeError, ValueError), match=r"(?i)bool"):
        e.for_class(target)


@pytest.mark.parametrize("target", [3, -4, torch.tensor(3), np.int64(-4)])
def test_select_single_class_out_of_range(target: object) -> None:
    e = make_explanation((5,))
    with pytest.raises(IndexError, match=r"3 outputs|\[0, 3\)"):
        e.select(target)


def test_select_per_sample_wrong_count() -> None:
    e = make_explanation((5,))
    with pytest.raises(ValueError, match=r"one target per sample \(4\), got 3"):
        e.select([0, 1, 2])


def test_select_per_sample_out_of_range() -> None:
    e = make_explanation((5,))
    with pytest.raises(IndexError, match=r"targets must lie in \[0, 3\), got range \[0, 3\]"):
        e.select([0, 1, 2, 3])


@pytest.mark.parametrize("player_shape", [(5,), (2, 3)])
def test_for_class_shape_and_values(player_shape: tuple[int, ...]) -> None:
    e = make_explanation(player_shape)
    attr = e.for_class([2, 0, 1, 1])
    assert attr.shape == (B, *player_shape)
    for b, c in enumerate([2, 0, 1, 1]):
        torch.testing.assert_close(attr[b], e.attributions[b, ..., c])


# ---------------------------------------------------------------------------------------------
# Indexing and conversion
# ---------------------------------------------------------------------------------------------
def test_indexing_keeps_a_batch_and_slices_everything() -> None:
    layers = [torch.randn(B, 5, 7, dtype=torch.float64), torch.randn(B, 5, C, dtype=torch.float64)]
    e = make_explanation((5,), layers=layers, extras={"logits": torch.randn(B, C)})
    for index, rows in [(0, [0]), (2, [2]), (-1, [B - 1]), (-B, [0]), (slice(1, 3), [1, 2])]:
        part = e[index]
        assert part.batch_size == len(rows)
        torch.testing.assert_close(part.attributions, e.attributions[rows])
        torch.testing.assert_close(part.base, e.base[rows])
        torch.testing.assert_close(part.output, e.output[rows])
        assert [z.shape[0] for z in part.layers] == [len(rows)] * 2
        torch.testing.assert_close(part.layers[0], layers[0][rows])
        torch.testing.assert_close(part.extras["logits"], e.extras["logits"][rows])
        part.check_local_accuracy()


@pytest.mark.parametrize("index", [B, -B - 1])
def test_indexing_out_of_range(index: int) -> None:
    with pytest.raises(IndexError, match=f"sample {index} out of range for a batch of {B}"):
        make_explanation((5,))[index]


def test_to_detach_cpu_convert_every_tensor() -> None:
    attributions = torch.randn(B, 5, C, requires_grad=True)
    base = torch.randn(B, C)
    e = Explanation(
        attributions=attributions,
        base=base,
        output=base + attributions.sum(1),
        reference=torch.zeros(5),
        layers=[attributions * 2],
    )
    assert e.output.requires_grad
    d = e.detach()
    assert not any(t.requires_grad for t in [d.attributions, d.output, d.layers[0]])
    e64 = e.to(torch.float64)
    assert {t.dtype for t in [e64.attributions, e64.base, e64.output, e64.reference, e64.layers[0]]} == {torch.float64}
    assert e.cpu().attributions.device.type == "cpu"


def test_repr_mentions_kind_and_shape() -> None:
    text = repr(make_explanation((2, 3), exact=False, method="test"))
    assert "Shapley representation" in text and "(2, 3)" in text and "'test'" in text
    assert "exact Shapley" in repr(make_explanation((5,)))
