"""Prints the runs of run.sh (name: old|new, processes, letter): accepted/s, latencies, each process's CPU share."""
import json
import sys
from pathlib import Path

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent


def cpu(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        pid, secs, *args = line.split()
        cmd = " ".join(args)
        kind = ("redis-server" if "redis-server" in cmd else "clients" if "--client-out" in cmd
                else "bench" if "load.py" in cmd else "coordinator")
        out[f"{kind}:{pid}"] = float(secs)
    return out


runs = sorted((p.name for p in here.iterdir() if p.is_dir()), key=lambda n: (n[3], n[:3], n[4:]))
for name in runs:
    r = json.loads((here / name / "results.json").read_text())
    res = r["result"]
    a, b = cpu(here / f"{name}.cpu-a"), cpu(here / f"{name}.cpu-b")
    span = float((here / f"{name}.t-b").read_text()) - float((here / f"{name}.t-a").read_text())
    shares = {k: (b[k] - a.get(k, 0)) / span for k in b if k in a}
    by = {}
    for k, v in shares.items():
        by.setdefault(k.split(":")[0], []).append(round(v, 2))
    u, rr = res["routes"]["units/next"]["all"], res["routes"]["result"]["all"]
    n = int(name[3])
    print(f"| {name} | {'1 process, SQLite' if n == 0 else f'{n} processes, Redis'} | {res['accepted_per_s']:.1f} | "
          f"{u['p50_ms']:.0f} / {u['p99_ms']:.0f} | {rr['p50_ms']:.0f} / {rr['p99_ms']:.0f} | {res['errors']} | "
          f"{', '.join(f'{k} {v}' for k, v in sorted(by.items()) if k != 'bench')} |")
