"""A short human summary of a `model_info` record: what `shapnets zoo info NAME` prints (`--json`: the record)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["model_summary"]


def _pct(value: Any) -> str | None:
    return f"{100 * float(value):.2f}%" if isinstance(value, int | float) and not isinstance(value, bool) else None


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _size(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    size = os.path.getsize(path)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return None  # pragma: no cover - the loop always returns


def _args_text(args: Mapping[str, Any] | None, limit: int = 6) -> str:
    """The constructor arguments worth reading (no long lists such as feature names or references)."""
    if not args:
        return ""
    shown = [f"{k}={v}" for k, v in args.items() if len(str(v)) <= 40][:limit]
    return ", ".join(shown)


def _data_line(info: Mapping[str, Any]) -> str:
    data_info = (info.get("extra") or {}).get("data_info") or {}
    cfg = info.get("pretrained_cfg") or {}
    name = info.get("dataset") or data_info.get("name") or cfg.get("dataset")
    if isinstance(name, Mapping):
        name = name.get("name")
    if not name:
        return "not trained (a generic architecture: give its sizes, e.g. in_features and num_classes)"
    shape = data_info.get("input_shape") or cfg.get("input_size")
    classes = data_info.get("class_names") or cfg.get("label_names")
    num_classes = data_info.get("num_classes") or cfg.get("num_classes") or (len(classes) if classes else None)
    parts = [str(name)]
    if shape:
        shape = list(shape)
        parts.append(f"{shape[0]} features" if len(shape) == 1 else "x".join(map(str, shape)) + " images")
    if num_classes:
        names = f" ({', '.join(map(str, classes))})" if classes and len(classes) <= 10 else ""
        parts.append(f"{num_classes} classes{names}")
    return ", ".join(parts)


def _accuracy_line(metrics: Mapping[str, Any] | None) -> str:
    metrics = metrics or {}
    test = _pct(metrics.get("test_accuracy"))
    if test is None:
        return "not recorded"
    extra = [f"macro {_pct(metrics['test_accuracy_macro'])}"] if _pct(metrics.get("test_accuracy_macro")) else []
    if metrics.get("test_samples"):
        extra.append(f"{metrics['test_samples']} test samples")
    line = f"test {test}" + (f" ({', '.join(extra)})" if extra else "")
    if _pct(metrics.get("best_val_accuracy")):
        line += f", best validation {_pct(metrics['best_val_accuracy'])}"
    return line


def _fidelity_line(fidelity: Mapping[str, Any] | None) -> str:
    if not fidelity:
        return "not recorded"
    parts = []
    if fidelity.get("local_accuracy_residual") is not None:
        parts.append(f"local accuracy residual {_num(fidelity['local_accuracy_residual'], 2)}")
    if fidelity.get("rel_l2_error_vs_exact_shapley") is not None:
        players = f", {fidelity['oracle_players']} players" if fidelity.get("oracle_players") else ""
        parts.append(f"vs exact Shapley values: rel. L2 error {_num(fidelity['rel_l2_error_vs_exact_shapley'])}, "
                     f"max abs {_num(fidelity.get('max_abs_error_vs_exact_shapley'))} "
                     f"({fidelity.get('samples', '?')} samples{players})")
    elif isinstance(fidelity.get("oracle"), str):
        parts.append(f"oracle {fidelity['oracle']}")
    if fidelity.get("exact_by_construction") is not None:
        parts.append("exact Shapley values by construction" if fidelity["exact_by_construction"]
                     else "not exact by construction")
    return "; ".join(parts) or "not recorded"


def model_summary(info: Mapping[str, Any]) -> str:
    """A dozen lines on one model from its `zoo.model_info` record: what it is, its data, accuracy, fidelity,
    size, weights and card.

    Args:
        info: `zoo.model_info(name_or_dir)`.

    Returns:
        Lines `label  value`, the first naming the model and what it is; fields nobody recorded say so.
    """
    cfg = info.get("pretrained_cfg") or {}
    description = cfg.get("description") or info.get("class") or ""
    arch = f"{info.get('architecture')} ({info.get('class')})"
    args = _args_text(info.get("model_args"))
    params = info.get("num_params")
    size_parts = [f"{params:,} parameters" if isinstance(params, int) else "parameters not recorded"]
    weights = _size(info.get("weights_path"))
    if weights:
        verified = info.get("sha256_verified")
        size_parts.append(f"{weights} of weights" + (", sha256 verified" if verified else
                                                     ", sha256 MISMATCH" if verified is False else ""))
    else:
        size_parts.append("no weights shipped")
    training = info.get("training") or {}
    rows = [
        ("architecture", arch + (f": {args}" if args else "")),
        ("data", _data_line(info)),
        ("accuracy", _accuracy_line(info.get("metrics"))),
        ("fidelity", _fidelity_line(info.get("fidelity"))),
        ("size", ", ".join(size_parts)),
    ]
    if isinstance(training, Mapping) and training.get("command"):
        rows.append(("trained by", str(training["command"])))
    rows += [
        ("weights", info.get("weights_path") or "none"),
        ("card", info.get("card_path") or "none (zoo.write_model_card writes one)"),
        ("full record", f"shapnets zoo info {info.get('name')} --json"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{info.get('name')}: {description}" if description else str(info.get("name"))]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)
