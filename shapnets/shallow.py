"""Shallow ShapNet: a sum of Shapley modules over groups of features, exactly Shapley end to end.

Shapley Explanation Networks (Wang, Wang, Inouye, ICLR 2021), https://arxiv.org/abs/2104.02297

`g(x) = sum_j f_j(x_{A_j})`. By linearity of the Shapley value and the dummy-player axiom, the
Shapley value of feature i for the whole network is the sum of the Shapley values it receives from
the modules whose group contains it, so every explanation of a Shallow ShapNet is exact.

Groups: `"singles"` (a GAM, one module per feature), `"pairs"` (all D(D-1)/2 pairs; the original
code inferred D wrongly here and silently dropped modules), or any list of index tuples of mixed
arities, overlaps allowed. Modules of equal arity are evaluated as one `ShapleyModuleBank`.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from ._heads import drop_output_layer, renew_output_layer
from ._streaming import LIVE_COPIES, StreamedBatches, streamed
from ._tabular import TabularGame
from ._validation import finite_output
from .contract import no_layers, rename_args
from .explanation import Explanation
from .interactions import Interactions
from .modules import MAX_PLAYERS, ShapleyModuleBank, kept_buffer, off_zero

__all__ = ["ShallowShapNet", "make_groups"]

GroupSpec = str | Sequence[Sequence[int]]

#: Dtypes whose sparse CSR product the CPU build runs (MKL or torch's own kernel).
SPARSE_DTYPES = (torch.float32, torch.float64)


class _Linearised(NamedTuple):
    """A Shallow ShapNet's no-grad explain as products around one activation (the banks' `DenseOperator`s stacked).

    Attributes:
        first: `(N + 1, D C + 1)`: `[first^T | shift]` and a zero row (that hidden unit is set to 1 after the act).
        combine: `((D + 1) O, N + 1)`: `[combine^T | constant]`, dense or sparse CSR; None where the second map runs
            per module (`local`).
        base: `(O,)`: the value at the reference.
        constant: `((D + 1) O, 1)`: the constant of `[phi | output]`.
        local: per bank, its `DenseOperator.local` and `rows`.
        forward_first: `(M + 1, D C + 1)`: the rows of `first` of every module's full coalition (`M = sum G h`), and
            the zero row.
        forward_out: `(O, M + 1)`: every module's output layer, and the sum of their biases (the forward's logits).
    """

    first: Tensor
    combine: Tensor | None
    base: Tensor
    constant: Tensor
    local: tuple[tuple[Tensor, Tensor], ...]
    forward_first: Tensor
    forward_out: Tensor


def make_groups(groups: GroupSpec, in_features: int) -> list[tuple[int, ...]]:
    """Resolve a group specification into a list of feature-index tuples.

    Args:
        groups: `"singles"`, `"pairs"`, or a sequence of index tuples.
        in_features: `D`, the number of features.

    Raises:
        ValueError: unknown keyword, empty group, out-of-range or repeated index within a group.
    """
    if isinstance(groups, str):
        if groups == "singles":
            return [(i,) for i in range(in_features)]
        if groups == "pairs":
            if in_features < 2:
                raise ValueError(f'groups="pairs" needs at least 2 features, got {in_features}')
            return list(itertools.combinations(range(in_features), 2))
        raise ValueError(f'unknown groups {groups!r}: use "singles", "pairs" or a list of index tuples')
    resolved = []
    for group in groups:
        group = tuple(int(i) for i in group)
        if not group:
            raise ValueError("empty group in groups")
        if len(set(group)) != len(group):
            raise ValueError(f"group {group} repeats a feature")
        bad = [i for i in group if not 0 <= i < in_features]
        if bad:
            raise ValueError(f"group {group} has indices {bad} outside [0, {in_features})")
        resolved.append(group)
    if not resolved:
        raise ValueError("groups is empty")
    return resolved


class ShallowShapNet(StreamedBatches, TabularGame):
    """A Shallow ShapNet: exact Shapley values of the whole network in one forward pass.

    Args:
        in_features: `D`, the number of features (players).
        num_classes: number of outputs (classes). `0`: no head (timm's pooled features): the inner nets end at
            their last hidden layer, and `forward` returns its sum over the modules `(B, num_features)`, still
            explained exactly.
        groups: `"singles"`, `"pairs"` or a list of feature-index tuples (mixed arities, overlaps).
        hidden: hidden widths of every module's inner MLP.
        reference: the reference input: `None` (zeros: the training mean for standardized data), a
            number, or a `(D,)` / `(D, C)` tensor. A buffer: saved with the model, moved by `.to()`.
        in_channels: channels per feature (1 for tabular data).
        act_layer: activation of the inner MLPs.
        feature_names: optional names used in explanations and plots.
        max_players: the largest group size accepted.
        out_features: the old name of `num_classes`, accepted for one release with a `DeprecationWarning`.

    Input is `(B, D)` (when `in_channels == 1`) or `(B, D, C)`; `forward` returns `(B, num_classes)`.
    """

    # Old -> new constructor names, accepted for one release (shapnets.contract).
    renamed_args: ClassVar[dict[str, str]] = {"out_features": "num_classes"}

    def __init__(
        self,
        in_features: int,
        num_classes: int | None = None,
        groups: GroupSpec = "pairs",
        hidden: Sequence[int] = (32,),
        reference: Tensor | float | None = None,
        in_channels: int = 1,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        feature_names: Sequence[str] | None = None,
        max_players: int = MAX_PLAYERS,
        out_features: int | None = None,
    ) -> None:
        super().__init__()
        num_classes = rename_args(type(self), dict(num_classes=num_classes, out_features=out_features))["num_classes"]
        if num_classes is None:
            raise TypeError("ShallowShapNet needs num_classes (the number of outputs)")
        if in_features < 1 or num_classes < 0 or in_channels < 1:
            raise ValueError(f"in_features, in_channels must be >= 1 and num_classes >= 0 (0: no head), got "
                             f"{in_features}, {num_classes}, {in_channels}")
        self.num_classes = num_classes or 1  # without a head (0), one is built and dropped
        self.groups = make_groups(groups, in_features)
        self._init_game(in_features, in_channels, reference, feature_names)

        # One bank per arity: all modules of equal size run as one batched computation.
        arities = sorted({len(g) for g in self.groups})
        self.arities = arities
        self.banks = nn.ModuleList()
        for k in arities:
            members = [g for g in self.groups if len(g) == k]
            index = torch.tensor(members, dtype=torch.long)
            self.register_buffer(f"index_{k}", index, persistent=False)
            # The same players player-major, the row order of the grouped path's values (`_explain_grouped`).
            self.register_buffer(f"players_{k}", index.T.flatten(), persistent=False)
            self.banks.append(
                ShapleyModuleBank(len(members), k, in_channels, self.num_classes, hidden, act_layer, max_players)
            )
        if num_classes == 0:
            self.reset_classifier(0)

    @property
    def out_channels(self) -> int:
        """Output channels: `num_classes`, or `num_features` without a head."""
        return self.num_classes or self.num_features

    # ------------------------------------------------------------------ timm's model interface
    # The head is the output layer of every module's inner net: each module still plays only on its group, so the
    # network stays a sum of module games and every explanation stays exact, whatever the head's weights.
    @property
    def num_features(self) -> int:
        """The width of the inner nets' last hidden layer (what the output layers read).

        Raises:
            ValueError: the inner nets have no hidden layer (`hidden=()`): the output layer is the whole inner.
        """
        bank = self.banks[0]
        if not self.num_classes:
            return bank.out_channels
        if len(bank.weights) < 2:
            raise ValueError(f"{type(self).__name__} with hidden=() has no features: each inner net is one "
                             "linear layer, its head")
        return int(bank.weights[-1].shape[1])

    @property
    def head_hidden_size(self) -> int:
        """timm's width before the classifier: `num_features`."""
        return self.num_features

    def get_classifier(self) -> nn.Module:
        """The module banks: the head is their inner nets' output layers (`banks.*.weights.-1`, `biases.-1`)."""
        return self.banks

    def reset_classifier(self, num_classes: int) -> None:
        """Freshly initialised output layers with `num_classes` outputs in every module's inner net (`0`: none).

        Every hidden layer keeps its weights. With `num_classes=0` each inner net ends at its last hidden layer
        (activated) and `forward` returns the modules' sum `(B, num_features)`; explanations stay exact.

        Raises:
            ValueError: `num_classes` is not an int >= 0, or `0` with `hidden=()` (no hidden layer to keep).
        """
        name = type(self).__name__
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"{name}.reset_classifier: num_classes must be an int >= 0 (0: no head, pooled "
                             f"features), got {num_classes!r}")
        if num_classes == 0 and self.num_classes:
            try:
                for bank in self.banks:
                    drop_output_layer(bank)
            except ValueError as e:
                raise ValueError(f"{name}.reset_classifier(0): {e}") from None
        elif num_classes:
            for bank in self.banks:
                renew_output_layer(bank, num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        """Every module's last hidden activation at the input, `(B, num_modules, num_features)` (bank by bank)."""
        width = self.num_features
        x = self._check(x)
        features = []
        for k, bank in zip(self.arities, self.banks):
            xg = x[:, self._index(k)].flatten(2)  # (B, G, k*C)
            h = torch.einsum("bgi,gio->bgo", xg, bank.weights[0]) + bank.biases[0]
            for i in range(1, len(bank.weights) - (1 if self.num_classes else 0)):
                h = torch.einsum("bgi,gio->bgo", bank.act(h), bank.weights[i]) + bank.biases[i]
            features.append(bank.act(h))
        return torch.cat(features, dim=1) if features else x.new_zeros(x.shape[0], 0, width)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits from `forward_features(x)`; `pre_logits=True` (or no head): the features summed over modules."""
        if pre_logits or not self.num_classes:
            return features.sum(1)
        out = features.new_zeros(features.shape[0], self.num_classes)
        start = 0
        for bank in self.banks:
            part = features[:, start:start + bank.num_groups]
            start += bank.num_groups
            logits = torch.einsum("bgi,gio->bgo", part, bank.weights[-1])
            bias = bank.bias(len(bank.weights) - 1)
            out = out + (logits if bias is None else logits + bias).sum(1)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, modules={len(self.groups)}"

    def _index(self, k: int) -> Tensor:
        return getattr(self, f"index_{k}")

    def working_elements(self, x: Tensor) -> int:
        return sum(bank.coalition_elements() for bank in self.banks) * LIVE_COPIES

    @streamed
    @finite_output
    def forward(self, x: Tensor) -> Tensor:
        """Logits `sum_j f_j(x_{A_j})` with one inner evaluation per module.

        Without autograd, where the two-product path applies (`dense_limit`), the modules run as two products: every
        module's full coalition of the cached operator, then the output layers (1.5-11.5x the per-bank path here,
        benchmarks/shallow_speed.py).
        """
        x = self._check(x)
        if not self._records_grad(x) and (operator := self._dense_operator(x)) is not None:
            return self._without_autocast(x, self._forward_dense, operator)
        out = x.new_zeros(x.shape[0], self.out_channels)
        for k, bank in zip(self.arities, self.banks):
            out = out + bank(x[:, self._index(k)]).sum(1)  # (B, G, k, C) -> (B, G, O) -> (B, O)
        return out

    @streamed
    @finite_output
    def explain(self, x: Tensor, layers: bool = False) -> Explanation:
        """Exact Shapley values of every output w.r.t. every feature.

        Args:
            x: `(B, D)` or `(B, D, C)`.
            layers: must be false: a Shallow ShapNet has one layer of modules (`TypeError` otherwise).

        Returns:
            `Explanation` with attributions `(B, D, num_classes)`, base `g(reference)`, output
            `g(x)` (equal to `forward(x)`), `exact=True`.
        """
        no_layers(self, layers)
        x = self._check(x)
        B = x.shape[0]
        if self._records_grad(x):
            attributions = x.new_zeros(B, self.in_features, self.out_channels)
            base = x.new_zeros(B, self.out_channels)
            output = x.new_zeros(B, self.out_channels)
            delta = x - self.reference
            for k, bank in zip(self.arities, self.banks):
                index = self._index(k)
                phi, b, o = bank.shapley(delta[:, index], self.reference[index])
                # Each module's value for feature i lands on feature i; features in no module get 0.
                attributions = attributions.index_add(1, index.flatten(), phi.flatten(1, 2))
                base, output = base + b.sum(-2), output + o.sum(1)
        elif (operator := self._dense_operator(x)) is not None:
            attributions, base, output = self._without_autocast(x, self._explain_dense, operator)
        else:
            attributions, base, output = self._explain_grouped(x)
        return Explanation(
            attributions=attributions,
            base=base.expand(B, -1) if base.dim() == 1 else base,
            output=output,
            reference=self.reference,
            player_axes=("feature",),
            player_names=self.feature_names,
            exact=True,
            method=type(self).__name__,
        )

    #: Largest `DenseOperator` (elements) for which the no-grad `explain` runs as two dense products; 0: never.
    #: Pairs of 30 features with 4 hidden units take 0.5M, 12 features with 32 hidden units 0.24M.
    dense_limit: ClassVar[int] = 1 << 21
    #: Smallest `(2^k - 1) h` (coalitions x hidden units of a module) for which the second map runs per module: one
    #: batched product of `G` matrices `((k + 1) O, (2^k - 1) h)` and a scatter onto the features, instead of one
    #: product over all features (which multiplies `(D + 1) O` columns where `(k + 1) O` are not zero). Below it the
    #: small matrices cost more in dispatch than they save: pairs with 32 hidden units (96) run per module (2x
    #: faster than the dense product here), pairs with 2-4 hidden units (6-12) over all features.
    local_width: ClassVar[int] = 32
    #: Density (non-zeros / elements) up to which the second product over all features uses a sparse CSR matrix (CPU,
    #: float32/64). Its rows hold `(k + 1) O` non-zeros of `(D + 1) O`: 7-10% for 435 pairs of 30 features (2.5-3x
    #: faster than the dense product here), 18% for 12 features (equal).
    sparse_density: ClassVar[float] = 1 / 8

    def __getstate__(self) -> dict[str, Any]:
        # The two-product operator and its workspace are caches, rebuilt on first use (and a CSR tensor cannot be
        # deep-copied): copies and pickles (EMA, export, DataParallel replicas) start without them.
        state = super().__getstate__()
        state.pop("_dense_cache", None)
        state.pop("_workspace_buffer", None)
        return state

    def _dense_operator(self, like: Tensor) -> _Linearised | None:
        """The cached two-product form of `explain` (and `forward`) for `like`'s dtype and device, or None.

        It applies where every bank has one hidden layer and the same pointwise activation and the operator has at
        most `dense_limit` elements. It takes precedence over `compile_coalitions`' fused kernel, which it outran on
        every CPU row measured but one (docs/performance.md): set `dense_limit = 0` to use that kernel instead. The
        cache is keyed on every parameter's storage and version counter (bumped by optimizer steps,
        `load_state_dict` and any in-place write), the reference's, the activations and the limits, so an
        explanation never reads weights older than the model's.
        """
        if not self.dense_limit:
            return None
        banks = list(self.banks)
        acts = tuple((type(bank.act), getattr(bank.act, "approximate", None), getattr(bank.act, "negative_slope", None))
                     for bank in banks)
        try:
            key = (self.dense_limit, self.sparse_density, self.local_width, like.dtype, like.device, acts,
                   *((t.data_ptr(), t._version) for t in (self.reference, *self.parameters())))
        except RuntimeError:  # inference-mode tensors have no version counter: nothing to key a cache on
            return None
        cached = self.__dict__.get("_dense_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        if not banks or len(set(acts)) > 1 or not all(bank.dense_ready() for bank in banks):
            self.__dict__["_dense_cache"] = (key, None)
            return None
        operator = self._without_autocast(like, self._linearise, banks)
        self.__dict__["_dense_cache"] = (key, operator)
        return operator

    def _linearise(self, like: Tensor, banks: list[ShapleyModuleBank]) -> _Linearised | None:
        """Stack the banks' `DenseOperator`s for `like`'s dtype and device, or None above `dense_limit`."""
        columns = sum(bank.dense_columns() for bank in banks)
        D, C, outputs = self.in_features, self.in_channels, self.out_channels
        operator = None
        if (columns + 1) * (D * C + 2 + (D + 1) * outputs) <= self.dense_limit:
            parts = [bank.dense_operator(self._index(k), D, self.reference, like.dtype)
                     for k, bank in zip(self.arities, banks)]
            # Transposed, with the shift and constant folded in as a last column (the offsets and the hidden layer get
            # a row of ones): addmm would first copy the broadcast shift into its whole output, a pass as long as the
            # activation's. Samples last, so that the second product is (sparse) matrix @ dense matrix.
            first = like.new_zeros(columns + 1, D * C + 1)
            first[:-1, :-1] = torch.cat([p.first for p in parts], 1).T
            first[:-1, -1] = torch.cat([p.shift for p in parts])
            constant = sum(p.constant for p in parts)
            combine = None
            if any(p.local.shape[-1] < self.local_width for p in parts):
                combine = torch.cat([*(p.combine for p in parts), constant[None]]).T.contiguous()
                density = float(combine.count_nonzero()) / combine.numel()
                if density <= self.sparse_density and like.device.type == "cpu" and like.dtype in SPARSE_DTYPES:
                    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
                        warnings.simplefilter("ignore", UserWarning)
                        combine = combine.to_sparse_csr()
            # The forward: every module's full coalition (its rows of `first`), and the output layers with their
            # biases' sum as a last column.
            offsets = itertools.accumulate([0] + [bank.dense_columns() for bank in banks[:-1]])
            ones_row = torch.tensor([columns], device=first.device)
            forward_first = first.index_select(0, torch.cat([*(start + p.full for start, p in zip(offsets, parts)),
                                                             ones_row]))
            forward_out = torch.cat([*(p.output_layer for p in parts), constant[D * outputs:, None]], 1)
            operator = _Linearised(first, combine, sum(p.base for p in parts), constant[:, None],
                                   tuple((p.local, p.rows) for p in parts), forward_first, forward_out)
        return operator

    def _records_grad(self, x: Tensor) -> bool:
        """Whether autograd would record a call on `x` (then the differentiable paths run)."""
        return torch.is_grad_enabled() and (x.requires_grad or self.reference.requires_grad
                                            or any(p.requires_grad for p in self.parameters()))

    @staticmethod
    def _without_autocast(x: Tensor, run: Callable[..., Any], *args: Any) -> Any:
        """`run(x, *args)`, with autocast off where it is on: the cached operator is in the model's dtype and the CSR
        product has no bf16 kernel, so it is built and run in that dtype (as the grouped path's products are), exact,
        and the result comes back in it."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return run(x, *args)
        return run(x, *args)

    def _offsets_and_ones(self, x: Tensor, rows: int) -> Tensor:
        """`[x - r ; 1]`, features x samples `((d c) + 1, b)`."""
        B = x.shape[0]
        inputs = x.new_empty(rows, B)
        torch.sub(x, self.reference, out=inputs[:-1].T.view(B, self.in_features, self.in_channels))
        inputs[-1].fill_(1)
        return inputs

    def _forward_dense(self, x: Tensor, operator: _Linearised) -> Tensor:
        """`forward` without autograd: every module's full coalition as one product, its output layer as another."""
        hidden = torch.mm(operator.forward_first, self._offsets_and_ones(x, operator.forward_first.shape[1]))
        hidden = self.banks[0]._activate(hidden, True)
        hidden[-1].fill_(1)  # the output biases' column of `forward_out`
        return torch.mm(operator.forward_out, hidden).T.contiguous()

    def _explain_dense(self, x: Tensor, operator: _Linearised) -> tuple[Tensor, Tensor, Tensor]:
        """`explain`'s attributions `(B, D, O)`, base `(O,)` and output `(B, O)` around one activation.

        `combine^T act(first^T [x - r; 1])` (`DenseOperator`), samples last, the second map over all features or per
        module (`local_width`): three or four large ops instead of ~25 per bank, which at tabular sizes is what a call
        costs (each small op is 5-20 us of dispatch on a CPU).
        """
        # Plain views, not einops strings, on this path: at tabular sizes a call is ~20 small ops, and a rearrange
        # costs as much as the op it describes. Layouts: inputs `((d c) + 1) b`, hidden `(n + 1) b`, values
        # `((d o) + o) b`.
        B, D, outputs = x.shape[0], self.in_features, self.out_channels
        inputs = self._offsets_and_ones(x, operator.first.shape[1])
        hidden = torch.mm(operator.first, inputs, out=kept_buffer(self, x, (operator.first.shape[0], B)))
        hidden = self.banks[0]._activate(hidden, True)
        hidden[-1].fill_(1)  # the constant's column of `combine`
        if operator.combine is not None:
            values = torch.mm(operator.combine, hidden)
        else:  # per module: each module's (k + 1) O rows, added onto its features' and the output's rows
            values = operator.constant.repeat(1, B)  # a copy: the cached constant is never written
            start = 0
            for local, rows in operator.local:
                groups, _, width = local.shape
                block = torch.bmm(local, hidden[start:start + groups * width].view(groups, width, B))
                values.index_add_(0, rows, block.view(-1, B))
                start += groups * width
        attributions = values[: D * outputs].view(D, outputs, B).permute(2, 0, 1).contiguous()
        # A feature at the reference is null in every module's game: exactly 0 (its coalition pairs are equal
        # columns, but the product sums their differences among other terms, leaving ~1e-8 in float32).
        off = off_zero(inputs[:-1].T.view(B, D, self.in_channels))  # (B, D): a channel off the reference
        if not bool(off.all()):
            attributions.masked_fill_(~off[:, :, None], 0.0)
        return attributions, operator.base.clone(), values[D * outputs:].T.contiguous()  # nothing shares the cache

    def _explain_grouped(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`explain`'s attributions `(B, D, O)`, base `(O,)` and output `(B, O)` without autograd (the fast path).

        Works feature-major and sample-last (`ShapleyModuleBank.shapley_grouped`): each bank gathers its modules'
        players as whole rows of the `(D, C, B)` offsets, and its `(k, G, O, B)` values are added onto their
        features' rows in place (one contiguous row per player and module).
        """
        B = x.shape[0]
        delta = rearrange(x - self.reference, "b d c -> d c b").contiguous()  # whole rows: index_select copies them
        attributions = x.new_zeros(self.in_features, self.out_channels, B)
        base = x.new_zeros(self.out_channels)
        output = x.new_zeros(self.out_channels, B)
        # Which features sit exactly at the reference, checked once on the (D, C, B) offsets, not per module.
        at_reference = delta.eq(0)
        any_at_reference = bool((at_reference if self.in_channels == 1 else at_reference.all(1)).any())
        for k, bank in zip(self.arities, self.banks):
            index = self._index(k)  # (G, k)
            offsets = delta.index_select(0, index.flatten()).view(*index.shape, self.in_channels, B)
            reference = self.reference.index_select(0, index.flatten()).view(*index.shape, self.in_channels)
            phi, b, o = bank.shapley_grouped(offsets, reference, any_at_reference=any_at_reference)
            attributions.index_add_(0, getattr(self, f"players_{k}"), phi.flatten(0, 1))  # phi rows: player-major
            base += b.sum(0)
            output += o.sum(0)
        attributions = rearrange(attributions, "d o b -> b d o").contiguous()
        return attributions, base, rearrange(output, "o b -> b o").contiguous()

    def interactions(self, x: Tensor, max_order: int | None = None, kind: str = "and") -> Interactions:
        """Exact Harsanyi dividends (or OR interactions) and pairwise Shapley interaction indices of the network.

        `g` is a sum of module games, so its dividends are the modules' own: every non-empty subset of every
        group is listed, and a subset shared by several groups (a feature's singleton under `"pairs"`) gets
        the sum of their dividends. A subset that lies in no group - in particular any subset of features from
        different groups - has dividend exactly 0 by construction and is not listed; likewise the interaction
        index of two features that share no group is 0. Computed from the coalition values `explain` uses.
        The OR interactions (`shapnets.and_or`) are linear in the game too and vanish on every subset holding a
        player the module ignores, so `kind="or"` gets them the same way, from each module's own.

        Args:
            x: `(B, D)` or `(B, D, C)`.
            max_order: list only subsets of at most this many features.
            kind: `"and"` (Harsanyi dividends) or `"or"`; `"and_or"` needs the game on every coalition of all
                features: use `shapnets.exact_interactions(model, x, model.reference, kind="and_or")`.

        Returns:
            `Interactions` with dividends `(B, S, num_classes)`, sii `(B, D, D, num_classes)` (the exact
            Shapley values of `explain` on its diagonal), base `g(reference)`, output `g(x)`.
        """
        from .and_or import check_kind, or_transform, zeta_transform

        if check_kind(kind) == "and_or":
            raise ValueError("ShallowShapNet.interactions: kind='and_or' splits the game on every coalition of all "
                             "features; use shapnets.exact_interactions(model, x, model.reference, kind='and_or') "
                             "(up to 16 features)")
        x = self._check(x)
        delta = x - self.reference
        games = []
        for k, bank in zip(self.arities, self.banks):
            index = self._index(k)
            games.append((bank.coalition_values(delta[:, index], self.reference[index]), index))
        meta = dict(player_names=self.feature_names, method=type(self).__name__)
        found = Interactions.from_module_games(games, self.in_features, max_order, **meta)
        if kind == "or":
            # A game whose AND dividends are each module's OR interactions; the SII stays the real game's.
            or_games = [(zeta_transform(or_transform(values, k), k), index) for (values, index), k in
                        zip(games, self.arities)]
            ors = Interactions.from_module_games(or_games, self.in_features, max_order, **meta)
            found = replace(ors, sii=found.sii, kind="or")
        return found
