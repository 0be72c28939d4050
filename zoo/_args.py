"""Constructor arguments <-> JSON: how a model's `model_args` travel through config.json.

The ShapNet classes take a few values JSON cannot hold (a reference tensor, an activation class).
Both directions live here so that the builder (JSON -> constructor kwargs) and `save_pretrained`
(constructor kwargs -> JSON) can never disagree.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ACT_LAYERS", "decode_model_args", "encode_model_args", "full_model_args", "jsonable"]

# Activations a saved model may name. Stored by name, never pickled: config.json stays plain data.
ACT_LAYERS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}
_ACT_NAMES = {cls: name for name, cls in ACT_LAYERS.items()}


def _act_layer(value: object, who: str) -> type[nn.Module] | Callable[[], nn.Module]:
    if isinstance(value, str):
        key = value.lower().replace("-", "_")
        if key not in ACT_LAYERS:
            raise ValueError(f"{who}: unknown act_layer {value!r}; known: {sorted(ACT_LAYERS)}")
        return ACT_LAYERS[key]
    if callable(value):
        return value  # a class or factory passed from Python; only names can be saved (see encode_model_args)
    raise TypeError(f"{who}: act_layer must be a name such as 'gelu' or an nn.Module class, got {type(value).__name__}")


def decode_model_args(model_args: Mapping[str, Any], who: str = "model_args") -> dict[str, Any]:
    """JSON-able `model_args` -> constructor kwargs (activation names -> classes, reference -> tensor).

    Raises:
        ValueError: an unknown activation name or a reference that is not numeric.
    """
    kwargs = dict(model_args)
    if "act_layer" in kwargs:
        kwargs["act_layer"] = _act_layer(kwargs["act_layer"], who)
    reference = kwargs.get("reference")
    if reference is not None and not isinstance(reference, Tensor):
        try:
            kwargs["reference"] = torch.tensor(reference, dtype=torch.get_default_dtype())
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{who}: reference must be a number or nested lists of numbers, got {reference!r}"
            ) from err
    return kwargs


def _to_json(value: object, key: str) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"model_args[{key!r}] is {value}: only finite numbers can be saved")
        return value
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, type) and issubclass(value, nn.Module):
        if value not in _ACT_NAMES:
            raise TypeError(
                f"model_args[{key!r}] is the class {value.__name__}, which has no saved name; "
                f"use one of {sorted(ACT_LAYERS)}"
            )
        return _ACT_NAMES[value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalars
        return _to_json(value.item(), key)
    raise TypeError(f"model_args[{key!r}] of type {type(value).__name__} cannot be written to config.json")


def encode_model_args(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs -> a JSON-able dict (tensors -> lists, activation classes -> names).

    Raises:
        TypeError: a value with no JSON form (e.g. a custom activation class), naming the key.
    """
    return {str(k): _to_json(v, str(k)) for k, v in model_args.items()}


def full_model_args(model_cls: type[nn.Module], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every constructor argument, the defaults filled in, so a saved config does not depend on them.

    Raises:
        TypeError: an argument the constructor does not take, naming it and the accepted ones.
    """
    signature = inspect.signature(model_cls)
    unknown = sorted(set(kwargs) - set(signature.parameters))
    if unknown:
        raise TypeError(
            f"{model_cls.__name__} got unexpected argument(s) {unknown}; it takes {list(signature.parameters)}"
        )
    bound = signature.bind_partial(**kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def jsonable(value: Any, nonfinite: Callable[[float], Any] = str) -> Any:
    """Loose conversion for metadata, cfgs and reports: tuples and tensors -> lists, paths, devices, dtypes -> strings.

    Args:
        value: nested mappings, lists and tuples of plain values, tensors, paths, devices or dtypes.
        nonfinite: what an inf / nan float becomes (default its string, `"inf"`; strict JSON reports use `None`).
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, nonfinite) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, nonfinite) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return nonfinite(value)
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, os.PathLike | torch.device | torch.dtype):
        return str(value)
    return value
