"""Plain (not self-explaining) baselines in the timm registry, for accuracy comparisons at a matched size.

* `baseline_mlp`: an MLP for tabular data: `in_features -> hidden... -> num_classes`, activation between layers;
* `baseline_cnn`: a small CNN for images: stages of (3x3 conv, BatchNorm, ReLU), max-pooled between stages, then
  global average pooling and a linear head.

Both are built by the same trainer as the ShapNets (`model.name: baseline_mlp` in a config), so a baseline
trained by `configs/baseline_mlp_<dataset>.yaml` or `configs/baseline_cnn_mnist.yaml` sees the same data split,
preprocessing, optimizer and schedule as the ShapNet it is compared with (`shapnets bench accuracy`). They have
no `explain()`: the benchmark's fidelity table explains them post hoc only. No weights are shipped; a trained
baseline lives in its run folder (`runs/<name>/`), and `pretrained_cfg_overlay=dict(file=<folder or
.safetensors>)` loads saved weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from shapnets.validation import check_input, finite_output, image_size_errors

from ._args import ACT_LAYERS
from ._builder import register
from ._registry import MNIST_CFG, Family, model_cfg

__all__ = ["BASELINE_ARCHITECTURES", "BaselineCNN", "BaselineMLP"]


def _activation(act_layer: str | type[nn.Module], who: str) -> type[nn.Module]:
    if isinstance(act_layer, type) and issubclass(act_layer, nn.Module):
        return act_layer  # the hub decodes saved activation names into classes
    key = str(act_layer).lower().replace("-", "_")
    if key not in ACT_LAYERS:
        raise ValueError(f"{who}: unknown act_layer {act_layer!r}; known: {sorted(ACT_LAYERS)}")
    return ACT_LAYERS[key]


def _check_classes(num_classes: object, who: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"{who}.reset_classifier: num_classes must be an int >= 0 (0: no head, pooled features), "
                         f"got {num_classes!r}")


class BaselineMLP(nn.Module):
    """A plain MLP classifier for tabular inputs `(B, D)`.

    Args:
        in_features: `D`.
        num_classes: outputs (logits); `0`: no head, the model returns the last hidden layer's output.
        hidden: widths of the hidden layers.
        act_layer: activation name (`"relu"`, `"gelu"`, ...: see `zoo.ACT_LAYERS`) or class.
        dropout: dropout after every hidden activation.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64, 64),
                 act_layer: str | type[nn.Module] = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 0 or any(int(h) < 1 for h in hidden):
            raise ValueError(f"BaselineMLP: in_features and hidden widths must be >= 1 and num_classes >= 0 (0: no "
                             f"head), got {in_features}, {num_classes}, {list(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"BaselineMLP: dropout must lie in [0, 1), got {dropout}")
        act = _activation(act_layer, "BaselineMLP")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            # One activation module per layer (not a shared one): DeepLift / LRP hooks need each called once.
            layers += [nn.Linear(width, int(h)), act()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, num_classes) if num_classes else nn.Identity())
        self.layers = nn.Sequential(*layers)
        self.in_features, self.num_classes = in_features, num_classes

    @finite_output
    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # timm's model interface: the head is the last linear layer; num_classes=0 leaves the last hidden layer's output.
    def forward_features(self, x: Tensor) -> Tensor:
        """The last hidden layer's output `(B, num_features)`."""
        return self.layers[:-1](check_input(x, [(None, self.in_features)], type(self).__name__, self))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return features if pre_logits else self.layers[-1](features)

    @property
    def num_features(self) -> int:
        return self.head_hidden_size

    @property
    def head_hidden_size(self) -> int:
        return int(next((m.out_features for m in reversed(self.layers[:-1]) if isinstance(m, nn.Linear)),
                        self.in_features))

    def get_classifier(self) -> nn.Module:
        return self.layers[-1]

    def reset_classifier(self, num_classes: int) -> None:
        """A new last layer with `num_classes` outputs (`0`: none, the model returns `forward_features`)."""
        _check_classes(num_classes, type(self).__name__)
        width = self.head_hidden_size
        like = next(self.parameters(), None)
        head = nn.Linear(width, num_classes) if num_classes else nn.Identity()
        self.layers[-1] = head.to(like) if like is not None else head
        self.num_classes = num_classes


class BaselineCNN(nn.Module):
    """A small plain CNN for images `(B, C, H, W)`: conv stages, global average pooling, a linear head.

    Args:
        in_chans: image channels.
        num_classes: outputs (logits); `0`: no head, the model returns the pooled features.
        channels: width of each stage (one 3x3 conv-BN-ReLU per stage, 2x2 max pooling between stages).
    """

    def __init__(self, in_chans: int, num_classes: int, channels: Sequence[int] = (16, 24, 32)) -> None:
        super().__init__()
        if in_chans < 1 or num_classes < 0 or not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"BaselineCNN: in_chans and the stage widths must be >= 1 (at least one stage) and "
                             f"num_classes >= 0 (0: no head), got {in_chans}, {num_classes}, {list(channels)}")
        layers: list[nn.Module] = []
        width = in_chans
        for stage, c in enumerate(channels):
            if stage:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(width, int(c), 3, padding=1, bias=False), nn.BatchNorm2d(int(c)), nn.ReLU()]
            width = int(c)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()
        self.in_chans, self.num_classes = in_chans, num_classes

    @finite_output
    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # timm's model interface: the head is the linear layer after global average pooling.
    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's map `(B, num_features, H', W')`."""
        x = check_input(x, [(None, self.in_chans, None, None)], type(self).__name__, self)
        with image_size_errors(x, type(self).__name__):
            return self.features(x)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = self.pool(features).flatten(1)
        return pooled if pre_logits else self.head(pooled)

    @property
    def num_features(self) -> int:
        return self.head_hidden_size

    @property
    def head_hidden_size(self) -> int:
        return int(self.features[-2].num_features)  # the last stage's BatchNorm

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear head with `num_classes` outputs (`0`: none, the model returns the pooled features)."""
        _check_classes(num_classes, type(self).__name__)
        self.head = (nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()).to(
            self.features[0].weight)
        self.num_classes = num_classes


BASELINE_ARCHITECTURES: dict[str, type[nn.Module]] = {"baseline_mlp": BaselineMLP, "baseline_cnn": BaselineCNN}
"""Registered name -> class."""

_HINT = ("none ship: train one (configs/baseline_*.yaml) and pass "
         "pretrained_cfg_overlay=dict(file=<folder or .safetensors>)")
register("baseline_mlp", BaselineMLP, model_cfg(
    description="Plain MLP for tabular data (pass in_features, num_classes, hidden; bare: 8 features, 2 classes): "
                "an accuracy baseline", fixed_input_size=False, input_size=(8,), num_classes=2),
    family=Family(missing_hint=_HINT, defaults=dict(in_features=8, num_classes=2)))
register("baseline_cnn", BaselineCNN, model_cfg(
    description="Plain small CNN for images (pass in_chans, num_classes, channels; bare: 1x28x28, 10 classes): "
                "an accuracy baseline", fixed_input_size=False, input_size=(1, 28, 28), num_classes=10,
    mean=MNIST_CFG["mean"], std=MNIST_CFG["std"]),
    family=Family(missing_hint=_HINT, defaults=dict(in_chans=1, num_classes=10)))
