"""Prints the runs of run.sh: accepted/s, latencies, and each process's share of the CPU during the load."""
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


def shares(here: Path, name: str) -> dict[str, float]:
    """Each process's share of a core between the two ``ps`` samples of run ``name``."""
    a, b = cpu(here / f"{name}.cpu-a"), cpu(here / f"{name}.cpu-b")
    span = float((here / f"{name}.t-b").read_text()) - float((here / f"{name}.t-a").read_text())
    return {k: (b[k] - a.get(k, 0)) / span for k in b if k in a}


def by_kind(share: dict[str, float]) -> str:
    by = {}
    for k, v in share.items():
        by.setdefault(k.split(":")[0], []).append(round(v, 2))
    return ", ".join(f"{k} {v}" for k, v in sorted(by.items()) if k != "bench")


if __name__ == "__main__":
    for n in (0, 2, 4):
        r = json.loads((here / f"redis{n}" / "results.json").read_text())["result"]
        share = shares(here, f"redis{n}")
        u, res = r["routes"]["units/next"]["all"], r["routes"]["result"]["all"]
        print(f"| {'1 process, SQLite' if n == 0 else f'{n} processes, Redis'} | {r['accepted_per_s']:.1f} | "
              f"{u['p50_ms']:.0f} / {u['p99_ms']:.0f} | {res['p50_ms']:.0f} / {res['p99_ms']:.0f} | {r['errors']} | "
              f"{by_kind(share)} | {sum(share.values()):.2f} |")
