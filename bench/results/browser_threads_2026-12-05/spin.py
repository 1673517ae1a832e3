"""Diagnostic (not a bench): ms per training step in the 1-thread tab and the 2-thread tab with variants of the
session options, interleaved (bench.browser_step's Browser). Usage: spin.py MODEL BATCH ROUNDS VARIANTS_JSON
({label: [threads, session options]} or [threads, session options, GRAPH.onnx]: another step graph of the same
model, batch, inputs and outputs, e.g. one exported by an older commit); results.txt holds the runs of 2026-12-05,
../browser_threads_2026-12-05b/results.txt the graph A/Bs."""
import json, shutil, statistics, sys, tempfile, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
import torch
from bench.browser_step import Browser, StaticServer, default_cache_dir, step_case
torch.set_num_threads(1)
name, batch, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
variants = json.loads(sys.argv[4])   # {label: [threads, options(, graph)]}
files = Path(tempfile.mkdtemp())
key, *_ = step_case(name, batch, default_cache_dir() / "steps", files)
server = StaticServer(files)
b = Browser(server.url, [1, 2], Path(tempfile.mkdtemp()) / "browser.log")
for label, (t, opts, *graph) in variants.items():
    k = f"{key}-{label}"
    for ext in ("onnx", "json", "bin"):
        shutil.copy(files / f"{key}.{ext}", files / f"{k}.{ext}")
    if graph:
        shutil.copy(graph[0], files / f"{k}.onnx")
    b.call(t, op="load", key=k, graph=f"{server.url}/files/{k}.onnx", meta=f"{server.url}/files/{k}.json",
           data=f"{server.url}/files/{k}.bin", options=opts)
    b.call(t, op="run", key=k, steps=2)
times = {l: [] for l in variants}
order = list(variants)
for r in range(rounds):
    for l in order[r % len(order):] + order[:r % len(order)]:
        times[l] += b.call(variants[l][0], op="run", key=f"{key}-{l}", steps=3)["times"]
b.close()
base = statistics.median(times[order[0]])
for l in order:
    m = statistics.median(times[l]); print(f"{l:12s} median {m:8.1f} ms  speed-up {base / m:.3f}  all {[round(x) for x in times[l]]}")
