"""How a saved model's test accuracy depends on its batch-norm statistics: its own, and re-estimated
on training images the way the coordinator's evaluator and `crowdtrain export` do (``recalibrate_bn``),
with the crops padded by zeros, padded by reflection, or not cropped at all.

A job's model has aggregated statistics that do not match its weights, so the coordinator re-estimates
them before every evaluation; one process evaluates with its own. Comparing the two is fair only when
the re-estimation does not itself cost accuracy: run this on one process's model and on a job's.

    python bench/bn_calibration.py --data PATH MODEL.pt [MODEL.pt ...] [--out FILE.json]
    python bench/bn_calibration.py --data PATH MODEL.pt ... --sizes 1024 4096 16384 --seeds 0 1 2

With ``--sizes``: only the evaluator's own calibration (the recipe's crops and flips on the first N
training images, as ``coordinator/evaluator.py`` does with N = 1,024), for each N and crop seed.

Prints one line per model and calibration, and writes them as JSON with the date, data and hardware.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import hardware  # noqa: E402
from models import registry  # noqa: E402
from models.data import load_cifar10  # noqa: E402
from models.export import read_pt  # noqa: E402
from models.local import recalibrate_bn  # noqa: E402
from models.train import evaluate  # noqa: E402

CALIBRATIONS = (   # (label, crop_pad or None for the recipe's, reflect, seeds)
    ("zero-padded crops (the evaluator before 2026-12-03)", None, False, (0,)),
    ("reflected crops", None, True, (0, 1)),
    ("no crops, flips only", 0, False, (0,)),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help=".pt files (crowdtrain train / crowdtrain export)")
    ap.add_argument("--data", required=True, help="CIFAR-10 path")
    ap.add_argument("--images", type=int, default=1024, help="calibration images (the evaluator's: 1024)")
    ap.add_argument("--sizes", type=int, nargs="+", help="instead of the calibrations above: the evaluator's, on "
                    "the first N training images, for each N")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="crop seeds for each --sizes N")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_cifar10(args.data, progress=False)
    test_x, test_y = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)
    calib = torch.from_numpy(np.ascontiguousarray(data.train_x[:max(args.sizes or [args.images])]))
    rows = []
    for path in args.models:
        name, model, _ = read_pt(path)
        model.eval()
        recipe = registry.get(name).recipe   # the crops and flips the model trained on

        def record(label: str, seed: int | None, acc: float) -> None:
            rows.append({"model": str(path), "name": name, "calibration": label, "seed": seed, "test_acc": acc})
            print(f"{path}: {label}{'' if seed is None else f' (crop seed {seed})'}: {100 * acc:.2f}%", flush=True)

        record("its own statistics", None, evaluate(model, test_x, test_y)[1])
        for n in args.sizes or []:   # the evaluator's calibration (coordinator/evaluator.py), N images
            for seed in args.seeds:
                m = copy.deepcopy(model)
                recalibrate_bn(m, calib[:n], crop_pad=recipe.crop_pad, flip=recipe.flip, seed=seed,
                               reflect=recipe.crop_reflect)
                record(f"the evaluator's, {n} images", seed, evaluate(m, test_x, test_y)[1])
        for label, crop_pad, reflect, seeds in ([] if args.sizes else CALIBRATIONS):
            for seed in seeds:
                m = copy.deepcopy(model)
                recalibrate_bn(m, calib, crop_pad=recipe.crop_pad if crop_pad is None else crop_pad,
                               flip=recipe.flip, seed=seed, reflect=reflect)
                record(label, seed, evaluate(m, test_x, test_y)[1])
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "data": args.data,
                                        "images": args.sizes or args.images, "hardware": hardware(),
                                        "command": " ".join(["python", "bench/bn_calibration.py", *sys.argv[1:]]),
                                        "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
