"""Lying workers against the defences: accuracy, compute overhead and time to quarantine (issue 11).

Claims under test (issue 11's targets): with 1 of 3 workers lying (each attack of
tests/helpers/fault_worker.py), and with 2 of 10, the final accuracy stays within 2 points of
the clean run at equal applied samples, and every sign-flip, noise or free-rider worker is
quarantined within 20 of its units; on a clean run, replication costs <= 10% extra compute once
workers are trusted, and the accuracy stays within 0.3 point of the undefended run.

Each run is one coordinator ``Job`` (the real layers: factory, intake, trust, aggregator, store)
on the first ``--images`` CIFAR-10 training images, driven in one process by virtual workers
that each hold one unit at a time and deliver in turn (so results arrive one version stale, as
with real workers); the liars are ``FaultWorker``s. The budget is ``--epochs`` of applied
samples, equal for every run. Defences: none (plain staleness-damped async SGD), adaptive
clipping (the default), centered clipping, trimmed mean (FedBuff buffers of 3) and replication
(adaptive clipping plus ``--replication adaptive``). Compute: units computed by workers (their
own, replicas) plus units the coordinator recomputed, over the units applied. One run each
(no repeated seeds: read differences of a point or two as noise). No timing claims.

    python bench/byzantine.py --data ../shared/data [--workers 3 --liars 1] [--attacks ...] [--defences ...]

``--sim SCENARIO`` measures the same in the simulator instead (``crowdtrain sim``: the scenario's
``[[strategies]]`` are the defences, its ``[liars]`` the liars; ``--set`` changes its keys): for each
attack the scenario runs with ``liars.fault`` set to it (``none``: ``liars.fraction = 0``), every
defence on the same fleet, for each of ``--seeds``.

    python bench/byzantine.py --sim scenarios/liars.toml --data ../shared/data --seeds 0 1 --section byzantine_sim

Writes bench/out/<section>-<date>/{config,results}.json and its section of docs/results.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import commit, hardware, shown, write_section  # noqa: E402
from contract.errors import ContractError  # noqa: E402
from contract.units import UnitRequest, pack_result  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.intake import Rejection  # noqa: E402
from coordinator.job import Job  # noqa: E402
from models.data import load_cifar10  # noqa: E402
from tests.helpers.fault_worker import Collusion, Fault, FaultWorker, a_little_z  # noqa: E402

ATTACKS = ("none", "sign_flip", "scale", "noise", "free_ride", "label_flip", "replay", "a_little", "band")
DEFENCES = {   # name -> config changes (replicated checks only where a defence says so)
    "none": {"robust": "none", "replication": "off"},
    "clipping": {"robust": "adaptive_clip", "replication": "off"},
    "centered clipping": {"robust": "centered_clip", "strategy": "fedbuff", "replication": "off",
                          "strategy_params": {"buffer_size": 3, "staleness": "polynomial"}},
    "trimmed mean": {"robust": "trimmed_mean:0.34", "strategy": "fedbuff", "replication": "off",
                     "strategy_params": {"buffer_size": 3, "staleness": "polynomial"}},
    "replication": {"robust": "adaptive_clip", "replication": "adaptive"},
}
TRUSTED_AFTER = 10


class Clock:
    """Real time plus an offset the driver advances to time out a check nobody can take."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def drive(job: Job, workers: list[FaultWorker], clock: Clock, max_units: int) -> tuple:
    """Every worker holds one unit; in turn each delivers and takes the next, until the budget is applied.
    When nothing is out and nothing can be handed out (a held result whose replica nobody else may take),
    the clock jumps past ``replica_wait_s`` so the coordinator checks it itself."""
    computed = {w.worker_id: 0 for w in workers}
    refused: Counter = Counter()
    held = {}
    idle = 0
    while not job.finished and sum(computed.values()) < max_units:   # a diverged model never finishes
        for w in workers:
            unit = held.pop(w.worker_id, None)
            if unit is not None:
                try:
                    result = w.result(unit, job.store.get_blob)
                    computed[w.worker_id] += 1
                    await job.submit(unit.unit_id, pack_result(result))
                except (Rejection, ContractError) as e:   # refused at the boundary (a diverged model's
                    refused[type(e).__name__ if isinstance(e, ContractError) else e.code] += 1   # delta, ...)
                except KeyError:   # its base was pruned (a tail copy whose twin delivered): a real worker
                    refused["base_gone"] += 1   # gets 404 unknown_blob and reports the unit failed
                await job.settle()
            unit = job.next_unit(UnitRequest(worker_id=w.worker_id, backend="python"))
            if unit is not None:
                held[w.worker_id] = unit
        if not held:   # nothing out and nothing to hand out: checks waiting on the coordinator
            idle += 1
            clock.offset += job.config.replica_wait_s + 1
            job.expire_leases()
            await job.settle()
            if idle > 50:
                break
    return computed, refused


