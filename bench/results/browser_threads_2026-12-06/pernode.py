import json, sys, collections, re
f, op = sys.argv[1], sys.argv[2]
ev = {1: collections.defaultdict(float), 2: collections.defaultdict(float)}
shape = {}
for line in open(f):
    m = re.match(r"\[tab (\d)\] log: (\{.*\}),?\s*$", line)
    if not m: continue
    try: e = json.loads(m.group(2))
    except Exception: continue
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"]["op_name"] == op:
        k = e["name"][:-12]
        ev[int(m.group(1))][k] += e["dur"] / 6000
        shape[k] = (e["args"]["input_type_shape"], e["args"]["output_type_shape"])
for k in sorted(ev[1], key=lambda k: -ev[1][k])[:int(sys.argv[3]) if len(sys.argv) > 3 else 20]:
    print(f"{ev[1][k]:7.2f} {ev[2][k]:7.2f} {k[:50]:50s} {json.dumps(shape[k][0])[:90]} -> {json.dumps(shape[k][1])[:60]}")
