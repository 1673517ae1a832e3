"""Browser step: a training step in onnxruntime-web vs Python onnxruntime and PyTorch; the donor's side.

Issue 4's benchmark, three parts, each skippable (``--skip step donor throttle``):

1. **step**: ms per training step of the exported step graph (``models.onnx_step.step_graph``),
   same model, batch and inputs (the model's initial state, random images and labels, the
   recipe's hyperparameters), measured side by side in one run:
     - onnxruntime-web WASM in headless Chromium with 1 and with 2 threads: a page of our own
       (bench/browser_step.html, one tab per thread count, the step in a module Web Worker
       as worker_web/worker.js runs it: the WASM-only build, proxy off, optimisation 'all')
       served with COOP/COEP headers by a small aiohttp server on 127.0.0.1, so threads work;
     - Python onnxruntime on the same graph, 1 and 2 intra-op threads;
     - PyTorch eager, 1 thread: forward, loss, backward, SGD update as
       ``models.local.run_local`` does them (channels_last, the recipe's optimiser), without
       augmentation.
   Every runtime feeds each step's outputs back as the next step's inputs. Warm-up steps are
   excluded; then ``--rounds`` rounds of ``--steps`` steps, the runtimes interleaved (in an
   order rotated each round) so machine noise hits all of them alike; the median over all
   timed steps is reported, with the spread of the per-round medians.
2. **donor**: a real coordinator (tests/helpers/cluster.py) on tiny synthetic data it makes
   itself, the donate page driven by worker_web/drive.mjs: bytes a first visit downloads (fresh
   profile), split into the page's static assets and the blobs (model version, data shard,
   step graph), and the seconds from opening the page to the first accepted unit, first visit
   and repeat visit (the same profile). The coordinator builds the step graph at start; we
   wait for ``GET /api/v1/steps/<model>/<batch>`` to answer 200 before the first visit, so the
   export is not counted.
3. **throttle**: the page at ``?throttle=N&threads=1`` for N in ``--throttles`` (default 100,
   50, 25, 0, 25, 50, 100: a palindrome, so a drift in the machine's load cancels; 0 is the
   page open but not started, the idle baseline), each a fresh profile held ``--window``
   seconds after its first unit; the CPU time of the Chromium processes (utime + stime from
   /proc of the browser started with that profile and all its descendants) over the window /
   wall time, relative to the 100% runs' mean (and to one full core): asked vs used.

    python bench/browser_step.py [--models cnn:64 resnet_fast:64] [--rounds 5 --steps 4] [--skip throttle]

Writes bench/out/browser_step-<date>/{config,results}.json and its section of docs/results.md.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import commit, hardware, shown, write_section  # noqa: E402
from models import registry  # noqa: E402
from models.data import default_cache_dir  # noqa: E402
from models.onnx_step import example_inputs, step_graph  # noqa: E402
from models.train import channels_last, loss_fn, make_optimizer  # noqa: E402

BENCH = ROOT / "bench"
ORT_DIST = ROOT / "worker_web" / "node_modules" / "onnxruntime-web" / "dist"
DRIVE = ROOT / "worker_web" / "drive.mjs"
NODE = shutil.which("node") or "node"
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-store"}
TYPES = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json"}
RUNTIMES = ("wasm-1t", "wasm-2t", "ort-1t", "ort-2t", "torch-1t")
GOALS = {"wasm_vs_torch": 1.5, "static_mb": 8.0, "first_visit_s": 15.0, "repeat_visit_s": 3.0, "throttle_rel": 0.10}


# ============================================================================ part 1: step timing
class StaticServer:
    """bench/browser_step*.{html,js}, onnxruntime-web's dist/ at /ort/ and a folder at /files/,
    with COOP/COEP (cross-origin isolated: WebAssembly threads), on 127.0.0.1 in a thread. ``dist``: another
    onnxruntime-web build's dist/ (an A/B of two releases)."""

    def __init__(self, files: Path, dist: Path = ORT_DIST) -> None:
        self.files, self.dist, self.loop, self.url = files, dist, asyncio.new_event_loop(), None
        started = threading.Event()
        threading.Thread(target=self._serve, args=(started,), daemon=True).start()
        if not started.wait(30) or self.url is None:
            raise RuntimeError("the bench's page server did not start")

    def _serve(self, started: threading.Event) -> None:
        from aiohttp import web

        async def handle(request: web.Request) -> web.StreamResponse:
            path = request.match_info["path"]
            if path in ("browser_step.html", "browser_step_worker.js"):
                source = BENCH / path
            elif path.startswith("ort/") and "/" not in path[4:]:
                source = self.dist / path[4:]
            elif path.startswith("files/") and "/" not in path[6:]:
                source = self.files / path[6:]
            else:
                raise web.HTTPNotFound()
            if not source.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(source, headers={**ISOLATION, "Content-Type": TYPES.get(source.suffix,
                                                                                           "application/octet-stream")})

        async def start() -> None:
            app = web.Application()
            app.router.add_get("/{path:.+}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"

        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(start())
        finally:
            started.set()
        self.loop.run_forever()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


class Browser:
    """bench/browser_step.mjs: headless Chromium with one tab per thread count, driven by JSON lines."""

    def __init__(self, base_url: str, threads: list[int], log: Path) -> None:
        self.log = open(log, "a")
        self.proc = subprocess.Popen([NODE, str(BENCH / "browser_step.mjs"), base_url, "--threads",
                                      ",".join(map(str, threads))], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self.next_id = 0
        first = self._read()
        if "ready" not in first:
            raise RuntimeError(f"the browser did not start: {first}")
        self.info = first["ready"]

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the browser driver exited ({self.proc.poll()}); see {self.log.name}")
            if line.startswith("{"):
                return json.loads(line)

    def call(self, threads: int, **msg) -> dict:
        self.next_id += 1
        self.proc.stdin.write(json.dumps({"id": self.next_id, "threads": threads, **msg}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if reply.get("error"):
            raise RuntimeError(f"browser ({threads} threads): {reply['error']}")
        return reply

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def step_case(model_name: str, batch: int, cache_dir: Path, files: Path):
    """The graph, its spec, the first step's inputs (also written to ``files`` for the page), the model."""
    t0 = time.perf_counter()
    graph, spec = step_graph(model_name, batch, cache_dir)
    ready_s = time.perf_counter() - t0
    recipe = registry.get(model_name).recipe
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = registry.build(model_name)
    feeds = {t.name: a.numpy().copy() for t, a in zip(spec.inputs, example_inputs(spec, recipe, model))}
    key = f"{model_name}-b{batch}"
    meta, blobs, offset = {"inputs": [], "outputs": []}, [], 0
    for t in spec.inputs:
        data = np.ascontiguousarray(feeds[t.name]).tobytes()
        meta["inputs"].append({"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": offset,
                               "nbytes": len(data)})
        blobs.append(data + b"\0" * (-len(data) % 8))   # 8-byte aligned for int64
        offset += len(blobs[-1])
    meta["outputs"] = [{"name": t.name, "feeds": t.feeds} for t in spec.outputs[1:]]
    (files / f"{key}.onnx").write_bytes(graph)
    (files / f"{key}.json").write_text(json.dumps(meta))
    (files / f"{key}.bin").write_bytes(b"".join(blobs))
    return key, graph, spec, feeds, model, recipe, ready_s


def step_flops(model_name: str, batch: int) -> float:
    """Floating-point operations of one forward + backward at ``batch`` (torch's flop counter;
    convolutions and matrix products only, the update's element-wise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    recipe = registry.get(model_name).recipe
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = registry.build(model_name).train()
        x, y = torch.rand(batch, 3, 32, 32) * 255, torch.randint(0, 10, (batch,))
        with FlopCounterMode(display=False) as counter:
            loss_fn(model(x), y, recipe).backward()
    return float(counter.get_total_flops())


def ort_runner(graph: bytes, spec, feeds: dict, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    feeds, names = dict(feeds), spec.output_names

    def run(n: int) -> tuple[list[float], list[float]]:
        times, losses = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            out = session.run(names, feeds)
            times.append(1000 * (time.perf_counter() - t0))
            losses.append(float(out[0]))
            for t, value in zip(spec.outputs[1:], out[1:]):
                feeds[t.feeds] = value
        return times, losses
    return run


def torch_runner(model: torch.nn.Module, recipe, feeds: dict):
    """The step of models.local.run_local (no augmentation), on the graph's first inputs."""
    model = model.to(memory_format=torch.channels_last).train()
    opt = make_optimizer(model, recipe)
    x = channels_last(torch.from_numpy(feeds["x"]))
    y = torch.from_numpy(feeds["y"])

    def run(n: int) -> tuple[list[float], list[float]]:
        times, losses = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            loss = loss_fn(model(x), y, recipe)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            times.append(1000 * (time.perf_counter() - t0))
            losses.append(value)
        return times, losses
    return run


def wasm_runner(browser: Browser, threads: int, key: str, base: str, options: dict | None = None):
    reply = browser.call(threads, op="load", key=key, graph=f"{base}/files/{key}.onnx", meta=f"{base}/files/{key}.json",
                         data=f"{base}/files/{key}.bin", options=options or {})

    def run(n: int) -> tuple[list[float], list[float]]:
        r = browser.call(threads, op="run", key=key, steps=n)
        return r["times"], r["losses"]
    run.create_ms = reply["createMs"]
    return run


def step_timing(args, out: Path) -> dict:
    torch.set_num_threads(1)
    files = Path(tempfile.mkdtemp(prefix="browser_step-"))
    cases = []
    for spec_text in args.models:   # export (or read from the cache) before anything is timed
        name, _, b = spec_text.partition(":")
        cases.append((name, int(b or 64), step_case(name, int(b or 64), args.step_cache, files)))
    server = StaticServer(files)
    browser = None
    rows = []
    try:
        browser = Browser(server.url, [1, 2], out / "browser.log")
        print(f"chromium tabs ready: {browser.info}", flush=True)
        for name, batch, (key, graph, spec, feeds, model, recipe, ready_s) in cases:
            runners = {"wasm-1t": wasm_runner(browser, 1, key, server.url),
                       "wasm-2t": wasm_runner(browser, 2, key, server.url),
                       "ort-1t": ort_runner(graph, spec, feeds, 1), "ort-2t": ort_runner(graph, spec, feeds, 2),
                       "torch-1t": torch_runner(model, recipe, feeds)}
            runners = {k: v for k, v in runners.items() if k in args.runtimes}
            first_losses = {}
            for k, run in runners.items():   # warm-up, excluded
                first_losses[k] = run(args.warmup)[1][0]
            times = {k: [] for k in runners}
            rounds = {k: [] for k in runners}
            last_losses = {}
            order = list(runners)
            t_start = time.time()
            for r in range(args.rounds):
                turn = order[r % len(order):] + order[:r % len(order)]
                for k in turn:
                    t, losses = runners[k](args.steps)
                    times[k] += t
                    rounds[k].append(statistics.median(t))
                    last_losses[k] = losses[-1]
            row = {"model": name, "batch": batch, "graph_bytes": len(graph), "graph_ready_s": round(ready_s, 2),
                   "graph_sha256": hashlib.sha256(graph).hexdigest(), "gflop_per_step": step_flops(name, batch) / 1e9,
                   "params": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - t_start, 1),
                   "runtimes": {}}
            for k in runners:
                row["runtimes"][k] = {"median_ms": statistics.median(times[k]), "min_ms": min(times[k]),
                                      "gflop_per_s": row["gflop_per_step"] / (statistics.median(times[k]) / 1000),
                                      "round_medians_ms": rounds[k], "n": len(times[k]),
                                      "first_loss": first_losses[k], "last_loss": last_losses[k],
                                      **({"session_create_ms": runners[k].create_ms}
                                         if hasattr(runners[k], "create_ms") else {})}
            med = {k: v["median_ms"] for k, v in row["runtimes"].items()}
            if "torch-1t" in med:
                row["ratios_vs_torch_1t"] = {k: med[k] / med["torch-1t"] for k in med}
            rows.append(row)
            print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()) +
                  (f"; wasm-1t / torch-1t = {row['ratios_vs_torch_1t']['wasm-1t']:.2f}x"
                   if "wasm-1t" in med and "torch-1t" in med else ""), flush=True)
    finally:
        if browser is not None:
            browser.close()
        server.stop()
        shutil.rmtree(files, ignore_errors=True)
    return {"rows": rows, "browser": browser.info if browser else None}


# ============================================================================ part 2: the donor's side
def http_get(url: str, gzip_ok: bool = True, timeout: float = 30) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzip_ok else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_manifest(url: str, model: str, batch: int, timeout: float = 600) -> tuple[float, dict]:
    """Seconds until the step manifest answers 200, and the manifest."""
    t0 = time.time()
    while time.time() < t0 + timeout:
        status, _, body = http_get(f"{url}/api/v1/steps/{model}/{batch}")
        if status == 200:
            return time.time() - t0, json.loads(body)
        if status != 503:
            raise RuntimeError(f"step manifest: HTTP {status}: {body[:300]!r}")
        time.sleep(0.5)
    raise RuntimeError("the step graph was not built in time")


def drive(url: str, *options: str, timeout: float = 240) -> dict:
    proc = subprocess.run([NODE, str(DRIVE), url, *options, "--timeout", str(int(timeout))], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout + 90)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"drive.mjs printed no result (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def asset_sizes(url: str) -> dict:
    """Compressed (gzip) bytes of each file the coordinator serves under /static/<version>/."""
    from coordinator.web import ORT_FILES, PAGE_FILES

    _, _, page = http_get(url + "/")
    text = page.decode()
    prefix = text.split('src="')[1].split("/main.js")[0]
    sizes = {"/ (the page)": len(page)}
    for rel in (*PAGE_FILES, *(f"ort/{n}" for n in ORT_FILES)):
        status, headers, body = http_get(f"{url}{prefix}/{rel}")
        if status == 200:
            sizes[rel] = len(body)
    return sizes


def split_bytes(by_type: dict) -> dict:
    static = sum(v for k, v in by_type.items() if k.startswith("/static") or k == "/")
    blobs = sum(v for k, v in by_type.items() if k.startswith("/api/v1/blobs"))
    return {"static": static, "blobs": blobs, "other": sum(by_type.values()) - static - blobs}


def make_cluster(tmp: Path, data: Path, batch: int, local_steps: int):
    from tests.helpers.cluster import Cluster

    tmp.mkdir(parents=True, exist_ok=True)
    return Cluster(tmp, "--data", str(data), "--model", "cnn", "--batch-size", str(batch), "--shard-size", "64",
                   "--local-steps", str(local_steps), "--epochs", "10000", "--eval-every", "3600",
                   "--eval-images", "100")


def worker_results(cluster, worker_id: str) -> list[dict]:
    with cluster.db() as db:
        rows = db.execute("SELECT unit_id, num_samples, compute_seconds, accepted FROM results WHERE worker_id = ? "
                          "ORDER BY seq", (worker_id,)).fetchall()
    return [{"unit_id": r[0], "num_samples": r[1], "compute_seconds": r[2], "accepted": r[3]} for r in rows]


def unit_blobs(cluster, unit_id: str, manifest: dict) -> dict:
    """Bytes of the blobs one unit needs (served as they are stored: not compressed)."""
    with cluster.db() as db:
        shard_ids, base_step = db.execute("SELECT shard_ids, base_step FROM units WHERE unit_id = ?",
                                          (unit_id,)).fetchone()
        version = db.execute("SELECT blob FROM versions WHERE step = ?", (base_step,)).fetchone()[0]
    size = lambda b: (cluster.state / "blobs" / b).stat().st_size  # noqa: E731
    return {"model_version": size(version), "shards": sum(size(b) for b in json.loads(shard_ids)),
            "graph": manifest["graph_bytes"]}


def donor(args, tmp: Path, data: Path) -> dict:
    cluster = make_cluster(tmp / "donor", data, args.donor_batch, args.donor_local_steps)
    try:
        cluster.start_coordinator()
        waited, manifest = wait_manifest(cluster.url, "cnn", args.donor_batch)
        print(f"donor: coordinator up, step graph ready after {waited:.1f} s more", flush=True)
        sizes = asset_sizes(cluster.url)
        profile = tmp / "donor-profile"
        page = f"{cluster.url}/?autostart=1&throttle={args.donor_throttle}"
        visits = {}
        for visit in ("first", *(f"repeat{i + 1}" for i in range(args.repeat_visits))):
            out = drive(page, "--profile", str(profile), "--units", "1", timeout=180)
            if not out.get("ok"):
                raise RuntimeError(f"donor {visit} visit failed: {out.get('error')} {out.get('console', [])[-5:]}")
            state = out["state"]
            results = worker_results(cluster, state["workerId"])
            counted = out.get("bytes_at_first_unit") or out["bytes"]   # up to the first accepted unit
            visits[visit] = {"seconds_to_first_unit": out["seconds_to_first_unit"], "seconds": out["seconds"],
                             "bytes_total": counted["total"], "by_type": counted["by_type"],
                             "bytes": split_bytes(counted["by_type"]), "requests": out["requests"],
                             "backend": state.get("backend"), "backend_reason": state.get("backendReason"),
                             "unit_compute_seconds": results[-1]["compute_seconds"] if results else None,
                             "unit_blobs": unit_blobs(cluster, results[-1]["unit_id"], manifest) if results else None,
                             "worker_id": state["workerId"]}
            v = visits[visit]
            print(f"donor {visit} visit: {v['seconds_to_first_unit']:.2f} s to the first accepted unit "
                  f"(training {v['unit_compute_seconds'] or 0:.2f} s of it); {v['bytes_total'] / 1e6:.2f} MB "
                  f"({v['bytes']['static'] / 1e6:.2f} static, {v['bytes']['blobs'] / 1e6:.2f} blobs); "
                  f"backend {v['backend']} ({v['backend_reason']})", flush=True)
    finally:
        cluster.stop()
    repeats = [v["seconds_to_first_unit"] for k, v in visits.items() if k.startswith("repeat")]
    return {"manifest_wait_s": waited, "asset_gzip_bytes": sizes, "visits": visits,
            "repeat_mean_s": statistics.mean(repeats) if repeats else None,
            "unit": {"model": "cnn", "batch": args.donor_batch, "local_steps": args.donor_local_steps,
                     "throttle": args.donor_throttle}}


# ============================================================================ part 3: throttle
CLK = os.sysconf("SC_CLK_TCK")


def chromium_ticks(profile: Path) -> dict[int, int]:
    """utime + stime (clock ticks) of the Chromium started with ``profile`` and all its descendants."""
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        procs[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]), cmd)
    key = str(profile).encode()
    roots = {pid for pid, (_, _, cmd) in procs.items()
             if cmd and b"chrom" in Path(cmd[0].decode(errors="replace")).name.encode() and any(key in c for c in cmd)}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return {pid: procs[pid][1] for pid in seen}


def cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLK


def throttle(args, tmp: Path, data: Path) -> dict:
    cluster = make_cluster(tmp / "throttle", data, args.donor_batch, args.throttle_local_steps)
    runs = []
    try:
        cluster.start_coordinator()
        wait_manifest(cluster.url, "cnn", args.donor_batch)
        for i, asked in enumerate(args.throttles):
            profile = tmp / f"throttle-profile-{i}"
            base = cluster.status()["units_accepted"]
            if asked == 0:   # the idle baseline: the page open, not started (no unit to wait for)
                url, goal = f"{cluster.url}/?threads=1", ["--units", "0", "--hold", str(args.window + args.settle + 10)]
            else:
                url, goal = (f"{cluster.url}/?autostart=1&throttle={asked}&threads=1",
                             ["--units", "1", "--hold", str(args.window + args.settle + 3)])
            proc = subprocess.Popen([NODE, str(DRIVE), url, "--profile", str(profile), "--timeout", "180", *goal],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.time() + 200
            if asked == 0:
                while not chromium_ticks(profile) and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.2)
                time.sleep(5)   # the page loaded and settled
            while asked and cluster.status()["units_accepted"] <= base:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"throttle {asked}: no unit accepted: {proc.communicate()[0][-2000:]}")
                time.sleep(0.2)
            time.sleep(args.settle)
            a, t0 = chromium_ticks(profile), time.time()
            time.sleep(args.window)
            b, t1 = chromium_ticks(profile), time.time()
            stdout, _ = proc.communicate(timeout=120)
            lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
            out = json.loads(lines[-1]) if lines else {"error": "no output"}
            with cluster.db() as db:
                units, samples = db.execute("SELECT COUNT(*), COALESCE(SUM(num_samples), 0) FROM results "
                                            "WHERE accepted BETWEEN ? AND ?", (t0, t1)).fetchone()
            used = cpu_seconds(a, b) / (t1 - t0)
            runs.append({"asked": asked, "cores_used": used, "window_s": t1 - t0, "processes": len(b),
                         "units_in_window": units, "samples_per_s": samples / (t1 - t0), "ok": out.get("ok"),
                         "backend_reason": (out.get("state") or {}).get("backendReason"),
                         "error": out.get("error")})
            print(f"throttle {asked}%: {used:.3f} cores over {t1 - t0:.1f} s ({len(b)} Chromium processes), "
                  f"{units} units, {samples / (t1 - t0):.1f} samples/s", flush=True)
            shutil.rmtree(profile, ignore_errors=True)
    finally:
        cluster.stop()
    full = [r["cores_used"] for r in runs if r["asked"] == 100]
    ref = statistics.mean(full) if full else None
    for r in runs:
        r["relative_share"] = r["cores_used"] / ref if ref else None
        r["relative_error"] = (r["relative_share"] / (r["asked"] / 100) - 1) if ref and r["asked"] else None
        r["error_vs_one_core"] = (r["cores_used"] / (r["asked"] / 100) - 1) if r["asked"] else None
    summary = {}
    for asked in dict.fromkeys(r["asked"] for r in runs):
        mine = [r for r in runs if r["asked"] == asked]
        cores = statistics.mean(r["cores_used"] for r in mine)
        summary[str(asked)] = {"runs": len(mine), "cores_used": cores, "cores_each": [r["cores_used"] for r in mine],
                               "relative_share": cores / ref if ref else None,
                               "relative_error": (cores / ref / (asked / 100) - 1) if ref and asked else None,
                               "error_vs_one_core": (cores / (asked / 100) - 1) if asked else None,
                               "samples_per_s": statistics.mean(r["samples_per_s"] for r in mine)}
    return {"reference_cores": ref, "runs": runs, "summary": summary,
            "unit": {"model": "cnn", "batch": args.donor_batch, "local_steps": args.throttle_local_steps}}


