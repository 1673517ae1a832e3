"""One row per run of this folder (after the warm-up): the README's table. Usage: python table.py [run ...]
(RUNS_DIR=folder: another folder's runs, e.g. ../load_uvloop_2026-12-05/table.py)"""
import json
import os
import sys
from pathlib import Path

HERE = Path(os.environ.get("RUNS_DIR") or Path(__file__).parent)


def ms(route: dict, *keys: str) -> str:
    a = route["after_warmup"]
    return " / ".join(f"{a[k]:.0f}" for k in keys)


print("| run | load before | units/next p50 / p95 / p99 | after own result p50 / p99 | other requests p50 / p99 "
      "| result p50 / p99 | accepted/s | refused too_stale | errors |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for run in sys.argv[1:] or ["old", "new", "new2", "old2"]:
    path = HERE / run / "results.json"
    if not path.is_file():
        continue
    data = json.loads(path.read_text())
    r, c = data["result"], data["config"]
    routes = r["routes"]
    load = c.get("load_before")
    load = f"{load[0]:.2f}" if isinstance(load, list) else str(load)
    print(f"| {run} | {load} | {ms(routes['units/next'], 'p50_ms', 'p95_ms', 'p99_ms')} "
          f"| {ms(routes['units/next after own result'], 'p50_ms', 'p99_ms')} "
          f"| {ms(routes['units/next other'], 'p50_ms', 'p99_ms')} | {ms(routes['result'], 'p50_ms', 'p99_ms')} "
          f"| {r['accepted_per_s']:.1f} | {r['refused'].get('too_stale', 0):,} | {r['errors']} |")
