"""Diagnostic (not a bench): ms per training step of two step graphs of the same model and batch (same inputs
and outputs), each in the 1-thread and the 2-thread tab, interleaved (bench.browser_step's Browser).
Usage: ab.py MODEL BATCH ROUNDS OLD.onnx [NEW.onnx]: NEW defaults to the graph of the code checked out now;
results.txt holds the runs of 2026-12-05."""
import shutil, statistics, sys, tempfile
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
import torch
from bench.browser_step import Browser, StaticServer, default_cache_dir, step_case
torch.set_num_threads(1)
name, batch, rounds, old = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
files = Path(tempfile.mkdtemp())
key, *_ = step_case(name, batch, default_cache_dir() / "steps", files)
if len(sys.argv) > 5:
    shutil.copy(sys.argv[5], files / f"{key}.onnx")
server = StaticServer(files)
b = Browser(server.url, [1, 2], Path(tempfile.mkdtemp()) / "browser.log")
variants = {"old-1t": (1, old), "old-2t": (2, old), "new-1t": (1, None), "new-2t": (2, None)}
for label, (t, graph) in variants.items():
    k = f"{key}-{label}"
    for ext in ("onnx", "json", "bin"):
        shutil.copy(files / f"{key}.{ext}", files / f"{k}.{ext}")
    if graph is not None:
        shutil.copy(graph, files / f"{k}.onnx")
    b.call(t, op="load", key=k, graph=f"{server.url}/files/{k}.onnx", meta=f"{server.url}/files/{k}.json",
           data=f"{server.url}/files/{k}.bin", options={})
    b.call(t, op="run", key=k, steps=2)
times = {l: [] for l in variants}
order = list(variants)
for r in range(rounds):
    for l in order[r % len(order):] + order[:r % len(order)]:
        times[l] += b.call(variants[l][0], op="run", key=f"{key}-{l}", steps=3)["times"]
b.close()
med = {l: statistics.median(v) for l, v in times.items()}
for l in order:
    print(f"{l:8s} median {med[l]:8.1f} ms  all {[round(x) for x in times[l]]}")
print(f"2 threads over 1: old {med['old-1t'] / med['old-2t']:.3f}x, new {med['new-1t'] / med['new-2t']:.3f}x; "
      f"new over old: 1 thread {med['old-1t'] / med['new-1t']:.3f}x, 2 threads {med['old-2t'] / med['new-2t']:.3f}x")