# ============================================================================ report
def report(cfg: dict, res: dict, out: Path) -> str:
    lines = [f"### Browser step and the donor's side ({cfg['date']})", "",
             f"- Hardware: {cfg['hardware']}; Chromium {cfg['chromium']} headless (Debian), onnxruntime-web "
             f"{cfg['ort_web']}, onnxruntime {cfg['ort']}. No GPU: WebGPU not measured. The 2 cores were shared "
             "with other work during the run: compare the ratios, measured side by side, more than the absolute "
             "numbers.",
             f"- Command: `{cfg['command']}` (under `nice -n {cfg['nice']}`) at commit {cfg['commit']}; raw "
             f"results in `{shown(out)}`."]
    step = res.get("step")
    if step:
        lines += ["", "**Step timing** (ms per SGD step, median; data: random images and labels, the model's "
                  "initial weights, the recipe's hyperparameters; the same exported graph for WASM and "
                  f"onnxruntime, each step's outputs fed back; {cfg['warmup']} warm-up steps excluded, then "
                  f"{cfg['rounds']} rounds of {cfg['steps']} steps with the runtimes interleaved; in brackets the "
                  "range of the per-round medians):", ""]
        keys = [k for k in RUNTIMES if any(k in r["runtimes"] for r in step["rows"])]
        lines += ["| model | batch | " + " | ".join(keys) + " | WASM 1t / torch 1t | WASM 2t / torch 1t | "
                  "ORT 1t / torch 1t | WASM 1t / ORT 1t |",
                  "|---|---:|" + "---:|" * len(keys) + "---:|---:|---:|---:|"]
        for r in step["rows"]:
            cells = []
            for k in keys:
                v = r["runtimes"].get(k)
                cells.append(f"{v['median_ms']:.1f} ({min(v['round_medians_ms']):.0f}-{max(v['round_medians_ms']):.0f})"
                             if v else "-")
            ratio = r.get("ratios_vs_torch_1t", {})
            fmt = lambda k: f"{ratio[k]:.2f}x" if k in ratio else "-"  # noqa: E731
            med = {k: v["median_ms"] for k, v in r["runtimes"].items()}
            wasm_ort = f"{med['wasm-1t'] / med['ort-1t']:.2f}x" if "wasm-1t" in med and "ort-1t" in med else "-"
            lines.append(f"| `{r['model']}` | {r['batch']} | " + " | ".join(cells) +
                         f" | {fmt('wasm-1t')} | {fmt('wasm-2t')} | {fmt('ort-1t')} | {wasm_ort} |")
        lines += ["", "Work per step (torch's flop counter: the convolutions and matrix products of forward and "
                  "backward) and the rate each runtime reached: " + "; ".join(
                      f"`{r['model']}` {r['gflop_per_step']:.1f} GFLOP: " + ", ".join(
                          f"{k} {v['gflop_per_s']:.0f}" for k, v in r["runtimes"].items()) + " GFLOP/s"
                      for r in step["rows"]) + ". Graphs: " + ", ".join(
                      f"`{r['model']}` {r['graph_bytes']:,} bytes (sha256 {r['graph_sha256'][:12]})"
                      for r in step["rows"]) + "."]
    d = res.get("donor")
    if d:
        first = d["visits"]["first"]
        sizes = d["asset_gzip_bytes"]
        page_files = sum(v for k, v in sizes.items() if not k.startswith("ort/"))
        wasm_build = sum(sizes.get(f"ort/{n}", 0) for n in ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs",
                                                             "ort-wasm-simd-threaded.wasm"))
        jsep_build = sum(sizes.get(f"ort/{n}", 0) for n in ("ort.min.mjs", "ort-wasm-simd-threaded.jsep.mjs",
                                                             "ort-wasm-simd-threaded.jsep.wasm"))
        u = d["unit"]
        lines += ["", f"**The donor's side** (a real coordinator on 127.0.0.1, tiny synthetic data: 512 training "
                  f"images in shards of 64; `cnn`, units of {u['local_steps']} steps of {u['batch']}; the page at "
                  f"`/?autostart=1&throttle={u['throttle']}` driven by `worker_web/drive.mjs`. The coordinator "
                  "exports the step graph at start; the first visit began only once "
                  "`GET /api/v1/steps/cnn/" + str(u["batch"]) + "` answered 200, so the export is not counted):", "",
                  "| visit | s to first accepted unit (of which training) | downloaded | static assets | "
                  "blobs (model, shard, graph) | other API |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, v in d["visits"].items():
            name = "first (fresh profile)" if name == "first" else f"repeat {name[6:]} (same profile)"
            lines.append(f"| {name} | {v['seconds_to_first_unit']:.2f} ({v['unit_compute_seconds'] or 0:.2f}) | "
                         f"{v['bytes_total'] / 1e6:.2f} MB | {v['bytes']['static'] / 1e6:.2f} MB | "
                         f"{v['bytes']['blobs'] / 1e6:.2f} MB | {v['bytes']['other'] / 1e6:.3f} MB |")
        ub = first["unit_blobs"] or {}
        lines += ["", f"Static assets as served (gzip): page and scripts {page_files / 1e6:.2f} MB; "
                  f"onnxruntime-web's WASM-only build (what a tab without WebGPU loads) {wasm_build / 1e6:.2f} MB; "
                  f"its WebGPU build (jsep, for a tab with an adapter) {jsep_build / 1e6:.2f} MB. Blobs one unit "
                  f"needs (not compressed): model version {ub.get('model_version', 0) / 1e6:.2f} MB (fetched for "
                  f"every unit, the version moves), data shard {ub.get('shards', 0) / 1e6:.3f} MB and step graph "
                  f"{ub.get('graph', 0) / 1e6:.3f} MB (both kept in the Cache API); bytes are counted up to the first "
                  "accepted unit. Backend chosen: "
                  f"{first['backend']} ({first['backend_reason']})."]
    t = res.get("throttle")
    if t and t["runs"]:
        lines += ["", f"**Throttle** (`?throttle=N&threads=1`, cnn units of {t['unit']['local_steps']} steps of "
                  f"{t['unit']['batch']}; runs in the order {', '.join(map(str, cfg['throttles']))}, each a fresh "
                  "profile, CPU time of all Chromium processes over a "
                  f"{cfg['window']:.0f} s window starting {cfg['settle']:.0f} s after the first accepted unit; "
                  "the mean of the runs at each setting (each run in brackets); share relative to the 100% runs' "
                  f"mean of {t['reference_cores']:.2f} cores):", "",
                  "| asked | cores used | used, relative to 100% | error vs asked (relative to 100%) | "
                  "error vs asked (1 core = 100%) | samples/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for asked, r in t["summary"].items():
            pct = lambda v: f"{100 * v:+.1f}%" if v is not None else "-"  # noqa: E731
            each = f" ({', '.join(f'{c:.3f}' for c in r['cores_each'])})" if r["runs"] > 1 else ""
            lines.append(f"| {asked + '%' if asked != '0' else 'idle (page open, not started)'} | "
                         f"{r['cores_used']:.3f}{each} | {100 * r['relative_share']:.1f}% | "
                         f"{pct(r['relative_error'])} | {pct(r['error_vs_one_core'])} | {r['samples_per_s']:.1f} |")
    lines += ["", "Goals (issue 4):", ""] + [f"- {g}" for g in goals(res)]
    return "\n".join(lines)


def goals(res: dict) -> list[str]:
    out = []
    step = res.get("step")
    if step:
        for r in step["rows"]:
            ratio = r.get("ratios_vs_torch_1t", {})
            if "wasm-1t" in ratio:
                ok = ratio["wasm-1t"] <= GOALS["wasm_vs_torch"]
                best = min((ratio[k], k) for k in ("wasm-1t", "wasm-2t") if k in ratio)
                out.append(f"WASM step / PyTorch 1 thread <= {GOALS['wasm_vs_torch']}x, `{r['model']}` batch "
                           f"{r['batch']}: **{'met' if ok else 'not met'}** ({ratio['wasm-1t']:.2f}x with 1 thread; "
                           f"best {best[0]:.2f}x with {best[1]}; prototype: ~5.6x).")
    d = res.get("donor")
    if d:
        first = d["visits"]["first"]
        static = first["bytes"]["static"] / 1e6
        out.append(f"First visit's static assets (page, scripts, onnxruntime-web incl. its wasm) <= "
                   f"{GOALS['static_mb']:.0f} MB: **{'met' if static <= GOALS['static_mb'] else 'not met'}** "
                   f"({static:.2f} MB; the blobs, {first['bytes']['blobs'] / 1e6:.2f} MB, come on top and grow "
                   "with the model).")
        s = first["seconds_to_first_unit"]
        out.append(f"Seconds to the first accepted unit, first visit, <= {GOALS['first_visit_s']:.0f} s: "
                   f"**{'met' if s <= GOALS['first_visit_s'] else 'not met'}** ({s:.2f} s, of which "
                   f"{first['unit_compute_seconds'] or 0:.2f} s training).")
        repeats = [v for k, v in d["visits"].items() if k.startswith("repeat")]
        if repeats:
            s = d["repeat_mean_s"]
            train = statistics.mean(v["unit_compute_seconds"] or 0 for v in repeats)
            out.append(f"Seconds to the first accepted unit, repeat visit, <= {GOALS['repeat_visit_s']:.0f} s: "
                       f"**{'met' if s <= GOALS['repeat_visit_s'] else 'not met'}** ({s:.2f} s, mean of "
                       f"{len(repeats)}, of which {train:.2f} s training).")
    t = res.get("throttle")
    if t and t["runs"]:
        tested = [{"asked": int(a), **r} for a, r in t["summary"].items() if a not in ("0", "100")]
        for r in tested:
            ok = abs(r["relative_error"]) <= GOALS["throttle_rel"]
            out.append(f"Throttle {r['asked']}% honoured within {100 * GOALS['throttle_rel']:.0f}%: "
                       f"**{'met' if ok else 'not met'}** ({100 * r['relative_share']:.1f}% of the 100% run's CPU, "
                       f"{100 * r['relative_error']:+.1f}% off; against one full core: "
                       f"{100 * r['error_vs_one_core']:+.1f}%).")
    return out


def versions() -> dict:
    import onnxruntime

    ort_web = json.loads((ORT_DIST.parent / "package.json").read_text())["version"]
    try:
        chromium = subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True,
                                  timeout=30).stdout.split()[1]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        chromium = "?"
    return {"ort": onnxruntime.__version__, "ort_web": ort_web, "chromium": chromium}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["cnn:64", "resnet_fast:64"], help="MODEL:BATCH for the step timing")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per runtime and model")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per runtime and round")
    p.add_argument("--donor-batch", type=int, default=32)
    p.add_argument("--donor-local-steps", type=int, default=4, help="steps per unit for the first-unit timing")
    p.add_argument("--donor-throttle", type=int, default=100)
    p.add_argument("--repeat-visits", type=int, default=2, help="repeat visits with the first visit's profile")
    p.add_argument("--throttles", type=int, nargs="+", default=[100, 50, 25, 0, 25, 50, 100],
                   help="throttle settings to run in this order; 0: the page open but not started (idle baseline)")
    p.add_argument("--throttle-local-steps", type=int, default=8)
    p.add_argument("--window", type=float, default=25.0, help="seconds of CPU measurement per throttle run")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after the first unit before the window")
    p.add_argument("--skip", nargs="*", default=[], choices=["step", "donor", "throttle"])
    p.add_argument("--step-cache", type=Path, default=default_cache_dir() / "steps",
                   help="step-graph cache (the coordinator's)")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/results.md")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"browser_step-{date}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"date": date, **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
           "hardware": hardware(), **versions(), "nice": os.nice(0), "commit": commit("models"),
           "command": "python " + " ".join(sys.argv)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    res: dict = {}

    def save() -> None:
        (out / "results.json").write_text(json.dumps({"config": cfg, **res}, indent=2) + "\n")

    t0 = time.time()
    if "step" not in args.skip:
        res["step"] = step_timing(args, out)
        save()
    if "donor" not in args.skip or "throttle" not in args.skip:
        from tests.helpers.tiny_cifar import write_official_archive

        with tempfile.TemporaryDirectory(prefix="browser_step-") as tmp:
            tmp = Path(tmp)
            data = tmp / "tiny"
            data.mkdir()
            write_official_archive(data, n_train=512, n_test=100)
            if "donor" not in args.skip:
                res["donor"] = donor(args, tmp, data)
                save()
            if "throttle" not in args.skip:
                res["throttle"] = throttle(args, tmp, data)
                save()
    res["seconds"] = round(time.time() - t0, 1)
    save()
    body = report(cfg, res, out)
    print("\n" + body)
    if not args.no_docs:
        write_section("browser_step", body, ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
