"""Shapley modules: exact Shapley values of a small inner network, computed in its forward pass.

Shapley Explanation Networks (Wang, Wang, Inouye, ICLR 2021), https://arxiv.org/abs/2104.02297

A Shapley module wraps an inner function `f` of `k` players (each a `C_in`-channel vector) and
returns, instead of `f(x)`, the Shapley values of the baseline game `v(S) = f(x_S ; r_not_S)`.
It evaluates `f` on all `2^k` coalitions in one batched call and combines the values with a fixed
linear map, so explanations cost one (enlarged) forward pass and are exact.

Two implementations share the coalition machinery of `shapnets.coalitions`:

* `ShapleyModule` wraps any `nn.Module` inner (the general form; one module).
* `ShapleyModuleBank` holds `G` independent MLP inners of the same arity with stacked weights and
  evaluates all of them in one batched computation (used by Shallow, Deep and Conv ShapNets, where
  the original code looped over modules in Python).

Both use the *first-layer fast path*: when the inner starts with a linear layer, each player is
projected once and every coalition's pre-activation is a masked sum of projections, so the first
layer costs `k` projections instead of `2^k` (identical results up to floating-point rounding).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ._validation import check_input, check_reference, finite_output
from .coalitions import (
    _signed_weights,
    cached_table,
    coalition_masks,
    coalition_table,
    shapley_from_values,
    signed_weights,
)
from .explanation import Explanation

if TYPE_CHECKING:
    from .interactions import Interactions

__all__ = [
    "MAX_PLAYERS",
    "ShapleyModule",
    "ShapleyModuleBank",
    "coalition_masks",
    "compile_coalitions",
    "evaluation_stats",
    "shapley_from_values",
]

#: Largest arity a Shapley module accepts by default: 2^16 coalitions per sample.
MAX_PLAYERS = 16


def off_zero(values: Tensor) -> Tensor:
    """Bool `(...)`: the rows of `values` `(..., C)` with a channel other than 0 (players off the reference, for
    offsets). A sum of absolute values is 0 exactly when every term is, and over a few channels it takes ~0.4x the
    time of `ne(0).any(-1)` on the CPU; one channel is one comparison."""
    values = values.detach()  # a mask: nothing for autograd to record
    return values[..., 0].ne(0) if values.shape[-1] == 1 else values.abs().sum(-1).ne(0)


def _null_players_exactly_zero(phi: Tensor, delta: Tensor, present: Tensor | None = None) -> Tensor:
    """Zero the Shapley values of players at the reference (offset exactly 0), keeping their gradients.

    Such a player is null in its module's game (adding it changes no coalition), so its value is 0 in exact
    arithmetic; in floating point, a matrix product may round two equal columns differently (by position in the
    kernel's blocking) and leave ~1e-18. Missingness is a guarantee, so it is enforced: the forward value is exactly
    `phi - phi = 0`, and the gradient (its value moves once the player leaves the reference) is phi's own.
    """
    # (..., G, k, 1); `present` (any shape with those elements), when the caller has computed it already.
    present = off_zero(delta)[..., None] if present is None else present.reshape(*phi.shape[:-1], 1)
    if phi.requires_grad:
        return torch.where(present, phi, phi - phi.detach())
    return phi.masked_fill(~present, 0.0)


@cached_table(maxsize=16)
def _active_slots(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For every pattern `t` of active slots (bit j: slot j), slot-major `(k, 2^k)`: column `t` holds its active
    slots in order (then the others); and how many are active, `(2^k,)` uint8."""
    bits = (torch.arange(2**k)[:, None] >> torch.arange(k)) & 1
    slots = torch.argsort(1 - bits, dim=1, stable=True)
    return slots.T.contiguous().to(device), bits.sum(1).to(device=device, dtype=torch.uint8)


def modules_by_active_count(pattern: Tensor, k: int) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Group modules by how many of their `k` players are off the reference (for `ShapleyModuleBank.shapley_sums`).

    Args:
        pattern: `(A,)` integer, bit `j` set where player slot `j` of the module is off the reference (non-zero).

    Yields:
        `(k', chosen, slots)` for every `k' >= 1` present: `chosen` `(m,)` the modules with `k'` active players,
        `slots` `(k', m)` their active slots, increasing down each column.
    """
    # index_select, not tensor[index]: on 1-D gathers of this size the advanced-indexing kernel is ~4x slower.
    slot_table, count_table = _active_slots(k, pattern.device)
    pattern = pattern.long()
    per_module = count_table.index_select(0, pattern)  # uint8
    # One stable sort of the small counts (a few passes over bytes) instead of a scan and a nonzero per count, ~7x
    # faster; stable, so each group keeps the modules in their order.
    order = torch.sort(per_module, stable=True).indices
    sizes = torch.bincount(per_module, minlength=k + 1).tolist()
    start = sizes[0]  # modules without an active player (callers list none) sort first and are left out
    for count in range(1, k + 1):
        if sizes[count]:
            chosen = order[start: start + sizes[count]]
            start += sizes[count]
            yield count, chosen, slot_table[:count].index_select(1, pattern.index_select(0, chosen))


@cached_table(maxsize=64)
def _coalition_members(k: int, channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`(k C, 2^k - 1, 1)`: 1 where input row `(player, channel)` belongs to non-empty coalition `t` (read-only)."""
    masks = coalition_masks(k, device, dtype)[1:]
    return rearrange(masks, "t k -> k 1 t 1").expand(k, channels, 2**k - 1, 1).reshape(k * channels, 2**k - 1, 1)


@cached_table(maxsize=256)
def _coalition_tables(k: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The non-empty coalitions `(2^k - 1, k)` and the signed weights `(2^k, k)` in `dtype` (read-only)."""
    return coalition_masks(k, device, dtype)[1:], _signed_weights(k).to(device, dtype)


@functools.lru_cache(maxsize=64)
def _signed_weight_lists(k: int) -> list[list[float]]:
    """`signed_weights(k)` as nested lists, `[t][i]` (read-only)."""
    return _signed_weights(k).tolist()


def _check_arity(k: int, max_players: int) -> None:
    if not 1 <= k <= max_players:
        raise ValueError(
            f"a Shapley module needs 1 <= num_players <= {max_players} (2^k coalitions are evaluated), "
            f"got {k}; group the features into smaller modules or raise max_players"
        )


def _first_linear(inner: nn.Module) -> tuple[nn.Linear, nn.Module] | None:
    """Split `inner` into its leading `nn.Linear` and the rest, if it starts with one."""
    if isinstance(inner, nn.Linear):
        return inner, nn.Identity()
    if isinstance(inner, nn.Sequential) and len(inner) and isinstance(inner[0], nn.Linear):
        return inner[0], inner[1:]
    return None


# ---------------------------------------------------------------------------------------------
# ShapleyModule: one module, any inner
# ---------------------------------------------------------------------------------------------
class ShapleyModule(nn.Module):
    """A Shapley module around an arbitrary inner network.

    The inner network reads the `k` players flattened feature-major, `(B, k * C_in)`, and returns
    `(B, C_out)`. `forward` evaluates it once on the input; `explain` evaluates it on all `2^k`
    coalitions in one batched call and returns their exact Shapley values.

    Args:
        inner: the inner network `R^(k*C_in) -> R^(C_out)`. Layers that mix samples of a batch
            (BatchNorm in training mode) would make the coalitions interact and are not supported.
        num_players: `k`, the number of players.
        reference: the reference input: `None` (zeros), a number, a `(C_in,)` per-channel value, or a
            full `(k, C_in)` tensor. Stored as a buffer (saved, moved by `.to()`), not learned unless
            `learn_reference=True`.
        in_channels: `C_in`; inferred from a leading `nn.Linear` or from a full reference if omitted.
        learn_reference: make the reference an `nn.Parameter`.
        fast_path: use the first-layer fast path when the inner starts with `nn.Linear`.
        max_players: the largest `k` accepted.
    """

    def __init__(
        self,
        inner: nn.Module,
        num_players: int,
        reference: Tensor | float | None = None,
        in_channels: int | None = None,
        learn_reference: bool = False,
        fast_path: bool = True,
        max_players: int = MAX_PLAYERS,
    ) -> None:
        super().__init__()
        _check_arity(num_players, max_players)
        self.inner = inner
        self.num_players = num_players
        self.fast_path = fast_path
        split = _first_linear(inner)
        if in_channels is None and split is not None:
            if split[0].in_features % num_players:
                raise ValueError(
                    f"the inner's first Linear reads {split[0].in_features} features, not a multiple of "
                    f"num_players={num_players}"
                )
            in_channels = split[0].in_features // num_players
        if in_channels is None and isinstance(reference, Tensor) and reference.dim() == 2:
            in_channels = reference.shape[1]
        if in_channels is None:
            raise ValueError("cannot infer in_channels: pass in_channels= or a full (k, C_in) reference")
        if split is not None and split[0].in_features != num_players * in_channels:
            raise ValueError(
                f"the inner's first Linear reads {split[0].in_features} features but k * C_in = "
                f"{num_players} * {in_channels} = {num_players * in_channels}"
            )
        self.in_channels = in_channels
        # The reference lives with the inner network's parameters (dtype and device).
        param = next(iter(inner.parameters()), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else None
        ref = check_reference(reference, (num_players, in_channels), "ShapleyModule", dtype)
        if param is not None:
            ref = ref.to(param.device)
        if learn_reference:
            self.reference = nn.Parameter(ref)
        else:
            self.register_buffer("reference", ref)

    def _check(self, x: Tensor) -> Tensor:
        return check_input(x, [(None, self.num_players, self.in_channels)], "ShapleyModule", self)

    @finite_output
    def forward(self, x: Tensor) -> Tensor:
        """`f(x)`: one evaluation of the inner network. `x`: `(B, k, C_in)` -> `(B, C_out)`."""
        x = self._check(x)
        return self.inner(rearrange(x, "b k c -> b (k c)"))

    def coalition_values(self, x: Tensor) -> Tensor:
        """`f` on every coalition: `(B, k, C_in)` -> `(2^k, B, C_out)` in one batched call."""
        k = self.num_players
        masks = coalition_masks(k, x.device, x.dtype)
        delta = x - self.reference  # (B, k, C): exact zeros where a player sits at the reference
        split = _first_linear(self.inner) if self.fast_path else None
        if split is not None:
            # Fast path: W z_t + b = W r + b + sum_j m_tj W_j (x_j - r_j); project each player once.
            linear, rest = split
            w = rearrange(linear.weight, "h (k c) -> k c h", k=k)
            at_reference = torch.einsum("kc,kch->h", self.reference.to(x.dtype), w)
            if linear.bias is not None:
                at_reference = at_reference + linear.bias
            projected = torch.einsum("bkc,kch->bkh", delta, w)
            pre = torch.einsum("tk,bkh->tbh", masks, projected) + at_reference
            values = rest(rearrange(pre, "t b h -> (t b) h"))
        else:
            hybrids = self.reference + masks[:, None, :, None] * delta  # (2^k, B, k, C)
            values = self.inner(rearrange(hybrids, "t b k c -> (t b) (k c)"))
        return rearrange(values, "(t b) o -> t b o", t=2**k)

    @finite_output
    def explain(self, x: Tensor) -> Explanation:
        """Exact Shapley values of the inner network at `x`.

        Returns:
            An `Explanation` with attributions `(B, k, C_out)`, base `f(r)` and output `f(x)`.
        """
        x = self._check(x)
        values = self.coalition_values(x)
        return Explanation(
            attributions=shapley_from_values(values, self.num_players),
            base=values[0],
            output=values[-1],
            reference=self.reference,
            player_axes=("player",),
            exact=True,
            method="ShapleyModule",
        )

    def interactions(self, x: Tensor, max_order: int | None = None, kind: str = "and") -> Interactions:
        """Exact Harsanyi dividends (or OR interactions) and pairwise Shapley interaction indices of the inner at `x`.

        From the same `2^k` coalition values as `explain` (no extra evaluation): the dividends of every
        non-empty subset of the `k` players and the `(k, k)` interaction index (Shapley values on its diagonal).

        Args:
            x: `(B, k, C_in)`.
            max_order: list only subsets of at most this many players.
            kind: `"and"` (Harsanyi dividends) or `"or"` (OR interactions, `shapnets.and_or`); for `"and_or"` use
                `shapnets.exact_interactions` on the inner (its split needs the whole game, also available here).

        Returns:
            `Interactions` with dividends `(B, S, C_out)`, sii `(B, k, k, C_out)`, base `f(r)`, output `f(x)`.
        """
        from .interactions import Interactions  # deferred: Interactions is only needed by this method

        return Interactions.from_coalition_values(self.coalition_values(self._check(x)), max_order, kind,
                                                  method="ShapleyModule")


def _one_layer_phi(
    projected: Tensor,
    base: Tensor,
    act: Callable[..., Tensor],
    weights: Tensor,
    values: Tensor | None = None,
    out: Tensor | None = None,
    exact_zeros: bool = True,
) -> Tensor:
    """Shapley values of `act(base + sum_{j in S} p_j)` for `projected` `(k, m, C)` (see `shapley_from_projections`).

    `weights` is `(k, 2^(k-1))` (the Shapley weights of the coalitions without player i). With `values` (a
    `(2^k, m, C)` buffer) and `out` (`(k, m, C)`), works in place without autograd, `weights` is then the signed
    `(k, 2^k)` matrix and `act` is called as `act(tensor, may_overwrite)`; otherwise out of place and differentiable.
    """
    k = projected.shape[0]
    if values is None:
        v = base.expand(1, *projected.shape[1:])
        for j in range(k):
            v = torch.cat([v, v + projected[j]])  # rows with bit j set: the same coalitions plus player j
        v = act(v)
    else:
        # In place, for speed: one product with the signed weights reads the 2^k values once (taking differences
        # first reads them k times). A player whose projection is exactly 0 in a channel does not change that
        # channel's value in any coalition, so its value there is exactly 0: enforced after the product, whose
        # rounding would leave ~1e-8 (float32) of `w v(S + i) - w v(S)`.
        v = values
        v[0] = base
        for j in range(k):
            torch.add(v[: 1 << j], projected[j], out=v[1 << j : 2 << j])
        v = act(v, True)
        torch.mm(weights, v.view(1 << k, -1), out=out.view(k, -1))
        return out.masked_fill_(projected == 0, 0.0) if exact_zeros else out
    phis = []
    for i in range(k):
        # Rows t = hi * 2^(i+1) + bit_i * 2^i + lo, as in _ShapleyCombine: bit_i pairs S with S + i.
        pairs = v.view(1 << (k - 1 - i), 2, 1 << i, -1)
        diff = (pairs[:, 1] - pairs[:, 0]).view(1 << (k - 1), -1)
        phis.append((weights[i] @ diff).view(projected.shape[1:]))
    return torch.stack(phis)


def _fused_one_layer_phi(projected: Tensor, base: Tensor, signed: Tensor, kind: str, slope: float) -> Tensor:
    """`_one_layer_phi` written as one pointwise expression, for `torch.compile` to fuse into a single loop.

    The `2^k` coalition values of an element are built (by doubling), activated and combined in registers: the
    compiled kernel reads the `k` projections and writes the `k` Shapley values, nothing else.
    """
    k = projected.shape[0]
    values = [base.expand_as(projected[0])]
    for j in range(k):
        values = values + [v + projected[j] for v in values]
    if kind == "leaky_relu":
        values = [F.leaky_relu(v, slope) for v in values]
    elif kind == "relu":
        values = [F.relu(v) for v in values]
    else:
        values = [F.gelu(v, approximate=kind.removeprefix("gelu_")) for v in values]
    phis = []
    for i in range(k):
        phi = signed[i, 0] * values[0]
        for t in range(1, 1 << k):
            phi = phi + signed[i, t] * values[t]
        phis.append(torch.where(projected[i] == 0, 0.0, phi))  # exactly 0, as in _one_layer_phi
    return torch.stack(phis)


def _fused_two_layer_phi(offsets: Tensor, w1: Tensor, at_reference: Tensor, w2: Tensor, signed: list[list[float]],
                         kind: str, slope: float) -> Tensor:
    """Shapley values of two-layer inners `Linear(k C, h) -> act -> Linear(h, O)`, as one unrolled expression.

    For `torch.compile` to fuse into one loop over `(G, n)` elements: every hidden unit of every coalition is built
    by doubling (`a + sum_{j in S} p_j`), activated and projected onto the `O` outputs in registers, so the
    `(G, h, 2^k n)` hidden activation is never written (the eager `shapley_grouped` writes and reads it). Unrolled
    over coalitions, hidden units and outputs: meant for small inners (`ShapleyModuleBank.fused_unroll`).

    Args:
        offsets: `(k, G, C, n)`: `x - reference` of input `c` of player `j` of every module (any strides).
        w1: `(k, C, h, G, 1)` first-layer weights; `at_reference`: `(h, G, 1)` its pre-activation at the reference.
        w2: `(h, O, G, 1)` second-layer weights (its bias cancels out of every Shapley difference).
        signed: `(k, 2^k)` nested list, `phi_i = sum_t signed[i][t] v(t)` (`coalitions.signed_weights(k).T`).
        kind, slope: the activation (`ShapleyModuleBank._pointwise_kind`) and LeakyReLU's slope.

    Returns:
        `(k O + O, G, n)`: row `i O + o` is player `i`'s value for output `o` (exactly 0 where all its offsets are
        0); the last `O` rows are the value at `x` without the last bias.
    """
    k, _, C, _ = offsets.shape
    h, outputs = w1.shape[2], w2.shape[1]
    projections = [[sum(w1[j, c, u] * offsets[j, :, c] for c in range(C)) for u in range(h)] for j in range(k)]
    pre = [[at_reference[u].expand_as(offsets[0, :, 0]) for u in range(h)]]
    for j in range(k):
        pre = pre + [[v[u] + projections[j][u] for u in range(h)] for v in pre]
    if kind == "leaky_relu":
        act = [[F.leaky_relu(v, slope) for v in units] for units in pre]
    elif kind == "relu":
        act = [[F.relu(v) for v in units] for units in pre]
    else:
        act = [[F.gelu(v, approximate=kind.removeprefix("gelu_")) for v in units] for units in pre]
    values = [[sum(w2[u, o] * units[u] for u in range(h)) for o in range(outputs)] for units in act]
    rows = []
    for i in range(k):
        null = offsets[i, :, 0] == 0
        for c in range(1, C):
            null = null & (offsets[i, :, c] == 0)
        for o in range(outputs):
            phi = signed[i][0] * values[0][o]
            for t in range(1, 1 << k):
                if signed[i][t]:
                    phi = phi + signed[i][t] * values[t][o]
            rows.append(torch.where(null, 0.0, phi))  # exactly 0, as in the eager paths
    return torch.stack(rows + values[-1])


_COMPILED: dict[str, Callable[..., Tensor] | None] = {}
_KERNELS = {"fn": _fused_one_layer_phi, "two": _fused_two_layer_phi}


def _compiled(name: str = "fn") -> Callable[..., Tensor] | None:
    """The compiled kernel `name` (`"fn"`: `_fused_one_layer_phi`, `"two"`: `_fused_two_layer_phi`; built once per
    process, compiled code is cached on disk by torch's inductor), or None where torch.compile is unavailable (a
    warning is given once)."""
    if name not in _COMPILED:
        try:
            _COMPILED[name] = torch.compile(_KERNELS[name], dynamic=True)
        except Exception as error:  # any failure means: no compiler here, use eager
            _compile_failed(error)
    return _COMPILED[name]


def _compile_failed(error: BaseException) -> None:
    import warnings

    if "failed" in _COMPILED:
        return
    _COMPILED.update(dict.fromkeys([*_KERNELS, "failed"], None))
    warnings.warn(f"ShapleyModuleBank: torch.compile is not usable here ({type(error).__name__}: {error}); "
                  "using the eager coalition path", RuntimeWarning, stacklevel=3)


def compile_coalitions(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Use the `torch.compile`d coalition kernels in every `ShapleyModuleBank` of `model` (no-grad only).

    Two kernels: one-layer inners (`hidden=()`, Conv ShapNets; `shapley_from_projections`) and small two-layer
    inners (Shallow ShapNets' `shapley_grouped`, up to `ShapleyModuleBank.fused_unroll` unrolled terms); other
    banks keep the eager path. Optional: the first call compiles (seconds to minutes on a CPU, longest for wide
    inners; the kernels are then cached on disk), and where no compiler works the banks fall back to the eager
    path with one warning. Results equal the eager path's up to rounding, and a player at the reference still
    gets exactly 0. A Shallow ShapNet whose inners have one hidden layer explains through its two-product path
    instead (`ShallowShapNet.dense_limit`), which was faster on the CPU rows measured. Returns `model`.
    """
    for bank in model.modules():
        if isinstance(bank, ShapleyModuleBank):
            bank.compiled = enabled
    return model


# ---------------------------------------------------------------------------------------------
# ShapleyModuleBank: G modules of equal arity with MLP inners, one batched computation
# ---------------------------------------------------------------------------------------------
def evaluation_stats(model: nn.Module, reset: bool = False) -> dict[str, int]:
    """Sum the evaluation counters of every `ShapleyModuleBank` in `model` (optionally zero them).

    Returns `module_evals`, `module_evals_skipped`, `coalition_evals`, `coalition_evals_skipped`:
    what a dense computation would have evaluated and how much of it was skipped.
    """
    total = dict.fromkeys(("module_evals", "module_evals_skipped", "coalition_evals", "coalition_evals_skipped"), 0)
    for bank in model.modules():
        if isinstance(bank, ShapleyModuleBank):
            for key, value in getattr(bank, "stats", {}).items():
                total[key] += value
            if reset:
                bank.reset_stats()
    return total


def kept_buffer(owner: nn.Module, like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An uninitialised `shape` tensor (dtype and device of `like`) carved from a buffer `owner` keeps between calls.

    For the largest tensor of a no-grad computation (a coalition tensor): allocated fresh each call, the CPU allocator
    hands back untouched pages and every 4 KB costs a page fault (about as much as the GELU on it). Kept, it is
    reused: the buffer grows to the largest request seen, up to `WORKSPACE_LIMIT` bytes (larger tensors are
    allocated per call, so that a big image does not leave hundreds of MB held per stage). Not shared across
    threads: one model instance should not run inference from several threads at once.
    """
    size = math.prod(shape)
    if size * like.element_size() > WORKSPACE_LIMIT:
        return like.new_empty(shape)
    buffer = getattr(owner, "_workspace_buffer", None)
    if (buffer is None or buffer.numel() < size or buffer.dtype != like.dtype or buffer.device != like.device
            or (buffer.is_inference() and not torch.is_inference_mode_enabled())):
        # (A buffer made under torch.inference_mode() cannot be written outside it.)
        buffer = like.new_empty(size)
        owner._workspace_buffer = buffer
    return buffer[:size].view(shape)


class DenseOperator(NamedTuple):
    """A Shallow ShapNet bank's no-grad Shapley values as linear maps around one activation
    (`ShapleyModuleBank.dense_operator`).

    For `n` samples with offsets `X = x - r` flattened to `(n, D C)`: `Z = act(X @ first + shift)` holds every
    module's hidden layer on every non-empty coalition (`N = G (2^k - 1) h` columns, ordered module, coalition,
    unit), and `Z @ combine + constant` is `[phi | output]`, `(n, (D + 1) O)`: the Shapley values of every feature
    and output, then the bank's output. The same second map per module: `local[g] @ Z_g` gives module `g`'s `k + 1`
    rows of `O` values (its players' Shapley values, then its output), added onto rows `rows` of `[phi | output]`.

    Attributes:
        first: `(D C, N)`: column `(g, t, u)` sums the first-layer weights of coalition `t`'s players of module `g`.
        shift: `(N,)`: each column's pre-activation at the reference.
        combine: `(N, (D + 1) O)`: the output layer times each coalition's signed Shapley weight, per player, and the
            output layer on the full coalitions (last `O` columns).
        constant: `((D + 1) O,)`: the empty coalition's share of every player's value, and the output biases.
        base: `(O,)`: the bank's value at the reference.
        local: `(G, (k + 1) O, (2^k - 1) h)`: `combine` per module, on its own players.
        rows: `(G (k + 1) O,)`: the row of `[phi | output]` (`d O + o`, output `D O + o`) of every row of `local`.
        full: `(G h,)`: the columns of every module's full coalition (the forward's hidden layer).
        output_layer: `(O, G h)`: the output layers on those columns (the forward's logits, less the output biases,
            which are the last `O` entries of `constant`).
    """

    first: Tensor
    shift: Tensor
    combine: Tensor
    constant: Tensor
    base: Tensor
    local: Tensor
    rows: Tensor
    full: Tensor
    output_layer: Tensor


def _init_linear_(weight: Tensor, bias: Tensor, fan_in: int) -> None:
    # nn.Linear's default initialisation, per module of the bank.
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


WORKSPACE_LIMIT = 32 << 20  # bytes: the largest coalition buffer a bank keeps between no-grad calls


class ShapleyModuleBank(nn.Module):
    """`G` independent Shapley modules of arity `k`, each with its own MLP inner, run as one.

    Module `g`'s inner is `Linear(k*C_in, h_1) -> act -> ... -> Linear(h_n, C_out)` with weights
    stacked along a leading group axis, so all modules (and all their coalitions) are evaluated by a
    few batched `einsum`s instead of a Python loop. With `hidden=()` the inner is a single linear
    layer (whose Shapley values are simply `W_j (x_j - r_j)`).

    Set `num_groups=1` and put patches in the batch to share one module across positions (the
    convolutional ShapNet does that).

    Args:
        num_groups: `G`.
        num_players: `k`, the arity of every module.
        in_channels: `C_in` of each player.
        out_channels: `C_out` of each module.
        hidden: hidden widths of the inner MLP.
        act_layer: activation class between layers.
        max_players: the largest `k` accepted.
        output_bias: give the last layer a bias. A constant cancels out of every Shapley
            difference, so where only the Shapley values are used (Deep and Conv ShapNets discard
            the value at the reference) that bias would get an exactly-zero gradient: leave it out
            (unless `output_act`, after which the bias no longer cancels).
        output_act: apply the activation after the last layer too (the original ShapNets code's
            `Linear -> LeakyReLU` inner is `hidden=(), output_act=True`).
    """

    def __init__(
        self,
        num_groups: int,
        num_players: int,
        in_channels: int,
        out_channels: int,
        hidden: Sequence[int] = (32,),
        act_layer: Callable[[], nn.Module] = nn.GELU,
        max_players: int = MAX_PLAYERS,
        output_bias: bool = True,
        output_act: bool = False,
    ) -> None:
        super().__init__()
        _check_arity(num_players, max_players)
        self.output_act = output_act
        if num_groups < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(f"num_groups, in_channels, out_channels must be >= 1, got {num_groups}, "
                             f"{in_channels}, {out_channels}")
        self.num_groups, self.num_players = num_groups, num_players
        self.in_channels, self.out_channels = in_channels, out_channels
        widths = [num_players * in_channels, *hidden, out_channels]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            w = nn.Parameter(torch.empty(num_groups, fan_in, fan_out))
            b = nn.Parameter(torch.empty(num_groups, fan_out))
            _init_linear_(w, b, fan_in)
            self.weights.append(w)
            if output_bias or layer < len(widths) - 2:
                self.biases.append(b)
        self.act = act_layer()

    def extra_repr(self) -> str:
        widths = [self.weights[0].shape[1]] + [w.shape[2] for w in self.weights]
        act = ", output_act=True" if self.output_act else ""
        return f"groups={self.num_groups}, players={self.num_players}, mlp={'-'.join(map(str, widths))}{act}"

    def coalition_elements(self) -> int:
        """Elements of the widest activation over all coalitions of all groups, per sample (memory estimates)."""
        widest = max([self.weights[0].shape[1]] + [w.shape[2] for w in self.weights])
        return self.num_groups * (1 << self.num_players) * widest

    def bias(self, layer: int) -> Tensor | None:
        """Layer `layer`'s bias `(G, width)`, or None (the output layer without `output_bias`)."""
        return self.biases[layer] if layer < len(self.biases) else None

    def _first_layer_weight(self) -> Tensor:
        return rearrange(self.weights[0], "g (k c) h -> g k c h", k=self.num_players)

    def _at_reference(self, like: Tensor, reference: Tensor | None = None) -> Tensor:
        """The first layer's pre-activation at the reference: `(G, h_1)`, or `(..., G, h_1)` for a batched one."""
        b = self.bias(0)
        at_reference = b if b is not None else like.new_zeros(self.num_groups, self.weights[0].shape[-1])
        if reference is None:
            return at_reference
        if reference.dim() < 3:
            raise ValueError(f"reference must be (..., G, k, C), got shape {tuple(reference.shape)}")
        players = (self.num_groups, self.num_players, self.in_channels)
        ref = reference.to(like.dtype).expand(*reference.shape[:-3], *players)
        # One batched product over the modules ((..., G, 1, k C) @ (G, k C, h_1)): an einsum costs ~10x its arithmetic
        # here in parsing and planning, and this runs once per call.
        projected = torch.matmul(ref.reshape(*ref.shape[:-2], 1, -1), self.weights[0].to(like.dtype))
        return at_reference + projected.squeeze(-2)

    def _rest(self, h: Tensor) -> Tensor:
        """Layers after the first one, on `(..., G, h_1)` pre-activations."""
        lead = h.shape[:-2]
        grouped = self._rest_grouped(rearrange(h.reshape(-1, *h.shape[-2:]), "n g h -> g h n"))
        return rearrange(grouped, "g o n -> n g o").reshape(*lead, self.num_groups, grouped.shape[1])

    def _workspace(self, like: Tensor, shape: tuple[int, ...]) -> Tensor:
        return kept_buffer(self, like, shape)

    def _rest_grouped(self, h: Tensor, overwrite: bool = False) -> Tensor:
        """Layers after the first one on group-major, feature-major pre-activations `(G, h_1, M)` -> `(G, C_out, M)`.

        In this layout every layer is one batched matrix product `W^T a` over the groups whose long side is the
        `M` samples x coalitions, with no copies between layers (a `(..., G, h)` layout makes each product permute
        its operand to `(G, ..., h)` and back, and with `C_out` = 2 outputs `a W` is a needle-thin product).
        """
        # Without autograd, the activation may overwrite its input (`overwrite`: the caller's buffer, or a layer output
        # of ours): the coalition tensor is the largest of the computation, and a fresh one of its size costs a page
        # fault per 4 KB on the CPU.
        for i in range(1, len(self.weights)):
            a = self._activate(h, overwrite or i > 1)
            w_t, b = self.weights[i].transpose(1, 2), self.bias(i)
            h = torch.baddbmm(b[:, :, None], w_t, a) if b is not None else torch.bmm(w_t, a)
        if self.output_act:
            h = self._activate(h, overwrite or len(self.weights) > 1)
        return h

    def _pointwise_kind(self) -> str | None:
        """The activation's name for the fused kernel (`leaky_relu`, `relu`, `gelu_none`, `gelu_tanh`), or None."""
        kind = type(self.act)
        if kind is nn.LeakyReLU:
            return "leaky_relu"
        if kind is nn.ReLU:
            return "relu"
        if kind is nn.GELU:
            return f"gelu_{self.act.approximate}"
        return None

    def _activate(self, h: Tensor, may_overwrite: bool) -> Tensor:
        """The activation, in place where `may_overwrite` and autograd is off (known elementwise activations only)."""
        if may_overwrite and not torch.is_grad_enabled():
            kind = type(self.act)
            if kind is nn.GELU:
                return torch.ops.aten.gelu_(h, approximate=self.act.approximate)
            if kind is nn.LeakyReLU:
                return F.leaky_relu_(h, self.act.negative_slope)
            if kind is nn.ReLU:
                return h.relu_()
        return self.act(h)

    def forward(self, x: Tensor) -> Tensor:
        """Every module's inner at its input: `(..., G, k, C_in)` -> `(..., G, C_out)`."""
        pre = torch.einsum("...gi,gio->...go", rearrange(x, "... g k c -> ... g (k c)"), self.weights[0])
        return self._rest(pre + self._at_reference(pre))

    def coalition_values(self, delta: Tensor, reference: Tensor | None = None) -> Tensor:
        """Every module's inner on every coalition: `(..., G, k, C)` -> `(2^k, ..., G, C_out)`.

        The bank works in offsets from the reference, so that callers can pad or prune in that
        space with exact zeros (a player whose offset is exactly 0 gets exactly 0).

        Args:
            delta: `x - reference` for the players of every module, `(..., G, k, C)`.
            reference: the reference, `(G, k, C)` or with leading axes broadcastable to `delta`;
                `None` means zero.
        """
        k, groups = self.num_players, self.num_groups
        batch = delta.shape[:-3]
        n = batch.numel()
        at_reference = self._at_reference(delta, reference)  # (G, h_1), or (..., G, h_1) per instance
        shared_base = at_reference.dim() == 2
        flat = delta.reshape(n, groups, k, delta.shape[-1])
        weight = rearrange(self._first_layer_weight(), "g k c h -> k g h c")
        projected = torch.matmul(weight, rearrange(flat, "n g k c -> k g c n"))  # (k, G, h_1, n)
        if shared_base:
            start = at_reference[:, :, None]  # (G, h_1, 1): broadcast, never materialised per sample
        else:
            start = rearrange(at_reference.expand(*batch, groups, -1).reshape(n, groups, -1), "n g h -> g h n")
        # Pre-activations of every coalition in the layout of _rest_grouped: coalition t (members = set bits of t)
        # is coalition t without its highest player plus that player's projection, one add per coalition.
        # With a shared reference the empty coalition is the same for every sample: it is evaluated once, as one
        # extra leading column of the same products (the same arithmetic as every other coalition, so that a player
        # at the reference gets exactly 0).
        lead = 1 if shared_base else 0
        hidden = projected.shape[2]
        if torch.is_grad_enabled() and (projected.requires_grad or start.requires_grad):
            coalitions = [start.expand(groups, -1, n)]
            for t in range(1, 2**k):
                top = t.bit_length() - 1
                coalitions.append(coalitions[t ^ (1 << top)] + projected[top])
            if shared_base:
                coalitions[0] = start
            pre = torch.cat([c.reshape(groups, hidden, -1) for c in coalitions], dim=2)
        else:  # written in place: the largest tensor of the computation is allocated once
            pre = self._workspace(projected, (groups, hidden, lead + (2**k - lead) * n))
            grid = pre[:, :, lead:].view(groups, hidden, 2**k - lead, n)  # grid[:, :, t - lead] = coalition t
            if shared_base:
                pre[:, :, 0] = start[:, :, 0]
            else:
                grid[:, :, 0] = start
            for t in range(1, 2**k):
                top = t.bit_length() - 1
                rest = t ^ (1 << top)
                torch.add(grid[:, :, rest - lead] if rest else start, projected[top], out=grid[:, :, t - lead])
        out = self._rest_grouped(pre, overwrite=True)  # (G, C_out, lead + coalitions x samples)
        values = rearrange(out[:, :, lead:], "g o (t n) -> t n g o", t=2**k - lead, n=n)
        if shared_base:
            # One copy into the final layout (a cat after the permute would copy every coalition twice).
            full = values.new_empty(2**k, n, groups, values.shape[-1])
            full[0] = rearrange(out[:, :, :1], "g o 1 -> 1 g o")
            full[1:] = values
            values = full
        return values.reshape(2**k, *batch, groups, values.shape[-1])

    def shapley_grouped(self, offsets: Tensor, reference: Tensor | None = None, *,
                        any_at_reference: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Exact Shapley values of every module, without autograd, in a group-major, sample-last layout.

        The inference form of `shapley` for a reference shared by all samples (Shallow ShapNets): the same values up
        to rounding, with fewer passes over the largest tensor. The first layer of every coalition is one batched
        product `[W_1 | a] [m_S * x ; 1]` (`a`: the pre-activation at the reference, folded in as a last column, so
        no bias is broadcast and added in a separate pass), the activation overwrites it in place, and the next
        layer reads it once; the `2^k` values of the `C_out` outputs (small) are then combined per player. The last
        layer's bias cancels out of every Shapley difference, so it is added only to the base and output values.
        A player whose offset is exactly 0 gets exactly 0.

        Args:
            offsets: `(G, k, C, n)`: `x - reference` of the `k` players of each of the `G` modules, for `n` samples.
            reference: the reference `(G, k, C)` (shared by all samples); `None` means zero.
            any_at_reference: False when the caller knows that no player sits exactly at the reference (it then
                skips the check that zeroes their values).

        Returns:
            `(phi, base, output)`: `(k, G, C_out, n)`, `(G, C_out)` (the value at the reference) and `(G, C_out, n)`
            (the value at `x`).

        Raises:
            ValueError: autograd would need the result (use `shapley`), or `offsets` has the wrong shape.
        """
        G, k, C = self.num_groups, self.num_players, self.in_channels
        if offsets.dim() != 4 or tuple(offsets.shape[:3]) != (G, k, C):
            raise ValueError(f"offsets must be (G={G}, k={k}, C={C}, n), got shape {tuple(offsets.shape)}")
        if torch.is_grad_enabled() and (offsets.requires_grad or any(p.requires_grad for p in self.parameters())):
            raise ValueError("shapley_grouped does not record gradients: call it under torch.no_grad() "
                             "(or use shapley(), which is differentiable)")
        if self.compiled and (fused := self._fused_grouped_kernel()) is not None:
            try:
                return self._shapley_grouped_fused(fused, offsets, reference)
            except Exception as error:  # a compiler failing on first use: fall back for good
                _compile_failed(error)
        n, coalitions, players = offsets.shape[-1], 2**k - 1, k * C
        columns = 1 + coalitions * n  # the empty coalition once (a shared reference), then every coalition x sample
        # Inputs of the first layer: column 0 is the empty coalition, then coalition t's offsets masked to its members;
        # the last row is the constant 1 that multiplies the folded-in pre-activation at the reference.
        member = _coalition_members(k, C, offsets.device, offsets.dtype)  # (k C, 2^k - 1, 1)
        inputs = offsets.new_empty(G, players + 1, columns)
        inputs[:, :players, 0] = 0
        inputs[:, players] = 1
        masked = inputs[:, :players, 1:].view(G, players, coalitions, n)
        torch.mul(offsets.reshape(G, players, 1, n), member, out=masked)
        at_reference = self._at_reference(offsets, None if reference is None else reference.to(offsets.dtype))
        first = torch.cat([rearrange(self.weights[0], "g i h -> g h i"), at_reference[:, :, None]], dim=2)
        last = len(self.weights) - 1
        deferred = self.bias(last) if last and not self.output_act else None
        h = offsets.new_empty(G, self.weights[-1].shape[-1], columns)  # every module's values
        # A few modules at a time, so that their hidden activations stay in cache from the product that writes them
        # through the activation to the product that reads them (on a CPU whose memory bandwidth is shared, a pass
        # over memory costs several times a pass over cache).
        step = max(1, self.grouped_chunk // (first.shape[1] * columns))
        for start in range(0, G, step):
            g = slice(start, min(G, start + step))
            if not last:
                a = torch.bmm(first[g], inputs[g], out=h[g])
            else:
                a = torch.bmm(first[g], inputs[g], out=self._workspace(offsets, (g.stop - start, first.shape[1],
                                                                                   columns)))
            for i in range(1, last + 1):
                a = self._activate(a, True)  # the workspace, or a layer output of ours
                w_t, b, out = self.weights[i][g].transpose(1, 2), self.bias(i), h[g] if i == last else None
                if b is None or (i == last and deferred is not None):
                    a = torch.bmm(w_t, a, out=out)
                else:
                    a = torch.baddbmm(b[g][:, :, None], w_t, a, out=out)
            if self.output_act and (activated := self._activate(a, True)) is not a:
                h[g] = activated
        values = h[:, :, 1:].view(G, h.shape[1], coalitions, n)  # values[:, :, t - 1]: coalition t
        phi = h.new_empty(k, G, h.shape[1], n)
        if k == 2:  # pairs, the common case: phi_{1,2} = ((v_12 - v_0) +- (v_1 - v_2)) / 2, five passes, not eight
            both, swap = values[:, :, 2] - h[:, :, :1], values[:, :, 0] - values[:, :, 1]
            torch.add(both, swap, out=phi[0])
            torch.sub(both, swap, out=phi[1])
            phi.mul_(0.5)
        elif k <= 4:  # differences first (k 2^(k-1) slices of (G, C_out, n)): the values are never copied
            weights = _signed_weight_lists(k)
            for i in range(k):
                for t in range(1 << i, 2**k):
                    if not t >> i & 1:
                        continue
                    rest = t ^ (1 << i)
                    diff = values[:, :, t - 1] - (values[:, :, rest - 1] if rest else h[:, :, :1])
                    if t == 1 << i:
                        torch.mul(diff, weights[t][i], out=phi[i])
                    else:
                        phi[i].add_(diff, alpha=weights[t][i])
        else:
            full = torch.cat([h[:, :, :1, None].expand(-1, -1, 1, n), values], dim=2)  # (G, C_out, 2^k, n)
            phi = torch.einsum("tk,gotn->kgon", signed_weights(k).to(full), full)
        # A player at the reference is null in its module's game: exactly 0 (the products may round equal columns
        # differently by ~1e-8 in float32).
        if any_at_reference:
            at_ref = offsets.eq(0).all(2)  # (G, k, n); with continuous features usually none: the fill is skipped
            if bool(at_ref.any()):
                phi.masked_fill_(rearrange(at_ref, "g k n -> k g 1 n"), 0.0)
        base, output = h[:, :, 0], values[:, :, coalitions - 1]
        if deferred is not None:
            base, output = base + deferred, output + deferred[:, :, None]
        return phi, base, output

    def dense_ready(self) -> bool:
        """Whether `dense_operator` applies: one hidden layer, a known pointwise activation, no output activation."""
        return len(self.weights) == 2 and not self.output_act and self._pointwise_kind() is not None

    def dense_columns(self) -> int:
        """`N` of this bank's `dense_operator`: hidden units of every module on every non-empty coalition."""
        return (2**self.num_players - 1) * self.num_groups * self.weights[0].shape[-1]

    @torch.no_grad()
    def dense_operator(self, index: Tensor, num_features: int, reference: Tensor, dtype: torch.dtype) -> DenseOperator:
        """This bank's Shapley values and output as linear maps around one activation (see `DenseOperator`).

        Every coalition's pre-activation is linear in the offsets (`a_g + sum_{i in S} W_gi (x_i - r_i)`) and, with
        one hidden layer, every Shapley value is linear in the hidden activations (the signed Shapley weights times
        the output layer). The first map is written out densely over the `D` features, the second both densely and
        per module: worth it where `D` is small enough that one large product beats `G` small ones and their passes
        (Shallow ShapNets on tabular data).

        Args:
            index: `(G, k)`: the features of every module's players.
            num_features: `D`.
            reference: the model's reference `(D, C)`.
            dtype: the operator's dtype (built in float64 or float32, then cast).

        Raises:
            ValueError: the bank is not `dense_ready` or `index` has the wrong shape.
        """
        G, k, C = self.num_groups, self.num_players, self.in_channels
        if not self.dense_ready():
            raise ValueError("dense_operator needs one hidden layer, a ReLU/LeakyReLU/GELU and no output activation")
        if tuple(index.shape) != (G, k):
            raise ValueError(f"index must be (G={G}, k={k}), got shape {tuple(index.shape)}")
        work = torch.float64 if dtype == torch.float64 else torch.float32
        w1 = rearrange(self.weights[0].to(work), "g (k c) h -> g k c h", k=k)
        w2 = self.weights[1].to(work)  # (G, h, O)
        h, out, D, T = w1.shape[-1], w2.shape[-1], num_features, 2**k - 1
        at_reference = self._at_reference(w1, reference.to(work)[index])  # (G, h)
        signed = signed_weights(k).to(work)  # (2^k, k): phi_i = sum_t signed[t, i] v_t
        groups = torch.arange(G, device=index.device)
        first = w1.new_zeros(D, C, G, T, h)
        local = w1.new_zeros(G, k + 1, out, T, h)
        for t in range(1, T + 1):
            for slot in range(k):
                if t >> slot & 1:  # player `slot` is in coalition t: its weights enter t's pre-activation
                    rearrange(first[:, :, :, t - 1], "d c g h -> d g c h").index_put_(
                        (index[:, slot], groups), w1[:, slot], accumulate=True)
                local[:, slot, :, t - 1] = signed[t, slot] * rearrange(w2, "g h o -> g o h")
        local[:, k, :, T - 1] = rearrange(w2, "g h o -> g o h")  # the full coalition is the output (its bias cancels)
        outputs = torch.arange(out, device=index.device)
        rows = torch.cat([index * out, index.new_full((G, 1), D * out)], 1)[:, :, None] + outputs  # (G, k + 1, O)
        combine = w1.new_zeros(G, T, h, (D + 1) * out)
        source = rearrange(local, "g r o t h -> g t h (r o)")
        combine.scatter_add_(3, rows.view(G, 1, 1, -1).expand(G, T, h, -1), source)
        empty = torch.einsum("gh,gho->go", self.act(at_reference), w2)  # every module's value at the reference
        output_bias = self.bias(1)
        output_bias = w2.new_zeros(G, out) if output_bias is None else output_bias.to(work)
        constant = w2.new_zeros(D + 1, out)
        for slot in range(k):
            constant.index_add_(0, index[:, slot], signed[0, slot] * empty)
        constant[D] = output_bias.sum(0)
        full = groups[:, None] * T * h + (T - 1) * h + torch.arange(h, device=index.device)  # the last coalition
        return DenseOperator(
            first=first.reshape(D * C, -1).to(dtype),
            shift=at_reference[:, None].expand(G, T, h).reshape(-1).to(dtype),
            combine=combine.reshape(G * T * h, -1).to(dtype),
            constant=constant.flatten().to(dtype),
            base=(empty + output_bias).sum(0).to(dtype),
            local=local.reshape(G, (k + 1) * out, T * h).to(dtype),
            rows=rows.flatten(),
            full=full.flatten(),
            output_layer=rearrange(w2, "g h o -> o (g h)").to(dtype),
        )

    def _fused_grouped_kernel(self) -> Callable[..., Tensor] | None:
        """The compiled two-layer kernel where this bank fits it (two layers, a pointwise activation, no output
        activation, at most `fused_unroll` unrolled terms), else None."""
        if len(self.weights) != 2 or self.output_act or self._pointwise_kind() is None:
            return None
        h, out = self.weights[0].shape[-1], self.weights[1].shape[-1]
        if h * out * 2**self.num_players > self.fused_unroll:
            return None
        return _compiled("two")

    def _shapley_grouped_fused(self, kernel: Callable[..., Tensor], offsets: Tensor, reference: Tensor | None
                               ) -> tuple[Tensor, Tensor, Tensor]:
        """`shapley_grouped` through `_fused_two_layer_phi` (`kernel`: it, compiled, or run eagerly in tests)."""
        k = offsets.shape[1]
        at_reference = self._at_reference(offsets, None if reference is None else reference.to(offsets.dtype))
        w1, w2 = self.weights[0].to(offsets.dtype), self.weights[1].to(offsets.dtype)
        signed = signed_weights(k).T.tolist()
        rows = kernel(rearrange(offsets, "g k c n -> k g c n"), rearrange(w1, "g (k c) h -> k c h g 1", k=k),
                      rearrange(at_reference, "g h -> h g 1"), rearrange(w2, "g h o -> h o g 1"), signed,
                      self._pointwise_kind(), float(getattr(self.act, "negative_slope", 0.0)))
        out = w2.shape[-1]
        phi = rearrange(rows[: k * out], "(k o) g n -> k g o n", k=k)
        # The value at the reference: one small product per module; the last bias cancels in phi.
        base = torch.einsum("gh,gho->go", self._activate(at_reference.clone(), True), w2)
        output = rearrange(rows[k * out:], "o g n -> g o n")
        last_bias = self.bias(1)
        if last_bias is not None:
            base, output = base + last_bias, output + last_bias[:, :, None]
        return phi, base, output

    #: Unrolled terms (hidden units x outputs x coalitions) up to which `compile_coalitions` fuses a two-layer bank.
    fused_unroll: int = 256
    #: Elements of the first hidden activation per chunk of modules in `shapley_grouped` (kept in cache).
    grouped_chunk: int = 1 << 22
    #: Use the compiled coalition kernel in `shapley_from_projections` (see `compile_coalitions`).
    compiled: bool = False
    #: Elements per coalition row of one chunk of `shapley_from_projections` (2^k rows are kept in cache together).
    projection_chunk: int = 1 << 14

    def shapley_from_projections(self, projected: Tensor, at_reference: Tensor, exact_zeros: bool = True) -> Tensor:
        """Exact Shapley values of a one-layer inner (`hidden=()`) from its players' projections.

        With one layer, coalition S's value is `act(a + sum_{j in S} p_j)`, where `p_j = W_j (x_j - r_j)` and `a` is
        the pre-activation at the reference, so the coalitions need no matrix product at all. Without `output_act`
        the inner is linear and `phi_j = p_j` exactly. With it, the `2^k` coalition values are built, activated and
        combined chunk by chunk (`projection_chunk` elements of every coalition at a time, so that the coalition
        axis lives in cache, never in memory): `2^k` values per element are never written out. Coalitions are built
        by doubling (`v(S + j) = v(S) + p_j`) and differences are taken before weighting, so a player whose
        projection is exactly 0 gets exactly 0.

        Args:
            projected: `(k, M, C_out)`: the projection `p_j` of every player of `M` module instances.
            at_reference: `(C_out,)`: the first layer's pre-activation at the reference (bias included).
            exact_zeros: make the value of a player exactly 0 wherever its projection is exactly 0 (one pass over
                the projections; without it such a value is only ~1e-8 in float32). A caller that knows no such
                value is used may skip it.

        Returns:
            `(k, M, C_out)` Shapley values (`projected` itself for a linear inner).
        """
        if len(self.weights) != 1:
            raise ValueError(f"shapley_from_projections needs a one-layer inner (hidden=()), this bank has "
                             f"{len(self.weights)} layers")
        k = self.num_players
        if projected.dim() != 3 or projected.shape[0] != k:
            raise ValueError(f"projected must be (k={k}, M, C_out), got shape {tuple(projected.shape)}")
        if not self.output_act:
            return projected  # a linear inner is additive: phi_j = W_j (x_j - r_j), exactly
        weights = coalition_table(k)[3].to(device=projected.device, dtype=projected.dtype)
        base = at_reference.to(projected.dtype)
        if torch.is_grad_enabled() and (projected.requires_grad or base.requires_grad):
            return _one_layer_phi(projected, base, self.act, weights)
        signed = signed_weights(k).T.to(device=projected.device, dtype=projected.dtype).contiguous()
        kind = self._pointwise_kind()
        if self.compiled and kind is not None and (fused := _compiled()) is not None:
            slope = getattr(self.act, "negative_slope", 0.0)
            try:
                return fused(projected, base, signed, kind, slope)
            except Exception as error:  # a compiler failing on first use: fall back for good
                _compile_failed(error)
        m, channels = projected.shape[1:]
        out = projected.new_empty(projected.shape)
        rows = max(1, self.projection_chunk // max(channels, 1))
        buffer = projected.new_empty(2**k * rows * channels)
        for start in range(0, m, rows):
            stop = min(m, start + rows)
            values = buffer[: 2**k * (stop - start) * channels].view(2**k, stop - start, channels)
            _one_layer_phi(projected[:, start:stop], base, self._activate, signed, values=values,
                           out=out[:, start:stop], exact_zeros=exact_zeros)
        return out

    def shapley(
        self, delta: Tensor, reference: Tensor | None = None, skip_inactive: bool = False,
        zero_null_players: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Exact Shapley values of every module (arguments as in `coalition_values`).

        Args:
            skip_inactive: evaluate only what a player's offset makes necessary: a module whose
                players all sit at the reference is not evaluated (its Shapley values are exactly 0),
                and a module with `z` players at the reference evaluates `2^(k-z)` coalitions instead
                of `2^k` (such players are dummies: their Shapley value is 0 and the others' values
                are those of the smaller game). Equal to the dense computation up to rounding.
                Counts are added to `self.stats`.
            zero_null_players: in the dense computation, set the value of every player whose offset is exactly
                0 to exactly 0 (rounding would leave ~1e-17). A caller that knows no such player's value is used
                (the conv layer, when only padding sits at the reference) may skip that pass over `delta`.

        Returns:
            `(phi, base, output)`: `(..., G, k, C_out)`, `(..., G, C_out)` (the value at the
            reference) and `(..., G, C_out)` (the value at `x`).
        """
        if skip_inactive:
            return self._shapley_skipping(delta, reference)
        values = self.coalition_values(delta, reference)
        self._count(delta.shape[:-2].numel(), delta.shape[:-2].numel() * 2**self.num_players, 0, 0)
        phi = shapley_from_values(values, self.num_players)
        return _null_players_exactly_zero(phi, delta) if zero_null_players else phi, values[0], values[-1]

    # ------------------------------------------------------------------ skipping inactive players
    stats: dict[str, int]
    #: Skip only when at least this fraction of the dense coalition evaluations can be skipped.
    skip_threshold: float = 0.3

    def reset_stats(self) -> None:
        """Zero the evaluation counters (`module_evals`, `coalition_evals` and their `*_skipped`)."""
        self.stats = dict.fromkeys(("module_evals", "module_evals_skipped", "coalition_evals",
                                    "coalition_evals_skipped"), 0)

    def _count(self, modules: int, coalitions: int, modules_skipped: int, coalitions_skipped: int) -> None:
        if not hasattr(self, "stats"):
            self.reset_stats()
        self.stats["module_evals"] += modules
        self.stats["coalition_evals"] += coalitions
        self.stats["module_evals_skipped"] += modules_skipped
        self.stats["coalition_evals_skipped"] += coalitions_skipped

    def _shapley_skipping(self, delta: Tensor, reference: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        k, G, C = self.num_players, self.num_groups, self.in_channels
        batch = delta.shape[:-3]
        flat = delta.reshape(-1, G, k, C)
        n = flat.shape[0]
        present = off_zero(flat)  # (n, G, k): which players differ from the reference
        needed = (2 ** present.sum(-1)).masked_fill(~present.any(-1), 0).sum()
        # Gathering costs more than it saves unless much can be skipped: below the threshold, go dense.
        if needed > (1 - self.skip_threshold) * n * G * 2**k:
            values = self.coalition_values(delta, reference)
            self._count(n * G, n * G * 2**k, 0, 0)
            phi = _null_players_exactly_zero(shapley_from_values(values, k), delta, present)
            return phi, values[0], values[-1]

        # Pre-activation at the reference: per group when the reference has no batch axes (every use here), else
        # per instance.
        at_reference = self._at_reference(flat, reference)
        per_instance = at_reference.dim() > 2
        if per_instance:
            at_reference = at_reference.expand(*batch, G, -1).reshape(n * G, -1)
        base = self._rest(at_reference)  # the module at its reference: (G, C_out) or (n*G, C_out)

        # Sort the instances by which players are active, so that each pattern is one contiguous piece: one gather
        # and one scatter in all (per-pattern gathers and scatters would each copy the full tensors in backward).
        pattern = (present.long() << torch.arange(k, device=delta.device)).sum(-1).flatten()  # (n*G,)
        order = torch.argsort(pattern, stable=True)
        patterns, counts = torch.unique_consecutive(pattern[order], return_counts=True)
        sizes = counts.tolist()
        pieces = flat.reshape(n * G, k, C).index_select(0, order).split(sizes)
        at_ref_pieces = at_reference.index_select(0, order).split(sizes) if per_instance else None
        phi_rows, phi_values, out_rows, out_values = [], [], [], []
        coalitions = 0
        for piece_index, (p, x_p, inst) in enumerate(zip(patterns.tolist(), pieces, order.split(sizes))):
            if p == 0:
                continue  # every player at the reference: phi = 0 and output = base, nothing to evaluate
            members = [j for j in range(k) if p >> j & 1]
            group = inst % G
            shared = at_reference[0] if G == 1 else at_reference[group]
            offset = at_ref_pieces[piece_index] if per_instance else shared
            h = self._subgame_values(x_p[:, members], members, None if G == 1 else group, offset)
            coalitions += len(inst) * 2 ** len(members)
            sub = shapley_from_values(h, len(members))  # (m, k', C_out)
            phi_rows.append((inst[:, None] * k + torch.tensor(members, device=delta.device)).flatten())
            phi_values.append(sub.reshape(-1, sub.shape[-1]))
            out_rows.append(inst)
            out_values.append(h[-1])
        out_channels = self.weights[-1].shape[-1]
        phi = flat.new_zeros(n * G * k, out_channels)
        base = base if per_instance else base.expand(n, G, out_channels).reshape(n * G, out_channels)
        output = base
        if phi_rows:
            phi = phi.index_copy(0, torch.cat(phi_rows), torch.cat(phi_values))
            output = output.index_copy(0, torch.cat(out_rows), torch.cat(out_values))
        total = n * G
        modules_done = int((pattern != 0).sum())
        self._count(total, total * 2**k, total - modules_done, total * 2**k - coalitions)
        return (
            phi.reshape(*batch, G, k, out_channels),  # explicit sizes: -1 is ambiguous for an empty batch
            base.reshape(*batch, G, out_channels),
            output.reshape(*batch, G, out_channels),
        )

    def _subgame_values(self, x: Tensor, members: list[int], group: Tensor | None, offset: Tensor) -> Tensor:
        """The inner on every coalition of the active players `members` only: `(m, k', C)` -> `(2^k', m, C_out)`.

        Args:
            x: the active players' offsets from the reference, `(m, k', C)`.
            members: which of the `k` player slots they are.
            group: `(m,)` module of each row, or `None` with one shared module (`G == 1`).
            offset: the first layer's pre-activation at the reference, `(h_1,)` or `(m, h_1)`.
        """
        w1 = self._first_layer_weight()
        if group is None:
            projected = torch.einsum("mkc,kch->mkh", x, w1[0, members])
        else:
            projected = torch.einsum("mkc,mkch->mkh", x, w1[group][:, members])
        masks = coalition_masks(len(members), x.device, x.dtype)
        h = torch.einsum("tk,mkh->tmh", masks, projected) + offset
        for i in range(1, len(self.weights)):
            wl, bl = self.weights[i], self.bias(i)
            if group is None:
                h = torch.einsum("tmi,io->tmo", self.act(h), wl[0])
            else:
                h = torch.einsum("tmi,mio->tmo", self.act(h), wl[group])
            if bl is not None:
                h = h + (bl[0] if group is None else bl[group])
        return self.act(h) if self.output_act else h

    def shapley_sums(self, rows: Tensor, modules: Sequence[tuple[Tensor, Tensor]],
                     reference: Tensor | None = None) -> Tensor:
        """Every row's Shapley values summed over the modules it plays in (one shared module, `G == 1`).

        Every row is a player off the reference; each module plays the game of its `k'` players that are (the
        other `k - k'` sit at the reference: dummies with Shapley value exactly 0, never evaluated), so a module
        evaluates `2^k'` coalitions and each player's value is added onto its row. The sparse form of `shapley` +
        a scatter-add, for Conv ShapNets: the work follows the active players, not the image.

        How (the work per module and the number of small operations both matter when pruning thins the players):
        every row is projected once for all `k` player slots (the first layer is linear); the caller groups the
        modules by their *number* `k'` of active players (`modules_by_active_count`), not by which slots, since
        the coalition sums of a module's gathered projections do not depend on the slots: at most `k` groups, each
        a few large products in a feature-major layout, and the Shapley combination is one product with the
        signed weights (the empty coalition, the reference, is the same for every module and evaluated once).

        Args:
            rows: `(R, C)` offsets from the reference, none of them all zero (a row at the reference must not be
                listed: as a player its value would be 0 only up to rounding, and missingness demands exactly 0).
            modules: one `(slots, players)` pair per group of modules with the same number `k'` of active players,
                slot-major: `slots` `(k', m)` long, which of the `k` player slots they are (increasing down each
                column), `players` `(k', m)` long, their rows.
            reference: the reference, broadcastable to `(1, k, C)`; `None` means zero.

        Returns:
            `(R, C_out)`: row `r`'s Shapley values summed over every module it is a player of.
        """
        if self.num_groups != 1:
            raise ValueError(f"shapley_sums evaluates one shared module, this bank has {self.num_groups} groups")
        offset = self._at_reference(rows, reference)[0]  # (h_1,)
        hidden, num_rows = offset.shape[0], rows.shape[0]
        # Every row's first-layer projection in each of the k slots, feature-major (h_1, k * R): column
        # slot * R + row (gathered columns need no transposing later).
        w1 = rearrange(self._first_layer_weight()[0], "k c h -> (h k) c")
        projected = (w1 @ rows.T).view(hidden, -1)
        empty = self._rest_grouped(offset[None, :, None])[0, :, 0]  # (C_out,) the module at the reference
        # Sums channel-major (C_out, R): row-major, the scatter-add is ~3x slower on the CPU.
        summed = rows.new_zeros(self.out_channels, num_rows)
        coalitions = done = 0
        for slots, players in modules:
            count, m = players.shape
            at = players.flatten()  # (k' m)
            gathered = projected.index_select(1, torch.add(at, slots.flatten(), alpha=num_rows)).view(hidden, count, m)
            masks, signed = _coalition_tables(count, rows.device, rows.dtype)  # (2^k' - 1, k'), (2^k', k')
            # Feature-major (h_1, 2^k' - 1, m): every later layer is one product over all modules and coalitions.
            pre = (masks @ gathered).add_(offset[:, None, None])
            values = self._rest_grouped(pre.view(1, hidden, -1), overwrite=True).view(-1, 2**count - 1, m)
            phi = signed[1:].T @ values + (empty[:, None] * signed[0])[:, :, None]  # (C_out, k', m)
            summed.index_add_(1, at, phi.view(-1, count * m))
            coalitions += m * 2**count
            done += m
        self._count(done, done * 2**self.num_players, 0, done * 2**self.num_players - coalitions)
        return summed.T.contiguous()

    def module(self, g: int) -> ShapleyModule:
        """A stand-alone `ShapleyModule` holding a copy of module `g`'s weights (for auditing)."""
        layers: list[nn.Module] = []
        for i, w in enumerate(self.weights):
            b = self.bias(i)
            lin = nn.Linear(w.shape[1], w.shape[2], bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w[g].T)
                if b is not None:
                    lin.bias.copy_(b[g])
            if i:
                layers.append(self.act)
            layers.append(lin)
        if self.output_act:
            layers.append(self.act)
        return ShapleyModule(nn.Sequential(*layers), self.num_players, in_channels=self.in_channels)
