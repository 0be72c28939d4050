"""The `shapnets` command line (also `python -m training`).

    shapnets train CONFIG [--set section.key=value]... [--output DIR] [--resume] [--overwrite]
    shapnets eval CHECKPOINT_OR_NAME [--split test|val] [--data-root DIR]
    shapnets explain CHECKPOINT_OR_NAME [--index N]... [--input CSV] [--split test] [--out plot.png]
    shapnets zoo list [PATTERN] [--pretrained]
    shapnets zoo info NAME [--json]
    shapnets interactions CHECKPOINT_OR_NAME [--index I] [--layer L] [--top K] [--max-order M] [--target C] [--out PNG]
    shapnets bench [fidelity|speed|scaling|accuracy|interactions]... [--out DIR] [--quick]

Mistakes in what was asked (bad config key, missing file, unknown model, missing data folder) print one line to
stderr and exit with status 2; `--debug` shows the traceback instead. A diverged run exits with status 1.
Multi-process training: `torchrun --nproc_per_node N -m training train CONFIG`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import UserError, load_config
from .sources import load_source, load_split  # re-exported: `training.cli.load_source` was their home

__all__ = ["build_parser", "main"]

log = logging.getLogger("training")

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1


# ------------------------------------------------------------------------------------------------ commands
def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train

    cfg = load_config(args.config, args.set)
    result = train(cfg, output_dir=args.output, resume=args.resume, overwrite=args.overwrite)
    if args.quiet:  # otherwise the log already ended with this line
        print(result["summary"])
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from .distributed import resolve_device
    from .trainer import evaluate

    device = resolve_device(args.device)
    loaded = load_source(args.source, device)
    dataset = load_split(loaded, args.split, args.data_root)
    loader = DataLoader(dataset, batch_size=args.batch_size)
    metrics = evaluate(loaded.model, loader, loaded.info.num_classes, device)
    print(f"{loaded.source} on {loaded.info.name}/{args.split} ({len(dataset)} samples): "
          f"acc {100 * metrics['acc']:.2f}%  macro acc {100 * metrics['acc_macro']:.2f}%  "
          f"loss {metrics['loss']:.4f}  ECE {metrics['ece']:.4f}")
    if args.json:
        print(json.dumps({"source": loaded.source, "split": args.split, "samples": len(dataset), **metrics}))
    return 0


def _read_csv_inputs(path: str, info: Any) -> tuple[Tensor, list[int | None]]:
    """Raw rows of a CSV file (header of the training columns, target optional) -> model input and labels.

    The model's recorded preprocessing (column order, categories, missing-value fills, standardisation) is
    applied here; see `zoo.preprocessing.TabularPreprocessor`.
    """
    from zoo.preprocessing import OutOfRangeWarning, PreprocessingError, TabularPreprocessor

    if len(info.input_shape) != 1 or not info.feature_names:
        raise UserError(f"--input CSV rows need a tabular model; {info.name} inputs have shape {info.input_shape}")
    if not Path(path).is_file():
        raise UserError(f"--input: no such CSV file: {path}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OutOfRangeWarning)
            x, labels = TabularPreprocessor.from_data_info(info).encode(path, source=Path(path).name)
        for warning in caught:  # one log line each, without warnings' source-line echo
            log.warning("warning: %s", warning.message)
        return x, labels
    except PreprocessingError as e:
        raise UserError(f"--input: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--input: {path} is not a UTF-8 text file ({e.reason}): is it really a CSV?") from None


def _display_values(info: Any, x: Tensor) -> list[str]:
    """Per-feature values for printing: raw (un-standardized, category names) when the data set allows it."""
    from .data import raw_values

    try:
        return [v if isinstance(v, str) else f"{v:.4g}" for v in raw_values(info, x)]
    except (ValueError, KeyError):
        return [f"{float(v):.4g}" for v in x]


def _cmd_explain(args: argparse.Namespace) -> int:
    from .distributed import resolve_device

    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    if args.raw:
        raise UserError("--raw is gone: --input rows are always raw values (the training columns by name), "
                        "preprocessed here with the model's recorded training statistics")
    device = resolve_device(args.device)
    loaded = load_source(args.source, device)
    info = loaded.info
    if not hasattr(loaded.model, "explain"):
        raise UserError(f"{type(loaded.model).__name__} has no explain(): not a self-explaining model")
    indices: list[int] = list(args.index or [])
    csv_inputs: list[str] = []
    for item in args.input or []:
        (indices.append(int(item)) if item.lstrip("-").isdigit() else csv_inputs.append(item))
    labels: list[int | None] = []
    if csv_inputs:
        read = [_read_csv_inputs(p, info) for p in csv_inputs]
        x = torch.cat([t for t, _ in read])
        labels = [label for _, rows in read for label in rows]
        names = [f"{Path(p).name} row {i + 1}" for p, (t, _) in zip(csv_inputs, read) for i in range(len(t))]
    else:
        dataset = load_split(loaded, args.split, args.data_root)
        indices = indices or [0]
        bad = [i for i in indices if not -len(dataset) <= i < len(dataset)]
        if bad:
            raise UserError(f"--index {bad} out of range: the {args.split} split has {len(dataset)} samples")
        samples = [dataset[i] for i in indices]
        x = torch.stack([s[0] for s in samples])
        labels = [int(s[1]) for s in samples]
        names = [f"{args.split}[{i}]" for i in indices]
    with torch.no_grad():
        expl = loaded.model.explain(x.to(device)).detach().cpu()
    class_names = list(info.class_names)
    feature_names = list(info.feature_names) if info.feature_names else None
    for b, sample_name in enumerate(names):
        predicted = int(expl.output[b].argmax())
        target = args.target if args.target is not None else predicted
        if not 0 <= target < len(class_names):
            raise UserError(f"--target {target} out of range for {len(class_names)} classes")
        truth = f", true {class_names[labels[b]]}" if labels[b] is not None else ""
        print(f"{sample_name}: predicted {class_names[predicted]}{truth}; explaining class {class_names[target]} "
              f"(logit {float(expl.output[b, target]):.4f} = base {float(expl.base[b, target]):.4f} "
              f"+ sum of attributions)")
        phi = expl.attributions[b, ..., target]
        flat = phi.flatten()
        order = flat.abs().argsort(descending=True)[: args.top]
        shown = _display_values(info, x[b]) if feature_names is not None else []
        for rank_, i in enumerate(order.tolist(), start=1):
            if feature_names is not None:
                label = f"{feature_names[i]} = {shown[i]}"
            else:
                coords = [int(c) for c in torch.unravel_index(torch.tensor(i), phi.shape)]
                label = "pixel (" + ", ".join(str(c) for c in coords) + ")"
            print(f"  {rank_:>2}. {label:<40} {float(flat[i]):+.4f}")
        if len(order) < flat.numel():
            rest = float(flat.sum() - flat[order].sum())
            print(f"      ({flat.numel() - len(order)} more not shown, their sum {rest:+.4f})")
        if args.out:
            out = Path(args.out)
            if len(names) > 1:
                out = out.with_name(f"{out.stem}_{b}{out.suffix}")
            written = _plot(expl, b, out, feature_names, class_names, x[b] if feature_names is None else None, target,
                            top=args.top, feature_values=shown or None, sample_id=sample_name,
                            label=class_names[labels[b]] if labels[b] is not None else None)
            print(f"  plot: {written}")
    return 0


def _plot(expl: Any, index: int, out: Path, feature_names: Any, class_names: Any, image: Any, target: int,
          **shown: Any) -> Path:
    """`plot_explanation` of one sample; `shown`: its `top`, `feature_values`, `sample_id` and `label`."""
    try:
        from .plots import plot_explanation
    except ImportError as e:
        raise UserError(f"--out needs training/plots.py: {e}") from e
    return plot_explanation(expl, index, out, feature_names=feature_names, class_names=class_names, image=image,
                            target=target, **shown)


def _cmd_interactions(args: argparse.Namespace) -> int:
    from shapnets import ConvShapNet, DeepShapNet, ShallowShapNet
    from shapnets.interactions import check_layer

    from .distributed import resolve_device

    device = resolve_device(args.device)
    loaded = load_source(args.source, device)
    model, info = loaded.model, loaded.info
    if not isinstance(model, ShallowShapNet | DeepShapNet | ConvShapNet):
        raise UserError(f"{type(model).__name__} has no exact interactions: a Shallow, Deep or Conv ShapNet is needed")
    if args.max_order is not None and args.max_order < 1:
        raise UserError(f"--max-order must be >= 1 (the largest subset size listed), got {args.max_order}")
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    dataset = load_split(loaded, args.split, args.data_root)
    if not -len(dataset) <= args.index < len(dataset):
        raise UserError(f"--index {args.index} out of range: the {args.split} split has {len(dataset)} samples")
    sample, label = dataset[args.index]
    x = torch.as_tensor(sample)[None].to(device)
    class_names = list(info.class_names)
    with torch.no_grad():
        predicted = int(model(x).argmax(1))
        if isinstance(model, ShallowShapNet):
            if args.layer is not None:
                raise UserError("--layer: a Shallow ShapNet has one layer; its interactions are the network's own")
            found, game, channels_are_classes = model.interactions(x, args.max_order), "the network's exact game", True
        else:
            try:
                stage = check_layer(-1 if args.layer is None else args.layer, model.num_stages, type(model).__name__)
            except IndexError as e:
                raise UserError(f"--layer: {e}") from None
            found = model.interactions(x, stage, args.max_order)
            channels_are_classes = stage == model.num_stages - 1
            game = (f"the per-layer game of layer {stage} of 0..{model.num_stages - 1} (with respect to that layer's "
                    "own inputs; not the network's end-to-end interactions)")
    found = found.detach().cpu()
    # A hidden layer's outputs are channels, not classes: its default is the channel the sample moves most.
    found.class_names = class_names if channels_are_classes else [f"channel {c}" for c in range(found.num_outputs)]
    if found.player_names is None and info.feature_names and not isinstance(model, ConvShapNet):
        found.player_names = list(info.feature_names)
    target = args.target
    if target is None:
        target = predicted if channels_are_classes else int((found.output - found.base)[0].abs().argmax())
    if not 0 <= target < found.num_outputs:
        what = "classes" if channels_are_classes else f"channels in layer {stage}"
        raise UserError(f"--target {target} out of range for {found.num_outputs} {what}")
    from .plots import interactions_table

    print(f"{args.split}[{args.index}]: predicted {class_names[predicted]}, true {class_names[int(label)]}; "
          f"{type(model).__name__}: top {args.top} Harsanyi dividends of {game}")
    print(interactions_table(found, 0, target, k=args.top))
    if args.out:
        from .plots import plot_interactions, plot_pixel_interactions

        if isinstance(model, ConvShapNet):  # pixels: the strongest pairs drawn over the image
            written = plot_pixel_interactions(found, args.out, image=x[0].cpu(), k=max(args.top, 2), target=target)
        else:
            written = plot_interactions(found, args.out, k=args.top, target=target)
        print(f"  plot: {written}")
    return 0


def _cmd_zoo_list(args: argparse.Namespace) -> int:
    import zoo

    for name in zoo.list_models(args.pattern or "", pretrained=args.pretrained):
        print(name)
    return 0


def _cmd_zoo_info(args: argparse.Namespace) -> int:
    import zoo

    try:
        info = zoo.model_info(args.name)
    except (KeyError, ValueError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UserError(f"zoo info {args.name!r}: {message}") from e
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(zoo.model_summary(info))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_to_zoo

    try:
        out = export_to_zoo(args.source, args.name, args.out, data_root=args.data_root,
                            fidelity_samples=args.fidelity_samples, notes=args.note)
    except (KeyError, ValueError, TypeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UserError(f"export {args.source!r}: {message}") from e
    print(f"exported {args.name} to {out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import KINDS, limit_thread_pools, run

    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown benchmark(s) {unknown}; choose from {', '.join(KINDS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
        limit_thread_pools(args.threads)  # KernelShap's scikit-learn BLAS too, not only torch's pool
    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    # The reports name the command that made them; rebuilt from the arguments (argv may be a test's or a script's).
    command = " ".join(["shapnets bench", *args.kinds, "--out", str(args.out), *(["--quick"] if args.quick else []),
                        *(["--models", *args.models] if args.models else []),
                        *(["--samples", str(args.samples)] if args.samples else []),
                        *(["--device", args.device] if args.device != "cpu" else [])])
    results = run(args.kinds, out=args.out, quick=args.quick, device=args.device, data_root=args.data_root,
                  samples=args.samples, zoo_models=args.models, command=command, verbose=not args.quiet)
    for kind in results:
        print(f"{kind}: {Path(args.out) / kind}.md" if args.out else f"{kind}: {len(results[kind])} rows")
    return 0


# ------------------------------------------------------------------------------------------------ parser and main
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `shapnets`."""
    parser = argparse.ArgumentParser(prog="shapnets", description="Train, evaluate and explain self-explaining "
                                     "networks (ShapNets).")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--quiet", action="store_true", help="only warnings and the final result")
    # The same flags after the command (`shapnets train c.yaml --debug`); SUPPRESS keeps the global value when absent.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", parents=[common], help="train a model from a YAML config")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.epochs=5")
    p.add_argument("--output", default=None, help="run folder (default: the config's output_dir or runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder from last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output folder")
    p.set_defaults(func=_cmd_train)

    def add_source(p: argparse.ArgumentParser) -> None:
        p.add_argument("source", metavar="CHECKPOINT_OR_NAME",
                       help="a checkpoint (.pt), a run folder, a pretrained folder or a zoo model name")
        p.add_argument("--data-root", default=None, help="folder holding the raw data (default: $SHAPNETS_DATA)")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = commands.add_parser("eval", parents=[common], help="evaluate a checkpoint or zoo model")
    add_source(p)
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    p.set_defaults(func=_cmd_eval)

    p = commands.add_parser("explain", parents=[common], help="explain predictions of a checkpoint or zoo model")
    add_source(p)
    p.add_argument("--index", type=int, action="append", help="sample index in --split (repeatable; default 0)")
    p.add_argument("--input", nargs="+", metavar="CSV_OR_INDEX",
                   help="CSV files of raw rows (a header row naming the training columns; the target column is "
                   "optional), preprocessed here as in training; or sample indices")
    p.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # gone: answered with an explanation
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--target", type=int, default=None, help="class to explain (default: the predicted class)")
    p.add_argument("--top", type=int, default=10, help="how many attributions to print and plot (the rest are "
                   "summed in the plot)")
    p.add_argument("--out", default=None, help="write a plot here (PNG; one file per sample)")
    p.set_defaults(func=_cmd_explain)

    p = commands.add_parser("interactions", parents=[common], help="the largest exact interactions (Harsanyi "
                            "dividends) of one prediction of a Shallow, Deep or Conv ShapNet")
    add_source(p)
    p.add_argument("--index", type=int, default=0, help="sample index in --split (default 0)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--layer", type=int, default=None,
                   help="Deep/Conv ShapNets: the layer whose own game is shown (default: the last; negative counts "
                   "from the end); Shallow ShapNets: the network's exact interactions, no --layer")
    p.add_argument("--top", type=int, default=10, help="how many subsets to print (and plot)")
    p.add_argument("--max-order", type=int, default=None, help="list only subsets of at most this many players")
    p.add_argument("--target", type=int, default=None,
                   help="the class (or the hidden layer's channel) to show (default: the predicted class, or the "
                   "channel the sample moves most)")
    p.add_argument("--out", default=None, help="write a PNG here (tabular: bar chart; Conv: pixel pairs)")
    p.set_defaults(func=_cmd_interactions)

    p = commands.add_parser("export", parents=[common], help="export a trained run into the zoo (weights + card)")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run folder or a .pt checkpoint")
    p.add_argument("--name", required=True, help="the zoo name to export as, e.g. shapnet_deep_yeast")
    p.add_argument("--out", default=None, help="weights folder (default: zoo/weights/<name>)")
    p.add_argument("--data-root", default=None, help="folder holding the raw data (default: $SHAPNETS_DATA)")
    p.add_argument("--fidelity-samples", type=int, default=16, help="test samples used for the fidelity numbers")
    p.add_argument("--note", action="append", default=None,
                   help="a note for config.json and the model card (repeatable), e.g. how the run deviates")
    p.set_defaults(func=_cmd_export)

    p = commands.add_parser("bench", parents=[common], help="benchmarks: fidelity vs the exact Shapley values, speed, "
                            "scaling, accuracy, interactions sparsity (Markdown, JSON and PNG per benchmark)")
    p.add_argument("kinds", nargs="*", metavar="KIND",
                   help="fidelity, speed, scaling, accuracy and/or interactions (default: all five)")
    p.add_argument("--out", default="bench_out", help="folder for <kind>.md / .json / .png (default: bench_out)")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds to a minute; for CI)")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="run fidelity, speed, interactions and the accuracy table's zoo rows on these zoo models "
                   "only, no synthetic ones (default: every shipped one; fidelity: tabular only, plus synthetic "
                   "models; interactions: tabular ShapNets only)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per model (default 8, quick 3; interactions: 200, quick 8)")
    p.add_argument("--data-root", default=None, help="folder holding the raw data (default: $SHAPNETS_DATA)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the scaling benchmark")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (1: stable timings on a shared machine; 0: torch default)")
    p.set_defaults(func=_cmd_bench)

    p = commands.add_parser("zoo", help="list and describe registered models")
    zoo_commands = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    q = zoo_commands.add_parser("list", parents=[common], help="list registered models")
    q.add_argument("pattern", nargs="?", default=None, help="fnmatch pattern, e.g. 'shapnet_*'")
    q.add_argument("--pretrained", action="store_true", help="only models with weights")
    q.set_defaults(func=_cmd_zoo_list)
    q = zoo_commands.add_parser("info", parents=[common], help="describe one model: a short summary (architecture, "
                                "data, accuracy, fidelity, size, card)")
    q.add_argument("name", help="a zoo name or a checkpoint folder")
    q.add_argument("--json", action="store_true", help="print the full record (model_info) as JSON instead")
    q.set_defaults(func=_cmd_zoo_info)

    from .figures import add_figure_commands

    p = commands.add_parser("figures", parents=[common], help="figures comparing the explanations of several models")
    add_figure_commands(p.add_subparsers(dest="figure", required=True, metavar="FIGURE"), parents=[common])
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (tests swap it between calls of `main`)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    # The logger passes INFO on (train.log records everything); only the terminal handler is quieted.
    logger = logging.getLogger("training")
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 diverged training, 2 user error)."""
    from .trainer import TrainingDiverged

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        print(f"shapnets {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as e:
        if args.debug:
            raise
        print(f"shapnets {args.command}: training diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        from .distributed import cleanup_distributed

        cleanup_distributed()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
