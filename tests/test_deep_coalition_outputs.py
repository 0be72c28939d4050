"""`DeepShapNet.coalition_outputs`: the network on every coalition of some features, from its wiring, vs the oracle."""

from __future__ import annotations

import pytest
import torch

from shapnets import DeepShapNet
from shapnets.oracle import coalition_values


def oracle(model: DeepShapNet, x: torch.Tensor, players: list[int]) -> torch.Tensor:
    """Masked forward passes: the chosen features from `x`, every other one at the model's reference."""
    chosen = torch.tensor(players)
    reference = model.reference  # (D, C)

    def fn(z: torch.Tensor) -> torch.Tensor:
        full = reference.expand(z.shape[0], *reference.shape).clone()
        full[:, chosen] = z
        return model(full)

    values, _ = coalition_values(fn, x[:, chosen], reference[chosen], None, len(players), 4096, "test")
    return values


@pytest.mark.parametrize(("features", "players", "kwargs"), [
    (8, [0, 1, 2, 3, 4, 5, 6, 7], {}),  # every feature plays, power of two: 3 stages
    (12, [11, 0, 5, 7, 2, 9], {}),  # padded to 16 (bit-reversed live rows), players in any order
    (6, [3, 1, 5], {"residual": False, "channels": [4, 4, 4]}),  # more stages than needed, no residual
    (3, [0, 1, 2], {"channels": [3, 3]}),  # last stage keeps its channels: the residual reaches the logits
    (2, [1], {}),  # one stage: its game is the input's (the model's reference, not 0)
    (5, [4, 0], {"in_channels": 2}),  # several channels per feature
])
def test_coalition_outputs_equal_the_masked_forward_passes(features: int, players: list[int], kwargs: dict) -> None:
    torch.manual_seed(features)
    channels = kwargs.get("in_channels", 1)
    model = DeepShapNet(features, 3, hidden=[8], reference=torch.randn(features, channels), **kwargs).double().eval()
    x = torch.randn(5, features, channels, dtype=torch.float64)
    got = model.coalition_outputs(x, players, max_rows=2 ** len(players) * 2)  # several chunks of samples
    assert got.shape == (2 ** len(players), 5, 3)
    torch.testing.assert_close(got, oracle(model, x, players), atol=1e-12, rtol=0)
    # Row 0 is the model at its reference, the last row the model at x with the other features at the reference.
    torch.testing.assert_close(got[0], model(model.reference[None]).expand(5, -1), atol=1e-12, rtol=0)


def test_coalition_outputs_reject_bad_players_and_pruning() -> None:
    model = DeepShapNet(6, 2, hidden=[4]).eval()
    x = torch.randn(2, 6)
    for players in ([], [0, 0], [6], [-1]):
        with pytest.raises(ValueError, match="distinct feature indices"):
            model.coalition_outputs(x, players)
    model.prune = [0.5] * model.num_stages
    with pytest.raises(ValueError, match="pruning"):
        model.coalition_outputs(x, [0, 1])
