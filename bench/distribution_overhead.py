"""Distribution overhead: K workers + a coordinator vs the single-process trainer, same cores.

Claim (goal >= 0.95): cutting training into work units costs little throughput. Same model,
same batch size, same machine, measured side by side in one run, single-process first and
last (their mean is the baseline) with the distributed run in between:
  - single process: ``sgd_step`` in a loop with ``--threads K`` torch threads, training
    samples/s over the timed steps (warm-up excluded);
  - distributed: ``crowdtrain coordinator`` (evaluation off) and K ``crowdtrain worker``
    processes with 1 thread each, on real HTTP on 127.0.0.1; samples/s of the results the
    coordinator accepted within the timed window (warm-up excluded), i.e. everything a unit
    costs: download, decode, training, encoding, submitting, validating, aggregating.

    python bench/distribution_overhead.py --data ../shared/data [--model resnet_fast] [--workers 2]

Writes bench/out/distribution_overhead-<date>/{config,results}.json and its section of
docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import hardware, shown, write_section  # noqa: E402
from models import registry  # noqa: E402
from models.data import load_cifar10  # noqa: E402
from models.train import make_optimizer, sgd_step  # noqa: E402
from tests.helpers.cluster import Cluster  # noqa: E402


def single_process(model_name: str, data, batch: int, threads: int, steps: int, warmup: int = 3) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    recipe = registry.get(model_name).recipe
    model = registry.build(model_name).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, recipe)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        sgd_step(model, opt, x[idx], y[idx], recipe, recipe.lr * 0.1, gen)
    return steps * batch / (time.perf_counter() - t0)


def distributed(model_name: str, data_path: str, batch: int, workers: int, shard_size: int, warmup_s: float,
                window_s: float, tmp: Path) -> dict:
    cluster = Cluster(tmp, "--data", data_path, "--model", model_name, "--batch-size", str(batch),
                      "--shard-size", str(shard_size), "--epochs", "100", "--eval-every", "100000",
                      "--eval-images", "100", worker_threads=1)
    try:
        cluster.start_coordinator()
        for i in range(workers):
            cluster.start_worker(f"w{i + 1}")
        time.sleep(warmup_s)
        t0 = time.time()
        time.sleep(window_s)
        t1 = time.time()
        with sqlite3.connect(cluster.state / "state.db") as db:
            samples, units = db.execute("SELECT COALESCE(SUM(num_samples), 0), COUNT(*) FROM results "
                                        "WHERE accepted BETWEEN ? AND ?", (t0, t1)).fetchone()
            compute = db.execute("SELECT AVG(compute_seconds) FROM results").fetchone()[0]
    finally:
        cluster.stop()
    return {"samples_per_s": samples / (t1 - t0), "units": units, "window_s": t1 - t0,
            "mean_unit_compute_s": compute}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="resnet_fast")
    p.add_argument("--batch", type=int, default=None, help="default: the model's recipe")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-sizes", type=int, nargs="+", default=[1000, 2500], help="images per unit")
    p.add_argument("--steps", type=int, default=30, help="timed single-process steps")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds before the distributed window")
    p.add_argument("--window", type=float, default=90.0, help="seconds of the distributed window")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    batch = args.batch or registry.get(args.model).recipe.batch_size
    data = load_cifar10(args.data, progress=False)
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"distribution_overhead-{date}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"date": date, "model": args.model, "batch": batch, "workers": args.workers, "shard_sizes": args.shard_sizes,
           "steps": args.steps, "warmup_s": args.warmup, "window_s": args.window, "hardware": hardware(),
           "command": "python " + " ".join(sys.argv)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    rows = []
    for shard in args.shard_sizes:
        before = single_process(args.model, data, batch, args.workers, args.steps)
        with tempfile.TemporaryDirectory() as tmp:
            dist = distributed(args.model, args.data, batch, args.workers, shard, args.warmup, args.window, Path(tmp))
        after = single_process(args.model, data, batch, args.workers, args.steps)
        single = (before + after) / 2
        row = {"shard_size": shard, "single_before": before, "single_after": after, "single": single, **dist,
               "ratio": dist["samples_per_s"] / single}
        rows.append(row)
        print(f"{args.model} batch {batch}, units of {shard} images: single {single:.0f} samples/s "
              f"({before:.0f}, {after:.0f}); {args.workers} workers + coordinator {dist['samples_per_s']:.0f} "
              f"samples/s ({dist['units']} units); ratio {row['ratio']:.3f}", flush=True)
        (out / "results.json").write_text(json.dumps({"config": cfg, "rows": rows}, indent=2) + "\n")
    lines = [f"### Distribution overhead ({date})", "",
             f"- {args.model}, batch {batch}; single process with {args.workers} torch threads vs "
             f"{args.workers} workers (1 thread each) + coordinator (evaluation off) on real HTTP on 127.0.0.1.",
             f"- Single process: {args.steps} timed steps before and after the distributed run (mean used). "
             f"Distributed: samples of accepted results in a {args.window:.0f} s window after {args.warmup:.0f} s "
             "of warm-up.",
             f"- Hardware: {cfg['hardware']}. Data: the JPEG copy of CIFAR-10.",
             f"- Command: `{cfg['command']}`; raw results in `{shown(out)}`.", "",
             "| images per unit | SGD steps per unit | single (samples/s) | distributed (samples/s) | ratio |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shard_size']} | {-(-r['shard_size'] // batch)} | {r['single']:.0f} | "
                     f"{r['samples_per_s']:.0f} | {r['ratio']:.3f} |")
    write_section("distribution_overhead", "\n".join(lines), ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
