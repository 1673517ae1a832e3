"""The table of docs/results.md "A tab on the main job's setup" from the runs' results.json (seeds 0, 1, 2):
python bench/results/byzantine_tab_trusted_2026-12-04/table.py [DIR ...] (default: this folder's seed folders)."""
import json
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
dirs = [Path(d) for d in sys.argv[1:]] or [here / "s0", here / "s1", here / "s2"]
runs = {}
for d in dirs:
    for r in json.loads((d / "results.json").read_text())["runs"]:
        runs.setdefault(r["run"], []).append(r)
print("| run | test acc. (%) | tab results | tab folded | tab checked | quarantined after | replicas by Python workers (%) "
      "| staleness, Python / tab | wall (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, rs in runs.items():
    acc = [100 * r["final_test_acc"] for r in rs]
    tab = [r["tab"] for r in rs]
    folded = [t["folded"] + r["honest"]["folded"] for t, r in zip(tab, rs)]
    withheld = [t["results"] - t["folded"] for t in tab]
    rep = [100 * r["honest"]["replicas"] / (f + w) for r, f, w in zip(rs, folded, withheld)]
    mean = lambda xs: sum(xs) / len(xs)   # noqa: E731
    each = lambda xs, f: " / ".join(f.format(x) for x in xs)   # noqa: E731
    stale_tab = [t["mean_staleness"] for t in tab]
    print(f"| {name} | {mean(acc):.2f} ({each(acc, '{:.2f}')}) | {each([t['results'] for t in tab], '{}')} | "
          f"{each([t['folded'] for t in tab], '{}')} | {each([t['checked'] for t in tab], '{}')} | "
          f"{each([t['results_until_quarantined'] if t['quarantined'] else 'not' for t in tab], '{}')} | "
          f"{mean(rep):.1f} ({each(rep, '{:.1f}')}) | "
          f"{mean([r['honest']['mean_staleness'] for r in rs]):.2f} / "
          f"{'-' if None in stale_tab else f'{mean(stale_tab):.2f}'} | "
          f"{each([r['wall_s'] for r in rs], '{:.0f}')} |")
