"""The no-grad Shallow ShapNet path (`ShapleyModuleBank.shapley_grouped`): exact against the oracle in float64,
equal to the differentiable path, exact zeros at the reference, and clear errors."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from shapnets import ShallowShapNet, ShapleyModuleBank, compile_coalitions, exact_shapley
from shapnets import modules as modules_impl

DT = torch.float64
ATOL = 1e-10

CASES = {
    "pairs, GELU": dict(groups="pairs"),
    "mixed arities 1-5, two hidden layers": dict(groups=[(0,), (1, 2), (2, 3, 4), (0, 5, 6, 7), (1, 3, 5, 7, 6)],
                                                 hidden=(6, 4)),
    "mixed arities 1-4, one hidden layer": dict(groups=[(0,), (1, 2), (2, 3, 4), (0, 5, 6, 7), (3, 6)], hidden=(5,)),
    "pairs, one layer (linear)": dict(groups="pairs", hidden=(), act_layer=nn.ReLU),
    "singles, 3 channels": dict(groups="singles", in_channels=3, hidden=(5,)),
    "one group of 7 (combined by a product)": dict(groups=[(0, 1, 2, 3, 4, 5, 6)], hidden=(3,), act_layer=nn.ReLU),
    "triples, LeakyReLU": dict(groups=[(0, 1, 2), (3, 4, 5), (5, 6, 7)], act_layer=nn.LeakyReLU),
}


def make(case: str) -> ShallowShapNet:
    kwargs = dict(CASES[case])
    channels = kwargs.get("in_channels", 1)
    reference = torch.randn(8, channels, dtype=DT)  # not zero: the reference's pre-activation is folded in
    return ShallowShapNet(8, 3, reference=reference, hidden=kwargs.pop("hidden", (8,)), **kwargs).to(DT).eval()


def inputs(net: ShallowShapNet, batch: int = 5) -> torch.Tensor:
    x = torch.randn(batch, 8, net.in_channels, dtype=DT)
    x[1, 2] = net.reference[2]  # one feature at the reference: exactly 0
    x[3] = net.reference  # a whole sample at the reference
    return x[..., 0] if net.in_channels == 1 else x


def no_grad_explain_is_exact(net: ShallowShapNet, x: torch.Tensor):
    """`net.explain(x)` without autograd: equal to the oracle in float64, local accuracy, exact zeros at the reference
    (`inputs`' feature 2 of sample 1 and all of sample 3). Returns the explanation."""
    with torch.no_grad():
        fast = net.explain(x)
    oracle = exact_shapley(net, x, net.reference)
    torch.testing.assert_close(fast.attributions, oracle.attributions, rtol=0, atol=ATOL)
    torch.testing.assert_close(fast.base, oracle.base, rtol=0, atol=ATOL)
    torch.testing.assert_close(fast.output, net(x), rtol=0, atol=ATOL)
    fast.check_local_accuracy()
    assert torch.equal(fast.attributions[1, 2], torch.zeros(3, dtype=DT))  # exactly, not ~1e-17
    assert torch.equal(fast.attributions[3], torch.zeros(8, 3, dtype=DT))
    return fast


# The two-product path's second map: one dense or CSR product over all features, or per module
# (sparse_density, local_width).
SECOND_MAPS = {"dense": (0.0, 1 << 30), "sparse": (1.0, 1 << 30), "local": (0.0, 0)}


@pytest.fixture(params=list(SECOND_MAPS))
def second_map(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each second map of the two-product path in turn."""
    density, width = SECOND_MAPS[request.param]
    monkeypatch.setattr(ShallowShapNet, "sparse_density", density)
    monkeypatch.setattr(ShallowShapNet, "local_width", width)
    return request.param


DENSE_CASES = ["pairs, GELU", "mixed arities 1-4, one hidden layer", "singles, 3 channels",
               "one group of 7 (combined by a product)", "triples, LeakyReLU"]


# dense / sparse / local: the two-product path's second maps (SECOND_MAPS); grouped: the grouped path with all modules
# at once / one module per chunk.
GROUPED_CHUNKS = {"grouped 1 << 22": 1 << 22, "grouped 1": 1}


@pytest.mark.parametrize("path", [*SECOND_MAPS, *GROUPED_CHUNKS])
@pytest.mark.parametrize("case", list(CASES))
def test_no_grad_paths_equal_the_oracle_and_the_autograd_path(case: str, path: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    two_products = path in SECOND_MAPS
    if two_products and case not in DENSE_CASES:
        pytest.skip("the two-product path takes one-hidden-layer inners only")
    if two_products:
        density, width = SECOND_MAPS[path]
        monkeypatch.setattr(ShallowShapNet, "sparse_density", density)
        monkeypatch.setattr(ShallowShapNet, "local_width", width)
    else:
        monkeypatch.setattr(ShallowShapNet, "dense_limit", 0)
        monkeypatch.setattr(ShapleyModuleBank, "grouped_chunk", GROUPED_CHUNKS[path])
    torch.manual_seed(0)
    net = make(case)
    x = inputs(net)
    operator = net._dense_operator(x)
    assert (operator is not None) == two_products
    if path == "local":
        assert operator.combine is None and len(operator.local) == len(net.banks)
    elif two_products:
        assert operator.combine.layout == (torch.sparse_csr if path == "sparse" else torch.strided)
    fast = no_grad_explain_is_exact(net, x)
    slow = net.explain(x)  # parameters require grad: the differentiable path
    assert slow.attributions.requires_grad and not fast.attributions.requires_grad
    torch.testing.assert_close(fast.attributions, slow.attributions.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(fast.output, slow.output.detach(), rtol=0, atol=ATOL)


@pytest.mark.parametrize(("dense_limit", "sparse_density", "local_width"),
                         [(1 << 21, 0.0, 1 << 30), (1 << 21, 1.0, 1 << 30), (1 << 21, 0.0, 0), (0, 0.0, 0)])
def test_no_grad_paths_in_float32_and_repeated_calls(dense_limit: int, sparse_density: float, local_width: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32 agrees with float64; the reused workspace does not leak between calls of other sizes."""
    monkeypatch.setattr(ShallowShapNet, "dense_limit", dense_limit)
    monkeypatch.setattr(ShallowShapNet, "sparse_density", sparse_density)
    monkeypatch.setattr(ShallowShapNet, "local_width", local_width)
    torch.manual_seed(1)
    net = make("pairs, GELU")
    x = inputs(net, 9)
    with torch.no_grad():
        want = net.explain(x).attributions
        net32 = net.float()
        first = net32.explain(x.float())
        net32.explain(torch.randn(33, 8))  # a larger call in between reuses and grows the workspace
        again = net32.explain(x.float())
    torch.testing.assert_close(first.attributions, want.float(), rtol=0, atol=1e-5)
    assert torch.equal(first.attributions, again.attributions) and torch.equal(first.base, again.base)


def test_one_layer_bank_returns_fresh_base_and_output() -> None:
    """Base and output are not views of a buffer that the next call overwrites."""
    bank = ShapleyModuleBank(3, 2, 1, 2, hidden=(), output_act=True).to(DT)
    offsets = torch.randn(3, 2, 1, 4, dtype=DT)
    with torch.no_grad():
        _, base, output = bank.shapley_grouped(offsets)
        base0, output0 = base.clone(), output.clone()
        bank.shapley_grouped(torch.randn(3, 2, 1, 4, dtype=DT))
    assert torch.equal(base, base0) and torch.equal(output, output0)


def test_shapley_grouped_refuses_gradients_and_bad_shapes() -> None:
    bank = ShapleyModuleBank(3, 2, 1, 2).to(DT)
    with pytest.raises(ValueError, match="no_grad"):
        bank.shapley_grouped(torch.randn(3, 2, 1, 4, dtype=DT))
    with torch.no_grad(), pytest.raises(ValueError, match=r"offsets must be \(G=3, k=2, C=1, n\)"):
        bank.shapley_grouped(torch.randn(4, 3, 2, 1, dtype=DT))


FUSED_CASES = ["pairs, GELU", "singles, 3 channels", "triples, LeakyReLU"]  # the banks the fused kernel takes


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_two_layer_kernel_run_eagerly_equals_the_oracle(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The expression compile_coalitions compiles, run eagerly (no compiler needed): exact, exact zeros.
    monkeypatch.setattr(ShallowShapNet, "dense_limit", 0)  # else the two-product path takes these models
    monkeypatch.setitem(modules_impl._COMPILED, "two", modules_impl._fused_two_layer_phi)
    torch.manual_seed(0)
    net = compile_coalitions(make(case))
    assert all(bank._fused_grouped_kernel() is modules_impl._fused_two_layer_phi for bank in net.banks)
    no_grad_explain_is_exact(net, inputs(net))


def test_fused_kernel_leaves_banks_it_does_not_fit_to_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(modules_impl._COMPILED, "two", modules_impl._fused_two_layer_phi)
    deep = compile_coalitions(make("mixed arities 1-5, two hidden layers"))  # three layers
    assert all(bank._fused_grouped_kernel() is None for bank in deep.banks)
    wide = compile_coalitions(ShallowShapNet(8, 3, "pairs", hidden=(64,)))  # 64 x 3 x 4 terms > fused_unroll
    assert wide.banks[0]._fused_grouped_kernel() is None


def test_fused_path_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(modules_impl, "_COMPILED", {})
    monkeypatch.setattr(ShallowShapNet, "dense_limit", 0)  # the eager path a failed compile falls back to
    net = make("pairs, GELU")
    x = inputs(net)
    with torch.no_grad():
        eager = net.explain(x).attributions
        compile_coalitions(net)
        with pytest.warns(RuntimeWarning, match="torch.compile is not usable here"):
            first = net.explain(x).attributions
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            second = net.explain(x).attributions
    assert torch.equal(first, eager) and torch.equal(second, eager)


@pytest.mark.slow
def test_compiled_two_layer_kernel_equals_the_oracle() -> None:
    # Compiles (a minute or more on a small CPU): slow.
    torch.manual_seed(0)
    net = compile_coalitions(make("pairs, GELU"))
    no_grad_explain_is_exact(net, inputs(net))
    assert modules_impl._COMPILED.get("two") not in (None, modules_impl._fused_two_layer_phi)


def test_dense_path_follows_the_weights_it_explains() -> None:
    """The dense operator is cached, but never stale: after an optimizer step, a load_state_dict, a new reference or a
    dtype change, explain is exact for the weights of the moment."""
    torch.manual_seed(2)
    net = make("pairs, GELU")
    x = inputs(net)

    def exact_now() -> None:
        operator = net._dense_operator(x.to(net.reference.dtype))
        assert operator is not None
        no_grad_explain_is_exact(net, x.to(net.reference.dtype))

    exact_now()
    cached = net._dense_operator(x)
    assert net._dense_operator(x) is cached  # the same weights: built once
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    net(x).sum().backward()
    optimizer.step()
    exact_now()
    assert net._dense_operator(x) is not cached
    net.load_state_dict(make("pairs, GELU").state_dict())  # new weights and a new reference
    x = inputs(net)
    exact_now()
    with torch.no_grad():
        net.reference.add_(0.25)
    x = inputs(net)  # its at-reference entries follow the new reference
    exact_now()
    net.float()
    x = x.float()
    with torch.no_grad():
        fast = net.explain(x)
    torch.testing.assert_close(fast.attributions, exact_shapley(net.double(), x.double(), net.reference).attributions
                               .float(), rtol=0, atol=1e-5)


def test_dense_path_stays_within_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above `dense_limit` elements the grouped path runs, and is exact."""
    torch.manual_seed(3)
    net = make("pairs, GELU")
    x = inputs(net)
    columns = sum(bank.dense_columns() for bank in net.banks)
    # The operator needs (columns + 1) x (8 + 2 + 9 x 3) elements.
    monkeypatch.setattr(ShallowShapNet, "dense_limit", columns * 10)
    assert net._dense_operator(x) is None
    no_grad_explain_is_exact(net, x)
    monkeypatch.setattr(ShallowShapNet, "dense_limit", (columns + 1) * 37)
    assert net._dense_operator(x) is not None
    compile_coalitions(net)  # the two-product path takes precedence over the fused kernel
    assert net._dense_operator(x) is not None


def test_dense_path_leaves_other_inners_to_the_grouped_path() -> None:
    torch.manual_seed(4)
    for net in (make("mixed arities 1-5, two hidden layers"), make("pairs, one layer (linear)"),
                ShallowShapNet(8, 3, hidden=(4,), act_layer=nn.Tanh).to(DT)):
        assert net._dense_operator(inputs(net)) is None
    edited = make("pairs, GELU")
    x = inputs(edited)
    no_grad_explain_is_exact(edited, x)
    edited.banks[0].act = nn.ReLU()  # the activation is part of the cache key: the operator is rebuilt
    no_grad_explain_is_exact(edited, x)


def test_copies_and_pickles_of_an_explained_model_rebuild_the_operator(second_map: str) -> None:
    """The cached operator (a CSR tensor where sparse) does not travel: deepcopy and torch.save work after explain."""
    torch.manual_seed(5)
    net = make("pairs, GELU")
    x = inputs(net)
    with torch.no_grad():
        want = net.explain(x).attributions
    twin = copy.deepcopy(net)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        assert "_dense_cache" not in other.__dict__
        with torch.no_grad():
            assert torch.equal(other.explain(x).attributions, want)


def test_explanations_do_not_share_the_cached_operator(second_map: str) -> None:
    """A batch of one (whose copies of the cached constants could be no-op views), then others; an explanation
    edited in place: every later call is still exact."""
    torch.manual_seed(6)
    net = make("pairs, GELU")
    x = inputs(net)
    want = exact_shapley(net, x[:1], net.reference)
    for _ in range(2):
        with torch.no_grad():
            single = net.explain(x[:1])
        torch.testing.assert_close(single.attributions, want.attributions, rtol=0, atol=ATOL)
        torch.testing.assert_close(single.base, want.base, rtol=0, atol=ATOL)
        for tensor in (single.base, single.attributions, single.output):
            tensor.add_(1.0)
    no_grad_explain_is_exact(net, x)


def test_two_product_path_under_autocast_runs_in_the_model_dtype(second_map: str) -> None:
    """bf16 autocast (no bf16 CSR kernel, bf16 blocks against a float32 scatter) leaves the path in float32: exact."""
    torch.manual_seed(7)
    net = make("pairs, GELU").float()
    x = inputs(net).float()
    with torch.no_grad():
        want = net.explain(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = net.explain(x)
    assert got.attributions.dtype == torch.float32
    assert torch.equal(got.attributions, want.attributions) and torch.equal(got.output, want.output)


@pytest.mark.parametrize("case", ["pairs, GELU", "singles, 3 channels"])
@pytest.mark.parametrize("dense_limit", [1 << 21, 0])
def test_an_empty_batch_gets_an_empty_explanation(case: str, dense_limit: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ShallowShapNet, "dense_limit", dense_limit)
    net = make(case)
    x = inputs(net)[:0]
    with torch.no_grad():
        explanation = net.explain(x)
    assert explanation.attributions.shape == (0, 8, 3) and explanation.output.shape == (0, 3)


@pytest.mark.parametrize("case", DENSE_CASES)
def test_no_grad_forward_equals_the_autograd_forward(case: str) -> None:
    """Without autograd, forward runs the full coalitions of the cached operator (two products): the same logits."""
    torch.manual_seed(8)
    net = make(case)
    x = inputs(net)
    slow = net(x)  # parameters require grad: the per-bank path
    with torch.no_grad():
        assert net._dense_operator(x) is not None
        fast = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = net.float()(x.float())
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=ATOL)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, slow.detach().float(), rtol=1e-5, atol=1e-5)
