"""Diagnostic (not a bench): ms per training step of two onnxruntime-web releases, each in a 1-thread and a
2-thread tab of its own headless Chromium, rounds interleaved (bench.browser_step's StaticServer, Browser and
step_case: the same graph, inputs and page). Usage: ab.py MODEL BATCH ROUNDS LABEL_A DIST_A LABEL_B DIST_B, each
DIST an onnxruntime-web dist/ folder. The losses of each tab's first steps are printed too: both releases start
from the same weights and inputs, so they must agree to float rounding."""
import shutil, statistics, sys, tempfile
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
import torch
from bench.browser_step import Browser, StaticServer, default_cache_dir, step_case
torch.set_num_threads(1)
name, batch, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
builds = {sys.argv[4]: Path(sys.argv[5]), sys.argv[6]: Path(sys.argv[7])}
files = Path(tempfile.mkdtemp())
key, *_ = step_case(name, batch, default_cache_dir() / "steps", files)
logs = Path(tempfile.mkdtemp())
tabs = {}
for label, dist in builds.items():
    server = StaticServer(files, dist)
    browser = Browser(server.url, [1, 2], logs / f"{label}.log")
    print(f"{label}: {dist}: onnxruntime-web {sorted({i.get('ortVersion') for i in browser.info.values()})}", flush=True)
    for t in (1, 2):
        browser.call(t, op="load", key=key, graph=f"{server.url}/files/{key}.onnx",
                     meta=f"{server.url}/files/{key}.json", data=f"{server.url}/files/{key}.bin", options={})
        first = browser.call(t, op="run", key=key, steps=2)
        print(f"{label} {t}t first losses {first['losses']}", flush=True)
        tabs[f"{label}-{t}t"] = (browser, t)
times = {tab: [] for tab in tabs}
order = list(tabs)
for r in range(rounds):
    for tab in order[r % len(order):] + order[:r % len(order)]:
        browser, t = tabs[tab]
        times[tab] += browser.call(t, op="run", key=key, steps=3)["times"]
for browser in {b for b, _ in tabs.values()}:
    browser.close()
med = {tab: statistics.median(v) for tab, v in times.items()}
for tab in order:
    print(f"{tab:16s} median {med[tab]:8.1f} ms  all {[round(x) for x in times[tab]]}")
for label in builds:
    print(f"{label}: 2 threads over 1: {med[f'{label}-1t'] / med[f'{label}-2t']:.3f}x")
