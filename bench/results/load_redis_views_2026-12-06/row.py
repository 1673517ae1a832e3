import json, sys
from pathlib import Path
for run in sys.argv[1:]:
    r = json.loads((Path(run) / "results.json").read_text())["result"]
    u, s = r["routes"]["units/next"]["after_warmup"], r["routes"]["result"]["after_warmup"]
    print(f"{run:24s} units/next p50 {u['p50_ms']:.1f} p95 {u['p95_ms']:.1f} p99 {u['p99_ms']:.1f} | result p50 "
          f"{s['p50_ms']:.0f} p99 {s['p99_ms']:.0f} | {r['accepted_per_s']:.1f} accepted/s, errors {r['errors']}, "
          f"loop lag p99 {r['loop_lag']['p99_ms']:.1f}")
