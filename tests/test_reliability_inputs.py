"""Reliability catalogue, category "inputs": odd tensors through every public model's `forward` and `explain`.

Each case is one way a user can hand a model something unexpected. Its expectation is either a correct result
(checked against the plain input: same values, local accuracy) or an error whose type and message name the
problem. The cases run against every model family (Shapley module, Shallow / Deep / Conv ShapNets, Interpretable
CNN, CapsNet) and the plain baselines, on `forward` and `explain`; docs/reliability.md lists them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import shapnets._tabular
import shapnets.capsnet
import shapnets.conv
import shapnets.icnn
import zoo
from shapnets import ConvShapNet, DeepShapNet, Explanation, ShallowShapNet, ShapleyModule
from shapnets._validation import all_finite, check_input

pytestmark = pytest.mark.reliability("inputs")


# ---------------------------------------------------------------------------------------------------- models
@dataclass
class Subject:
    """A model under test, a valid input for it, and what kind of input it takes."""

    model: nn.Module
    good: Tensor
    kind: str  # "tabular" (B, D) / (B, k, C) or "image" (B, C, H, W)
    fixed_size: bool = False  # images of one size only (CapsNet)

    @property
    def methods(self) -> tuple[str, ...]:
        return ("forward", "explain") if hasattr(self.model, "explain") else ("forward",)


def _make(name: str) -> Subject:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "shapley_module":
            inner = nn.Sequential(nn.Linear(3 * 2, 8), nn.GELU(), nn.Linear(8, 2))
            return Subject(ShapleyModule(inner, num_players=3, in_channels=2, reference=0.1), torch.randn(4, 3, 2),
                           "tabular")
        if name == "shallow":
            return Subject(ShallowShapNet(6, 3, reference=torch.linspace(-1, 1, 6)), torch.randn(4, 6), "tabular")
        if name == "deep":
            return Subject(DeepShapNet(6, 3, channels=4, hidden=(8,)), torch.randn(4, 6), "tabular")
        if name == "conv":
            return Subject(ConvShapNet(in_chans=1, num_classes=3, channels=(4, 4), hidden=(8,)),
                           torch.rand(4, 1, 12, 12), "image")
        if name == "icnn":
            return Subject(zoo.create_model("icnn_vgg_small", num_classes=3, in_chans=1), torch.rand(4, 1, 32, 32),
                           "image")
        if name == "capsnet":
            model = zoo.create_model("capsnet", conv_channels=16, primary_types=4, primary_dim=4, class_dim=8,
                                     num_classes=3, decoder_widths=(16,), input_mean=0.5, input_std=0.25)
            return Subject(model, torch.rand(4, 1, 28, 28), "image", fixed_size=True)
        if name == "baseline_mlp":
            return Subject(zoo.create_model("baseline_mlp", in_features=6, num_classes=3), torch.randn(4, 6),
                           "tabular")
        if name == "baseline_cnn":
            return Subject(zoo.create_model("baseline_cnn", num_classes=3, in_chans=1), torch.rand(4, 1, 16, 16),
                           "image")
    raise KeyError(name)


MODEL_NAMES = ["shapley_module", "shallow", "deep", "conv", "icnn", "capsnet", "baseline_mlp", "baseline_cnn"]
_SUBJECTS: dict[str, Subject] = {}


def subject(name: str) -> Subject:
    """One instance per model for the whole module (CapsNet and the ICNN take a moment to build); always eval()."""
    if name not in _SUBJECTS:
        _SUBJECTS[name] = _make(name)
    s = _SUBJECTS[name]
    s.model.eval().float()
    s.model.chunk_size = None  # the streaming cases set it; other cases see the default
    return s


def call(model: nn.Module, method: str, x: object) -> Tensor | Explanation:
    return model(x) if method == "forward" else model.explain(x)


def output_of(result: Tensor | Explanation) -> Tensor:
    return result if isinstance(result, Tensor) else result.output


# ---------------------------------------------------------------------------------------------------- expectations
@dataclass
class Error:
    """The call must raise `kind` with a message matching `match` (a regex)."""

    kind: type[Exception]
    match: str


@dataclass
class Works:
    """The call must succeed; `check(result, reference_result, subject, method)` asserts what the result must be."""

    check: Callable[..., None] | None = None


def _same_as_plain(result, plain, s: Subject, method: str) -> None:
    torch.testing.assert_close(output_of(result), output_of(plain), rtol=1e-5, atol=1e-5)
    if isinstance(result, Explanation):
        torch.testing.assert_close(result.attributions, plain.attributions, rtol=1e-5, atol=1e-5)
        result.check_local_accuracy()


def _is_valid(result, plain, s: Subject, method: str) -> None:
    out = output_of(result)
    assert out.shape[1] == output_of(plain).shape[1] and bool(torch.isfinite(out).all())
    if isinstance(result, Explanation):
        result.check_local_accuracy()


def _empty(result, plain, s: Subject, method: str) -> None:
    out = output_of(result)
    assert out.shape == (0, output_of(plain).shape[1])
    if isinstance(result, Explanation):
        assert result.batch_size == 0 and result.attributions.shape[1:] == plain.attributions.shape[1:]


def _same_as_first_sample(result, plain, s: Subject, method: str) -> None:
    _same_as_plain(result, plain[:1], s, method)


def _same_as_materialised(result, plain, s: Subject, method: str) -> None:
    """A stride-0 view `x[:1].expand(B, ...)` gives what the materialised copy gives."""
    materialised = s.good[:1].expand_as(s.good).clone()
    _same_as_plain(result, call(s.model, method, materialised), s, method)


def _float64(result, plain, s: Subject, method: str) -> None:
    out = output_of(result)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), output_of(plain), rtol=1e-4, atol=1e-4)
    if isinstance(result, Explanation):
        result.check_local_accuracy()  # float64: to 1e-9


# ---------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One odd input: how to make it from a valid one, which models it applies to, what must happen."""

    id: str
    make: Callable[[Tensor, Subject], object]
    expect: Error | Works | Callable[[Subject], Error | Works]
    applies: Callable[[Subject], bool] = lambda s: True
    setup: Callable[[Subject], None] | None = None

    def expectation(self, s: Subject) -> Error | Works:
        return self.expect(s) if callable(self.expect) else self.expect


