"""What a simulation writes: ``results.json``, CSVs per run, a summary CSV and three plots.

``results.json`` holds only what the seed determines (no wall-clock times, no paths), so
two runs of one scenario with one seed give identical files; wall times go to
``timing.json``. Comparisons are made within a sweep point against the scenario's
``baseline`` run: the simulated time each run takes to reach the baseline's final test
accuracy (at the first evaluation at or above it) and its accuracy difference at the
same applied samples.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

from coordinator.sim.engine import RunResult
from coordinator.sim.scenario import Scenario

ACCURACY_FIELDS = ("sim_time_s", "samples_applied", "samples_computed", "version", "test_acc", "test_loss")
UPDATE_FIELDS = ("seq", "unit_id", "worker_id", "base_step", "staleness", "num_samples", "accepted", "applied_step",
                 "dropped")
STYLES = ("-", "--", ":", "-.")
UNIT_FIELDS = ("unit_id", "worker_id", "issued_s", "deadline_s", "base_version", "samples", "reissue", "fate",
               "store_status", "model_bytes")
SUMMARY_FIELDS = ("label", "strategy", "point", "final_test_acc", "acc_vs_baseline_points", "time_to_target_s",
                  "speedup_vs_baseline", "sim_time_s", "samples_applied", "samples_computed", "versions",
                  "staleness_mean", "staleness_max", "units_issued", "units_lost", "units_reissued",
                  "units_dropped_by_strategy", "stalled", "liar_units_folded", "liar_units_folded_after_quarantine",
                  "quarantined_after_units", "units_computed", "units_replica", "coordinator_recomputed",
                  "replication_overhead", "replication_overhead_trusted")


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label).strip("_")


def time_to(evals, target: float) -> float | None:
    """Simulated seconds of the first evaluation at or above ``target`` (None: never)."""
    return next((e.sim_time_s for e in evals if e.test_acc >= target), None)


def compare(scenario: Scenario, runs: list[RunResult]) -> list[dict]:
    """One row per run: its numbers and how it compares with the baseline at its sweep point."""
    rows = []
    for run in runs:
        base = next((r for r in runs if r.point == run.point and r.strategy_label == scenario.baseline), None)
        s = run.summary
        row = {"label": run.label, "strategy": run.strategy, "point": json.dumps(run.point, sort_keys=True),
               **{k: json.dumps(s[k], sort_keys=True) if isinstance(s[k], dict) else s[k]
                  for k in SUMMARY_FIELDS if k in s}}
        if base is not None:
            target = base.summary["final_test_acc"]
            mine, theirs = time_to(run.evals, target), time_to(base.evals, target)
            row["baseline"] = base.label
            row["acc_vs_baseline_points"] = round(100 * (s["final_test_acc"] - target), 4)
            row["time_to_target_s"] = mine
            row["speedup_vs_baseline"] = round(theirs / mine, 4) if mine and theirs else None
        rows.append(row)
    return rows


def results_doc(scenario: Scenario, runs: list[RunResult], data_info: dict, scale: float, threads: int) -> dict:
    comparison = compare(scenario, runs)
    return {
        "scenario": scenario.to_dict(), "scale": scale, "data": data_info, "torch_threads": threads,
        "runs": [{"label": r.label, "strategy": r.strategy, "params": r.params, "point": r.point,
                  "summary": r.summary, "evals": [dataclasses.asdict(e) for e in r.evals]} for r in runs],
        "comparison": comparison,
    }


def _csv(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write(out: Path, scenario: Scenario, runs: list[RunResult], data_info: dict, scale: float, threads: int,
          extra_timing: dict | None = None) -> dict:
    """Write every file under ``out``; returns the results document."""
    out.mkdir(parents=True, exist_ok=True)
    doc = results_doc(scenario, runs, data_info, scale, threads)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    timing = {"runs": {r.label: round(r.wall_s, 2) for r in runs}, **(extra_timing or {})}
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    _csv(out / "summary.csv", (*SUMMARY_FIELDS, "baseline"), doc["comparison"])
    for r in runs:
        name = slug(r.label)
        _csv(out / f"{name}.accuracy.csv", ACCURACY_FIELDS, [dataclasses.asdict(e) for e in r.evals])
        _csv(out / f"{name}.updates.csv", UPDATE_FIELDS, r.updates)
        _csv(out / f"{name}.units.csv", UNIT_FIELDS, r.units)
    plot(out, scenario, runs)
    return doc


def plot(out: Path, scenario: Scenario, runs: list[RunResult]) -> None:
    """accuracy_vs_time.png, accuracy_vs_samples.png, staleness_hist.png: one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{scenario.name}: {scenario.values['model']['name']}"
    for name, x_of, xlabel in (
            ("accuracy_vs_time.png", lambda e: e.sim_time_s / 3600, "simulated time (hours)"),
            ("accuracy_vs_samples.png", lambda e: e.samples_applied, "samples applied to the model")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, r in enumerate(runs):
            ax.plot([x_of(e) for e in r.evals], [100 * e.test_acc for e in r.evals], marker=".", label=r.label,
                    linestyle=STYLES[i // 10 % len(STYLES)])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max((int(k) for r in runs for k in r.summary["staleness_histogram"]), default=0)
    xs = list(range(top + 1))
    for i, r in enumerate(runs):   # runs with the same histogram overlap: dashes keep both visible
        hist = r.summary["staleness_histogram"]
        total = sum(hist.values()) or 1
        ax.step(xs, [hist.get(str(x), 0) / total for x in xs], where="mid", label=r.label,
                linestyle=STYLES[i % len(STYLES)], linewidth=2.5 - 0.4 * (i % len(STYLES)))
    ax.set_xlabel("staleness of an applied update (model versions)")
    ax.set_ylabel("fraction of applied updates")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "staleness_hist.png", dpi=100)
    plt.close(fig)
