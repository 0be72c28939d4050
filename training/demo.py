"""`make demo`: train a Shallow ShapNet on Breast Cancer, verify its explanations, plot one.

Breast Cancer (scikit-learn) has 30 features: 10 cell-nucleus measurements (radius, texture, ...)
each summarised three ways (mean, standard error, worst). The players of our game are the 10
measurements, each a 3-channel vector, so the exact Shapley oracle needs only 2^10 evaluations and
every explanation the network gives can be checked against it.

Run: `python -m training.demo --out demo_out` (CPU, well under a minute).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from shapnets import ShallowShapNet, exact_shapley
from training.data import load_dataset
from training.plots import explanation_table, plot_explanation


def as_measurements(x: torch.Tensor) -> torch.Tensor:
    # sklearn's column order is 10 means, 10 standard errors, 10 worst values.
    return rearrange(x, "b (stat m) -> b m stat", stat=3)


def stacked(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[dataset[i] for i in range(len(dataset))])
    return as_measurements(torch.stack(xs)), torch.stack(ys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the plot")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    bundle = load_dataset("breast_cancer", seed=args.seed)
    info = bundle.info
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = map(stacked, (bundle.train, bundle.val, bundle.test))
    names = [n.removeprefix("mean ") for n in info.feature_names[:10]]
    print(f"Breast Cancer: {len(x_train)} train / {len(x_val)} val / {len(x_test)} test samples, "
          f"{len(names)} players (measurements) x 3 channels (mean, se, worst), standardized on train")

    # Reference 0 = the training mean of every channel (the data are standardized).
    model = ShallowShapNet(len(names), info.num_classes, groups="pairs", hidden=(16,), in_channels=3,
                           feature_names=names)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    # Keep the weights with the lowest validation loss (46 validation samples make accuracy too coarse).
    start, best = time.perf_counter(), (float("inf"), None, 0.0)
    for _ in range(args.epochs):  # full-batch: the whole training set is 409 samples
        model.train()
        loss = F.cross_entropy(model(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            val_logits = model(x_val)
            val_loss = F.cross_entropy(val_logits, y_val).item()
        if val_loss < best[0]:
            val_acc = (val_logits.argmax(1) == y_val).float().mean().item()
            best = (val_loss, {k: v.clone() for k, v in model.state_dict().items()}, val_acc)
    model.load_state_dict(best[1])
    model.eval()
    with torch.no_grad():
        test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"trained {len(model.groups)} pairwise Shapley modules in {time.perf_counter() - start:.1f}s: "
          f"val accuracy {best[2]:.3f}, test accuracy {test_acc:.3f}")

    # The network's own explanation vs brute force over all 2^10 coalitions, in float64.
    model64 = model.double()
    x = x_test[:8].double()
    with torch.no_grad():
        t0 = time.perf_counter()
        expl = model64.explain(x)
        t1 = time.perf_counter()
        oracle = exact_shapley(model64, x, model64.reference)
        t2 = time.perf_counter()
    error = (expl.attributions - oracle.attributions).abs().max().item()
    print(f"explanations of {len(x)} test samples vs the exact oracle: max |error| = {error:.2e}, "
          f"local accuracy residual {expl.local_accuracy_error():.2e}; "
          f"explain {1e3 * (t1 - t0):.1f} ms vs oracle {1e3 * (t2 - t1):.0f} ms")

    print("\n" + explanation_table(expl, 0, feature_names=names, class_names=info.class_names))
    path = plot_explanation(expl, 0, args.out / "breast_cancer_explanation.png", feature_names=names,
                            class_names=info.class_names, top=10, sample_id="test[0]", label=int(y_test[0]))
    print(f"\nwrote {path}")
    return 0 if error < 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
