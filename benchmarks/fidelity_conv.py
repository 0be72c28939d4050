"""Conv ShapNet fidelity on a coarse pixel-patch game, before and after a fidelity fine-tune.

The game: the central `4 grid x 4 grid` pixels of a 28x28 MNIST image cut into `grid x grid` patches of 4x4 pixels
(the players; `--grid 3`: 9 players, `--grid 4`: 16); every other pixel sits at the model's reference. The exact
Shapley values of that game (`exact_shapley`, float64, 2^players coalitions per image) are compared with the
model's own explanation summed over each patch, for the class the model predicts, as the relative L2 error over
images and players (as in `shapnets bench fidelity`).

    python benchmarks/fidelity_conv.py --samples 4 --grid 3 [--train configs/finetune_conv_mnist_fidelity.yaml]

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
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shapnets import exact_shapley, patch_players  # noqa: E402
from training.cli import load_source, load_split  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import DataBundle  # noqa: E402
from training.trainer import evaluate, load_data, train  # noqa: E402

PATCH = 4  # pixels per patch side


class RegionGame(nn.Module):
    """`z (N, side^2) -> model(image)`: the central region's pixels from `z`, every other pixel at the reference."""

    def __init__(self, model: nn.Module, reference: Tensor, start: int, side: int) -> None:
        super().__init__()
        self.model, self.reference, self.start, self.side = model, reference, start, side  # reference (1, H, W)

    def forward(self, z: Tensor) -> Tensor:
        a, s = self.start, self.side
        full = self.reference.expand(z.shape[0], *self.reference.shape).clone()
        full[:, :, a:a + s, a:a + s] = z.view(-1, 1, s, s)
        return self.model(full)


def measure(source: str, samples: int, data_root: str | None, accuracy: bool, grid: int = 3,
            eval_samples: int = 500) -> dict[str, Any]:
    """Own error against the exact Shapley values on the central `grid x grid` patches of the first test images."""
    loaded = load_source(source, torch.device("cpu"))
    model = loaded.model.double().eval()
    test = load_split(loaded, "test", data_root)
    x = torch.stack([torch.as_tensor(test[i][0]) for i in range(samples)]).double()
    SIDE = grid * PATCH
    START = (x.shape[-1] - SIDE) // 2
    n = grid * grid
    reference = model.reference.view(-1, 1, 1).expand(x.shape[1:]).clone()
    region = x[:, :, START:START + SIDE, START:START + SIDE].reshape(samples, -1)
    game = RegionGame(model, reference, START, SIDE)
    players = patch_players(SIDE, SIDE, PATCH).reshape(-1)
    start = time.perf_counter()
    with torch.no_grad():
        exact = exact_shapley(game, region, reference[:, START:START + SIDE, START:START + SIDE].reshape(-1),
                              players=players, max_players=n, max_batch=4096)
        oracle_s = time.perf_counter() - start
        full = reference.expand(samples, *reference.shape).clone()
        full[:, :, START:START + SIDE, START:START + SIDE] = x[:, :, START:START + SIDE, START:START + SIDE]
        expl = model.explain(full)
    target = expl.output.argmax(1)
    outside = torch.ones(x.shape[-2:], dtype=torch.bool)
    outside[START:START + SIDE, START:START + SIDE] = False  # missingness: 0 there
    own_pixels = expl.attributions[:, START:START + SIDE, START:START + SIDE].reshape(samples, -1, expl.num_outputs)
    own = own_pixels.new_zeros(samples, n, expl.num_outputs).index_add(1, players, own_pixels)
    pick = target.view(-1, 1, 1).expand(-1, n, 1)
    own_t, exact_t = own.gather(2, pick)[..., 0], exact.attributions.gather(2, pick)[..., 0]
    result = {"source": source, "samples": samples, "players": n,
              "region": f"rows/cols {START}..{START + SIDE - 1}", "oracle_seconds": round(oracle_s, 1),
              "own_rel_l2_error": float((own_t - exact_t).norm() / exact_t.norm()),
              "outside_region_max_abs": float(expl.attributions[:, outside].abs().max()),
              "local_accuracy_residual": expl.local_accuracy_error()}
    if accuracy:
        model.float()
        subset = Subset(test, range(min(eval_samples, len(test))))
        metrics = evaluate(model, DataLoader(subset, batch_size=250), loaded.info.num_classes, torch.device("cpu"))
        result["test_acc"] = metrics["acc"]
        result["test_images"] = len(subset)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapnet_conv_mnist")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--grid", type=int, default=3, help="patches per side of the game (3: 9 players, 4: 16)")
    parser.add_argument("--train", default=None, help="a fine-tune config to run and measure")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--accuracy", action="store_true", help="also evaluate the test accuracy (--eval-samples)")
    parser.add_argument("--out", default="runs/fidelity_conv.json")
    parser.add_argument("--no-before", action="store_true", help="do not measure --model (measured earlier)")
    parser.add_argument("--eval-samples", type=int, default=500,
                        help="test images for the accuracy (and validation images / 5 during the fine-tune)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    if not args.no_before:
        results.append(measure(args.model, args.samples, args.data_root, args.accuracy, args.grid, args.eval_samples))
        print(json.dumps(results[-1]), flush=True)
    if args.train:
        cfg = load_config(args.train)
        folder = cfg.resolved_output_dir()
        if not (folder / "summary.json").is_file():
            # Evaluation on CPU costs as much as training here: the fine-tune validates on a subset and tests on the
            # first `eval_samples` test images (the same ones `measure` uses).
            bundle = load_data(cfg)
            small = DataBundle(bundle.train, Subset(bundle.val, range(min(args.eval_samples // 5, len(bundle.val)))),
                               Subset(bundle.test, range(min(args.eval_samples, len(bundle.test)))), bundle.info)
            train(cfg, output_dir=folder, overwrite=True, data=small)
        results.append(measure(str(folder / "last.pt"), args.samples, args.data_root, args.accuracy, args.grid,
                               args.eval_samples))
        summary = json.loads((folder / "summary.json").read_text())
        results[-1]["trainer_test_acc"] = summary.get("test", {}).get("acc")
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
