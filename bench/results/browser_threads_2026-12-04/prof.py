"""Diagnostic (not a bench): onnxruntime-web's own per-node profile of the training step in the 1-thread and
the 2-thread tab, 6 steps each, written to the browser log (the tabs' console).

    python bench/results/browser_threads_2026-12-04/prof.py resnet_fast 128 LOG
    python bench/results/browser_threads_2026-12-04/agg.py LOG   # per op type: ms per step, 1 vs 2 threads
"""
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.browser_step import Browser, StaticServer, default_cache_dir, step_case  # noqa: E402

torch.set_num_threads(1)
name, batch, log = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
files = Path(tempfile.mkdtemp())
key, *_ = step_case(name, batch, default_cache_dir() / "steps", files)
server = StaticServer(files)
log.write_text("")
b = Browser(server.url, [1, 2], log)
for t in (1, 2):
    b.call(t, op="load", key=key, graph=f"{server.url}/files/{key}.onnx", meta=f"{server.url}/files/{key}.json",
           data=f"{server.url}/files/{key}.bin", options={"enableProfiling": True})
    b.call(t, op="run", key=key, steps=6)
    b.call(t, op="endProfiling", key=key)
b.close()
