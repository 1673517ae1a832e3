"""The side-by-side table of this folder's runs (python table.py [DIR])."""
import json
import sys
from pathlib import Path

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
rows = {}
for f in sorted(here.glob("*/results.json")):
    parts = f.parent.name.split("-")   # rN-KIND-CODE, same-10m-CODE, or (first/) rN-CODE-fp16-KIND
    if parts[1] in ("old", "new"):
        tag, code, kind = parts[0], parts[1], parts[3]
    else:
        tag, code = parts[0], parts[-1]
        kind = "-".join(parts[1:-1]) if tag.startswith("r") else "-".join(parts[:-1])
    r = json.loads(f.read_text())
    for row in r["rows"]:
        a, b = row["async_sgd"], row["fedbuff"]
        rows.setdefault((row["params"], kind), []).append((tag, code, a, b, row["bound_ratio"]))
print("| params | runs | code | accepted/s | per CPU-s | CPU ms per result (system) | fedbuff K=10 accepted/s | aggregation x bound |")
print("|---:|---|---|---|---|---|---|---|")
for (params, kind), runs in sorted(rows.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
    for code in ("old", "new"):
        mine = [r for r in runs if r[1] == code]
        if not mine:
            continue
        acc = ", ".join(f"{a['accepted_per_s']:.1f}" for _, _, a, _, _ in mine)
        cpu = ", ".join(f"{a['accepted_per_cpu_s']:.1f}" for _, _, a, _, _ in mine)
        ms = ", ".join(f"{1e3 * a['cpu_seconds'] / a['submissions']:.0f} ({1e3 * a['system_cpu_seconds'] / a['submissions']:.0f})"
                       for _, _, a, _, _ in mine)
        fb = ", ".join(f"{b['accepted_per_s']:.1f}" for _, _, _, b, _ in mine)
        agg = ", ".join(f"{x:.1f}" for *_, x in mine)
        print(f"| {params:,} | {kind} ({', '.join(t for t, *_ in mine)}) | {code} | {acc} | {cpu} | {ms} | {fb} | {agg} |")
