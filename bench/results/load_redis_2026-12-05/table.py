"""Prints the runs of run.sh (name: old|new, processes, letter): accepted/s, latencies, each process's CPU share."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "load_redis_2026-12-04"))
from table import by_kind, shares  # noqa: E402  (the 2026-12-04 runs' table: the same CPU samples)

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
runs = sorted((p.name for p in here.iterdir() if p.is_dir()), key=lambda n: (n[3], n[:3], n[4:]))
for name in runs:
    res = json.loads((here / name / "results.json").read_text())["result"]
    u, rr = res["routes"]["units/next"]["all"], res["routes"]["result"]["all"]
    n = int(name[3])
    print(f"| {name} | {'1 process, SQLite' if n == 0 else f'{n} processes, Redis'} | {res['accepted_per_s']:.1f} | "
          f"{u['p50_ms']:.0f} / {u['p99_ms']:.0f} | {rr['p50_ms']:.0f} / {rr['p99_ms']:.0f} | {res['errors']} | "
          f"{by_kind(shares(here, name))} |")
