"""What the zoo knows about a model (`model_info`) and the Markdown model card generated from it.

Both read the same sources: the registry's cfg and, when weights exist, their config.json. A
field nobody recorded is reported as missing (`None` in `model_info`, "not recorded" in a card),
never guessed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from timm.models import get_pretrained_cfg, is_model

from ._args import decode_model_args, encode_model_args, full_model_args, jsonable
from ._paths import CONFIG_NAME, WEIGHTS_NAME, card_path, shipped_dir
from ._registry import ARCHITECTURES, VARIANT_DEFAULTS, architecture_of, known_names_hint
from .hub import RESERVED_KEYS, read_config, sha256_of
from .shapnets_models import PAPER

__all__ = ["model_info", "write_model_card"]

NOT_RECORDED = "not recorded"
_CARD_SECTIONS = ("dataset", "preprocessing", "metrics", "fidelity", "training")
_CITATION = """@inproceedings{wang2021shapley,
  title     = {Shapley Explanation Networks},
  author    = {Wang, Rui and Wang, Xiaoqian and Inouye, David I.},
  booktitle = {International Conference on Learning Representations},
  year      = {2021},
  url       = {https://arxiv.org/abs/2104.02297}
}"""
# Other families cite their own paper (by registered-name prefix); everything else is a ShapNet.
_FAMILY_CITATIONS = {
    "icnn_": """@inproceedings{zhang2018interpretable,
  title     = {Interpretable Convolutional Neural Networks},
  author    = {Zhang, Quanshi and Wu, Ying Nian and Zhu, Song-Chun},
  booktitle = {IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2018},
  url       = {https://arxiv.org/abs/1710.00935}
}""",
    "capsnet": """@inproceedings{sabour2017dynamic,
  title     = {Dynamic Routing Between Capsules},
  author    = {Sabour, Sara and Frosst, Nicholas and Hinton, Geoffrey E.},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2017},
  url       = {https://arxiv.org/abs/1710.09829}
}""",
}


def _citation(name: str) -> str:
    return next((c for prefix, c in _FAMILY_CITATIONS.items() if name.startswith(prefix)), _CITATION)


def _is_image_model(info: Mapping[str, Any]) -> bool:
    return info["class"] == "ConvShapNet" or tuple(info["pretrained_cfg"].get("player_axes") or ()) == (
        "height", "width")


def _registry_cfg(name: str) -> dict[str, Any]:
    cfg = get_pretrained_cfg(name)
    return jsonable(cfg.to_dict()) if cfg is not None else {}


def _default_model_args(name: str) -> tuple[dict[str, Any] | None, int | None]:
    """A named variant's documented arguments (all of them) and its parameter count; generic names have none."""
    if name not in VARIANT_DEFAULTS:
        return None, None
    arch, defaults = VARIANT_DEFAULTS[name]
    model_cls = ARCHITECTURES[arch]
    args = full_model_args(model_cls, decode_model_args(defaults, name))
    num_params = sum(p.numel() for p in model_cls(**args).parameters())
    return encode_model_args(args), num_params


def _locate(name_or_dir: str | os.PathLike) -> tuple[str, Path | None, str]:
    """(registered name, checkpoint folder or None, source) for a name or a folder."""
    path = Path(name_or_dir)
    if path.is_file() and path.name in (WEIGHTS_NAME, CONFIG_NAME):
        path = path.parent
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} is a folder without {CONFIG_NAME}: not a checkpoint (see zoo.save_pretrained)")
        return read_config(path)["architecture"], path, "directory"
    name = str(name_or_dir).split(".", 1)[0]
    if not is_model(name) or name not in {*ARCHITECTURES, *VARIANT_DEFAULTS}:
        raise ValueError(
            f"{str(name_or_dir)!r} is neither a checkpoint folder nor a registered ShapNet. " + known_names_hint(name)
        )
    folder = shipped_dir(name)
    if (folder / CONFIG_NAME).is_file():
        return name, folder, "shipped"
    return name, None, "registry"


def model_info(name_or_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything the zoo knows about a registered name or a checkpoint folder, as a JSON-able dict.

    Keys: `name`, `architecture` (generic), `class`, `source` ("shipped" / "directory" / "registry"),
    `has_weights`, `weights_path`, `config_path`, `sha256` (recorded), `sha256_verified` (the file's
    hash recomputed now), `shapnets_version`, `num_params`, `model_args`, `pretrained_cfg`, `game`,
    `dataset`, `preprocessing`, `metrics`, `fidelity`, `training`, `card_path`, `extra` (other
    recorded metadata). Missing values are `None`.

    Raises:
        ValueError: neither a folder nor a registered ShapNet (close matches listed), or an invalid config.json.
    """
    name, folder, source = _locate(name_or_dir)
    config: dict[str, Any] = read_config(folder) if folder is not None else {}
    registry = _registry_cfg(name.split(".", 1)[0])
    weights = folder / WEIGHTS_NAME if folder is not None else None
    has_weights = weights is not None and weights.is_file()
    if config:
        model_args, num_params = config["model_args"], config.get("num_params")
    else:
        model_args, num_params = _default_model_args(name)
    card = folder / "README.md" if source == "directory" else card_path(name)
    known = {*RESERVED_KEYS, *_CARD_SECTIONS}
    recorded_cfg = config.get("pretrained_cfg", {})
    pretrained_cfg = {**registry, **recorded_cfg}
    if name in VARIANT_DEFAULTS and registry.get("description"):
        # Trained as a generic architecture (e.g. shapnet_conv), exported as a named variant: describe the variant.
        pretrained_cfg["description"] = registry["description"]
    return {
        "name": name,
        "architecture": architecture_of(name),
        "class": ARCHITECTURES[architecture_of(name)].__name__,
        "source": source,
        "has_weights": has_weights,
        "weights_path": str(weights) if has_weights else None,
        "config_path": str(folder / CONFIG_NAME) if folder is not None else None,
        "sha256": config.get("sha256"),
        "sha256_verified": (sha256_of(weights) == config["sha256"]) if has_weights else None,
        "shapnets_version": config.get("shapnets_version"),
        "num_params": num_params,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "game": config.get("game"),
        **{key: config.get(key) for key in _CARD_SECTIONS},
        "card_path": str(card) if card.is_file() else None,
        "extra": {k: v for k, v in config.items() if k not in known} or None,
    }


def _as_list(value: Any) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else [str(v) for v in value]


def _fmt(value: Any) -> str:
    if value is None:
        return NOT_RECORDED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return f"`{json.dumps(value)}`"
    return str(value)


def _table(rows: Mapping[str, Any] | None) -> str:
    if not rows:
        return NOT_RECORDED + "\n"
    lines = ["| field | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in rows.items()]
    return "\n".join(lines) + "\n"


def _text_or_table(value: Any) -> str:
    if isinstance(value, Mapping) and value:
        return "\n\n" + _table(value)  # a Markdown table needs a blank line before it
    return _fmt(value or None) + "\n"


def _recorded_or_documented(recorded: Any, documented: str | None) -> Any:
    """What the checkpoint recorded; else the registry's documentation, labelled as such; else None."""
    if recorded is not None:
        return recorded
    if documented:
        return f"{documented} (registry documentation; {NOT_RECORDED} with the weights)"
    return None


def _reference_text(game: Mapping[str, Any] | None, cfg: Mapping[str, Any]) -> str:
    meaning = (game or {}).get("reference_meaning") or cfg.get("reference")
    reference = (game or {}).get("reference")
    shape = (game or {}).get("reference_shape")
    parts = [meaning or NOT_RECORDED]
    if reference is not None:
        flat = json.dumps(reference)
        parts.append(
            f"values (shape {shape}): `{flat}`" if len(flat) <= 400 else f"shape {shape} (values in config.json)"
        )
    return "; ".join(parts)


def _usage(info: Mapping[str, Any]) -> str:
    cfg = info["pretrained_cfg"]
    args = info["model_args"] or {}
    folder = Path(info["config_path"]).parent if info["source"] == "directory" else None
    if folder is not None and folder.resolve() != shipped_dir(info["name"]).resolve():
        load = f'model = zoo.load_pretrained("{folder}")'
    elif info["has_weights"]:
        load = f'model = zoo.create_model("{info["name"]}", pretrained=True)'
    else:
        load = f'model = zoo.create_model("{info["name"]}")  # no shipped weights: trains from scratch'
    if _is_image_model(info):
        size = cfg.get("input_size") or [args.get("in_chans", 1), 28, 28]
        example = f"x = torch.rand(4, {', '.join(str(s) for s in size)})"
        shape = f"(4, {size[1]}, {size[2]}, num_classes)"
    else:
        features = args.get("in_features", "D")
        example = f"x = torch.randn(4, {features})  # preprocessed as described above"
        shape = f"(4, {features}, num_classes)"
    return (
        "```python\nimport torch\nimport zoo\n\n"
        f"{load}\n{example}\n"
        "logits = model(x)\n"
        f"explanation = model.explain(x)            # attributions {shape}\n"
        "explanation.check_local_accuracy()        # sum of attributions + base == logits\n```\n"
    )


def render_model_card(info: Mapping[str, Any]) -> str:
    """The Markdown card for a `model_info` dict (pure: no file access)."""
    cfg = info["pretrained_cfg"]
    game = info.get("game") or {}
    metrics = info.get("metrics") or {}
    training = info.get("training") or {}
    dataset = _recorded_or_documented(info.get("dataset"), cfg.get("dataset"))
    preprocessing = _recorded_or_documented(info.get("preprocessing"), cfg.get("preprocessing"))
    licence = (info.get("extra") or {}).get("license") or cfg.get("license")
    shapley = _citation(info["name"]) == _CITATION  # other families' explanations are not Shapley-based
    tags = ["shapnets", "self-explaining", *(["shapley-values"] if shapley else []), "pytorch"]
    tags.append("image-classification" if _is_image_model(info) else "tabular-classification")
    time_s = training.get("time_s")
    train_time = f"{time_s:.0f} s ({time_s / 60:.1f} min)" if isinstance(time_s, int | float) else NOT_RECORDED
    other_training = {k: v for k, v in training.items() if k not in ("command", "time_s")}
    test_accuracy = metrics.get("test_accuracy")
    lines = [
        "---",
        "library_name: shapnets",
        f"license: {licence or 'unknown'}",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {info['name']}",
        "",
        f"{cfg.get('description') or info['class']}. A self-explaining network: `model.explain(x)` returns the "
        f"model's own {'Shapley-based ' if shapley else ''}explanation from the forward pass.",
        "",
        "## Model details",
        "",
        _table(
            {
                "architecture": f"`{info['class']}` (registry: `{info['architecture']}`)",
                "parameters": info.get("num_params"),
                "classes": cfg.get("num_classes"),
                "class names": cfg.get("label_names"),
                "input size": cfg.get("input_size"),
                "paper": f"{cfg.get('paper_name') or PAPER} ({cfg.get('paper_ids') or 'arXiv:2104.02297'})",
                "licence": licence,
                "shapnets version": info.get("shapnets_version"),
            }
        ),
        "Constructor arguments (`model_args`):",
        "",
        f"```json\n{json.dumps(info.get('model_args'), indent=2)}\n```" if info.get("model_args") else NOT_RECORDED,
        "",
        "## Data",
        "",
        "**Data set and split:** " + _text_or_table(dataset),
        "**Preprocessing:** " + _text_or_table(preprocessing),
        "## The game being explained",
        "",
        _table(
            {
                "players": game.get("players") or cfg.get("players"),
                "number of players": game.get("num_players") or cfg.get("num_players"),
                "player axes": game.get("player_axes") or cfg.get("player_axes"),
                "reference": _reference_text(game, cfg),
                "guarantee": game.get("explanation") or cfg.get("explanation"),
            }
        ),
        "## Results",
        "",
        f"**Test accuracy:** {_fmt(test_accuracy)}",
        "",
        *(f"**Note:** {note}\n" for note in _as_list((info.get("extra") or {}).get("notes"))),
        _table({k: v for k, v in metrics.items() if k != "test_accuracy"}) if len(metrics) > 1 else "",
        "## Explanation fidelity",
        "",
        _table(info.get("fidelity")),
        "## Training",
        "",
        _table(
            {
                "command": f"`{training['command']}`" if training.get("command") else None,
                "time": train_time,
                **other_training,
            }
        ),
        "## Files",
        "",
        _table(
            {
                "weights": f"`{WEIGHTS_NAME}`" if info["has_weights"] else "none shipped",
                "sha256": info.get("sha256"),
            }
        ),
        "## Usage",
        "",
        _usage(info),
        "## Citation",
        "",
        f"```bibtex\n{_citation(info['name'])}\n```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(directory_or_name: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Generate a Markdown model card from config.json (or the registry, for names without weights).

    Args:
        directory_or_name: a checkpoint folder or a registered name.
        out_path: where to write; default `zoo/cards/<name>.md` for a name, `<folder>/README.md`
            for a folder.

    Returns:
        The card's path.
    """
    info = model_info(directory_or_name)
    if out_path is None:
        directory = info["source"] == "directory"
        out_path = Path(info["config_path"]).parent / "README.md" if directory else card_path(info["name"])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render_model_card(info), encoding="utf-8")
    return out_path
