"""Diagnostic: the webgpu step graph with every intermediate as an output; CPU reference stats."""
import json, sys
from pathlib import Path
sys.path.insert(0, "/work/main")
import numpy as np, onnx, onnxruntime as ort, torch
from onnx import shape_inference
from models import registry
from models.data import default_cache_dir
from models.onnx_step import example_inputs, step_graph
name, batch = sys.argv[1], int(sys.argv[2])
out = Path(sys.argv[3]); out.mkdir(exist_ok=True)
graph, spec = step_graph(name, batch, default_cache_dir() / "steps", target="webgpu")
m = onnx.load_from_string(graph)
m = shape_inference.infer_shapes(m)
known = {o.name for o in m.graph.output}
types = {v.name: v for v in m.graph.value_info}
order = []
for node in m.graph.node:
    for o in node.output:
        if o and o in types and o not in known and types[o].type.tensor_type.elem_type in (1, 7, 9):
            m.graph.output.append(types[o]); known.add(o)
        order.append((o, node.op_type, node.name))
(out / "g.onnx").write_bytes(m.SerializeToString())
recipe = registry.get(name).recipe
with torch.random.fork_rng():
    torch.manual_seed(0)
    model = registry.build(name)
feeds = {t.name: a.numpy().copy() for t, a in zip(spec.inputs, example_inputs(spec, recipe, model))}
meta, blobs, off = {"inputs": []}, [], 0
for t in spec.inputs:
    d = np.ascontiguousarray(feeds[t.name]).tobytes()
    meta["inputs"].append({"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": off, "nbytes": len(d)})
    blobs.append(d + b"\0" * (-len(d) % 8)); off += len(blobs[-1])
(out / "in.json").write_text(json.dumps(meta)); (out / "in.bin").write_bytes(b"".join(blobs))
s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
names = [o.name for o in s.get_outputs()]
res = s.run(names, feeds)
ref = {}
for n, v in zip(names, res):
    v = np.asarray(v, dtype=np.float64)
    ref[n] = {"sum": float(v.sum()), "abs": float(np.abs(v).sum()), "n": int(v.size), "head": v.ravel()[:6].tolist()}
(out / "ref.json").write_text(json.dumps({"ref": ref, "order": order}))
print(len(names), "outputs")
