"""rows.py RUN...: a table row per run of bench/load.py with several processes (the clients' units/next p99, each
process's own, the leader's loop lag, accepted/s, errors) and the clients' p99 per 10-s window."""
import json
import sys
from pathlib import Path

for run in sys.argv[1:]:
    r = json.loads((Path(run) / "results.json").read_text())["result"]
    u = r["routes"]["units/next"]["after_warmup"]
    own = {True: [], False: []}
    lag = None
    for p in r.get("by_process", []):
        own[bool(p["leader"])].append(p["server"]["POST /api/v1/units/next"]["p99_ms"])
        if p["leader"]:
            lag = p["loop_lag"]["p99_ms"]
    others = " / ".join(f"{x:.1f}" for x in own[False])
    leader = " / ".join(f"{x:.1f}" for x in own[True])
    print(f"| {Path(run).name} | {u['p99_ms']:.1f} | {others} | {leader} | {lag:.1f} | {r['accepted_per_s']:.1f} | "
          f"{r['errors']} |")
    print("   windows:", " ".join(str(round(w["p99_ms"])) for w in r["timeline"]["units/next"] if "p99_ms" in w))
