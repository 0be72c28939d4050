"""Shapley modules and banks: exactness against the brute-force oracle, fast path, validation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from shapnets import (
    MAX_PLAYERS,
    ShallowShapNet,
    ShapleyModule,
    ShapleyModuleBank,
    coalition_masks,
    exact_shapley,
    shapley_from_values,
)

DT = torch.float64
ATOL = 1e-10
MISSING_ATOL = 1e-13  # "exactly zero" for a player at its reference, up to float64 rounding


def mlp(k: int, c_in: int, c_out: int = 3, hidden: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(k * c_in, hidden), nn.GELU(), nn.Linear(hidden, c_out)).to(DT)


def shapley_by_definition(v: dict[frozenset[int], Tensor], k: int) -> list[Tensor]:
    """phi_i = sum over S without i of |S|!(k-|S|-1)!/k! (v(S+i) - v(S)), straight from the formula."""
    phi = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        total = torch.zeros_like(v[frozenset()])
        for size in range(k):
            weight = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            for subset in itertools.combinations(others, size):
                s = frozenset(subset)
                total = total + weight * (v[s | {i}] - v[s])
        phi.append(total)
    return phi


# ---------------------------------------------------------------------------------------------
# Coalition machinery
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_coalition_masks_enumerate_every_subset_once(k: int) -> None:
    masks = coalition_masks(k)
    assert masks.shape == (2**k, k)
    assert masks[0].sum() == 0 and masks[-1].sum() == k  # empty first, grand coalition last
    rows = {tuple(int(m) for m in row) for row in masks}
    assert rows == set(itertools.product([0, 1], repeat=k))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_shapley_from_values_matches_the_definition(k: int) -> None:
    values = torch.randn(2**k, 2, 3, dtype=DT)  # arbitrary game: 2 samples, 3 outputs
    masks = coalition_masks(k)
    v = {frozenset(j for j in range(k) if masks[t, j]): values[t] for t in range(2**k)}
    phi = shapley_from_values(values, k)
    assert phi.shape == (2, k, 3)
    for i, expected in enumerate(shapley_by_definition(v, k)):
        torch.testing.assert_close(phi[:, i], expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(phi.sum(1), values[-1] - values[0], rtol=0, atol=ATOL)  # efficiency


def test_shapley_from_values_checks_number_of_coalitions() -> None:
    with pytest.raises(ValueError, match=r"expected 2\^3 = 8 coalition values along dim 0, got 7"):
        shapley_from_values(torch.zeros(7, 1, 2), 3)


# ---------------------------------------------------------------------------------------------
# ShapleyModule: exactness, fast path, local accuracy
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nonzero_reference", [False, True], ids=["zero-ref", "ref"])
@pytest.mark.parametrize("c_in", [1, 3])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_module_is_exact(k: int, c_in: int, nonzero_reference: bool) -> None:
    inner = mlp(k, c_in)
    reference = torch.randn(k, c_in, dtype=DT) if nonzero_reference else None
    module = ShapleyModule(inner, k, reference=reference)
    x = torch.randn(5, k, c_in, dtype=DT)
    expl = module.explain(x)
    oracle = exact_shapley(lambda z: inner(z.flatten(1)), x, module.reference)
    assert expl.attributions.shape == (5, k, 3) and expl.exact
    torch.testing.assert_close(expl.attributions, oracle.attributions, rtol=0, atol=ATOL)
    torch.testing.assert_close(expl.base, oracle.base, rtol=0, atol=ATOL)
    torch.testing.assert_close(expl.output, module(x), rtol=0, atol=ATOL)
    expl.check_local_accuracy()

    # Fast path (first layer projected once per player) == slow path (every hybrid through the inner).
    module.fast_path = False
    slow = module.explain(x)
    torch.testing.assert_close(slow.attributions, expl.attributions, rtol=0, atol=ATOL)
    torch.testing.assert_close(slow.output, expl.output, rtol=0, atol=ATOL)


@pytest.mark.parametrize("fast_path", [True, False])
def test_module_missingness(fast_path: bool) -> None:
    k, c_in = 4, 2
    reference = torch.randn(k, c_in, dtype=DT)
    module = ShapleyModule(mlp(k, c_in), k, reference=reference, fast_path=fast_path)
    x = torch.randn(3, k, c_in, dtype=DT)
    x[:, 1] = reference[1]
    x[2, 3] = reference[3]
    phi = module.explain(x).attributions
    # Zero up to rounding: BLAS may round identical rows of a batch differently, so not bit for bit.
    assert phi[:, 1].abs().max() < MISSING_ATOL
    assert phi[2, 3].abs().max() < MISSING_ATOL
    assert phi[0, 3].abs().max() > 1e-3


class PolynomialInner(nn.Module):
    """A non-Sequential inner with a three-way interaction: no first-layer fast path applies."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(2, dtype=DT))

    def forward(self, z: Tensor) -> Tensor:
        # z: (N, 3 * 2), feature-major.
        a, b, c = z[:, 0:2], z[:, 2:4], z[:, 4:6]
        return torch.stack([(a * b * c).sum(1) * self.scale[0], torch.sin(a[:, 0] + c[:, 1]) * self.scale[1]], 1)


