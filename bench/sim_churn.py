"""Aggregation strategies under churn, in the simulator: the table of docs/results.md.

Claim under test (issue 5): an asynchronous strategy ends within 1 point of synchronous
FedAvg at equal samples, and reaches sync's final accuracy at least 3x sooner (simulated
time) under heavy churn; for edge-popup, max-merge of scores against their mean over K
nodes x M samples per unit. Each scenario in ``scenarios/`` runs through ``crowdtrain sim``
(the coordinator's own job, scheduler and strategies; real training on the JPEG copy of
CIFAR-10; simulated time), one seed, at ``--scale`` times the scenarios' default budget,
up to ``--jobs`` scenarios at once (one torch thread each).

    python bench/sim_churn.py --data ../shared/data [--scale 2] [--jobs 2] [--report-only]

Writes bench/out/sim_churn-<date>/<scenario>/ (the simulator's files), config.json, and
its section of docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import hardware, shown, write_section  # noqa: E402

DENSE = ("no_churn", "mild_churn", "heavy_churn", "stragglers")
SWEEP = "edge_popup_sweep"


def run(scenario: str, args: argparse.Namespace, out: Path) -> tuple[str, int, float]:
    cmd = [sys.executable, "-m", "crowdtrain", "sim", str(ROOT / "scenarios" / f"{scenario}.toml"), "--data",
           args.data, "--out", str(out / scenario), "--scale", str(args.scale), "--no-progress",
           *[a for s in args.set for a in ("--set", s)]]
    t0 = time.time()
    # each version writes the model and the strategy's state (supermask_max: its score history):
    # keep the simulator's temporary stores in memory where there is a tmpfs
    env = {**os.environ, **({"TMPDIR": "/dev/shm"} if Path("/dev/shm").is_dir() else {})}
    with open(out / f"{scenario}.log", "w") as log:
        rc = subprocess.call(["nice", "-n", "10", *cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return scenario, rc, time.time() - t0


def hours(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds / 3600:.2f}"


def dense_table(out: Path) -> list[str]:
    lines = ["| scenario | strategy | final test acc. (%) | vs sync (points) | sim. h to sync's final acc. | speed-up "
             "| sim. h to budget | mean staleness | units lost / reissued |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for scenario in DENSE:
        path = out / scenario / "results.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        for row in doc["comparison"]:
            speed = row.get("speedup_vs_baseline")
            lines.append(f"| {scenario} | {row['label']} | {100 * row['final_test_acc']:.1f} | "
                         f"{row['acc_vs_baseline_points']:+.1f} | {hours(row['time_to_target_s'])} | "
                         f"{'-' if speed is None else f'{speed:.2f}x'} | {row['sim_time_s'] / 3600:.2f} | "
                         f"{row['staleness_mean']:.2f} | {row['units_lost']} / {row['units_reissued']} |")
    return lines


def sweep_table(out: Path) -> list[str]:
    path = out / SWEEP / "results.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    lines = ["| K nodes | M samples per unit | mean: final acc. (%) | max: final acc. (%) | max - mean (points) "
             "| mean: staleness | max: staleness | max: sim. h to mean's final acc. (speed-up) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    batch = doc["scenario"]["model"]["batch_size"]
    by_point: dict[str, dict[str, dict]] = {}
    for row in doc["comparison"]:
        by_point.setdefault(row["point"], {})[row["strategy"]] = row
    for point, rows in by_point.items():
        p = json.loads(point)
        mean, mx = rows.get("supermask_mean"), rows.get("supermask_max")
        if not (mean and mx):
            continue
        speed = mx.get("speedup_vs_baseline")
        lines.append(f"| {p['workers.count']} | {p['model.local_steps'] * batch} | "
                     f"{100 * mean['final_test_acc']:.1f} | "
                     f"{100 * mx['final_test_acc']:.1f} | {mx['acc_vs_baseline_points']:+.1f} | "
                     f"{mean['staleness_mean']:.2f} | {mx['staleness_mean']:.2f} | {hours(mx['time_to_target_s'])}"
                     f"{'' if speed is None else f' ({speed:.2f}x)'} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--set", action="append", default=["budget.evals=10"], help="passed to crowdtrain sim")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", nargs="+", help="scenarios to run (default: all)")
    p.add_argument("--report-only", action="store_true", help="rebuild the docs section from existing outputs")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"sim_churn-{date}"
    out.mkdir(parents=True, exist_ok=True)
    scenarios = args.only or [*DENSE, SWEEP]
    cfg_path = out / "config.json"
    fresh = {"date": date, "scale": args.scale, "set": args.set, "jobs": args.jobs, "hardware": hardware(),
             "command": "python " + " ".join(sys.argv), "wall_s": {}}
    # --report-only, or --only some scenarios: keep the first full run's config, add to its wall times
    keep = (args.report_only or args.only) and cfg_path.exists()
    cfg = json.loads(cfg_path.read_text()) if keep else fresh
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            for name, rc, wall in pool.map(lambda s: run(s, args, out), scenarios):
                print(f"{name}: exit {rc}, {wall:.0f} s", flush=True)
                cfg["wall_s"][name] = round(wall, 1)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    any_doc = next((json.loads((out / s / "results.json").read_text()) for s in [*DENSE, SWEEP]
                    if (out / s / "results.json").exists()), None)
    if any_doc is None:
        print("no results to report", file=sys.stderr)
        return 1
    budget = any_doc["scenario"]["budget"]
    samples = round(budget["train_images"] * budget["epochs"])
    lines = [f"### Strategies under churn, simulated ({cfg['date']})", "",
             f"- `crowdtrain sim` on the bundled scenarios at `--scale {cfg['scale']:g}`: resnet_fast, batch 64, "
             f"peak lr 0.1, 4 SGD steps (256 samples) per unit, on the first {budget['train_images']:,} training "
             f"images of the JPEG copy of CIFAR-10 for {budget['epochs']:g} epochs ({samples:,} samples applied, "
             f"equal for every strategy); test accuracy on the first {budget['eval_images']:,} test images at "
             f"{budget['evals']} evenly spaced points, batch-norm statistics re-estimated as in every coordinator "
             "evaluation. 8 simulated workers, median 0.5 samples/s (a unit takes about 8.5 simulated minutes), "
             "speeds, churn and crashes as each scenario file says; workers do not prefetch their next unit "
             "(`workers.prefetch` off). One seed (0) per cell: read differences of a point or two as noise.",
             "- Sync is the coordinator's FedAvg with rounds of K = 8 results computed from the current version "
             "(results from an older version are dropped); async_sgd and fedasync use the polynomial staleness "
             "damping, fedbuff buffers 4. \"Sim. h to sync's final acc.\" is the simulated time of the first "
             "evaluation at or above sync's final accuracy (so it moves in steps of one evaluation); \"speed-up\" "
             "is sync's time to its own final accuracy divided by that.",
             f"- Hardware: {cfg['hardware']}; one torch thread per run, {cfg['jobs']} runs at once. Accuracy and "
             "simulated times do not depend on the machine's speed or load (same seed and thread count, same "
             "numbers on this machine); wall time does.",
             f"- Command: `{cfg['command']}`; raw results (results.json, CSVs, plots per scenario) in `{shown(out)}`.",
             "", *dense_table(out)]
    sweep = sweep_table(out)
    if sweep:
        doc = json.loads((out / SWEEP / "results.json").read_text())
        b = doc["scenario"]["budget"]
        lines += ["", f"Edge-popup ({doc['scenario']['model']['name']}, only scores train), max-merge vs mean of the "
                  f"scores, both merging every update on arrival, K simulated nodes x M samples per unit, "
                  f"{round(b['train_images'] * b['epochs']):,} samples, no churn:", "", *sweep]
    write_section("sim_churn", "\n".join(lines), ROOT / "docs" / "results.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
