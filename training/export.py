"""Export a trained run into the zoo: weights, config.json with measured metrics, and a model card.

`shapnets export RUN_OR_CHECKPOINT --name shapnet_deep_yeast` re-evaluates the model on its test split,
measures the fidelity of its explanations, and writes `zoo/weights/<name>/` and `zoo/cards/<name>.md`:

* test accuracy (micro and macro) and calibration error, recomputed here, not copied from the run;
* fidelity on the first `fidelity_samples` test samples, in float64: the error of the model's explanation
  against `shapnets.exact_shapley` (max absolute and relative L2) on all features when there are at most
  `ORACLE_MAX_PLAYERS`, else on inputs whose other features sit at the reference (see
  `explanation_fidelity`); the local-accuracy residual and the missingness residual (the largest
  attribution of a feature moved to its reference).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from shapnets import exact_shapley

log = logging.getLogger("shapnets")

__all__ = ["ORACLE_MAX_PLAYERS", "explanation_fidelity", "export_to_zoo"]

#: Largest game checked against the brute-force oracle at export (2^12 coalitions per sample).
ORACLE_MAX_PLAYERS = 12


def _stack(dataset: Any, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[dataset[i] for i in range(min(count, len(dataset)))])
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def explanation_fidelity(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Fidelity numbers of a model's explanation on inputs `x`, computed in float64 on a copy."""
    import copy

    model64 = copy.deepcopy(model).double().eval()
    x = x.double()
    expl = model64.explain(x)
    result: dict[str, Any] = {
        "samples": int(x.shape[0]),
        "precision": "float64",
        "local_accuracy_residual": expl.local_accuracy_error(),
        "exact_by_construction": bool(expl.exact),
    }
    reference = getattr(model64, "reference", None)
    if reference is not None and expl.player_axes == ("feature",):
        # Missingness: move each feature in turn to its reference; its attribution must vanish.
        worst = 0.0
        for j in range(x.shape[1]):
            moved = x.clone()
            moved[:, j] = reference[j].reshape(moved[:, j].shape[1:]) if moved.dim() == 3 else reference[j, 0]
            worst = max(worst, model64.explain(moved).attributions[:, j].abs().max().item())
        result["missingness_residual"] = worst
    elif reference is not None and expl.player_axes == ("height", "width"):
        # Missingness for images: move a random tenth of the pixels (all channels) to the reference.
        H, W = x.shape[-2:]
        pixels = torch.rand(H, W, generator=torch.Generator().manual_seed(0)) < 0.1
        moved = torch.where(pixels, reference.view(-1, 1, 1), x)
        result["missingness_residual"] = model64.explain(moved).attributions[:, pixels].abs().max().item()
        result["missingness_pixels"] = int(pixels.sum())
    players = expl.num_players
    if expl.player_axes == ("feature",) and reference is not None:
        # A game of more than ORACLE_MAX_PLAYERS players is out of the oracle's reach. Keep a random subset U of
        # features and move the others to the reference: they are then null players (Shapley value 0) and the
        # values of U are those of the |U|-player game, which the oracle can enumerate. Same check, fewer players.
        kept = torch.randperm(players, generator=torch.Generator().manual_seed(0))[:ORACLE_MAX_PLAYERS].sort().values
        base_input = reference.expand_as(x if x.dim() == 3 else x[..., None]).reshape(x.shape).clone()
        x_kept = base_input.clone()
        x_kept[:, kept] = x[:, kept]

        def on_kept(z: torch.Tensor) -> torch.Tensor:
            full = base_input[:1].expand(z.shape[0], *base_input.shape[1:]).clone()
            full[:, kept] = z
            return model64(full)

        start = time.perf_counter()
        oracle = exact_shapley(on_kept, x_kept[:, kept], reference.reshape(x.shape[1:])[kept])
        oracle_s = time.perf_counter() - start
        attributions = model64.explain(x_kept).attributions
        diff = attributions[:, kept] - oracle.attributions
        result.update(
            oracle_players=len(kept),
            oracle_setting="all features" if len(kept) == players else
            f"{len(kept)} of {players} features kept, the others at the reference (null players)",
            max_abs_error_vs_exact_shapley=diff.abs().max().item(),
            rel_l2_error_vs_exact_shapley=(diff.norm() / oracle.attributions.norm().clamp_min(1e-300)).item(),
            others_max_abs_attribution=attributions[:, [j for j in range(players) if j not in kept.tolist()]]
            .abs().max().item() if len(kept) < players else 0.0,
            oracle_seconds=round(oracle_s, 3),
        )
    else:
        result["oracle"] = "not run: the players are not tabular features"
    return result


CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def export_to_zoo(
    source: str,
    name: str,
    out_dir: str | Path | None = None,
    *,
    data_root: str | None = None,
    fidelity_samples: int = 16,
    notes: list[str] | None = None,
) -> Path:
    """Export a run (folder or .pt checkpoint) as zoo weights + card; returns the weights folder.

    `notes` go into config.json (`notes`) and onto the card, one "**Note:**" line each.

    Raises:
        UserError (from the CLI helpers): the source cannot be loaded or has no data information.
    """
    import zoo
    from zoo import card_path, shipped_dir

    from .config import config_to_dict
    from .sources import load_source, load_split
    from .trainer import evaluate

    loaded = load_source(source, torch.device("cpu"))
    if loaded.cfg is None:
        raise ValueError(f"{source!r} is not a training run or checkpoint written by `shapnets train`")
    test = load_split(loaded, "test", data_root)
    metrics = evaluate(loaded.model, DataLoader(test, batch_size=512), loaded.info.num_classes, torch.device("cpu"))
    x, _ = _stack(test, fidelity_samples)
    fidelity = explanation_fidelity(loaded.model, x)

    run_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    config_name = loaded.cfg.name or name
    metadata = {
        "dataset": loaded.info.name,
        "data_info": loaded.info.to_dict(),
        "preprocessing": loaded.info.preprocessing,
        "metrics": {
            "test_accuracy": metrics["acc"],
            "test_accuracy_macro": metrics["acc_macro"],
            "test_ece": metrics["ece"],
            "test_loss": metrics["loss"],
            "test_samples": len(test),
            "best_val_accuracy": summary.get("best_val_acc"),
        },
        "fidelity": fidelity,
        "training": {
            # Only a config the repository has: a sweep point's run name is not a file (its note says how it ran).
            "command": f"shapnets train configs/{config_name}.yaml"
            if (CONFIGS_DIR / f"{config_name}.yaml").is_file() else None,
            "config": config_to_dict(loaded.cfg),
            "time_s": summary.get("wall_time_s"),
            "epochs": summary.get("epochs"),
            "samples_per_s": summary.get("samples_per_s"),
            "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
            if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "torch": torch.__version__,
        },
    }
    if notes:
        metadata["notes"] = list(notes)
    out = Path(out_dir) if out_dir is not None else shipped_dir(name)
    model_args = getattr(loaded.model, "model_args", None)
    zoo.save_pretrained(loaded.model, out, metadata=metadata, model_args=model_args, architecture=name)
    card = zoo.write_model_card(out, out_path=card_path(name) if out == shipped_dir(name) else None)
    log.info("exported %s: test acc %.4f, fidelity %s -> %s, card %s", name, metrics["acc"], fidelity, out, card)
    return out