def _with(x: Tensor, index: int, value: float) -> Tensor:
    x = x.clone()
    x.view(-1)[index] = value
    return x


def _one_more_player(x: Tensor, s: Subject) -> Tensor:
    return torch.cat([x, x[:, :1]], dim=1)


def _channels_last_layout(x: Tensor, s: Subject) -> Tensor:
    return x.permute(0, 2, 3, 1)  # (B, H, W, C): a common mix-up with numpy / PIL images


def _double_model(s: Subject) -> None:
    s.model.double()


SHAPE = r"expects input of shape"
DTYPE_FLOAT = r"floating-point tensor, got dtype"
DTYPE_MISMATCH = r"does not match the model's torch.float32"
NONFINITE = r"non-finite value"
tabular = lambda s: s.kind == "tabular"  # noqa: E731
image = lambda s: s.kind == "image"  # noqa: E731

CASES = [
    # --- rank and shape
    Case("extra_leading_axis", lambda x, s: x[None], Error(ValueError, SHAPE)),
    Case("missing_batch_axis", lambda x, s: x[0], Error(ValueError, SHAPE)),
    Case("scalar_tensor", lambda x, s: torch.tensor(1.0), Error(ValueError, SHAPE)),
    Case("flattened_input", lambda x, s: x.reshape(-1), Error(ValueError, SHAPE)),
    Case("one_player_too_many", _one_more_player, Error(ValueError, SHAPE), applies=tabular),
    Case("one_player_too_few", lambda x, s: x[:, :-1], Error(ValueError, SHAPE), applies=tabular),
    Case("rgb_for_grayscale_model", lambda x, s: x.repeat(1, 3, 1, 1), Error(ValueError, SHAPE), applies=image),
    Case("zero_channels", lambda x, s: x[:, :0], Error(ValueError, SHAPE), applies=image),
    Case("channels_last_layout_BHWC", _channels_last_layout, Error(ValueError, SHAPE), applies=image),
    Case("smaller_image", lambda x, s: x[..., 2:, 2:],
         lambda s: Error(ValueError, SHAPE) if s.fixed_size else Works(_is_valid), applies=image),
    Case("larger_image", lambda x, s: torch.nn.functional.pad(x, (2, 2, 2, 2)),
         lambda s: Error(ValueError, SHAPE) if s.fixed_size else Works(_is_valid), applies=image),
    Case("non_square_image", lambda x, s: x[..., :-3],
         lambda s: Error(ValueError, SHAPE) if s.fixed_size else Works(_is_valid), applies=image),
    Case("image_too_small_for_the_network", lambda x, s: x[..., :1, :1],
         lambda s: (Error(ValueError, SHAPE) if s.fixed_size else Works(_is_valid)
                    if isinstance(s.model, ConvShapNet) else Error(ValueError, "too small")), applies=image),
    Case("empty_image", lambda x, s: x[..., :0, :],
         lambda s: Error(ValueError, SHAPE if s.fixed_size else r"empty image|too small"), applies=image),
    # --- batch size
    Case("empty_batch", lambda x, s: x[:0], Works(_empty)),
    Case("batch_of_one", lambda x, s: x[:1], Works(_same_as_first_sample)),
    # --- values
    Case("one_nan", lambda x, s: _with(x, 1, float("nan")), Error(ValueError, NONFINITE)),
    Case("all_nan", lambda x, s: torch.full_like(x, float("nan")), Error(ValueError, NONFINITE)),
    Case("positive_inf", lambda x, s: _with(x, 0, float("inf")), Error(ValueError, NONFINITE)),
    Case("negative_inf", lambda x, s: _with(x, -1, float("-inf")), Error(ValueError, NONFINITE)),
    Case("huge_finite_values_1e20", lambda x, s: x * 1e20 + 1e20, None),  # special-cased: correct or named error
    Case("constant_zero_input", lambda x, s: torch.zeros_like(x), Works(_is_valid)),
    # --- dtypes
    Case("int64", lambda x, s: (x * 10).long(), Error(TypeError, DTYPE_FLOAT)),
    Case("int32", lambda x, s: (x * 10).int(), Error(TypeError, DTYPE_FLOAT)),
    Case("uint8_raw_pixels", lambda x, s: (x.abs() * 255).clamp(max=255).to(torch.uint8),
         Error(TypeError, DTYPE_FLOAT)),
    Case("bool", lambda x, s: x > 0, Error(TypeError, DTYPE_FLOAT)),
    Case("complex64", lambda x, s: x.to(torch.complex64), Error(TypeError, DTYPE_FLOAT)),
    Case("float16_into_float32_model", lambda x, s: x.half(), Error(TypeError, DTYPE_MISMATCH)),
    Case("bfloat16_into_float32_model", lambda x, s: x.bfloat16(), Error(TypeError, DTYPE_MISMATCH)),
    Case("float64_into_float32_model", lambda x, s: x.double(), Error(TypeError, DTYPE_MISMATCH)),
    Case("float64_model_and_input", lambda x, s: x.double(), Works(_float64), setup=_double_model),
    # --- containers and devices
    Case("numpy_array", lambda x, s: x.numpy(), Error(TypeError, r"expects a torch.Tensor, got ndarray")),
    Case("python_list", lambda x, s: x.tolist(), Error(TypeError, r"expects a torch.Tensor, got list")),
    Case("wrong_device_meta", lambda x, s: x.to("meta"),
         Error(RuntimeError, r"input is on meta but the model is on cpu")),
    # --- layouts that must simply work
    Case("non_contiguous_transposed", lambda x, s: x.transpose(0, -1).contiguous().transpose(0, -1),
         Works(_same_as_plain)),
    Case("channels_last_memory_format", lambda x, s: x.contiguous(memory_format=torch.channels_last),
         Works(_same_as_plain), applies=image),
    Case("broadcast_view_stride_0", lambda x, s: x[:1].expand_as(x), Works(_same_as_materialised)),
    Case("view_with_storage_offset", lambda x, s: torch.cat([x[:1], x])[1:], Works(_same_as_plain)),
    Case("requires_grad_input", lambda x, s: x.clone().requires_grad_(), Works(_same_as_plain)),
    Case("inference_mode_tensor", lambda x, s: _inference_copy(x), Works(_same_as_plain)),
]


