"""Conv ShapNet fidelity on a coarse pixel-patch game, before and after a fidelity fine-tune.

The game: the central 16x16 pixels of a 28x28 MNIST image cut into 16 patches of 4x4 pixels (the players); every
other pixel sits at the model's reference. The exact Shapley values of that 16-player game (`exact_shapley`,
float64, 2^16 coalitions per image) are compared with the model's own explanation summed over each patch, for the
class the model predicts, as the relative L2 error over images and players (as in `shapnets bench fidelity`).

    python benchmarks/fidelity_conv.py --samples 4 [--train configs/finetune_conv_mnist_fidelity.yaml]

With `--train`, the config is fine-tuned (or its finished run reused) and measured too, with its test accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shapnets import exact_shapley, patch_players  # noqa: E402
from training.cli import load_source, load_split  # noqa: E402
from training.config import load_config  # noqa: E402
from training.trainer import evaluate, train  # noqa: E402

SIDE, PATCH, START = 16, 4, 6  # the region rows/cols 6..21, 4x4 patches: 16 players


class RegionGame(nn.Module):
    """`z (N, 256) -> model(image)`: the region's pixels from `z`, every other pixel at the reference."""

    def __init__(self, model: nn.Module, reference: Tensor) -> None:
        super().__init__()
        self.model, self.reference = model, reference  # reference (1, 28, 28)

    def forward(self, z: Tensor) -> Tensor:
        full = self.reference.expand(z.shape[0], *self.reference.shape).clone()
        full[:, :, START:START + SIDE, START:START + SIDE] = z.view(-1, 1, SIDE, SIDE)
        return self.model(full)


def measure(source: str, samples: int, data_root: str | None, accuracy: bool) -> dict[str, Any]:
    loaded = load_source(source, torch.device("cpu"))
    model = loaded.model.double().eval()
    test = load_split(loaded, "test", data_root)
    x = torch.stack([torch.as_tensor(test[i][0]) for i in range(samples)]).double()
    reference = model.reference.view(-1, 1, 1).expand(x.shape[1:]).clone()
    region = x[:, :, START:START + SIDE, START:START + SIDE].reshape(samples, -1)
    game = RegionGame(model, reference)
    players = patch_players(SIDE, SIDE, PATCH).reshape(-1)
    start = time.perf_counter()
    with torch.no_grad():
        exact = exact_shapley(game, region, reference[:, START:START + SIDE, START:START + SIDE].reshape(-1),
                              players=players, max_players=16, max_batch=4096)
        oracle_s = time.perf_counter() - start
        full = reference.expand(samples, *reference.shape).clone()
        full[:, :, START:START + SIDE, START:START + SIDE] = x[:, :, START:START + SIDE, START:START + SIDE]
        expl = model.explain(full)
    target = expl.output.argmax(1)
    outside = torch.ones(x.shape[-2:], dtype=torch.bool)
    outside[START:START + SIDE, START:START + SIDE] = False  # missingness: 0 there
    own_pixels = expl.attributions[:, START:START + SIDE, START:START + SIDE].reshape(samples, -1, expl.num_outputs)
    own = own_pixels.new_zeros(samples, 16, expl.num_outputs).index_add(1, players, own_pixels)
    pick = target.view(-1, 1, 1).expand(-1, 16, 1)
    own_t, exact_t = own.gather(2, pick)[..., 0], exact.attributions.gather(2, pick)[..., 0]
    result = {"source": source, "samples": samples, "players": 16, "oracle_seconds": round(oracle_s, 1),
              "own_rel_l2_error": float((own_t - exact_t).norm() / exact_t.norm()),
              "outside_region_max_abs": float(expl.attributions[:, outside].abs().max()),
              "local_accuracy_residual": expl.local_accuracy_error()}
    if accuracy:
        model.float()
        metrics = evaluate(model, torch.utils.data.DataLoader(test, batch_size=500), loaded.info.num_classes,
                           torch.device("cpu"))
        result["test_acc"] = metrics["acc"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapnet_conv_mnist")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--train", default=None, help="a fine-tune config to run and measure")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--accuracy", action="store_true", help="also evaluate test accuracy (10,000 images)")
    parser.add_argument("--out", default="runs/fidelity_conv.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [measure(args.model, args.samples, args.data_root, args.accuracy)]
    print(json.dumps(results[-1]), flush=True)
    if args.train:
        cfg = load_config(args.train)
        folder = cfg.resolved_output_dir()
        if not (folder / "summary.json").is_file():
            train(cfg, output_dir=folder, overwrite=True)
        results.append(measure(str(folder), args.samples, args.data_root, args.accuracy))
        summary = json.loads((folder / "summary.json").read_text())
        results[-1]["trainer_test_acc"] = summary.get("test", {}).get("acc")
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
