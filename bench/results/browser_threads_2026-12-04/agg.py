"""Per op type, ms per step (of 6) in the 1-thread and the 2-thread tab, from prof.py's LOG."""
import json, sys, collections, re
f = sys.argv[1]
ev = {1: [], 2: []}
for line in open(f):
    m = re.match(r"\[tab (\d)\] log: (\{.*\}),?\s*$", line)
    if not m: continue
    try: e = json.loads(m.group(2))
    except Exception: continue
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        ev[int(m.group(1))].append(e)
res = {}
for t in (1, 2):
    by = collections.defaultdict(float); tot = 0
    for e in ev[t]:
        by[e["args"]["op_name"]] += e["dur"]; tot += e["dur"]
    res[t] = (by, tot)
    print(t, "events", len(ev[t]), "total ms per step", tot / 6 / 1000)
by1, t1 = res[1]; by2, t2 = res[2]
print(f"{'op':22} {'1t ms':>8} {'2t ms':>8} {'ratio':>6} {'share1':>6} {'extra2t':>8}")
for op in sorted(by1, key=lambda o: -by1[o])[:25]:
    a, b = by1[op]/6000, by2.get(op, 0)/6000
    print(f"{op:22} {a:8.1f} {b:8.1f} {a/max(b,1e-9):6.2f} {a/(t1/6000):6.1%} {b - a/2:8.1f}")
