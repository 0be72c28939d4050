"""The `Explanation` type shared by every model family and by the exact oracle.

An explanation is an additive decomposition of a model's output over a set of players
(features, pixels, ...):

    output[b, c] == base[b, c] + sum_over_players attributions[b, ..., c]      (local accuracy)

`base` is the model's output at the reference input of the game. Everything else in the record
(the reference, the names of the player axes, per-layer representations) describes that game, so
that an explanation can be checked, plotted and compared without the model at hand.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from ._format import optional_import, signed_sum

if TYPE_CHECKING:  # optional extras: imported inside the methods that need them
    import matplotlib.figure
    import pandas
    import shap

__all__ = ["Explanation", "LocalAccuracyError", "RankedAttribution", "TensorFields", "class_indices", "signed_sum"]

_T = TypeVar("_T", bound="TensorFields")


class LocalAccuracyError(AssertionError):
    """Raised by `Explanation.check_local_accuracy` when attributions + base != output."""


def class_indices(output: Tensor, target: int | Sequence[int] | Tensor) -> Tensor:
    """`(B,)` class indices of `target` (one class for all samples, or one per sample) for outputs `(B, C)`.

    Raises:
        TypeError: a bool.
        IndexError: a class outside `[-C, C)` (one class) or `[0, C)` (per sample).
        ValueError: per-sample targets whose count is not `B`.
    """
    B, C = output.shape
    if isinstance(target, bool):
        raise TypeError("target must be a class index, got a bool")
    if isinstance(target, Tensor) and target.dim() == 0:
        target = int(target.item())
    elif isinstance(target, numbers.Integral):  # numpy integers too
        target = int(target)
    if isinstance(target, int):
        if not -C <= target < C:
            raise IndexError(f"class {target} out of range for {C} outputs")
        return torch.full((B,), target % C, dtype=torch.long, device=output.device)
    index = torch.as_tensor(target, dtype=torch.long, device=output.device).reshape(-1)
    if index.numel() != B:
        raise ValueError(f"need one target per sample ({B}), got {index.numel()}")
    if index.numel() and (index.min() < 0 or index.max() >= C):
        raise IndexError(f"targets must lie in [0, {C}), got range [{index.min()}, {index.max()}]")
    return index


class RankedAttribution(NamedTuple):
    """One entry of `Explanation.top`: where the player is, its name and its attribution."""

    player: tuple[int, ...]
    """The player's index along each player axis (`(j,)` for features, `(h, w)` for pixels)."""
    name: str
    value: float


class TensorFields:
    """`detach` / `to` / `cpu` for a dataclass of tensors, through its `_map(fn)` (fn applied to every tensor).

    Also `batch_size` and `num_outputs`, read from the dataclass's `output` field `(B, C_out)`.
    """

    output: Tensor

    @property
    def batch_size(self) -> int:
        return self.output.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.output.shape[1]

    def _map(self: _T, fn) -> _T:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def detach(self: _T) -> _T:
        return self._map(lambda t: t.detach())

    def to(self: _T, *args, **kwargs) -> _T:
        return self._map(lambda t: t.to(*args, **kwargs))

    def cpu(self: _T) -> _T:
        return self._map(lambda t: t.cpu())


