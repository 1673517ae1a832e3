"""Is the simulator faithful? The same churn scenario with real processes and simulated.

Claim under test (issue 5): ``crowdtrain sim`` reproduces what a real coordinator and real
workers do under churn. Part 1 runs a real ``crowdtrain coordinator`` and N real
``crowdtrain worker`` processes on 127.0.0.1 and follows the scenario's
``churn.schedule``: at each ``at_s`` (wall seconds after the workers start) it kills
(``kill -9``, no hand-back) the ``leave`` oldest live workers and starts ``join`` fresh
ones. From the coordinator's log it measures the workers' speed (samples per compute
second) and the rest of a unit's round trip. Part 2 runs the simulator on the same
scenario with ``workers.speed`` and ``network.latency_s`` set to those measurements. The
two accuracy curves (against applied samples and against seconds), the units lost and
reissued, and the time to the budget are compared. One run each.

    python bench/churn_real.py --data ../shared/data [--scenario scenarios/churn_real.toml]

Writes bench/out/churn_real-<date>/{config,results}.json, curves.png, the simulator's
files under sim/, and its section of docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import hardware, shown, write_section  # noqa: E402
from coordinator.sim.scenario import Dist, Scenario, load  # noqa: E402
from tests.helpers.cluster import Cluster  # noqa: E402


def coordinator_flags(sc: Scenario, data: str) -> list[str]:
    m, b, c = sc.values["model"], sc.values["budget"], sc.values["coordinator"]
    strategy = sc.strategies[0]
    flags = ["--data", data, "--model", m["name"], "--strategy", strategy.name, "--seed", str(sc.seed),
             "--epochs", str(b["epochs"]), "--batch-size", str(m["batch_size"]), "--lr", str(m["lr"]),
             "--local-steps", str(m["local_steps"]), "--shard-size", str(m["shard_size"]),
             "--shards-per-unit", str(m["shards_per_unit"]), "--codec", m["codec"],
             "--max-staleness", str(c["max_staleness"]), "--max-delta-norm", str(c["max_delta_norm"]),
             "--late-results", c["late_results"], "--lease-min", str(c["lease_min_s"]),
             "--lease-first", str(c["lease_first_s"]), "--replication", c["replication"]]
    for k, v in strategy.params.items():
        flags += ["--param", f"{k}={v}"]
    if b["train_images"]:
        flags += ["--limit-train", str(b["train_images"])]
    if b["eval_images"]:
        flags += ["--eval-images", str(b["eval_images"])]
    return flags


def run_real(sc: Scenario, data: str, tmp: Path, eval_every: float, timeout: float) -> dict:
    cluster = Cluster(tmp, *coordinator_flags(sc, data), "--eval-every", str(eval_every), worker_threads=1)
    alive: list[tuple[str, object]] = []
    started = killed = 0
    try:
        cluster.start_coordinator()
        t0 = time.time()
        for _ in range(sc.values["workers"]["count"]):
            started += 1
            alive.append((f"w{started}", cluster.start_worker(f"w{started}")))
        pending = list(sc.values["churn"]["schedule"])
        deadline = t0 + timeout
        final = None
        while time.time() < deadline:
            now = time.time() - t0
            while pending and pending[0][0] <= now:
                _, leave, join = pending.pop(0)
                for _ in range(min(leave, len(alive))):
                    name, proc = alive.pop(0)
                    proc.kill()          # SIGKILL: the unit in hand is lost, not handed back
                    killed += 1
                for _ in range(join):
                    started += 1
                    alive.append((f"w{started}", cluster.start_worker(f"w{started}")))
            s = cluster.status()
            if s["finished"] and s["accuracy_history"] and s["accuracy_history"][-1]["version"] == s["model_version"]:
                final = s
                break
            time.sleep(0.5)
        if final is None:
            raise AssertionError(f"the real job did not finish in {timeout:.0f} s")
        with cluster.db() as db:
            names = ("unit_id", "issued", "finished", "status", "shard_ids", "samples")
            units = [dict(zip(names, r)) for r in
                     db.execute(f"SELECT {', '.join(names)} FROM units ORDER BY issued")]
            results = db.execute("SELECT r.num_samples, r.compute_seconds, r.accepted - u.issued, r.staleness, "
                                 "r.applied_step FROM results r JOIN units u USING (unit_id)").fetchall()
            started_at = json.loads(db.execute("SELECT value FROM meta WHERE key = 'started'").fetchone()[0])
    finally:
        cluster.stop()
    speeds = [n / c for n, c, *_ in results if c > 0]
    overhead = [max(0.0, span - c) for n, c, span, *_ in results if c > 0]
    expired = [u for u in units if u["status"] == "expired"]
    reissued = 0
    for e in expired:     # a lost unit's shard handed out again later
        shards = set(json.loads(e["shard_ids"]))
        reissued += any(u["issued"] >= (e["finished"] or 0) and shards & set(json.loads(u["shard_ids"]))
                        for u in units if u is not e)
    history = [{"seconds": h["seconds"] - (t0 - started_at), "samples": h["samples"], "test_acc": h["test_acc"],
                "version": h["version"]} for h in final["accuracy_history"]]
    applied = [r[3] for r in results if r[4] is not None]
    return {"history": history, "final_test_acc": history[-1]["test_acc"], "samples": final["samples"],
            "versions": final["model_version"], "seconds_to_budget": history[-1]["seconds"],
            "units_issued": len(units), "units_lost": len(expired), "units_reissued": reissued,
            "workers_killed": killed, "workers_started": started,
            "speed_median": statistics.median(speeds), "overhead_median_s": statistics.median(overhead),
            "staleness_mean": sum(applied) / len(applied) if applied else 0.0}


def run_sim(sc: Scenario, data_path: str, speed: float, latency: float, out: Path) -> dict:
    import torch

    from coordinator.sim import report
    from coordinator.sim.engine import run_scenario
    from models.data import load_cifar10

    torch.set_num_threads(1)
    sc.values["workers"]["speed"] = Dist("constant", speed)
    sc.values["network"]["latency_s"] = Dist("constant", latency)
    data = load_cifar10(data_path, progress=False)
    runs = run_scenario(sc, data)
    report.write(out, sc, runs, {"digest": data.digest}, 1.0, 1)
    run = runs[0]
    s = run.summary
    return {"history": [{"seconds": e.sim_time_s, "samples": e.samples_applied, "test_acc": e.test_acc,
                         "version": e.version} for e in run.evals],
            "final_test_acc": s["final_test_acc"], "samples": s["samples_applied"], "versions": s["versions"],
            "seconds_to_budget": s["sim_time_s"], "units_issued": s["units_issued"], "units_lost": s["units_lost"],
            "units_reissued": s["units_reissued"], "staleness_mean": s["staleness_mean"]}


def interpolate(history: list[dict], samples: float) -> float | None:
    pts = sorted((h["samples"], h["test_acc"]) for h in history)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= samples <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (samples - x0) / (x1 - x0)
    return None


def plot(real: dict, sim: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in (("real processes", real), ("simulator", sim)):
        a.plot([h["samples"] for h in run["history"]], [100 * h["test_acc"] for h in run["history"]], marker=".",
               label=name)
        b.plot([h["seconds"] for h in run["history"]], [100 * h["test_acc"] for h in run["history"]], marker=".",
               label=name)
    a.set_xlabel("samples applied")
    b.set_xlabel("seconds (wall for real, simulated for the simulator)")
    for ax in (a, b):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "churn_real.toml")
    p.add_argument("--eval-every", type=float, default=10.0, help="real coordinator: seconds between evaluations")
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"churn_real-{date}"
    out.mkdir(parents=True, exist_ok=True)
    sc = load(args.scenario)
    cfg = {"date": date, "scenario": sc.to_dict(), "eval_every_s": args.eval_every, "hardware": hardware(),
           "command": "python " + " ".join(sys.argv)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        real = run_real(sc, args.data, Path(tmp), args.eval_every, args.timeout)
    print(f"real: {100 * real['final_test_acc']:.2f}% after {real['seconds_to_budget']:.0f} s; speed "
          f"{real['speed_median']:.0f} samples/s, overhead {real['overhead_median_s']:.2f} s a unit", flush=True)
    latency = real["overhead_median_s"] / 3     # answer, download, upload: three one-way legs in the simulator
    wall = time.time()
    sim = run_sim(load(args.scenario), args.data, real["speed_median"], latency, out / "sim")
    sim["wall_s"] = time.time() - wall
    points = [h["samples"] for h in sim["history"]]
    gaps = [abs(a - h["test_acc"]) for s, h in zip(points, sim["history"])
            if (a := interpolate(real["history"], s)) is not None and s > 0]
    compare = {"mean_abs_acc_gap_points": 100 * sum(gaps) / len(gaps) if gaps else None, "points": len(gaps)}
    (out / "results.json").write_text(json.dumps({"config": cfg, "real": real, "sim": sim, "compare": compare},
                                                 indent=2) + "\n")
    plot(real, sim, out / "curves.png")
    c = sc.values
    rows = [("final test acc. (%)", f"{100 * real['final_test_acc']:.2f}", f"{100 * sim['final_test_acc']:.2f}"),
            ("seconds to the budget (wall / simulated)", f"{real['seconds_to_budget']:.0f}",
             f"{sim['seconds_to_budget']:.0f}"),
            ("model versions", str(real["versions"]), str(sim["versions"])),
            ("units issued", str(real["units_issued"]), str(sim["units_issued"])),
            ("units lost (lease expired) / reissued", f"{real['units_lost']} / {real['units_reissued']}",
             f"{sim['units_lost']} / {sim['units_reissued']}"),
            ("mean staleness of applied updates", f"{real['staleness_mean']:.2f}", f"{sim['staleness_mean']:.2f}")]
    gap = compare["mean_abs_acc_gap_points"]
    lines = [f"### Simulator against real processes under churn ({date})", "",
             f"- Scenario `{shown(args.scenario)}`: {sc.description}. {c['model']['name']}, batch "
             f"{c['model']['batch_size']}, {c['model']['local_steps']} SGD steps per unit, "
             f"{sc.strategies[0].name} {sc.strategies[0].params}, the first {c['budget']['train_images']:,} training "
             f"images for {c['budget']['epochs']:g} epochs, test accuracy on {c['budget']['eval_images']:,} test "
             "images. One run each.",
             f"- Real: a coordinator and worker processes (1 thread each) on 127.0.0.1, workers killed with SIGKILL "
             f"on the schedule; evaluation every {args.eval_every:g} s. Measured: {real['speed_median']:.0f} "
             f"samples per compute second per worker, {real['overhead_median_s']:.2f} s a unit besides "
             "compute. Simulated: the same scenario with those two numbers as `workers.speed` and "
             f"`network.latency_s` (a third of the overhead per leg); evaluation at {c['budget']['evals']} points.",
             f"- Hardware: {cfg['hardware']}. Command: `{cfg['command']}`; raw results and curves.png in "
             f"`{shown(out)}`.", "",
             "| | real processes | simulator |", "|---|---:|---:|",
             *[f"| {a} | {b} | {s} |" for a, b, s in rows], "",
             f"Mean absolute gap between the two accuracy curves at the simulator's evaluation points (the real "
             f"curve interpolated in applied samples): {'n/a' if gap is None else f'{gap:.2f} points'} over "
             f"{compare['points']} points."]
    write_section("churn_real", "\n".join(lines), ROOT / "docs" / "results.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