def _inference_copy(x: Tensor) -> Tensor:
    with torch.inference_mode():
        return x.clone()


def _params() -> list:
    params = []
    for case in CASES:
        for name in MODEL_NAMES:
            s = subject(name)
            if not case.applies(s):
                continue
            for method in s.methods:
                params.append(pytest.param(case, name, method, id=f"{case.id}-{name}-{method}"))
    return params


@pytest.mark.parametrize(("case", "name", "method"), _params())
def test_input_case(case: Case, name: str, method: str) -> None:
    """One odd input through one model's forward / explain: a correct result or an error naming the problem."""
    s = subject(name)
    plain = call(s.model, method, s.good)
    if case.setup is not None:
        case.setup(s)
    try:
        bad = case.make(s.good, s)
        if case.id == "huge_finite_values_1e20":
            _huge_values(s, method, bad)
            return
        expect = case.expectation(s)
        if isinstance(expect, Error):
            with pytest.raises(expect.kind, match=expect.match) as info:
                call(s.model, method, bad)
            assert type(s.model).__name__ in str(info.value), "the message must name the model"
        else:
            result = call(s.model, method, bad)
            if expect.check is not None:
                expect.check(result, plain, s, method)
    finally:
        s.model.float()


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if "explain" in subject(n).methods])
def test_explain_under_inference_mode_then_outside_it(name: str) -> None:
    """Buffers a model keeps between calls (workspaces, cached operators) made under torch.inference_mode() must not
    break the calls after it, which may write them in place."""
    s = subject(name)
    with torch.inference_mode():
        inside = s.model.explain(s.good)
    with torch.no_grad():
        after = s.model.explain(s.good)
    torch.testing.assert_close(after.attributions, inside.attributions, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.model.explain(s.good).attributions.detach(), inside.attributions, rtol=1e-5,
                               atol=1e-5)


