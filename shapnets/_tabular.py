"""What Shallow and Deep ShapNets share: a game over D tabular features of C channels each."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._validation import check_input, check_reference

__all__ = ["TabularGame"]


class TabularGame(nn.Module):
    """Base for models whose players are `D` features of `C` channels: reference, names, input checks."""

    data_args = ("feature_names", "reference")  # what a data set may fill (shapnets.contract)
    in_features: int
    in_channels: int
    feature_names: list[str] | None

    def _init_game(
        self,
        in_features: int,
        in_channels: int,
        reference: Tensor | float | None,
        feature_names: Sequence[str] | None,
    ) -> None:
        """Validate and store the game: the reference becomes a `(D, C)` buffer (saved, moved by `.to()`)."""
        who = type(self).__name__
        self.in_features, self.in_channels = in_features, in_channels
        self.feature_names = list(feature_names) if feature_names is not None else None
        if self.feature_names is not None and len(self.feature_names) != in_features:
            raise ValueError(f"{who}: {len(self.feature_names)} feature names for {in_features} features")
        if isinstance(reference, Tensor) and reference.dim() == 1 and reference.numel() == in_features > 1 \
                and in_channels > 1:
            raise ValueError(f"{who}: reference (D,) is ambiguous with in_channels={in_channels}: pass (D, C)")
        self.register_buffer("reference", check_reference(reference, (in_features, in_channels), who))

    @property
    def num_players(self) -> int:
        return self.in_features

    def _check(self, x: Tensor) -> Tensor:
        """Validate `(B, D)` (one channel) or `(B, D, C)` input and return it as `(B, D, C)`."""
        spec = [(None, self.in_features, self.in_channels)]
        if self.in_channels == 1:
            spec.insert(0, (None, self.in_features))
        x = check_input(x, spec, type(self).__name__, self.reference)  # the reference: moved and cast with the model
        return x[..., None] if x.dim() == 2 else x