@dataclass
class Explanation(TensorFields):
    """Attributions of a batch of outputs to the players of a game.

    Attributes:
        attributions: `(B, *players, C_out)`: the contribution of every player to every output.
        base: `(B, C_out)`: the output at the reference (the value of the empty coalition).
        output: `(B, C_out)`: the explained output (for classifiers: the logits).
        reference: the reference input of the game, laid out like one input sample
            (e.g. `(D, C)` for tabular models, `(C,)` per pixel for images); `None` if unknown.
        player_axes: names of the player axes of `attributions`, e.g. `("feature",)` or
            `("height", "width")`.
        player_names: optional names of the players (only for a single player axis).
        class_names: optional names of the output channels.
        exact: True when the attributions are the exact Shapley values of `output` under the
            baseline game with this reference (Shapley modules, Shallow ShapNets, the oracle);
            False when only local accuracy and missingness are guaranteed (Deep / Conv ShapNets).
        layers: optional per-layer representations `(B, *players, C_l)`, first to last.
        method: a short tag saying what produced the explanation.
    """

    attributions: Tensor
    base: Tensor
    output: Tensor
    reference: Tensor | None = None
    player_axes: tuple[str, ...] = ("player",)
    player_names: list[str] | None = None
    class_names: list[str] | None = None
    exact: bool = True
    layers: list[Tensor] | None = None
    method: str = ""
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        a, b, o = self.attributions, self.base, self.output
        if o.dim() != 2:
            raise ValueError(f"Explanation.output must be (B, C_out), got shape {tuple(o.shape)}")
        if b.shape != o.shape:
            raise ValueError(f"Explanation.base {tuple(b.shape)} must have the shape of output {tuple(o.shape)}")
        if a.dim() < 3 or a.shape[0] != o.shape[0] or a.shape[-1] != o.shape[-1]:
            raise ValueError(
                f"Explanation.attributions must be (B, *players, C_out) = ({o.shape[0]}, ..., {o.shape[1]}), "
                f"got {tuple(a.shape)}"
            )
        if len(self.player_axes) != a.dim() - 2:
            raise ValueError(
                f"player_axes {self.player_axes} names {len(self.player_axes)} axes but attributions "
                f"{tuple(a.shape)} has {a.dim() - 2} player axes"
            )
        if self.player_names is not None and len(self.player_names) != self.num_players:
            raise ValueError(f"{len(self.player_names)} player names for {self.num_players} players")

    # ------------------------------------------------------------------ shape helpers
    @property
    def player_shape(self) -> tuple[int, ...]:
        return tuple(self.attributions.shape[1:-1])

    @property
    def num_players(self) -> int:
        n = 1
        for s in self.player_shape:
            n *= s
        return n

    # ------------------------------------------------------------------ local accuracy
    def residual(self) -> Tensor:
        """`output - base - sum(attributions)`, shape `(B, C_out)`; zero when local accuracy holds."""
        total = self.attributions.flatten(1, -2).sum(1)
        return self.output - self.base - total

    def local_accuracy_error(self) -> float:
        """The largest absolute local-accuracy residual over the batch and outputs."""
        if self.output.numel() == 0:
            return 0.0
        return self.residual().abs().max().item()

    def check_local_accuracy(self, atol: float | None = None, rtol: float = 1e-4) -> None:
        """Raise `LocalAccuracyError` unless attributions summed over players + base == output.

        Args:
            atol: absolute tolerance; default 1e-9 in float64 and 1e-4 otherwise.
            rtol: tolerance relative to the largest output magnitude.
        """
        if atol is None:
            atol = 1e-9 if self.output.dtype == torch.float64 else 1e-4
        err = self.local_accuracy_error()
        scale = self.output.abs().max().item() if self.output.numel() else 0.0
        if not err <= atol + rtol * scale:
            raise LocalAccuracyError(
                f"local accuracy violated: max |output - base - sum(attributions)| = {err:.3e} "
                f"> atol {atol:.1e} + rtol {rtol:.1e} * {scale:.3e}"
            )

    # ------------------------------------------------------------------ selection
    def select(self, target: int | Sequence[int] | Tensor) -> Explanation:
        """Keep one output channel: an int for all samples, or one index per sample `(B,)`.

        Returns an `Explanation` with `C_out == 1` (local accuracy is preserved).
        """
        index = self._target_index(target)
        attr_index = index.view(-1, *([1] * (self.attributions.dim() - 1))).expand(
            *self.attributions.shape[:-1], 1
        )
        names = None
        if self.class_names is not None and bool((index == index[0]).all()) and index.numel():
            names = [self.class_names[int(index[0])]]
        return replace(
            self,
            attributions=self.attributions.gather(-1, attr_index),
            base=self.base.gather(1, index.view(-1, 1)),
            output=self.output.gather(1, index.view(-1, 1)),
            class_names=names,
            layers=None,
        )

    def for_class(self, target: int | Sequence[int] | Tensor) -> Tensor:
        """Attributions for one output channel per sample, shape `(B, *players)`."""
        return self.select(target).attributions[..., 0]

    @property
    def predicted(self) -> Tensor:
        """The argmax output channel of every sample, shape `(B,)`."""
        return self.output.argmax(dim=1)

    def _target_index(self, target: int | Sequence[int] | Tensor) -> Tensor:
        return class_indices(self.output, target)

    # ------------------------------------------------------------------ ranking, tables, pictures
    def player_labels(self) -> list[str]:
        """One label per player, in flattened player order: `player_names` if set, else `x0, x1, ...` for one
        player axis and `(h, w)` positions for several."""
        if self.player_names is not None:
            return [str(n) for n in self.player_names]
        if len(self.player_shape) == 1:
            return [f"x{j}" for j in range(self.num_players)]
        return [str(tuple(int(i) for i in torch.unravel_index(torch.tensor(j), self.player_shape)))
                for j in range(self.num_players)]

    def _one_target(self, index: int, target: int | None) -> int:
        """The output channel explained for sample `index`: `target`, or that sample's predicted one."""
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"the sample index must be an int, got {type(index).__name__}")
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"sample {index} out of range for a batch of {self.batch_size}")
        row = self.output[int(index) % self.batch_size][None]
        if target is None:
            return int(row.argmax())
        return int(class_indices(row, target)[0])

    def top(self, k: int = 10, index: int = 0, target: int | None = None) -> list[RankedAttribution]:
        """The `k` largest attributions (by magnitude) of one sample for one output.

        Args:
            k: how many (all players when `k` exceeds their number).
            index: which sample of the batch.
            target: the output channel; default the sample's predicted (largest) output.

        Returns:
            `RankedAttribution(player, name, value)` tuples, largest `|value|` first; ties keep player order.

        Raises:
            ValueError: `k < 1`.
            IndexError: a sample or target out of range.
        """
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"top: k must be a positive integer, got {k!r}")
        c = self._one_target(index, target)
        values = self.attributions[index, ..., c].detach().flatten().cpu()
        order = values.abs().argsort(descending=True, stable=True)[: int(k)]
        labels = self.player_labels()
        return [RankedAttribution(tuple(int(i) for i in torch.unravel_index(torch.tensor(j), self.player_shape)),
                                  labels[j], float(values[j])) for j in order.tolist()]

    def plot(
        self,
        index: int = 0,
        top: int = 10,
        target: int | None = None,
        *,
        kind: str = "waterfall",
        data: Tensor | Sequence[float] | None = None,
        feature_values: Sequence[str] | None = None,
        sample_id: str | None = None,
        label: int | str | None = None,
        image: Tensor | None = None,
        all_classes: bool = False,
    ) -> matplotlib.figure.Figure:
        """A matplotlib figure of one sample's explanation (needs the `viz` extra: matplotlib).

        Features (one player axis): a waterfall from the base value to the output (`kind="waterfall"`) or bars of
        the attributions (`kind="bar"`), for the `top` largest attributions; the players left out are summed in
        one "N other features" bar (waterfall) or stated in a note (bar). Pixels (two player axes): a heat map of
        the attributions over the image (red raises the output, blue lowers it), the `top` strongest pixels
        marked; `all_classes=True` adds one map per output channel.

        Args:
            index: which sample of the batch.
            top: how many players to show (features) or mark (pixels).
            target: the output channel; default the sample's predicted one.
            kind: `"waterfall"` or `"bar"` (features only).
            data: the explained input sample `(*players)` (features) or `(C, H, W)` / `(H, W)` (the image);
                shown next to the feature names, or under the heat map.
            feature_values: display strings for the features (e.g. raw, un-standardised values); win over `data`.
            sample_id: a name for the sample, shown in the title (e.g. `"test[3]"`).
            label: the true class (index or name), shown in the title.
            image: the background of a pixel heat map (same as `data` for images).
            all_classes: pixels: one heat map per output channel, the target first.

        Returns:
            The figure (not shown, not closed): `fig.savefig(path)` writes it.

        Raises:
            ImportError: matplotlib is missing (names the extra).
            ValueError: an unknown kind, `top < 1`, or player axes that cannot be drawn.
        """
        from ._plotting import features_figure, pixels_figure

        if kind not in ("waterfall", "bar"):
            raise ValueError(f'kind must be "waterfall" or "bar", got {kind!r}')
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be a positive integer, got {top!r}")
        c = self._one_target(index, target)
        if len(self.player_shape) == 1:
            return features_figure(self, index, c, top, kind, data, feature_values, sample_id, label)
        if len(self.player_shape) == 2:
            background = image if image is not None else data
            return pixels_figure(self, index, c, top, background, sample_id, label, all_classes)
        raise ValueError(f"cannot plot attributions with player axes {self.player_axes} (one or two axes are drawn)")

    def _data_array(self, data: Tensor | Any | None) -> Any:
        """`data` as a float numpy array shaped `(B, *players)`, or None."""
        if data is None:
            return None
        values = torch.as_tensor(data).detach().cpu().double()
        if values.dim() == len(self.player_shape) + 2 and values.shape[-1] == 1 and len(self.player_shape) == 1:
            values = values[..., 0]  # tabular inputs with one measurement channel, `(B, D, 1)`
        if values.shape == self.player_shape and self.batch_size == 1:
            values = values[None]
        if tuple(values.shape) != (self.batch_size, *self.player_shape):
            # Single-channel images `(B, 1, H, W)` line up with pixel players `(H, W)`.
            if values.dim() == 4 and values.shape[1] == 1 and tuple(values.shape[2:]) == self.player_shape:
                values = values[:, 0]
            else:
                raise ValueError(f"data of shape {tuple(values.shape)} does not match the explained batch "
                                 f"({self.batch_size}, *players {self.player_shape})")
        return values.numpy()

    def to_shap(self, target: int | Sequence[int] | Tensor | None = None,
                data: Tensor | Any | None = None) -> shap.Explanation:
        """A `shap.Explanation` (needs the `shap` extra), so that `shap.plots.waterfall / beeswarm / bar` apply.

        Args:
            target: None keeps every output channel (values `(B, *players, C)`, base values `(B, C)`; with a
                single output `(B, *players)` and `(B,)`), as shap's own explainers do for multi-output models;
                an int, `"predicted"` or one index per sample keeps one channel per sample (values
                `(B, *players)`, base values `(B,)`).
            data: the explained inputs `(B, *players)` (the feature values shap prints next to the names).

        Returns:
            A `shap.Explanation` whose values summed over the players plus its base values give the outputs.

        Raises:
            ImportError: shap is missing (names the extra).
            ValueError: `data` that does not match the batch and players.
        """
        shap = optional_import("shap", "shap", "Explanation.to_shap()")
        values = self.attributions.detach().cpu().double()
        base = self.base.detach().cpu().double()
        output_names = list(self.class_names) if self.class_names is not None else None
        if isinstance(target, str):
            if target != "predicted":
                raise ValueError(f'to_shap: target must be an index, per-sample indices or "predicted", got {target!r}')
            target = self.predicted
        if target is not None:
            one = self.select(target)
            values, base = one.attributions.detach().cpu().double()[..., 0], one.base.detach().cpu().double()[:, 0]
            output_names = None
        elif self.num_outputs == 1:
            values, base = values[..., 0], base[:, 0]
        feature_names = self.player_labels() if len(self.player_shape) == 1 else None
        return shap.Explanation(values=values.numpy(), base_values=base.numpy(), data=self._data_array(data),
                                feature_names=feature_names, output_names=output_names)

    def to_pandas(self, target: int | Sequence[int] | Tensor | None = None, data: Tensor | Any | None = None,
                  long: bool = False) -> pandas.DataFrame:
        """The attributions as a `pandas.DataFrame` (needs pandas, e.g. through the `shap` extra).

        Args:
            target: the output channel per sample (an int for all, or one per sample); default each sample's
                predicted one.
            data: the explained inputs `(B, *players)`; `long` tables get a `value` column.
            long: one row per (sample, player) with columns `sample, player, name, class, attribution[, value]`
                instead of one row per sample.

        Returns:
            Wide (default): one row per sample; columns `class`, `output`, `base`, then one per player (its
            label) holding its attribution, so that `base + sum of the player columns == output`.
            Long: the tidy table described under `long`.

        Raises:
            ImportError: pandas is missing.
            ValueError: a player label that collides with `class` / `output` / `base` in the wide layout.
        """
        pd = optional_import("pandas", "shap", "Explanation.to_pandas()")
        index = self.predicted if target is None else self._target_index(target)
        one = self.select(index)
        phi = one.attributions.detach().cpu().double()[..., 0].flatten(1)
        labels = self.player_labels()
        classes = [self.class_names[int(c)] if self.class_names is not None else int(c) for c in index.tolist()]
        if long:
            B, P = phi.shape
            table = {
                "sample": [b for b in range(B) for _ in range(P)],
                "player": [j for _ in range(B) for j in range(P)],
                "name": labels * B,
                "class": [c for c in classes for _ in range(P)],
                "attribution": phi.flatten().tolist(),
            }
            values = self._data_array(data)
            if values is not None:
                table["value"] = values.reshape(B, P).flatten().tolist()
            return pd.DataFrame(table)
        clash = sorted({"class", "output", "base"} & set(labels))
        if clash:
            raise ValueError(f"to_pandas: player name(s) {clash} collide with the wide table's columns; use long=True")
        frame = pd.DataFrame(phi.numpy(), columns=labels)
        frame.insert(0, "base", one.base.detach().cpu().double()[:, 0].numpy())
        frame.insert(0, "output", one.output.detach().cpu().double()[:, 0].numpy())
        frame.insert(0, "class", classes)
        return frame

    # ------------------------------------------------------------------ conversion
    def _map(self, fn) -> Explanation:
        return replace(
            self,
            attributions=fn(self.attributions),
            base=fn(self.base),
            output=fn(self.output),
            reference=None if self.reference is None else fn(self.reference),
            layers=None if self.layers is None else [fn(z) for z in self.layers],
            extras={k: fn(v) for k, v in self.extras.items()},
        )

    def __getitem__(self, index: int | slice) -> Explanation:
        """Samples of the batch: `expl[0]` keeps a batch of one, `expl[2:5]` a slice."""
        sl = slice(index, index + 1) if isinstance(index, int) else index
        if isinstance(index, int) and not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"sample {index} out of range for a batch of {self.batch_size}")
        if isinstance(index, int) and index < 0:
            sl = slice(index + self.batch_size, index + self.batch_size + 1)
        return replace(
            self,
            attributions=self.attributions[sl],
            base=self.base[sl],
            output=self.output[sl],
            layers=None if self.layers is None else [z[sl] for z in self.layers],
            extras={k: v[sl] for k, v in self.extras.items()},
        )

    @classmethod
    def concat(cls, parts: Sequence[Explanation]) -> Explanation:
        """Join explanations of consecutive batches of the same game along the batch axis.

        Raises:
            ValueError: no parts, or parts that explain different games (players, outputs, layers, extras).
        """
        if not parts:
            raise ValueError("Explanation.concat needs at least one explanation")
        first = parts[0]
        for p in parts[1:]:
            if (p.player_shape, p.num_outputs, p.player_axes, p.exact) != (
                first.player_shape, first.num_outputs, first.player_axes, first.exact
            ) or (p.layers is None) != (first.layers is None) or p.extras.keys() != first.extras.keys():
                raise ValueError("Explanation.concat: the parts explain different games (players, outputs, "
                                 "layers or extras differ)")
        return replace(
            first,
            attributions=torch.cat([p.attributions for p in parts]),
            base=torch.cat([p.base for p in parts]),
            output=torch.cat([p.output for p in parts]),
            layers=None if first.layers is None else [torch.cat(z) for z in zip(*(p.layers for p in parts))],
            extras={k: torch.cat([p.extras[k] for p in parts]) for k in first.extras},
        )

    def __repr__(self) -> str:
        kind = "exact Shapley" if self.exact else "Shapley representation"
        return (
            f"Explanation({kind}, method={self.method!r}, batch={self.batch_size}, "
            f"players={self.player_shape} {self.player_axes}, outputs={self.num_outputs}, "
            f"local_accuracy_error={self.local_accuracy_error():.2e})"
        )