def test_custom_inner_uses_slow_path_and_is_exact() -> None:
    inner = PolynomialInner()
    module = ShapleyModule(inner, 3, reference=torch.randn(3, 2, dtype=DT))
    assert module.in_channels == 2  # inferred from the full reference
    x = torch.randn(4, 3, 2, dtype=DT)
    expl = module.explain(x)
    oracle = exact_shapley(lambda z: inner(z.flatten(1)), x, module.reference)
    torch.testing.assert_close(expl.attributions, oracle.attributions, rtol=0, atol=ATOL)
    torch.testing.assert_close(expl.output, module(x), rtol=0, atol=ATOL)
    expl.check_local_accuracy()


def test_sequential_not_starting_with_linear_is_exact() -> None:
    inner = nn.Sequential(nn.Tanh(), nn.Linear(6, 4), nn.GELU(), nn.Linear(4, 2)).to(DT)
    module = ShapleyModule(inner, 3, in_channels=2, reference=0.3)
    x = torch.randn(4, 3, 2, dtype=DT)
    oracle = exact_shapley(lambda z: inner(z.flatten(1)), x, module.reference)
    torch.testing.assert_close(module.explain(x).attributions, oracle.attributions, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (None, torch.zeros(3, 2)),
        (0.5, torch.full((3, 2), 0.5)),
        (torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 2.0]] * 3)),
        (torch.arange(6.0).view(3, 2), torch.arange(6.0).view(3, 2)),
    ],
    ids=["none", "scalar", "per-channel", "full"],
)
def test_module_reference_forms(reference: object, expected: Tensor) -> None:
    module = ShapleyModule(nn.Linear(6, 2), 3, reference=reference)
    torch.testing.assert_close(module.reference, expected)
    assert "reference" in module.state_dict()


def test_module_reference_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"reference of shape \(4,\) cannot be broadcast to .* shape \(3, 2\)"):
        ShapleyModule(nn.Linear(6, 2), 3, reference=torch.zeros(4))


def test_learned_reference_gets_gradients() -> None:
    module = ShapleyModule(mlp(2, 1), 2, reference=torch.randn(2, 1, dtype=DT), learn_reference=True)
    assert isinstance(module.reference, nn.Parameter)
    module.explain(torch.randn(3, 2, 1, dtype=DT)).attributions.square().sum().backward()
    assert module.reference.grad is not None and module.reference.grad.abs().sum() > 0


def test_module_gradients_reach_every_parameter() -> None:
    module = ShapleyModule(mlp(3, 2), 3, reference=torch.randn(3, 2, dtype=DT))
    module.explain(torch.randn(4, 3, 2, dtype=DT)).attributions.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# ShapleyModule: constructor and input validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, MAX_PLAYERS + 1])
def test_module_arity_limits(k: int) -> None:
    with pytest.raises(ValueError, match=rf"1 <= num_players <= {MAX_PLAYERS} .*got {k}"):
        ShapleyModule(nn.Identity(), k, in_channels=1)


def test_module_max_players_is_configurable() -> None:
    with pytest.raises(ValueError, match=r"num_players <= 3 .*got 4"):
        ShapleyModule(nn.Linear(4, 1), 4, max_players=3)


def test_module_first_linear_must_split_into_players() -> None:
    with pytest.raises(ValueError, match="reads 7 features, not a multiple of num_players=3"):
        ShapleyModule(nn.Linear(7, 2), 3)
    with pytest.raises(ValueError, match=r"reads 6 features but k \* C_in = 3 \* 3 = 9"):
        ShapleyModule(nn.Linear(6, 2), 3, in_channels=3)


def test_module_in_channels_must_be_inferable() -> None:
    with pytest.raises(ValueError, match="cannot infer in_channels"):
        ShapleyModule(PolynomialInner(), 3)


