"""``crowdtrain sim SCENARIO.toml --out DIR``: run a scenario's strategies on simulated workers."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from coordinator.sim.scenario import ScenarioError, load, override


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Simulate many volunteer workers on a simulated clock: the "
                                "coordinator's own scheduler, leases and strategies, real training on real data.")
    p.add_argument("scenario", type=Path, help="scenario file (TOML), e.g. scenarios/heavy_churn.toml")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: runs/sim-<scenario name>)")
    p.add_argument("--data", metavar="PATH", help="CIFAR-10 path (default: $CROWDTRAIN_DATA)")
    p.add_argument("--scale", type=float, default=1.0, metavar="F",
                   help="F times the scenario's sample budget (more distinct images first, then epochs) (default: 1)")
    p.add_argument("--seed", type=int, metavar="N", help="override the scenario's seed (default: the scenario's)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one scenario key, e.g. --set budget.eval_images=2000; repeatable (default: none)")
    p.add_argument("--only", nargs="+", metavar="LABEL",
                   help="run only these strategy labels (default: all of the scenario's)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads; results depend on it (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: off, a progress bar)")
    return p


def cli(argv: list[str], prog: str = "crowdtrain sim", command: str = "sim") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.scale <= 0:
        print(f"error: --scale: expected a number > 0, got {args.scale}", file=sys.stderr)
        return 2
    try:
        scenario = load(args.scenario)
        for assignment in args.set:
            scenario = override(scenario, assignment)
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seed is not None:
        scenario.seed = args.seed
    labels = [s.label for s in scenario.strategies]
    if args.only and not set(args.only) <= set(labels):
        print(f"error: --only: expected strategy labels of {args.scenario} ({', '.join(labels)}), got "
              f"{', '.join(args.only)}", file=sys.stderr)
        return 2
    import torch

    from coordinator.sim import report
    from coordinator.sim.engine import run_scenario
    from models.data import DataError, load_cifar10

    torch.set_num_threads(max(1, args.threads))
    try:
        data = load_cifar10(args.data, progress=not args.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scenario = scenario.scaled(args.scale, len(data.train_y)) if args.scale != 1.0 else scenario
    out = args.out or Path("runs") / f"sim-{scenario.name}"
    t0 = time.perf_counter()
    runs = run_scenario(scenario, data, progress=not args.no_progress, only=args.only)
    budget = scenario.values["budget"]
    info = {"digest": data.digest, "train_images": budget["train_images"] or len(data.train_y),
            "test_images": budget["eval_images"] or len(data.test_y)}
    doc = report.write(out, scenario, runs, info, args.scale, torch.get_num_threads(),
                       {"total_s": round(time.perf_counter() - t0, 2), "data": str(data.source),
                        "command": " ".join(["crowdtrain", command, *argv])})
    print(summary_table(doc))
    print(f"wrote {out}/results.json, {len(runs) * 3 + 1} CSV files and 3 plots")
    return 0


def summary_table(doc: dict) -> str:
    rows = [("run", "test acc", "vs base", "sim h", "t to base acc h", "speedup", "staleness", "lost", "reissued")]
    for r in doc["comparison"]:
        ttt = r.get("time_to_target_s")
        vs = r.get("acc_vs_baseline_points")
        rows.append((r["label"], f"{100 * r['final_test_acc']:.2f}%", "-" if vs is None else f"{vs:+.2f}",
                     f"{r['sim_time_s'] / 3600:.2f}", "-" if ttt is None else f"{ttt / 3600:.2f}",
                     "-" if r.get("speedup_vs_baseline") is None else f"{r['speedup_vs_baseline']:.2f}x",
                     f"{r['staleness_mean']:.2f}", str(r["units_lost"]), str(r["units_reissued"])))
    if any(r.get("liar_units_folded") is not None and (json.loads(r.get("quarantined_after_units") or "{}")
                                                        or r.get("units_replica")) for r in doc["comparison"]):
        rows[0] += ("liars folded", "quarantined after (units)", "replication")
        for row, r in zip(rows[1:], doc["comparison"]):
            q = json.loads(r["quarantined_after_units"])
            rows[rows.index(row)] = row + (str(r["liar_units_folded"]),
                                           ", ".join("not" if v is None else str(v) for v in q.values()) or "-",
                                           f"{100 * r['replication_overhead']:.1f}%")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)
