"""Bytes a unit downloads for its base model, and what it costs in accuracy: whole fp32 versions,
whole fp16 versions, and version deltas (``--version-download``; contract/versions.py), side by side
in the churn simulator (``crowdtrain sim``) at equal samples.

Each model runs one scenario per seed with three entries of the default strategy that differ only
in ``coordinator.version_download``; the simulated workers fetch what ``worker_py`` would (a version
delta from the version they hold, rebuilt and hash-checked, or the whole blob) and ``units.csv``
records each unit's ``model_bytes``. A worker's first unit has nothing to start from; "warm" units
are the others.

    python bench/version_download.py --data /work/shared/data --models cnn resnet_fast --seeds 0
    python bench/version_download.py --report-only --out bench/out/version_download-2026-12-01

Writes ``<out>/config.json``, ``<out>/<model>-s<seed>/`` (the scenario and the simulator's files),
``<out>/results.json`` and the ``version_download`` section of docs/results.md (unless ``--no-docs``).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import commit, hardware, shown, write_section  # noqa: E402

MODES = ("fp32", "fp16", "delta")   # --modes picks among these (fp32 first: the baseline)
STRATEGY = ('name = "async_sgd"\nparams = { staleness = "polynomial", staleness_a = 1.0 }\n')


def scenario(model: str, args: argparse.Namespace) -> str:
    """The parity bench's mild-churn setup (8 workers, the coordinator's default units: 1,000-image
    shards, 4 SGD steps at its own batch and lr), one async_sgd entry per download mode. The network
    is fast enough that a transfer takes no simulated time, so every mode meets the same schedule
    and the modes differ only in the bases the workers train from (bytes are counted all the same)."""
    entries = "".join(f'\n[[strategies]]\n{STRATEGY}label = "{m}"\ncoordinator = {{ version_download = "{m}" }}\n'
                      for m in args.modes)
    return f'''name = "version_download-{model}"
description = "whole fp32 / whole fp16 / version-delta downloads of the unit's base, side by side"
seed = 0
baseline = "fp32"

[model]
name = "{model}"
batch_size = "none"
lr = "none"
local_steps = 4
codec = "fp16"
shard_size = 1000

[budget]
train_images = {args.train_images}
epochs = {args.epochs}
eval_images = {args.eval_images}
evals = 4

[workers]
count = {args.workers}
speed = {{ dist = "lognormal", median = 0.5, sigma = 0.5 }}
jitter = 0.1

[churn]
leave_per_hour = 0.1
join_per_hour = 0.1
hand_back = 0.5
die_in_unit = 0.02
restart_s = 60

[network]
latency_s = {{ dist = "lognormal", median = 0.1, sigma = 0.5 }}
bandwidth_mbps = 1e9

[coordinator]
lease_first_s = 3600
lease_max_s = 7200
{entries}'''


def run(model: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    folder = out / f"{model}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scenario.toml"
    path.write_text(scenario(model, args))
    cmd = [sys.executable, "-m", "crowdtrain", "sim", str(path), "--data", args.data, "--out", str(folder),
           "--seed", str(seed), "--threads", str(args.threads), "--no-progress"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (folder / "sim.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return {"model": model, "seed": seed, "folder": shown(folder), "wall_s": round(time.time() - t0, 1),
            "command": " ".join(cmd[1:])}


def collect(entry: dict) -> dict:
    """Per mode: final test accuracy, and model bytes per unit (all units, warm units)."""
    folder = ROOT / entry["folder"]
    summary = {r["label"]: r for r in csv.DictReader((folder / "summary.csv").open())}
    modes = {}
    for mode in [m for m in MODES if (folder / f"{m}.units.csv").exists()]:
        units = list(csv.DictReader((folder / f"{mode}.units.csv").open()))
        seen, warm, every = set(), [], []
        for u in sorted(units, key=lambda u: float(u["issued_s"])):
            if not u.get("model_bytes"):
                continue
            n = int(u["model_bytes"])
            every.append(n)
            if u["worker_id"] in seen:
                warm.append(n)
            seen.add(u["worker_id"])
        modes[mode] = {"final_test_acc": float(summary[mode]["final_test_acc"]), "units": len(every),
                       "bytes_per_unit": statistics.fmean(every), "warm_units": len(warm),
                       "warm_bytes_per_unit": statistics.fmean(warm) if warm else None,
                       "warm_bytes_max": max(warm) if warm else None,
                       "warm_bytes_median": statistics.median(warm) if warm else None,
                       "warm_whole": sum(1 for n in warm if n >= 0.9 * max(every)) if mode == "delta" else None,
                       "mean_staleness": float(summary[mode].get("mean_staleness") or "nan")}
    return {**entry, "modes": modes}


def report(results: list[dict], config: dict) -> str:
    mb = lambda n: f"{n / 1e6:.2f}" if n is not None else "-"   # noqa: E731
    rows = ["| model | seed | download | final test acc. (%) | vs fp32 (points) | MB per unit, all | MB per unit, warm: "
            "mean / median (max) | vs fp32, warm |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        base = r["modes"]["fp32"]
        for mode in r["modes"]:
            m = r["modes"][mode]
            rows.append(f"| {r['model']} | {r['seed']} | {mode} | {100 * m['final_test_acc']:.2f} | "
                        f"{100 * (m['final_test_acc'] - base['final_test_acc']):+.2f} | {mb(m['bytes_per_unit'])} | "
                        f"{mb(m['warm_bytes_per_unit'])} / {mb(m.get('warm_bytes_median'))} ({mb(m['warm_bytes_max'])}) | "
                        f"{m['warm_bytes_per_unit'] / base['warm_bytes_per_unit']:.1%} |")
    runs = "; ".join(f"{r['model']} seed {r['seed']}: {r['wall_s']:.0f} s" for r in results)
    notes = f"\n- Note: {config['note']}" if config.get("note") else ""
    return f"""### Model bytes per unit: fp32, fp16 and version deltas (2026-12-01)

