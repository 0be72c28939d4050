"""The brute-force oracle `exact_shapley`: known games, Shapley axioms, player maps, chunking, validation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from shapnets import exact_shapley, pixel_players

DT = torch.float64
ATOL = 1e-12


# ---------------------------------------------------------------------------------------------
# Games with known Shapley values
# ---------------------------------------------------------------------------------------------
def test_linear_game() -> None:
    # f(x) = W x: phi_i = W[:, i] (x_i - r_i).
    w = torch.randn(3, 5, dtype=DT)
    x, r = torch.randn(4, 5, dtype=DT), torch.randn(5, dtype=DT)
    expl = exact_shapley(lambda z: z @ w.T, x, r)
    torch.testing.assert_close(expl.attributions, (x - r)[..., None] * w.T, rtol=0, atol=ATOL)
    torch.testing.assert_close(expl.base, (r @ w.T).expand(4, 3), rtol=0, atol=ATOL)
    torch.testing.assert_close(expl.output, x @ w.T, rtol=0, atol=ATOL)
    assert expl.exact and expl.attributions.shape == (4, 5, 3)


def test_interaction_game_splits_interactions_evenly() -> None:
    # f = x0 x1 x2 + x3 x4 with zero reference: the 3-way term splits in thirds, the pair in halves,
    # and player 5 is a dummy.
    def f(z: Tensor) -> Tensor:
        return z[:, 0] * z[:, 1] * z[:, 2] + z[:, 3] * z[:, 4]

    x = torch.randn(3, 6, dtype=DT)
    expl = exact_shapley(f, x)
    triple, pair = x[:, 0] * x[:, 1] * x[:, 2], x[:, 3] * x[:, 4]
    expected = torch.stack([triple / 3] * 3 + [pair / 2] * 2 + [torch.zeros(3, dtype=DT)], 1)
    torch.testing.assert_close(expl.attributions[..., 0], expected, rtol=0, atol=ATOL)
    assert expl.attributions.shape == (3, 6, 1)  # a (N,) output becomes one output channel


def test_symmetry_and_efficiency() -> None:
    # f symmetric in players 1 and 2 (and they take equal values): equal Shapley values.
    def f(z: Tensor) -> Tensor:
        return torch.stack([torch.tanh(z[:, 0] + z[:, 1] * z[:, 2]) + z[:, 3] ** 2, z.sin().prod(1)], 1)

    x = torch.randn(4, 4, dtype=DT)
    x[:, 2] = x[:, 1]
    expl = exact_shapley(f, x, 0.3)
    torch.testing.assert_close(expl.attributions[:, 1], expl.attributions[:, 2], rtol=0, atol=ATOL)
    expl.check_local_accuracy()


# ---------------------------------------------------------------------------------------------
# Player maps
# ---------------------------------------------------------------------------------------------
def test_default_players_are_the_second_axis() -> None:
    # (B, D, C): each feature with all its channels is one player.
    w = torch.randn(4, 3, 2, dtype=DT)
    x = torch.randn(2, 4, 3, dtype=DT)
    expl = exact_shapley(lambda z: torch.einsum("ndc,dco->no", z, w), x)
    torch.testing.assert_close(expl.attributions, torch.einsum("bdc,dco->bdo", x, w), rtol=0, atol=ATOL)


def test_pixel_players() -> None:
    players = pixel_players(3, 2, 4)
    assert players.shape == (3, 2, 4)
    assert torch.equal(players[0], torch.arange(8).view(2, 4))
    assert torch.equal(players[2], players[0])
    # A linear model of an image: pixel p's Shapley value sums its channels' terms.
    w = torch.randn(3, 2, 4, dtype=DT)
    x = torch.randn(2, 3, 2, 4, dtype=DT)
    expl = exact_shapley(lambda z: (z * w).sum((1, 2, 3)), x, players=players)
    assert expl.attributions.shape == (2, 8, 1)
    torch.testing.assert_close(expl.attributions[..., 0], (x * w).sum(1).flatten(1), rtol=0, atol=ATOL)


def test_grouping_players_matches_the_grouped_game() -> None:
    # Players {0, 2} and {1, 3} of a 4-feature function == a 2-player game on the grouped inputs.
    def f(z: Tensor) -> Tensor:
        return torch.tanh(z[:, 0] * z[:, 1] + z[:, 2] - z[:, 3] ** 2)

    x, r = torch.randn(3, 4, dtype=DT), torch.randn(4, dtype=DT)
    grouped = exact_shapley(f, x, r, players=torch.tensor([0, 1, 0, 1]))

    def f_pairs(z: Tensor) -> Tensor:  # z: (N, 2, 2) with z[:, g] = the features of group g
        return f(z.transpose(1, 2).reshape(-1, 4))

    reference = r.view(2, 2).T
    direct = exact_shapley(f_pairs, x.view(3, 2, 2).transpose(1, 2), reference)
    torch.testing.assert_close(grouped.attributions, direct.attributions, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "max_batch"), [(3, 5), (10, 4), (7, 1), (2, 1000)])
def test_chunks_never_exceed_max_batch_and_agree(batch: int, max_batch: int) -> None:
    w = torch.randn(5, 2, dtype=DT)
    seen: list[int] = []

    def f(z: Tensor) -> Tensor:
        seen.append(z.shape[0])
        return torch.tanh(z @ w) * z[:, :1]

    x = torch.randn(batch, 5, dtype=DT)
    chunked = exact_shapley(f, x, 0.2, max_batch=max_batch)
    assert max(seen) <= max_batch
    assert sum(seen) == batch * 2**5  # every coalition of every sample exactly once
    seen.clear()
    whole = exact_shapley(f, x, 0.2, max_batch=10**6)
    assert seen == [batch * 2**5]
    torch.testing.assert_close(chunked.attributions, whole.attributions, rtol=0, atol=0)
    torch.testing.assert_close(chunked.output, whole.output, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def test_needs_a_batch() -> None:
    with pytest.raises(ValueError, match=r"expects a batch \(B, \.\.\.\), got shape \(5,\)"):
        exact_shapley(lambda z: z, torch.zeros(5))


@pytest.mark.parametrize("players", [torch.tensor([0.0, 1.0, 1.0]), torch.tensor([True, False, True])])
def test_players_must_be_integers(players: Tensor) -> None:
    with pytest.raises(TypeError, match=f"players must be an integer map .*got dtype {players.dtype}"):
        exact_shapley(lambda z: z.sum(1), torch.zeros(2, 3), players=players)


def test_players_map_shape_and_numbering() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"players map has shape \(4,\), expected one sample's shape \(3,\)"):
        exact_shapley(lambda z: z.sum(1), x, players=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"number the players 0\.\.2 without gaps"):
        exact_shapley(lambda z: z.sum(1), x, players=torch.tensor([0, 2, 2]))


def test_max_players() -> None:
    with pytest.raises(ValueError, match=r"21 players need 2\^21 evaluations per sample; the limit is max_players=20"):
        exact_shapley(lambda z: z.sum(1), torch.zeros(1, 21))
    with pytest.raises(ValueError, match="max_players=3"):
        exact_shapley(lambda z: z.sum(1), torch.zeros(1, 4), max_players=3)


@pytest.mark.parametrize(
    ("fn", "given"),
    [
        (lambda z: z.sum(1)[:1], r"\(1,\)"),  # drops the batch
        (lambda z: z.sum(1).view(-1, 1, 1), r"\(64, 1, 1\)"),  # too many dims
        (lambda z: z.sum(), r"\(\)"),  # a scalar
        (lambda z: z.sum(1).tolist(), "list"),  # not a tensor
    ],
    ids=["batch", "rank", "scalar", "list"],
)
def test_fn_output_is_checked(fn, given: str) -> None:
    # 2 samples x 2^5 coalitions = 64 inputs in one call.
    with pytest.raises(ValueError, match=rf"fn must map a batch of 64 inputs to \(64,\) or \(64, C_out\), got {given}"):
        exact_shapley(fn, torch.zeros(2, 5))


def test_reference_shape_is_checked() -> None:
    with pytest.raises(ValueError, match=r"reference of shape \(4,\) cannot be broadcast to the players' shape \(5,\)"):
        exact_shapley(lambda z: z.sum(1), torch.zeros(2, 5), torch.zeros(4))
