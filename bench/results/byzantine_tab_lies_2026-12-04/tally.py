"""The tables of docs/results.md's "The tab's other lies" from the runs' results.json (seeds 0-2, and seed 0 with replication off)."""
import json
import statistics
import sys
from pathlib import Path

KINDS = ("free_ride", "noise", "scale", "replay", "a_little", "label_flip")
here = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
for kind in KINDS:
    runs = []
    for seed, folder in ((0, kind), (1, f"{kind}-s1"), (2, f"{kind}-s2")):
        path = here / folder / "results.json"
        if path.exists():
            runs.append((seed, json.loads(path.read_text())["runs"][0]))
    if not runs:
        continue
    accs = [100 * r["final_test_acc"] for _, r in runs]
    tab = [r["tab"] for _, r in runs]
    print(f"| {kind} | {statistics.mean(accs):.2f} ({' / '.join(f'{a:.2f}' for a in accs)}) | "
          f"{min(t['results'] for t in tab)}-{max(t['results'] for t in tab)} | "
          f"{' / '.join(str(t['folded']) for t in tab)} | "
          f"{' / '.join(str(t['results_until_quarantined']) for t in tab)} | "
          f"{' / '.join(str(t['credit']) for t in tab)} | "
          f"{' / '.join(str(r['honest']['replicas']) for _, r in runs)} | "
          f"{min(r['wall_s'] for _, r in runs):.0f}-{max(r['wall_s'] for _, r in runs):.0f} |")

# replication off (the coordinator's defaults: adaptive clipping only), seed 0
for kind in KINDS:
    path = here / f"{kind}-undefended" / "results.json"
    if path.exists():
        r = json.loads(path.read_text())["runs"][0]
        t = r["tab"]
        print(f"| {kind}, replication off | {100 * r['final_test_acc']:.2f} | {t['results']} | {t['folded']} "
              f"({t['samples_folded']:,} samples) | not | {t['credit']:,} | {t['mean_staleness']:.2f} | {r['wall_s']:.0f} |")
