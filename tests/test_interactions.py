"""Exact interactions: Harsanyi dividends and pairwise Shapley interaction indices (shapnets.interactions)."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from shapnets import (
    ConvShapNet,
    DecompositionError,
    DeepShapNet,
    Interactions,
    ShallowShapNet,
    ShapleyModule,
    coalition_masks,
    exact_interactions,
    exact_shapley,
    moebius_transform,
    shapley_from_values,
    shapley_interaction_index,
)
from shapnets.deep import _to_pairs

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def by_subset(interactions: Interactions, sample: int | None = None) -> dict[tuple[int, ...], Tensor]:
    """Dividends keyed by subset: `(B, C)` each, or `(C,)` for one sample."""
    d = interactions.dividends if sample is None else interactions.dividends[sample]
    return {s: d[..., t, :] for t, s in enumerate(interactions.subsets)}


def assert_matches_oracle(found: Interactions, oracle: Interactions, atol: float = 1e-10) -> None:
    """Same dividends on the listed subsets, 0 on every other subset of the oracle, same SII."""
    listed = by_subset(found)
    for subset, value in by_subset(oracle).items():
        expected = listed.get(subset, torch.zeros_like(value))
        assert torch.allclose(value, expected, atol=atol), (subset, value, expected)
    assert set(listed) <= set(oracle.subsets)
    torch.testing.assert_close(found.sii, oracle.sii, atol=atol, rtol=0)
    torch.testing.assert_close(found.base, oracle.base, atol=atol, rtol=0)
    torch.testing.assert_close(found.output, oracle.output, atol=atol, rtol=0)


class Bilinear(nn.Module):
    """f(x1, x2) = a x1 + b x2 + c x1 x2 + e: a 2-player game with known dividends."""

    def __init__(self, a: float, b: float, c: float, e: float) -> None:
        super().__init__()
        self.register_buffer("coef", torch.tensor([a, b, c, e], dtype=F64))

    def forward(self, z: Tensor) -> Tensor:
        a, b, c, e = self.coef
        return (a * z[:, 0] + b * z[:, 1] + c * z[:, 0] * z[:, 1] + e)[:, None]


# ---------------------------------------------------------------------------------------------
# The linear maps, on hand-computed and random games
# ---------------------------------------------------------------------------------------------
def test_two_player_game_by_hand():
    a, b, c, e = 0.5, -1.5, 2.0, 0.25
    r1, r2, x1, x2 = 0.3, -0.7, 1.2, 0.4
    module = ShapleyModule(Bilinear(a, b, c, e), num_players=2, reference=torch.tensor([[r1], [r2]], dtype=F64))
    found = module.interactions(torch.tensor([[[x1], [x2]]], dtype=F64))
    assert found.subsets == [(0,), (1,), (0, 1)]
    d = by_subset(found, 0)
    # f(x1, r2) - f(r1, r2) = (a + c r2)(x1 - r1), and the pair's dividend is the cross term.
    assert d[(0,)].item() == pytest.approx((a + c * r2) * (x1 - r1), abs=1e-12)
    assert d[(1,)].item() == pytest.approx((b + c * r1) * (x2 - r2), abs=1e-12)
    assert d[(0, 1)].item() == pytest.approx(c * (x1 - r1) * (x2 - r2), abs=1e-12)
    assert found.base.item() == pytest.approx(a * r1 + b * r2 + c * r1 * r2 + e, abs=1e-12)
    sii = found.sii[0, :, :, 0]
    assert sii[0, 1].item() == sii[1, 0].item() == pytest.approx(c * (x1 - r1) * (x2 - r2), abs=1e-12)
    assert sii[0, 0].item() == pytest.approx(d[(0,)].item() + d[(0, 1)].item() / 2, abs=1e-12)
    found.check_decomposition()


def test_three_player_game_by_hand():
    # v = x0 x1 x2 + 3 x0 with reference 0: dividends d_{0} = 3 x0, d_{012} = x0 x1 x2, all others 0.
    x = torch.tensor([[1.5, -2.0, 0.5]], dtype=F64)
    found = exact_interactions(lambda z: z.prod(1) + 3 * z[:, 0], x)
    assert found.subsets == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    triple = x.prod().item()
    expected = {(0,): 3 * x[0, 0].item(), (0, 1, 2): triple}
    for subset, value in by_subset(found, 0).items():
        assert value.item() == pytest.approx(expected.get(subset, 0.0), abs=1e-12), subset
    sii = found.sii[0, :, :, 0]
    off = sii[~torch.eye(3, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, triple / 2))  # d_{012} / (3 - 1)
    torch.testing.assert_close(sii.diagonal(), torch.tensor([3 * 1.5 + triple / 3, triple / 3, triple / 3], dtype=F64))


def test_moebius_inverts_the_zeta_transform():
    k = 5
    values = torch.randn(2**k, 3, 2, dtype=F64)
    dividends = moebius_transform(values, k)
    rows = torch.arange(2**k)
    subset_of = (rows[:, None] & rows[None, :]) == rows[:, None]  # [S, T]: S ⊆ T
    rebuilt = torch.einsum("st,s...->t...", subset_of.to(F64), dividends)
    torch.testing.assert_close(rebuilt, values)
    assert torch.equal(dividends[0], values[0])


def test_moebius_of_two_players_by_hand():
    v = torch.tensor([1.0, 3.0, 4.0, 10.0], dtype=F64)
    assert moebius_transform(v, 2).tolist() == [1.0, 2.0, 3.0, 10.0 - 3.0 - 4.0 + 1.0]


def test_sii_matches_its_definition_on_coalition_values():
    # I_ij = sum_{S ⊆ N - {i, j}} |S|! (n - |S| - 2)! / (n - 1)! * (v(S+ij) - v(S+i) - v(S+j) + v(S)).
    n = 4
    values = torch.randn(2**n, 2, 3, dtype=F64)
    sii = shapley_interaction_index(moebius_transform(values, n), n)
    assert sii.shape == (2, n, n, 3)
    for i, j in itertools.permutations(range(n), 2):
        expected = torch.zeros(2, 3, dtype=F64)
        for t in range(2**n):
            if t >> i & 1 or t >> j & 1:
                continue
            s = bin(t).count("1")
            weight = math.factorial(s) * math.factorial(n - s - 2) / math.factorial(n - 1)
            expected += weight * (values[t | 1 << i | 1 << j] - values[t | 1 << i] - values[t | 1 << j] + values[t])
        torch.testing.assert_close(sii[:, i, j], expected)
    diagonal = sii.diagonal(dim1=1, dim2=2).movedim(-1, 1)
    torch.testing.assert_close(diagonal, shapley_from_values(values, n))


def test_shapley_values_are_dividends_split_evenly():
    n = 6
    values = torch.randn(2**n, 4, 2, dtype=F64)
    found = Interactions.from_coalition_values(values)
    masks = coalition_masks(n, dtype=F64)
    d = moebius_transform(values, n)
    by_hand = torch.einsum("ti,tbc->bic", masks[1:] / masks[1:].sum(1, keepdim=True), d[1:])
    torch.testing.assert_close(found.shapley_values(), by_hand)
    torch.testing.assert_close(found.shapley_values(), shapley_from_values(values, n))
    found.check_decomposition()


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def test_shapley_module_interactions_match_explain_and_oracle():
    module = ShapleyModule(
        nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)), num_players=4, reference=0.3
    ).double()
    x = torch.randn(5, 4, 2, dtype=F64)
    found = module.interactions(x)
    found.check_decomposition()
    expl = module.explain(x)
    torch.testing.assert_close(found.shapley_values(), expl.attributions)
    torch.testing.assert_close(found.sii.diagonal(dim1=1, dim2=2).movedim(-1, 1), expl.attributions)
    assert_matches_oracle(found, exact_interactions(module, x, reference=module.reference))


@pytest.mark.parametrize("groups", ["pairs", [(0, 1, 2), (2, 3), (4,), (1, 3), (3, 1, 4)]])
def test_shallow_is_exact_for_the_whole_network(groups):
    model = ShallowShapNet(5, 3, groups=groups, hidden=(8,), reference=torch.randn(5)).double()
    x = torch.randn(4, 5, dtype=F64)
    found = model.interactions(x)
    found.check_decomposition()
    expected_subsets = {tuple(sorted(s)) for g in model.groups for r in range(1, len(g) + 1)
                        for s in itertools.combinations(g, r)}
    assert set(found.subsets) == expected_subsets
    torch.testing.assert_close(found.output, model(x))
    torch.testing.assert_close(found.shapley_values(), model.explain(x).attributions)
    reference = model.reference[:, 0]
    torch.testing.assert_close(found.shapley_values(), exact_shapley(model, x, reference).attributions)
    # The oracle lists all 31 subsets: those in no group (cross-group) must come out 0.
    oracle = exact_interactions(model, x, reference)
    assert len(oracle.subsets) == 2**5 - 1
    assert_matches_oracle(found, oracle)


def test_max_order_truncates_the_listing_not_the_index():
    model = ShallowShapNet(4, 2, groups=[(0, 1, 2), (1, 3)], hidden=(8,)).double()
    x = torch.randn(3, 4, dtype=F64)
    full = model.interactions(x)
    pairs = model.interactions(x, max_order=2)
    assert max(len(s) for s in pairs.subsets) == 2 and (0, 1, 2) not in pairs.subsets
    assert not pairs.complete and full.complete
    torch.testing.assert_close(pairs.sii, full.sii)
    for subset, value in by_subset(pairs).items():
        torch.testing.assert_close(value, by_subset(full)[subset])
    with pytest.raises(ValueError, match="max_order"):
        pairs.check_decomposition()
    with pytest.raises(ValueError, match="max_order"):
        pairs.shapley_values()
    assert model.interactions(x, max_order=3).complete  # nothing above the largest group
    oracle = exact_interactions(model, x, max_order=2)
    assert max(len(s) for s in oracle.subsets) == 2 and not oracle.complete
    torch.testing.assert_close(oracle.sii, full.sii, atol=1e-12, rtol=0)


def _deep_stage_function(model: DeepShapNet, stage: int):
    """The game of one stage as a plain function of the D feature rows (absolute values), for the oracle."""
    stride = model.stage_stride(stage)

    def fn(z: Tensor) -> Tensor:
        padded = z.new_zeros(z.shape[0], model.num_padded, z.shape[-1]).index_copy(1, model.live_rows, z)
        return model.stages[stage](_to_pairs(padded, stride)).sum(1)

    return fn


def test_deep_layer_games():
    model = DeepShapNet(5, 3, channels=[4, 4, 4], hidden=(8,), reference=torch.randn(5)).double().eval()
    x = torch.randn(3, 5, dtype=F64)
    reps = [z.index_select(1, model.live_rows) for z in model.representations(x)]
    for stage in range(model.num_stages):
        found = model.interactions(x, stage)
        found.check_decomposition()
        stage_input = reps[stage - 1] if stage else x[..., None] - model.reference
        phi = reps[stage] - stage_input if reps[stage].shape[-1] == stage_input.shape[-1] else reps[stage]
        torch.testing.assert_close(found.shapley_values(), phi)  # the stage's representation before the residual
        assert max(len(s) for s in found.subsets) == 2
        # The oracle on the stage's function of its inputs (absolute values: the reference is the model's at
        # stage 0 and 0 after).
        absolute = reps[stage - 1] if stage else x[..., None]
        reference = model.reference if stage == 0 else torch.zeros_like(absolute[0])
        oracle = exact_interactions(_deep_stage_function(model, stage), absolute, reference)
        assert_matches_oracle(found, oracle)
    with pytest.raises(IndexError, match="layer 4 out of range"):
        model.interactions(x, 4)
    with pytest.raises(TypeError, match="layer"):
        model.interactions(x, 1.0)
    assert model.interactions(x, -1).method.endswith(f"layer {model.num_stages - 1} (per-layer game)")


def test_conv_layer_games_match_the_oracle():
    model = ConvShapNet(2, 3, channels=(4,), hidden=(8,), reference=torch.tensor([0.3, -0.2])).double()
    x = torch.randn(2, 2, 3, 4, dtype=F64)  # 12 pixels: the oracle evaluates 4096 coalitions per sample
    reps = model.representations(x)
    for stage in range(model.num_stages):
        found = model.interactions(x, stage)
        found.check_decomposition()
        assert found.player_shape == (3, 4) and found.sii.shape == (2, 12, 12, found.num_outputs)
        stage_input = model._input_offsets(x) if stage == 0 else reps[stage - 1]
        phi = reps[stage] - stage_input if reps[stage].shape[-1] == stage_input.shape[-1] else reps[stage]
        torch.testing.assert_close(found.shapley_values(), phi.flatten(1, 2))
        conv = model.stages[stage]
        reference = model.reference if stage == 0 else torch.zeros(stage_input.shape[-1], dtype=F64)

        def fn(z: Tensor, conv=conv, reference=reference) -> Tensor:  # the layer game on absolute pixels
            return conv.bank(conv.patches(z - reference)[..., None, :, :] + reference).sum((1, 2, 3))

        pixels = torch.arange(12).view(3, 4, 1).expand(3, 4, stage_input.shape[-1])  # all channels of a pixel
        oracle = exact_interactions(fn, stage_input + reference, reference, players=pixels)
        assert_matches_oracle(found, oracle)
        # Only subsets of one dilated 2x2 patch are listed.
        d = conv.dilation[0]
        for subset in found.subsets:
            rows, cols = {p // 4 for p in subset}, {p % 4 for p in subset}
            assert max(rows) - min(rows) in (0, d) and max(cols) - min(cols) in (0, d)


def test_interactions_are_differentiable():
    model = ShallowShapNet(4, 2, hidden=(8,)).double()
    pair_mass = model.interactions(torch.randn(3, 4, dtype=F64), max_order=2).dividends[:, 4:].abs().sum()
    pair_mass.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.banks[0].weights)


def test_matches_shapiq_exact_computer():
    shapiq = pytest.importorskip("shapiq")
    np = pytest.importorskip("numpy")
    model = ShallowShapNet(5, 2, groups=[(0, 1, 2), (2, 3, 4), (0, 4)], hidden=(8,), reference=0.2).double()
    x = torch.randn(1, 5, dtype=F64)
    found = model.interactions(x)
    reference = model.reference[:, 0]
    for c in range(2):

        def game(coalitions: np.ndarray, c: int = c) -> np.ndarray:
            mask = torch.as_tensor(coalitions, dtype=torch.bool)
            with torch.no_grad():
                return model(torch.where(mask, x, reference)).numpy()[:, c]

        computer = shapiq.ExactComputer(game, n_players=5)
        moebius, sii = computer("Moebius", order=5), computer("SII", order=2)
        listed = by_subset(found, 0)
        for size in range(1, 6):
            for subset in itertools.combinations(range(5), size):
                ours = listed[subset][c].item() if subset in listed else 0.0
                assert moebius[subset] == pytest.approx(ours, abs=1e-10), subset
        for i, j in itertools.combinations_with_replacement(range(5), 2):
            theirs = sii[(i,) if i == j else (i, j)]
            assert theirs == pytest.approx(found.sii[0, i, j, c].item(), abs=1e-10), (i, j)


# ---------------------------------------------------------------------------------------------
# The record: ranking, selection, checks and errors
# ---------------------------------------------------------------------------------------------
def test_top_ranks_by_magnitude_with_names():
    names = ["age", "income", "height", "weight"]
    model = ShallowShapNet(4, 2, hidden=(8,), feature_names=names).double()
    x = torch.randn(2, 4, dtype=F64)
    found = model.interactions(x)
    predicted = int(found.output[1].argmax())
    ranked = found.top(4, sample=1)
    values = found.dividends[1, :, predicted]
    assert [r.value for r in ranked] == pytest.approx(values[values.abs().argsort(descending=True)[:4]].tolist())
    assert all(r.names == tuple(names[i] for i in r.subset) for r in ranked)
    pairs_only = found.top(100, target=0, sample=0, min_order=2)
    assert len(pairs_only) == 6 and all(len(r.subset) == 2 for r in pairs_only)
    magnitudes = [abs(r.value) for r in pairs_only]
    assert magnitudes == sorted(magnitudes, reverse=True)
    with pytest.raises(IndexError, match="class 5 out of range"):
        found.top(3, target=5)
    with pytest.raises(IndexError, match="sample 2 out of range"):
        found.top(3, sample=2)


def test_mass_in_top_and_selection():
    model = ShallowShapNet(5, 3, hidden=(8,)).double()
    x = torch.randn(4, 5, dtype=F64)
    found = model.interactions(x)
    share = found.mass_in_top(0.1)
    count = math.ceil(0.1 * len(found.subsets))
    magnitudes = found.select(None).dividends[..., 0].abs()
    by_hand = magnitudes.sort(1, descending=True).values[:, :count].sum(1) / magnitudes.sum(1)
    torch.testing.assert_close(share, by_hand)
    torch.testing.assert_close(found.mass_in_top(1.0), torch.ones(4, dtype=F64))
    one = found.select(2)
    assert one.dividends.shape == (4, len(found.subsets), 1) and one.sii.shape == (4, 5, 5, 1)
    one.check_decomposition()
    torch.testing.assert_close(found[1:3].dividends, found.dividends[1:3])
    assert found[-1].batch_size == 1
    with pytest.raises(ValueError, match="share"):
        found.mass_in_top(0.0)


def test_check_decomposition_catches_a_wrong_record():
    found = ShallowShapNet(3, 2, hidden=(8,)).double().interactions(torch.randn(2, 3, dtype=F64))
    found.check_decomposition()
    found.dividends[0, 1, 0] += 1e-3
    with pytest.raises(DecompositionError, match="Harsanyi decomposition violated"):
        found.check_decomposition()


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 17, dtype=F64)
    with pytest.raises(ValueError, match=r"17 players need 2\^17 evaluations.*max_players=16"):
        exact_interactions(lambda z: z.sum(1), x)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_order must be a positive integer"):
            exact_interactions(lambda z: z.sum(1), x[:, :3], max_order=bad)
        with pytest.raises(ValueError, match="max_order must be a positive integer"):
            ShallowShapNet(3, 2).interactions(torch.randn(2, 3), max_order=bad)
    with pytest.raises(ValueError, match=r"expected 2\^3 = 8 coalition values along dim 0, got 6"):
        moebius_transform(torch.zeros(6, 2), 3)
    with pytest.raises(ValueError, match="power of two"):
        Interactions.from_coalition_values(torch.zeros(6, 1, 2))
    with pytest.raises(ValueError, match=r"dividends must be \(B, S, C_out\)"):
        Interactions([(0,), (1,)], torch.zeros(1, 3, 2), torch.zeros(1, 2, 2, 2), torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="subsets must be non-empty sorted tuples"):
        Interactions([(1, 0)], torch.zeros(1, 1, 2), torch.zeros(1, 2, 2, 2), torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="ShallowShapNet expects input of shape"):
        ShallowShapNet(3, 2).interactions(torch.randn(2, 4))
    with pytest.raises(IndexError, match="layer -3 out of range"):
        ConvShapNet(1, 2, channels=(3,)).interactions(torch.randn(1, 1, 4, 4), -3)


def test_plots_write_files(tmp_path):
    plots = pytest.importorskip("training.plots")
    model = ShallowShapNet(4, 2, hidden=(8,), feature_names=["a", "b", "c", "d"])
    found = model.interactions(torch.randn(2, 4))
    table = plots.interactions_table(found, index=1, k=3)
    lines = table.splitlines()
    assert len(lines) == 4  # a header and the 3 largest
    assert all(" × ".join(r.names) in line for r, line in zip(found.top(3, sample=1), lines[1:]))
    written = plots.plot_interactions(found, tmp_path / "bars.png", k=5, index=1)
    assert written.is_file() and written.stat().st_size > 0
    conv = ConvShapNet(1, 3, channels=(4,), hidden=(8,))
    image = torch.randn(1, 1, 6, 6)
    layer = conv.interactions(image, 1)
    pairs = plots.pixel_pairs(layer, k=5)
    assert len(pairs) == 5 and all(abs(a[0] - b[0]) in (0, 2) and abs(a[1] - b[1]) in (0, 2) for a, b, _ in pairs)
    assert [abs(v) for *_, v in pairs] == sorted((abs(v) for *_, v in pairs), reverse=True)
    harsanyi = plots.pixel_pairs(layer, k=5, kind="harsanyi")
    assert all(layer.top(5, min_order=2, max_order=2)[i].value == v for i, (_, _, v) in enumerate(harsanyi))
    written = plots.plot_pixel_interactions(layer, tmp_path / "pixels.png", image=image[0], k=5)
    assert written.is_file() and written.stat().st_size > 0
    with pytest.raises(ValueError, match="pixel players"):
        plots.pixel_pairs(found)
    with pytest.raises(ValueError, match="kind must be"):
        plots.pixel_pairs(layer, kind="banzhaf")


def test_sparsity_benchmark_runs_on_shipped_models(tmp_path):
    pytest.importorskip("sklearn")  # breast cancer ships with scikit-learn: no data folder needed
    spec = importlib.util.spec_from_file_location("interactions_bench", ROOT / "benchmarks" / "interactions.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["shapnet_shallow_breast_cancer", "shapnet_deep_breast_cancer", "--samples", "4",
                         "--conv", "", "--out", str(tmp_path), "--threads", "0"])
    rows = {(r["model"], r["game"]): r for r in result["rows"]}
    assert set(rows) == {("shapnet_shallow_breast_cancer", "network (exact)"),
                         ("shapnet_deep_breast_cancer", "last layer (per-layer game)")}
    for row in rows.values():
        assert 0 < row["mass in top"] <= 1 and row["decomposition error"] < 1e-4
        assert row["order 1"] + row["order 2"] + row["order >= 3"] == pytest.approx(1.0)
    shallow = rows[("shapnet_shallow_breast_cancer", "network (exact)")]
    assert shallow["subsets"] == 30 + 30 * 29 // 2 and shallow["top subsets"] == math.ceil(0.05 * 465)
    assert (tmp_path / "interactions.md").is_file() and len(result["pictures"]) == 2
    assert all(p.is_file() for p in result["pictures"])


@pytest.mark.gpu
def test_interactions_on_cuda_match_cpu():
    shallow = ShallowShapNet(4, 2, groups=[(0, 1, 2), (2, 3)], hidden=(8,), reference=0.1).double()
    conv = ConvShapNet(1, 2, channels=(3,), hidden=(8,)).double()
    x, image = torch.randn(3, 4, dtype=F64), torch.randn(2, 1, 5, 5, dtype=F64)
    pairs = [(shallow.interactions(x), shallow.cuda().interactions(x.cuda())),
             (conv.interactions(image, 1), conv.cuda().interactions(image.cuda(), 1))]
    for cpu, gpu in pairs:
        assert gpu.dividends.is_cuda and gpu.subsets == cpu.subsets
        torch.testing.assert_close(gpu.cpu().dividends, cpu.dividends)
        torch.testing.assert_close(gpu.cpu().sii, cpu.sii)
        torch.testing.assert_close(gpu.shapley_values().cpu(), cpu.shapley_values())
        assert [r.subset for r in gpu.top(3)] == [r.subset for r in cpu.top(3)]
    oracle = exact_interactions(shallow, x.cuda(), shallow.reference[:, 0])
    torch.testing.assert_close(oracle.sii.cpu(), pairs[0][0].sii)