- What: the bytes a unit downloads for its base model (shards and step graphs aside) and the final test
  accuracy at equal samples, with `--version-download fp32` (before: every unit fetches the whole fp32
  version), `fp16` (the whole version as fp16) and `delta` (the default now: a zlib-compressed int8
  version delta from the version the worker holds, step = max(RMS/2, max/127) per tensor; the worker
  rebuilds the unit's base in float32 and checks its hash; a worker that holds nothing gets fp16).
  "Warm" units are a worker's units after its first.
- Setup: `crowdtrain sim` (real training and the coordinator's own `Job`, simulated time), the parity
  bench's mild churn: {config['workers']} workers (lognormal speeds, median 0.5 samples/s), 10%/h
  leave and join, 2% of units crash; the coordinator's default units (1,000-image shards, 4 SGD steps
  at its own batch and lr, fp16 result deltas), async SGD (default); first {config['train_images']:,}
  training images x {config['epochs']} epochs; test accuracy on {config['eval_images'] or 10000:,} test
  images. The modes of one seed meet the same fleet and, with transfers taking no simulated time,
  the same schedule: they differ only in the bases the workers train from.
- Hardware: {config['hardware']}; shared with other work. Wall time: {runs}.
- Command: `python bench/version_download.py --data /work/shared/data --models {' '.join(config['models'])}
  --seeds {' '.join(map(str, config['seeds']))} --modes {' '.join(config['modes'])} --jobs {config.get('jobs', 1)}` at commit `{config['commit']}`; config, scenarios and the
  simulator's files (`units.csv` has `model_bytes` per unit) in `{config['out']}`.{notes}

{chr(10).join(rows)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet_fast"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--eval-images", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--jobs", type=int, default=1, help="simulations run at once")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/version_download-2026-12-01")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        config = json.loads((out / "config.json").read_text())
        runs = json.loads((out / "results.json").read_text())
    else:
        config = {"models": args.models, "seeds": args.seeds, "modes": args.modes, "workers": args.workers,
                  "train_images": args.train_images, "epochs": args.epochs, "eval_images": args.eval_images,
                  "threads": args.threads, "jobs": args.jobs, "hardware": hardware(), "commit": commit(),
                  "out": shown(out), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        (out / "config.json").write_text(json.dumps(config, indent=1))
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda ms: run(ms[0], ms[1], args, out),
                                 [(model, seed) for seed in args.seeds for model in args.models]))
        (out / "results.json").write_text(json.dumps(runs, indent=1))
    results = [collect(r) for r in runs]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = report(results, config)
    print(text)
    if not args.no_docs:
        write_section("version_download", text, ROOT / "docs/results.md")


if __name__ == "__main__":
    main()
