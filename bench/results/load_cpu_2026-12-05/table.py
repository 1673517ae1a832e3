"""One row per run of this folder (after the warm-up), with the coordinator's CPU (cores, from <run>.cpu-a/-b,
30 s apart) and its event loop's lag (``crowdtrain_event_loop_lag_seconds``, over the whole run; "-" for code
without it), and the client process's own loop lag after the warm-up and its cores (bench/load.py since 2026-12-06;
"-" before). Usage: python table.py [--dir FOLDER] [run ...] (FOLDER: where the runs are; default this one's)"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
if sys.argv[1:2] == ["--dir"]:
    HERE, sys.argv[1:3] = Path(sys.argv[2]), []


def ms(route: dict, *keys: str) -> str:
    a = route["after_warmup"]
    return " / ".join(f"{a[k]:.0f}" for k in keys)


def cores(run: str) -> str:
    try:
        a, b = ((HERE / f"{run}.cpu-{x}").read_text().split() for x in "ab")
    except OSError:
        return "-"
    return f"{(int(b[1]) - int(a[1])) / (int(b[2]) - int(a[2])):.2f}"


print("| run | load before | units/next p50 / p95 / p99 | after own result p99 | others p99 | result p50 / p99 "
      "| loop lag p50 / p95 / p99 | clients' loop lag p95 / p99, cores | coordinator cores | accepted/s "
      "| refused too_stale | errors |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for run in sys.argv[1:]:
    path = HERE / run / "results.json"
    if not path.is_file():
        continue
    data = json.loads(path.read_text())
    r, c = data["result"], data["config"]
    routes, lag = r["routes"], r.get("loop_lag")
    lag = "-" if not lag else f"{lag['p50_ms']:.1f} / {lag['p95_ms']:.1f} / {lag['p99_ms']:.1f}"
    own = r.get("client_loop_lag") or {}
    own = "-" if not own.get("n") else f"{own['p95_ms']:.1f} / {own['p99_ms']:.1f}, {r['client_cores']:.2f}"
    print(f"| {run} | {c['load_before'][0]:.2f} | {ms(routes['units/next'], 'p50_ms', 'p95_ms', 'p99_ms')} "
          f"| {ms(routes['units/next after own result'], 'p99_ms')} | {ms(routes['units/next other'], 'p99_ms')} "
          f"| {ms(routes['result'], 'p50_ms', 'p99_ms')} | {lag} | {own} | {cores(run)} "
          f"| {r['accepted_per_s']:.1f} | {r['refused'].get('too_stale', 0):,} | {r['errors']} |")
