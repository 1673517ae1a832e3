import json, sys
d = sys.argv[1]; ep = sys.argv[2]
R = json.load(open(f"{d}/ref.json")); W = json.load(open(f"{d}/{ep}.json"))
ref, order = R["ref"], R["order"]
shown = 0
for o, op, node in order:
    if o not in ref or o not in W: continue
    a, b = ref[o], W[o]
    scale = max(a["abs"], 1e-12)
    err = max(abs(a["sum"] - b["sum"]) / scale, abs(a["abs"] - b["abs"]) / scale)
    if err > 1e-3:
        print(f"{op:18s} {node[:50]:50s} {o[:30]:30s} n={a['n']} rel={err:.3g} ref={a['head'][:3]} got={b['head'][:3]}")
        shown += 1
        if shown > int(sys.argv[3] if len(sys.argv) > 3 else 15): break
