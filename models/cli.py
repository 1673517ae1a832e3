"""The command lines of ``crowdtrain train`` and ``crowdtrain eval``: parse, then import the work.

Torch-free, so ``--help`` and a bad argument answer at once; ``models.train`` (the recipe and
its ``run``) and ``models.export`` (``evaluate``, the predictors) load after parsing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.recipe import LOSSES, SCHEDULES

DEFAULT_MODEL = "resnet_fast"
RECIPE = "the model's recipe"


def train_parser(prog: str = "crowdtrain train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train one registered model on CIFAR-10 in this process. "
                                "Writes OUT/metrics.jsonl, OUT/model.pt, OUT/config.json and OUT/curves.png; "
                                "Ctrl-C stops after the current step and keeps what was written.")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"registered model name, see `crowdtrain models` (default: {DEFAULT_MODEL})")
    p.add_argument("--data", metavar="PATH", help="CIFAR-10: official archive or folder, or image-folder layout "
                   "(directory or .tar.gz) (default: $CROWDTRAIN_DATA)")
    p.add_argument("--download", action="store_true",
                   help="download the official archive if no data is found (default: off)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: runs/<model>-<time>)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the batches and the augmentation (default: 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: all cores)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="where to train: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N; "
                   "a seed gives the same batches, crops and flips on every device (default: auto)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="use only the first N training images (default: the whole split)")
    p.add_argument("--no-progress", action="store_true", help="no progress output (default: off: a line per epoch, and a progress bar on a terminal)")
    hp = p.add_argument_group(f"hyperparameters (default: {RECIPE}; `crowdtrain models --recipes` lists them)")
    hp.add_argument("--epochs", type=int, metavar="N", help=f"passes over the training split (default: {RECIPE})")
    hp.add_argument("--batch-size", type=int, metavar="N", help=f"samples per SGD step (default: {RECIPE})")
    hp.add_argument("--lr", type=float, metavar="X", help=f"peak learning rate (default: {RECIPE})")
    hp.add_argument("--momentum", type=float, metavar="X", help=f"SGD momentum coefficient (default: {RECIPE})")
    hp.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                    help=f"Nesterov momentum (default: {RECIPE})")
    hp.add_argument("--weight-decay", type=float, metavar="X",
                    help=f"L2 coefficient on weights and kernels (default: {RECIPE})")
    hp.add_argument("--label-smoothing", type=float, metavar="X",
                    help=f"cross-entropy target smoothing, 0..1 (default: {RECIPE})")
    hp.add_argument("--loss", choices=LOSSES, help=f"ce (cross-entropy) or focal (default: {RECIPE})")
    hp.add_argument("--focal-gamma", type=float, metavar="X",
                    help=f"focusing exponent of the focal loss (default: {RECIPE})")
    hp.add_argument("--schedule", choices=SCHEDULES, help=f"learning-rate schedule, per step (default: {RECIPE})")
    hp.add_argument("--warmup", type=float, metavar="F",
                    help=f"fraction of the run spent warming up (default: {RECIPE})")
    hp.add_argument("--lr-start", type=float, metavar="F",
                    help=f"lr where the warmup starts, a fraction of the peak (default: {RECIPE})")
    hp.add_argument("--lr-end", type=float, metavar="F",
                    help=f"lr at the end of the run, a fraction of the peak (default: {RECIPE})")
    hp.add_argument("--crop-pad", type=int, metavar="PIXELS",
                    help=f"random-crop padding, 0: no crop (default: {RECIPE})")
    hp.add_argument("--crop-reflect", action=argparse.BooleanOptionalAction, default=None,
                    help=f"pad crops by mirroring the edges instead of with zeros; one process (default: {RECIPE})")
    hp.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                    help=f"random horizontal flips (default: {RECIPE})")
    hp.add_argument("--alt-flip", action=argparse.BooleanOptionalAction, default=None,
                    help=f"with --flip, each image's flip alternates epoch to epoch from a random first one; one process "
                    f"(default: {RECIPE})")
    hp.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None,
                    help=f"average the weights along the run (default: {RECIPE})")
    hp.add_argument("--tta", type=int, choices=(0, 1, 2),
                    help=f"test-time augmentation of the last evaluation: 0 none, 1 flip, 2 flip and one-pixel "
                    f"shifts (default: {RECIPE})")
    return p


def eval_parser(prog: str = "crowdtrain eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Test accuracy of a .pt or .onnx model on the CIFAR-10 "
                                "test split.")
    p.add_argument("--model", required=True, metavar="FILE",
                   help="model file: .pt (crowdtrain train / export) or .onnx (export) (required)")
    p.add_argument("--data", metavar="PATH", help="CIFAR-10, as for `crowdtrain train` (default: $CROWDTRAIN_DATA)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N test images (default: all 10,000)")
    p.add_argument("--threads", type=int, metavar="N", help="torch / onnxruntime threads (default: all cores)")
    p.add_argument("--tta", type=int, choices=(0, 1, 2),
                   help="test-time augmentation: 0 none, 1 flip, 2 flip and one-pixel shifts; the accuracy without "
                   "it is printed beside (default: the model's recipe, as `crowdtrain train` reports its last "
                   "evaluation; 0 for most models, 2 for airbench)")
    return p


def train(argv: list[str], prog: str = "crowdtrain train") -> int:
    args = train_parser(prog).parse_args(argv)
    from models.train import run

    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def evaluate(argv: list[str], prog: str = "crowdtrain eval") -> int:
    p = eval_parser(prog)
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit: expected a positive integer")
    from models.export import run_eval

    return run_eval(args)


def cli(argv: list[str], prog: str | None = None, command: str = "train") -> int:
    """``crowdtrain train`` or ``crowdtrain eval``, by ``command``."""
    if command == "eval":
        return evaluate(argv, prog or "crowdtrain eval")
    return train(argv, prog or "crowdtrain train")