def _huge_values(s: Subject, method: str, bad: Tensor) -> None:
    """Values of 1e20 where normalised data is expected: a finite, locally accurate result or an overflow error."""
    try:
        result = call(s.model, method, bad)
    except ValueError as e:
        assert "overflows" in str(e) and type(s.model).__name__ in str(e)
        return
    out = output_of(result)
    assert bool(torch.isfinite(out).all()), "a non-finite result must be an error"
    if isinstance(result, Explanation):
        # float32 rounding scales with the values: local accuracy relative to the largest term.
        scale = max(result.attributions.abs().max().item(), out.abs().max().item(), 1.0)
        assert result.local_accuracy_error() <= 1e-4 * scale


def test_catalogue_has_at_least_thirty_distinct_cases() -> None:
    """The issue's bar: at least 30 distinct bad inputs."""
    assert len({c.id for c in CASES}) == len(CASES) >= 30


# ---------------------------------------------------------------------------------------------------- streaming
STREAMED = ["shallow", "deep", "conv", "icnn", "capsnet"]


@pytest.mark.reliability("inputs", per="function")
@pytest.mark.parametrize("name", STREAMED)
@pytest.mark.parametrize("method", ["forward", "explain"])
def test_large_batch_streams_in_chunks_with_the_same_result(name: str, method: str, monkeypatch) -> None:
    """A batch larger than the memory budget allows runs chunk by chunk (never all at once) with the same result."""
    s = subject(name)
    x = torch.cat([s.good] * 6)  # 24 samples
    seen: list[int] = []

    def spy(t, *args, **kwargs):  # every model validates what it computes on: record the batch sizes
        seen.append(t.shape[0])
        return check_input(t, *args, **kwargs)

    for module in (shapnets._tabular, shapnets.conv, shapnets.capsnet, shapnets.icnn):
        monkeypatch.setattr(module, "check_input", spy)
    with torch.no_grad():
        whole = call(s.model, method, x)
        assert seen == [len(x)]
        seen.clear()
        per_sample = s.model.working_elements(x) * x.element_size()
        monkeypatch.setattr(s.model, "memory_budget", 5 * per_sample)  # the automatic chunk: 5 samples
        chunked = call(s.model, method, x)
    assert seen == [5, 5, 5, 5, 4], f"chunks validated: {seen}"
    torch.testing.assert_close(output_of(chunked), output_of(whole), rtol=1e-5, atol=1e-6)
    if isinstance(chunked, Explanation):
        torch.testing.assert_close(chunked.attributions, whole.attributions, rtol=1e-5, atol=1e-6)
        assert set(chunked.extras) == set(whole.extras)
        chunked.check_local_accuracy()