def run_one(args, defence: str, attack: str, liars: int, data) -> dict:
    changes = DEFENCES[defence]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CoordinatorConfig(state=Path(tmp), model=args.model, limit_train=args.images, epochs=args.epochs,
                                shard_size=args.shard_size, batch_size=args.batch_size, local_steps=args.local_steps,
                                lr=args.lr, eval_images=args.eval_images, codec="fp32", seed=args.seed,
                                max_staleness=None, **changes)
        clock = Clock()
        job = Job(cfg, clock=clock, rng=random.Random(args.seed))   # the same unit seeds in every run
        job.open(data)
        collusion = Collusion(z=a_little_z(args.workers, liars))
        fault = Fault.NONE if attack == "none" else Fault(attack)
        workers = [FaultWorker(f"h{i + 1}") for i in range(args.workers - liars)]
        workers += [FaultWorker(f"liar{i + 1}", fault, collusion) for i in range(liars if attack != "none" else 0)]
        workers += [FaultWorker(f"h{args.workers - liars + i + 1}") for i in range(liars if attack == "none" else 0)]
        t0 = time.perf_counter()
        budget_units = job.budget / (args.batch_size * args.local_steps)
        computed, refused = asyncio.run(drive(job, workers, clock, int(3 * budget_units)))
        finished = job.finished
        acc = job.evaluate_current()
        rows = job.store.results()
        status = job.status()
        trust = {r.worker_id: r for r in status.trust}
        liar_ids = [w.worker_id for w in workers if w.fault is not Fault.NONE]
        quarantine = {}
        for lid in liar_ids:
            mine = [r for r in rows if r["worker_id"] == lid]
            quarantine[lid] = (sum(r["dropped"] != "quarantined" for r in mine)
                               if trust.get(lid) and trust[lid].quarantined else None)
        applied = [r for r in rows if r["applied_step"] is not None]
        units_applied = len(applied)
        recomputed = job.check_counts["recomputed"]
        work = sum(computed.values()) + recomputed
        honest_work = sum(n for w, n in computed.items() if w not in liar_ids) + recomputed
        # replication once every honest worker is trusted: of the results accepted after the last honest
        # worker's 10th valid check, the share held for a check
        honest = [w.worker_id for w in workers if w.fault is Fault.NONE]
        own = [r for r in rows if r["worker_id"] in honest and not (job.store.unit(r["unit_id"]) or {}).get("replica_of")]
        late = own[len(own) // 2:]
        late_checked = sum(r["check_state"] is not None for r in late) / len(late) if late else 0.0
        job.close()
    return {"defence": defence, "attack": attack, "liars": liars if attack != "none" else 0, "workers": args.workers,
            "finished": finished,
            "test_acc": acc["test_acc"], "samples": acc["samples"], "units_applied": units_applied,
            "units_computed": work, "coordinator_recomputed": recomputed,
            "overhead": work / max(units_applied, 1) - 1, "late_checked_share": late_checked,
            "honest_overhead": honest_work / max(units_applied - sum(r["worker_id"] in liar_ids for r in applied), 1) - 1,
            "liar_applied": sum(r["worker_id"] in liar_ids for r in applied),
            "quarantined_after": quarantine, "seconds": time.perf_counter() - t0,
            "dropped": {k: v for k, v in status.updates_dropped.items()}, "refused": dict(refused)}


def sim_scenario(args, attack: str = "none", seed: int = 0):
    """The scenario with ``--set``, set up for ``attack`` and ``seed``."""
    from coordinator.sim.scenario import load, override

    scenario = load(args.sim)
    for assignment in args.set:
        scenario = override(scenario, assignment)
    scenario = override(scenario, "liars.fraction=0") if attack == "none" else \
        override(scenario, f'liars.fault="{attack}"')
    scenario.seed = seed
    return scenario


def sim_rows(args, attack: str, seed: int, data, skip: set) -> list[dict]:
    """The scenario's defences (strategy labels; ``--defences`` if given) against ``attack``, simulated
    with ``seed``, but those in ``skip``."""
    from coordinator.sim.engine import run_scenario

    scenario = sim_scenario(args, attack, seed)
    labels = [s.label for s in scenario.strategies]
    only = [d for d in (args.defences if args.defences_given else labels) if d in labels and d not in skip]
    if not only:
        return []
    rows = []
    with tempfile.TemporaryDirectory(prefix="crowdtrain-byz-") as tmp:
        for run in run_scenario(scenario, data, only=only, workdir=Path(tmp)):
            s = run.summary
            rows.append({"defence": run.label, "attack": attack, "seed": seed, "liars": len(s["liars"]),
                         "workers": scenario["workers.count"], "finished": s["finished"],
                         "test_acc": s["final_test_acc"], "samples": s["samples_applied"],
                         "liar_applied": s["liar_units_folded"],
                         "liar_applied_after_quarantine": s["liar_units_folded_after_quarantine"],
                         "quarantined_after": s["quarantined_after_units"], "liar_sent": s["liar_units_sent"],
                         "units_computed": s["units_computed"], "units_replica": s["units_replica"],
                         "coordinator_recomputed": s["coordinator_recomputed"],
                         "overhead": s["replication_overhead"], "overhead_trusted": s["replication_overhead_trusted"],
                         "trusted_results": s["trusted_results"], "seconds": run.wall_s})
            r = rows[-1]
            print(f"seed {seed} {r['defence']:18s} {attack:11s} acc {100 * r['test_acc']:5.2f}%  overhead "
                  f"{100 * r['overhead']:5.1f}%  liar applied {r['liar_applied']:3d}  quarantined after "
                  f"{r['quarantined_after']}  {r['seconds']:.0f} s", flush=True)
    return rows


def sim_section(args, cfg: dict, rows: list[dict], out: Path) -> str:
    """The simulator's table: per defence and attack, the mean over seeds (each seed's value in brackets)."""
    v = sim_scenario(args).values
    seeds = sorted({r["seed"] for r in rows})
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["defence"], r["attack"]), []).append(r)

    def each(values, fmt) -> str:
        """The mean of the known values, then every seed's value when there are several ("-": none, "n/a":
        not measured, a row from before the count existed)."""
        known = [x for x in values if isinstance(x, (int, float))]
        mean = fmt(sum(known) / len(known)) if known else "n/a" if "n/a" in values else "-"
        if len(values) == 1:
            return mean
        return mean + " (" + " / ".join(fmt(x) if isinstance(x, (int, float)) else x or "-" for x in values) + ")"

    def versus(rs, clean_rows) -> str:
        clean = {c["seed"]: c for c in clean_rows}
        paired = [100 * (r["test_acc"] - clean[r["seed"]]["test_acc"]) if r["seed"] in clean else None for r in rs]
        return each(paired, lambda x: f"{x:+.2f}")

    n = max((r["liars"] for r in rows), default=0)
    speed = v["workers"]["speed"]
    speeds = (f"{speed.a:g} samples per simulated second each" if speed.kind == "constant" else
              f"{speed.kind} speeds, {', '.join(f'{k} {x:g}' for k, x in list(speed.to_toml().items())[1:])}")
    lines = [f"### Lying workers in the simulator, {n} of {v['workers']['count']} ({cfg['date']})", "",
             f"- `crowdtrain sim {shown(Path(args.sim))}`: `{v['model']['name']}` on the first "
             f"{v['budget']['train_images']:,} training images of the JPEG copy of CIFAR-10, "
             f"{v['budget']['epochs']:g} epochs of applied samples (equal for every run), units of "
             f"{v['model']['local_steps']} steps of {v['model']['batch_size']}, peak lr {v['model']['lr']}; test "
             f"accuracy on {v['budget']['eval_images']:,} test images. {v['workers']['count']} simulated workers "
             f"({speeds}), the liars drawn from the seed and computing with `coordinator/sim/faults.py` (the "
             "tests' attack workers' code); every defence meets the same fleet.",
             f"- Hardware: {cfg['hardware']}; {args.threads} torch thread. Seeds: {', '.join(map(str, seeds))} "
             "(a cell with several shows their mean, then each seed's value).",
             "- Commands: " + "; ".join(f"`{c}`" for c in cfg["commands"]) + f"; raw results in `{shown(out)}`.",
             "- Compute overhead: units computed as replicas by the workers plus units the coordinator recomputed, "
             "over all units computed (the liars' own included). Once trusted: of the honest workers' own results "
             "sent while they had 10 or more agreeing checks in a row, the share held for a check (each costs one more "
             "computation; \"-\": no worker was trusted in the run; \"n/a\": not counted, a run from before this count was "
             "added). Stopped: the simulator stopped the run before its "
             "budget, when max(20, 3 x workers) results in a row were refused (a model diverged by lies). Quarantined "
             "after: each liar's results sent (its units, replicas included) when it was quarantined.", "",
             "| defence | attack | test acc. (%) | vs its clean run (points) | vs undefended clean (points) | "
             "overhead (%) | once trusted (%) | liar's updates applied | quarantined after |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    defences, attacks = ({name: i for i, name in enumerate(names)} for names in (DEFENCES, ATTACKS))
    for (defence, attack), rs in sorted(cells.items(), key=lambda kv: (defences.get(kv[0][0], 99),
                                                                       attacks.get(kv[0][1], 99))):
        rs = sorted(rs, key=lambda r: r["seed"])
        acc = each([100 * r["test_acc"] for r in rs], lambda x: f"{x:.2f}")
        stopped = sum(not r["finished"] for r in rs)
        acc += f" (stopped{'' if len(rs) == 1 else f': {stopped} of {len(rs)}'})" if stopped else ""
        own = "" if attack == "none" else versus(rs, cells.get((defence, "none"), []))
        undefended = "" if (defence, attack) == ("none", "none") else versus(rs, cells.get(("none", "none"), []))
        overhead = each([100 * r["overhead"] for r in rs], lambda x: f"{x:.1f}")
        trusted = each(["n/a" if "trusted_results" not in r else None if r["overhead_trusted"] is None
                        else 100.0 * r["overhead_trusted"] for r in rs], lambda x: f"{x:.1f}")
        if all(r["units_replica"] == 0 and r["coordinator_recomputed"] == 0 for r in rs):
            trusted = ""                                    # no replication in these runs
        q = [u for r in rs for u in r["quarantined_after"].values()]
        qtext = "-" if not q else "not" if set(q) == {None} else ", ".join("not" if u is None else str(u)
                                                                            for u in q) + " units"
        lines.append(f"| {defence} | {attack} | {acc} | {own} | {undefended} | {overhead} | {trusted} | "
                     f"{sum(r['liar_applied'] for r in rs)} | {qtext} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="CIFAR-10 path (default: $CROWDTRAIN_DATA)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--images", type=int, default=10000, help="training images used")
    p.add_argument("--epochs", type=float, default=2.0, help="budget of applied samples, in passes")
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=125)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--liars", type=int, default=1)
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    p.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=list(DEFENCES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--section", default="byzantine", help="the docs/results.md section to write")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out's results.json")
    p.add_argument("--sim", type=Path, default=None, metavar="SCENARIO",
                   help="measure in the simulator with this scenario (its strategies are the defences)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="--sim: change a scenario key, as crowdtrain sim --set; repeatable")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="--sim: seeds (default: --seed)")
    p.add_argument("--merge", type=Path, nargs="+", default=[], metavar="DIR",
                   help="--sim: add the rows (and commands) of these earlier --out folders to the table")
    p.add_argument("--table-only", action="store_true", help="--sim: run nothing, write the table from the rows")
    args = p.parse_args(argv)
    args.defences_given = argv is not None and "--defences" in argv or argv is None and "--defences" in sys.argv
    if args.sim is not None:
        return main_sim(args)
    torch.set_num_threads(args.threads)
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"{args.section}-{date}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    cfg.update(date=date, hardware=hardware(), commit=commit(), command="python " + " ".join(sys.argv))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    data = load_cifar10(args.data, progress=False)
    rows = json.loads((out / "results.json").read_text())["rows"] if args.resume else []
    done = {(r["defence"], r["attack"]) for r in rows}
    for defence in args.defences:
        for attack in args.attacks:
            if (defence, attack) in done:
                continue
            row = run_one(args, defence, attack, args.liars, data)
            rows.append(row)
            q = row["quarantined_after"]
            print(f"{defence:18s} {attack:11s} acc {100 * row['test_acc']:5.2f}%  overhead {100 * row['honest_overhead']:5.1f}%  "
                  f"liar applied {row['liar_applied']:3d}  quarantined after {q}  {row['seconds']:.0f} s", flush=True)
            (out / "results.json").write_text(json.dumps({"config": cfg, "rows": rows}, indent=2) + "\n")
    clean = {r["defence"]: r for r in rows if r["attack"] == "none"}
    base = clean.get("none")
    lines = [f"### Lying workers against the defences, {args.liars} of {args.workers} ({date})", "",
             f"- `{args.model}` on the first {args.images:,} training images of the JPEG copy of CIFAR-10, a budget of "
             f"{args.epochs:g} epochs of applied samples (equal for every run), units of {args.local_steps} steps of "
             f"{args.batch_size}, peak lr {args.lr}; test accuracy on {args.eval_images:,} test images. One coordinator "
             f"`Job` driven in one process by {args.workers} virtual workers holding one unit each (results arrive "
             f"about one version stale); the liars are `tests/helpers/fault_worker.py`'s `FaultWorker`s.",
             f"- Hardware: {cfg['hardware']}; {args.threads} torch thread. One run per cell (read a point or two as "
             "noise).",
             f"- Command: `{cfg['command']}`; raw results in `{shown(out)}`.",
             "- A run that cannot reach its budget (every delta refused once the model diverged) is stopped after "
             "3 times its budget of units.",
             "- Overhead: units the honest workers (replicas included) and the coordinator computed, over the honest "
             "units applied, minus 1 (a liar's own units are its loss, not counted). Late checked: the share of honest workers' own results held for a check in the second half "
             "of the run. Quarantined after: the liar's results accepted before its quarantine.", "",
             "| defence | attack | test acc. (%) | vs clean (points) | overhead (%) | late checked (%) | "
             "liar's updates applied | quarantined after |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ref = clean.get(r["defence"]) or base
        diff = "" if ref is None else f"{100 * (r['test_acc'] - ref['test_acc']):+.2f}"
        q = r["quarantined_after"]
        qtext = "-" if not q else ", ".join("not" if v is None else f"{v} units" for v in q.values())
        acc = f"{100 * r['test_acc']:.2f}" + ("" if r["finished"] else " (stopped: diverged)")
        lines.append(f"| {r['defence']} | {r['attack']} | {acc} | {diff} | {100 * r['honest_overhead']:.1f} | "
                     f"{100 * r['late_checked_share']:.0f} | {r['liar_applied']} | {qtext} |")
    write_section(args.section, "\n".join(lines), ROOT / "docs" / "results.md")
    return 0


def main_sim(args) -> int:
    torch.set_num_threads(args.threads)
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"{args.section}-{date}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "merge" else v
           for k, v in vars(args).items()}
    cfg.update(date=date, hardware=hardware(), commit=commit(), command="python " + shlex.join(sys.argv))
    rows, commands = [], []
    for folder in ([out] if args.resume or args.table_only else []) + list(args.merge):
        doc = json.loads((folder / "results.json").read_text())
        known = {(r["defence"], r["attack"], r["seed"]) for r in rows}
        rows += [r for r in doc["rows"] if (r["defence"], r["attack"], r["seed"]) not in known]
        commands += [c for c in doc["config"].get("commands", [doc["config"]["command"]]) if c not in commands]
    cfg["commands"] = commands + ([] if args.table_only else [cfg["command"]])
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if args.table_only:
        (out / "results.json").write_text(json.dumps({"config": cfg, "rows": rows}, indent=2) + "\n")
        write_section(args.section, sim_section(args, cfg, rows, out), ROOT / "docs" / "results.md")
        return 0
    data = load_cifar10(args.data, progress=False)
    for seed in args.seeds or [args.seed]:
        for attack in args.attacks:
            done = {r["defence"] for r in rows if (r["attack"], r["seed"]) == (attack, seed)}
            rows += sim_rows(args, attack, seed, data, done)
            (out / "results.json").write_text(json.dumps({"config": cfg, "rows": rows}, indent=2) + "\n")
    write_section(args.section, sim_section(args, cfg, rows, out), ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
