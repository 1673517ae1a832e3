"""The command line of ``crowdtrain export``: parse, then import the work (``coordinator.model_out``).

Torch-free, so ``--help`` and a bad argument answer at once.
"""
from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("onnx", "pt")   # models.export.FORMATS (tests/test_cli.py holds them equal)


def build_parser(prog: str = "crowdtrain export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Take a model out as an ONNX inference graph (uint8 "
                                "images [N,3,32,32] -> logits [N,10]) or a .pt checkpoint: a version from a "
                                "coordinator's state directory (read only, a running one's too), or a "
                                "`crowdtrain train` model.pt. One of --state and --model is required.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--state", type=Path, metavar="DIR",
                        help="the coordinator's --state directory (default: none; this or --model)")
    source.add_argument("--model", type=Path, metavar="FILE",
                        help="a .pt checkpoint to convert, e.g. crowdtrain train's OUT/model.pt (default: none; "
                             "this or --state)")
    p.add_argument("--format", choices=FORMATS, help="onnx or pt (default: from --out's suffix, else onnx)")
    p.add_argument("--out", type=Path, metavar="FILE", help="output file (default: <job>-<model>-v<N>.<format> "
                   "here, or --model's path with the format's suffix)")
    p.add_argument("--version", default="final", help="with --state: a version number, 'final' (the latest) or "
                   "'best' (highest test accuracy still on disk) (default: final)")
    p.add_argument("--no-recalibrate", action="store_true", help="with --state: keep the version's batch-norm "
                   "statistics as aggregated (default: off: re-estimated as the evaluator does)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (default: all cores)")
    return p


def cli(argv: list[str], prog: str = "crowdtrain export", command: str = "export") -> int:
    args = build_parser(prog).parse_args(argv)
    from coordinator.model_out import run_export

    return run_export(args)