@pytest.mark.reliability("inputs", per="function")
@pytest.mark.parametrize("name", STREAMED)
def test_training_mode_never_splits_the_batch(name: str) -> None:
    """In training the batch stays whole (batch statistics, one autograd graph)."""
    s = subject(name)
    s.model.train()
    s.model.chunk_size = 1
    try:
        assert s.model.chunk_rows(s.good) is None
    finally:
        s.model.eval()
        s.model.chunk_size = None


def test_conv_memory_estimate_bounds_a_224px_chunk() -> None:
    """At 224x224 the automatic chunk stays within the budget (a batch of thousands would need tens of GB)."""
    model = ConvShapNet(in_chans=3, num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)  # no pixel at the reference: the skip path's estimate is the dense one
    rows = model.chunk_rows(x)
    per_sample = model.working_elements(x) * x.element_size()
    assert rows >= 1 and rows * per_sample <= model.memory_budget
    assert per_sample * 10_000 > 10 * model.memory_budget  # a 10,000-image batch would not fit in one go


@pytest.mark.parametrize("kernel_size", [2, 3])
def test_conv_skip_path_estimate_bounds_its_coalition_tensors(kernel_size: int, monkeypatch) -> None:
    """On images with background, the skip path's estimate is far below the dense one and still bounds the
    coalition tensors it really builds (every first-hidden-layer input and the output of the layers after it)."""
    torch.manual_seed(0)
    model = ConvShapNet(in_chans=2, num_classes=3, channels=(4, 6), kernel_size=kernel_size, hidden=(8, 5)).eval()
    x = torch.zeros(6, 2, 20, 20)  # reference 0: the background
    x[:, :, 5:12, 4:13] = torch.randn(6, 2, 7, 9)  # a dense blob of ~20% of the pixels per image
    x[:, :, 15, 2::3] = torch.randn(6, 2, 6)  # and scattered pixels
    sizes: list[int] = []
    rest = type(model.stages[0].bank)._rest_grouped

    def spy(bank, h, *args, **kwargs):
        out = rest(bank, h, *args, **kwargs)
        sizes.append(h.numel() + out.numel())
        return out

    monkeypatch.setattr(type(model.stages[0].bank), "_rest_grouped", spy)
    with torch.no_grad():
        model.explain(x, layers=True).check_local_accuracy()
    per_sample = model.working_elements(x)
    model.skip_inactive = False
    assert per_sample * 3 < model.working_elements(x), "the skip path's estimate should be well below the dense one"
    assert max(sizes) * 2 <= per_sample * len(x), f"coalition tensors {max(sizes)} vs estimate {per_sample * len(x)}"


def test_bad_chunk_size_is_named() -> None:
    """`chunk_size` must be a positive number of samples."""
    model = DeepShapNet(6, 3).eval()
    model.chunk_size = 0
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1"):
        model(torch.randn(4, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_needs_every_value_finite_not_the_sum(dtype: torch.dtype) -> None:
    """The one-reduction finiteness check: a NaN or inf anywhere is caught, finite values whose sum overflows
    (float32 max 3.4e38, float16 65504) are not mistaken for a non-finite input."""
    big = torch.finfo(dtype).max
    finite = torch.full((64, 12), big / 2, dtype=dtype)  # its sum overflows in dtype
    assert all_finite([finite, torch.zeros(0, dtype=dtype), -finite])
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = finite.clone()
        broken[7, 3] = bad
        assert not all_finite([torch.ones(3, dtype=dtype), broken])
    with pytest.raises(ValueError, match="1 non-finite"):
        x = torch.randn(4, 30, dtype=dtype)
        x[2, 5] = float("nan")
        check_input(x, [(None, 30)], "model")
    assert check_input(torch.full((4, 30), big, dtype=dtype), [(None, 30)], "model") is not None
