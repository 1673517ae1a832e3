"""What a donor's GPU gives a Python worker: a work unit's throughput on each torch device.

Times ``models.local.run_local`` (the one function a Python worker trains a unit with), end to end
as the worker runs it: the base state loaded into a cached model, the shard moved to the device,
``--steps`` SGD steps of the recipe's batch, the delta back as CPU arrays. Per model and device:
one untimed warm-up unit, then ``--repeats`` timed units; the median is reported, in samples/s
and ms per step. Side by side in one run, so the devices share the machine's state.

    python bench/gpu_unit.py --data ../shared/data --devices cpu cuda --out bench/out/gpu_unit

Writes OUT/config.json and OUT/results.json; prints one line per model and device. Without
``--data`` the shard is random pixels (timing only: the numbers do not depend on the images).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import commit, hardware  # noqa: E402
from models import registry  # noqa: E402
from models.local import run_local, state_arrays  # noqa: E402
from models.train import describe_device, resolve_device  # noqa: E402


def shard(data, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if data is not None:
        return data.train_x[:n], data.train_y[:n]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def measure(name: str, device: torch.device, data, steps: int, repeats: int, batch: int | None) -> dict:
    spec = registry.get(name)
    recipe = spec.recipe if batch is None else dataclasses.replace(spec.recipe, batch_size=batch)
    torch.manual_seed(0)
    model = registry.build(name)
    base = state_arrays(model)
    x, y = shard(data, steps * recipe.batch_size)
    lr = recipe.lr * 0.1
    run_local(name, base, x, y, recipe, min(3, steps), lr, seed=1, model=model, device=device)   # warm-up
    seconds = []
    for r in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = run_local(name, base, x, y, recipe, steps, lr, seed=2 + r, model=model, device=device)
        seconds.append(time.perf_counter() - t0)
        if not np.isfinite(out.mean_loss):
            raise FloatingPointError(f"{name} on {device}: loss {out.mean_loss}")
    mid = statistics.median(seconds)
    return {"model": name, "device": describe_device(device), "batch": recipe.batch_size, "steps": steps,
            "seconds": seconds, "median_s": mid, "samples_per_s": steps * recipe.batch_size / mid,
            "ms_per_step": 1000 * mid / steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="CIFAR-10 path (default: random pixels)")
    p.add_argument("--models", nargs="+", default=["cnn", "alexnet", "physics_alexnet", "resnet_fast", "airbench"])
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="torch devices, side by side")
    p.add_argument("--steps", type=int, default=20, help="SGD steps per timed unit")
    p.add_argument("--repeats", type=int, default=3, help="timed units per model and device")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: each model's recipe)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / f"gpu_unit-{time.strftime('%Y-%m-%d')}")
    args = p.parse_args(argv)
    try:
        devices = [resolve_device(d) for d in args.devices]
    except ValueError as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    data = None
    if args.data:
        from models.data import load_cifar10
        data = load_cifar10(args.data, progress=False)
    gpu = next((str(d) for d in devices if d.type == "cuda"), None)
    config = {"date": time.strftime("%Y-%m-%d %H:%M"), "hardware": hardware(gpu), "commit": commit(),
              "threads": torch.get_num_threads(), "command": "python " + " ".join(sys.argv),
              "data": data.source if data is not None else "random pixels", **vars(args) | {"out": str(args.out)}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    rows = []
    for name in args.models:
        for device in devices:
            row = measure(name, device, data, args.steps, args.repeats, args.batch)
            rows.append(row)
            print(f"{name:16s} {row['device']:28s} batch {row['batch']:5d}: {row['samples_per_s']:9.0f} samples/s, "
                  f"{row['ms_per_step']:8.2f} ms/step", flush=True)
            (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