@pytest.fixture
def module64() -> ShapleyModule:
    return ShapleyModule(mlp(3, 2), 3)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.zeros(4, 6, dtype=DT), ValueError, r"expects input of shape \(B, 3, 2\), got \(4, 6\)"),
        (torch.zeros(4, 2, 2, dtype=DT), ValueError, r"expects input of shape \(B, 3, 2\), got \(4, 2, 2\)"),
        (torch.zeros(4, 3, 1, dtype=DT), ValueError, r"expects input of shape \(B, 3, 2\), got \(4, 3, 1\)"),
        (torch.zeros(4, 3, 2, dtype=torch.long), TypeError, "floating-point tensor, got dtype torch.int64"),
        (torch.zeros(4, 3, 2, dtype=torch.float32), TypeError, "input dtype torch.float32 does not match .*float64"),
        (torch.full((4, 3, 2), float("nan"), dtype=DT), ValueError, r"24 non-finite value\(s\)"),
        (torch.tensor([[[0.0, float("inf")]] * 3], dtype=DT), ValueError, r"3 non-finite value\(s\)"),
        ([[0.0, 0.0]] * 3, TypeError, "expects a torch.Tensor, got list"),
    ],
    ids=["rank", "players", "channels", "int", "dtype-mismatch", "nan", "inf", "not-a-tensor"],
)
def test_module_rejects_bad_input(module64: ShapleyModule, x: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        module64(x)
    with pytest.raises(error, match=match):
        module64.explain(x)


# ---------------------------------------------------------------------------------------------
# ShapleyModuleBank
# ---------------------------------------------------------------------------------------------
def make_bank(groups: int = 4, k: int = 3, c_in: int = 2, c_out: int = 3, hidden: tuple[int, ...] = (8, 5)):
    return ShapleyModuleBank(groups, k, c_in, c_out, hidden).to(DT)


def test_bank_forward_shapes_and_local_accuracy() -> None:
    bank = make_bank()
    x = torch.randn(2, 7, 4, 3, 2, dtype=DT)  # extra leading axes are batch axes
    reference = torch.randn(4, 3, 2, dtype=DT)
    out = bank(x)
    assert out.shape == (2, 7, 4, 3)
    phi, base, output = bank.shapley(x - reference, reference)
    assert phi.shape == (2, 7, 4, 3, 3)
    torch.testing.assert_close(output, out, rtol=0, atol=ATOL)
    torch.testing.assert_close(base, bank(reference.expand_as(x)), rtol=0, atol=ATOL)
    torch.testing.assert_close(phi.sum(-2) + base, output, rtol=0, atol=ATOL)


def test_bank_module_matches_bank_for_every_group() -> None:
    bank = make_bank()
    x = torch.randn(5, 4, 3, 2, dtype=DT)
    reference = torch.randn(4, 3, 2, dtype=DT)
    phi, base, output = bank.shapley(x - reference, reference)
    for g in range(4):
        module = bank.module(g).to(DT)  # see test_bank_module_follows_bank_dtype for why .to() is needed
        assert isinstance(module, ShapleyModule) and module.num_players == 3 and module.in_channels == 2
        torch.testing.assert_close(module(x[:, g]), bank(x)[:, g], rtol=0, atol=ATOL)
        with torch.no_grad():
            module.reference.copy_(reference[g])
        expl = module.explain(x[:, g])
        torch.testing.assert_close(expl.attributions, phi[:, g], rtol=0, atol=ATOL)
        torch.testing.assert_close(expl.base, base[:, g], rtol=0, atol=ATOL)
        torch.testing.assert_close(expl.output, output[:, g], rtol=0, atol=ATOL)


def test_bank_shapley_is_exact() -> None:
    bank = make_bank(groups=3, k=4, c_in=1)
    x = torch.randn(3, 3, 4, 1, dtype=DT)
    reference = torch.randn(3, 4, 1, dtype=DT)
    phi, _, _ = bank.shapley(x - reference, reference)
    for g in range(3):
        oracle = exact_shapley(lambda z, g=g: bank.module(g).inner(z.flatten(1)), x[:, g], reference[g])
        torch.testing.assert_close(phi[:, g], oracle.attributions, rtol=0, atol=ATOL)


def test_bank_module_is_a_copy() -> None:
    bank = make_bank()
    x = torch.randn(5, 4, 3, 2, dtype=DT)
    before = bank(x)
    module = bank.module(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    torch.testing.assert_close(bank(x), before, rtol=0, atol=0)
    # ... and training the bank afterwards does not move the copy either.
    copy_out = module(x[:, 1])
    with torch.no_grad():
        bank.weights[0].mul_(2.0)
    torch.testing.assert_close(module(x[:, 1]), copy_out, rtol=0, atol=0)


def test_bank_module_follows_bank_dtype() -> None:
    module = make_bank().module(0)
    assert {t.dtype for t in [*module.parameters(), *module.buffers()]} == {DT}


def test_linear_bank_shapley_is_weight_times_offset() -> None:
    # A linear inner is additive: player j's Shapley value is its own term W_j (x_j - r_j).
    bank = make_bank(hidden=())
    x = torch.randn(5, 4, 3, 2, dtype=DT)
    reference = torch.randn(4, 3, 2, dtype=DT)
    phi, _, _ = bank.shapley(x - reference, reference)
    w = bank.weights[0].view(4, 3, 2, 3)  # (g, k*c, o) -> (g, k, c, o), feature-major
    expected = torch.einsum("bgkc,gkco->bgko", x - reference, w)
    torch.testing.assert_close(phi, expected, rtol=0, atol=ATOL)


def test_bank_missingness() -> None:
    bank = make_bank()
    delta = torch.randn(5, 4, 3, 2, dtype=DT)
    delta[:, :, 0] = 0.0
    phi, _, _ = bank.shapley(delta, torch.randn(4, 3, 2, dtype=DT))
    assert phi[:, :, 0].abs().max() < MISSING_ATOL
    assert phi[:, :, 1:].abs().min() > 0


def test_bank_reference_must_have_group_axes() -> None:
    bank = make_bank()
    with pytest.raises(ValueError, match=r"reference must be \(\.\.\., G, k, C\), got shape \(3, 2\)"):
        bank.shapley(torch.zeros(1, 4, 3, 2, dtype=DT), torch.zeros(3, 2, dtype=DT))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 2, 1, 1), "must be >= 1, got 0, 1, 1"),
        ((2, 2, 0, 1), "must be >= 1, got 2, 0, 1"),
        ((2, 0, 1, 1), r"1 <= num_players <= 16 .*got 0"),
        ((2, MAX_PLAYERS + 1, 1, 1), rf"got {MAX_PLAYERS + 1}"),
    ],
)
def test_bank_constructor_validation(args: tuple[int, int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShapleyModuleBank(*args)


def test_bank_gradients_reach_every_parameter() -> None:
    bank = make_bank()
    delta = torch.randn(5, 4, 3, 2, dtype=DT)
    phi, _, _ = bank.shapley(delta, torch.randn(4, 3, 2, dtype=DT))
    phi.square().sum().backward()
    for name, p in bank.named_parameters():
        assert p.grad is not None and bool((p.grad.flatten(1).abs().sum(1) > 0).all()), name  # every group


def test_reused_coalition_workspace_never_changes_earlier_results() -> None:
    """No-grad calls reuse a bank's coalition buffer: earlier results stay intact and equal a fresh computation."""
    net = ShallowShapNet(6, 3, reference=torch.randn(6)).eval()
    x1, x2 = torch.randn(8, 6), torch.randn(5, 6)
    with torch.no_grad():
        first = net.explain(x1)
        kept = first.attributions.clone()
        net.explain(x2)  # another batch size through the same buffer
        again = net.explain(x1)
    assert torch.equal(first.attributions, kept), "a result must not alias the reused buffer"
    torch.testing.assert_close(again.attributions, kept, rtol=0, atol=0)
    fresh = net.explain(x1)  # with autograd: no reuse
    torch.testing.assert_close(fresh.attributions, kept, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_modules_by_active_count_groups_every_module_once(k: int) -> None:
    """Each module with an active player lands once, in the group of its number of active players, with its active
    slots in increasing order; within a group the modules keep their order; modules without one are left out."""
    from shapnets.modules import modules_by_active_count

    torch.manual_seed(k)
    pattern = torch.randint(0, 2**k, (500,), dtype=torch.uint8 if k <= 8 else torch.int16)
    seen: list[int] = []
    for count, chosen, slots in modules_by_active_count(pattern, k):
        assert slots.shape == (count, len(chosen)) and len(chosen) > 0
        assert bool((chosen[1:] > chosen[:-1]).all()), "modules keep their order within a group"
        for module, column in zip(chosen.tolist(), slots.T.tolist()):
            bits = [j for j in range(k) if int(pattern[module]) >> j & 1]
            assert column == bits, f"module {module}: slots {column}, active {bits}"
        seen += chosen.tolist()
    assert sorted(seen) == [i for i in range(len(pattern)) if int(pattern[i])], "every active module exactly once"
