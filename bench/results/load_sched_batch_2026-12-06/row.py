"""row.py DIR RUN...: one line per run: units/next and result latency after the warm-up, accepted/s, errors, the
event loop's lag, and the loop thread's line of RUN.threads."""
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
for run in sys.argv[2:]:
    r = json.loads((d / run / "results.json").read_text())["result"]
    u, s = r["routes"]["units/next"]["after_warmup"], r["routes"]["result"]["after_warmup"]
    loop = next((l.split(None, 2)[2] for l in (d / f"{run}.threads").read_text().splitlines() if " loop " in l), "-")
    print(f"{run:8s} units/next p50 {u['p50_ms']:.1f} p95 {u['p95_ms']:.1f} p99 {u['p99_ms']:.1f} | result p50 "
          f"{s['p50_ms']:.0f} p99 {s['p99_ms']:.0f} | {r['accepted_per_s']:.1f} accepted/s, errors {r['errors']}, "
          f"loop lag p99 {r['loop_lag']['p99_ms']:.1f} | loop thread: {loop}")
