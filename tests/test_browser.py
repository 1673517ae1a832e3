"""The browser worker end to end: a real coordinator process on 127.0.0.1 (tiny data it makes
itself), Debian's headless Chromium driven by playwright-core (worker_web/drive.mjs) opening
the donate page, pressing Start, and training real units with onnxruntime-web.

Also, without a browser: the step-graph manifest (coordinator/steps.py) and its known-answer
check, and the page's assets (versioned, immutable, compressed, cross-origin isolated).
"""
from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from contract.codecs import decode_delta
from contract.shards import decode_shard
from contract.units import WORKER_KEY_HEADER, blob_id
from coordinator.steps import check_answer, check_inputs, check_mask, check_signs
from models.onnx_step import StepSpec
from tests.helpers.cluster import ROOT, Cluster
from tests.helpers.tiny_cifar import write_official_archive

DRIVER = ROOT / "worker_web" / "drive.mjs"
NODE = shutil.which("node")
HAVE_BROWSER = NODE is not None and Path("/usr/bin/chromium").exists() and \
    (ROOT / "worker_web" / "node_modules" / "playwright-core").is_dir()
needs_browser = pytest.mark.skipif(not HAVE_BROWSER, reason="needs node, /usr/bin/chromium and worker_web/node_modules "
                                                            "(bash deploy/setup.sh --test installs them)")
pytestmark = pytest.mark.timeout(900)

# Small units on tiny data: 4 steps of 32 images from shards of 64.
# evaluations every 30 s: no test here reads accuracy, and each one is CPU the tab and the workers share
TINY = ("--batch-size", "32", "--shard-size", "64", "--local-steps", "4", "--eval-every", "30")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    write_official_archive(folder, n_train=512, n_test=100)
    return folder


def get(url: str) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def manifest(c: Cluster, model: str, batch: int, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, headers, body = get(f"{c.url}/api/v1/steps/{model}/{batch}")
        if status == 200:
            return json.loads(body)
        assert status == 503 and headers.get("Retry-After"), (status, body)
        time.sleep(1)
    raise AssertionError("the step graph was not built in time")


def drive(url: str, *options: str, timeout: float = 400) -> dict:
    proc = subprocess.run([NODE, str(DRIVER), url, *options], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout + 60)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"driver printed no result (exit {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    return json.loads(lines[-1])


def results_of(c: Cluster, worker_id: str) -> list[tuple]:
    with c.db() as db:
        return db.execute("SELECT unit_id, loss_before, loss_after, num_samples, staleness FROM results "
                          "WHERE worker_id = ? ORDER BY seq", (worker_id,)).fetchall()


# ------------------------------------------------------------------------------ no browser
def test_manifest_graph_and_known_answer(cluster, data):
    c = cluster("--data", str(data), "--model", "cnn", *TINY)
    c.start_coordinator()
    m = manifest(c, "cnn", 32)
    assert m["model"] == "cnn" and m["batch_size"] == 32
    status, headers, graph = get(f"{c.url}/api/v1/blobs/{m['graph']}")
    assert status == 200 and blob_id(graph) == m["graph"] and len(graph) == m["graph_bytes"]
    assert "immutable" in headers["Cache-Control"]
    spec = StepSpec.from_json(json.dumps({**m["spec"], "model": "cnn", "batch_size": 32, "opset": 18}))
    # the answer is reproducible from the blobs the browser fetches
    state = decode_delta(get(f"{c.url}/api/v1/blobs/{m['check']['state']}")[2])
    x, y = decode_shard(get(f"{c.url}/api/v1/blobs/{m['check']['shard']}")[2])
    feeds = check_inputs(spec, state, x[:32], y[:32])
    again = check_answer(graph, spec, feeds)
    assert again["loss"] == pytest.approx(m["check"]["loss"], rel=1e-6)
    for name, want in m["check"]["outputs"].items():
        assert again["outputs"][name]["norm"] == pytest.approx(want["norm"], rel=1e-5, abs=1e-7)
    # the WebGPU formulation is another graph of the same step: its own answer, nearly the same
    gpu = get(f"{c.url}/api/v1/blobs/{m['webgpu']['graph']}")[2]
    assert blob_id(gpu) == m["webgpu"]["graph"] != m["graph"]
    assert check_answer(gpu, spec, feeds)["loss"] == pytest.approx(m["webgpu"]["loss"], rel=1e-6)
    assert m["webgpu"]["loss"] == pytest.approx(m["check"]["loss"], rel=1e-4)
    # and it catches a step that computes something else: a 10% larger learning rate
    feeds["lr"] = np.array(m["check"]["hyper"]["lr"] * 1.1, np.float32)
    wrong = check_answer(graph, spec, feeds)
    tol = m["check"]["tolerance"]["norm"]
    off = [n for n, w in m["check"]["outputs"].items() if n.startswith("new_p:")
           and abs(wrong["outputs"][n]["norm"] - w["norm"]) > tol * w["norm"]]
    assert off, "a 10% larger step must fail the norm check"
    # refusals name the field
    for path, code, field in (("/api/v1/steps/alexnet/32", 404, "model"), ("/api/v1/steps/cnn/0", 400, "batch"),
                              ("/api/v1/steps/cnn/33", 400, "batch"), ("/api/v1/steps/cnn/x", 400, "batch")):
        status, _, body = get(c.url + path)
        assert status == code and json.loads(body)["error"]["field"] == field, (path, body)


async def test_browser_units_wait_for_the_step_graph(aiohttp_client, tmp_path):
    from coordinator.app import create_app
    from coordinator.keys import STEPS
    from tests.test_coordinator import make_job

    job = make_job(tmp_path, batch_size=32, browser_graph="on-demand")
    # as `crowdtrain coordinator --browser-graph on-demand` starts: the first browser request starts the export
    app = create_app(job.config, job, warm=True)
    client = await aiohttp_client(app)
    graph = lambda: client.get("/api/status")  # noqa: E731
    assert (await (await graph()).json())["browser_graph"] == "not started"   # asking status starts nothing
    ask = lambda backend: client.post("/api/v1/units/next", json={"protocol": 1, "worker_id": f"w-{backend}",  # noqa: E731
                                                                   "backend": backend})
    resp = await ask("browser")
    assert resp.status == 204 and "preparing" in resp.headers["X-Crowdtrain-Reason"]
    assert (await ask("python")).status == 200     # Python workers do not wait for it
    assert (await (await graph()).json())["browser_graph"] == "building"
    await app[STEPS].wait(32)
    assert (await (await graph()).json())["browser_graph"] == "ready"
    resp = await ask("browser")
    assert resp.status == 200 and (await resp.json())["batch_size"] == 32


async def test_a_warm_cache_builds_the_manifest_without_an_export_or_a_check_run(tmp_path, monkeypatch):
    # every coordinator start builds the manifest (servers warm it up): with the graphs and the check's
    # answers cached, that costs no export subprocess and no onnxruntime run
    import coordinator.steps as steps
    from tests.test_coordinator import make_job

    job = make_job(tmp_path, batch_size=32)
    first = await steps.StepGraphs(job, steps.step_cache_dir()).wait(32)   # exports only on a cold cache

    async def no_export(self, batch_size):
        raise AssertionError("exported although every target's graph is cached")

    def no_run(*args):
        raise AssertionError("ran the check although its answer is cached")
    monkeypatch.setattr(steps.StepGraphs, "_export", no_export)
    monkeypatch.setattr(steps, "_run_check", no_run)
    again = await steps.StepGraphs(job, steps.step_cache_dir()).wait(32)
    assert again == first


def test_known_answers_are_cached_per_graph_and_feeds(tmp_path, monkeypatch):
    import coordinator.steps as steps

    runs = []

    def run(ort, graph, spec, feeds):
        runs.append(graph)
        return {"loss": float(len(runs)), "outputs": {"new_p:w": {"norm": 1.0, "proj": 0.5}}}
    monkeypatch.setattr(steps, "_run_check", run)
    feeds = {"x": np.ones((2, 3), np.float32), "lr": np.array(0.05, np.float32)}
    first = check_answer(b"graph", None, feeds, tmp_path)
    assert check_answer(b"graph", None, feeds, tmp_path) == first and len(runs) == 1    # read back
    assert check_answer(b"graph", None, dict(feeds, lr=np.array(0.06, np.float32)), tmp_path)["loss"] == 2.0
    assert check_answer(b"other", None, feeds, tmp_path)["loss"] == 3.0                   # another graph
    assert check_answer(b"graph", None, {**feeds, "x": feeds["x"].reshape(3, 2)}, tmp_path)["loss"] == 4.0
    for f in (tmp_path / "answers").iterdir():   # a damaged entry is computed again, not trusted
        f.write_text("{not json")
    assert check_answer(b"graph", None, feeds, tmp_path)["loss"] == 5.0
    assert check_answer(b"graph", None, feeds)["loss"] == 6.0 and len(runs) == 6         # no cache: always run


def test_the_known_answers_cache_keeps_the_most_recently_used(tmp_path, monkeypatch):
    import os

    import coordinator.steps as steps

    runs = []
    monkeypatch.setattr(steps, "_run_check", lambda ort, graph, spec, feeds: runs.append(graph) or
                        {"loss": float(len(runs)), "outputs": {}})
    monkeypatch.setattr(steps, "ANSWERS_KEPT", 3)
    feeds = {"x": np.ones(2, np.float32)}
    for i, graph in enumerate([b"a", b"b", b"c"]):
        check_answer(graph, None, feeds, tmp_path)
        for f in (tmp_path / "answers").iterdir():   # distinct ages whatever the file system's time resolution
            os.utime(f, (f.stat().st_mtime - 10, f.stat().st_mtime - 10))
    check_answer(b"a", None, feeds, tmp_path)        # read back: "a" is the most recently used now
    check_answer(b"d", None, feeds, tmp_path)        # a fourth: the least recently used ("b") goes
    assert len(list((tmp_path / "answers").glob("*.json"))) == 3 and len(runs) == 4
    for graph in (b"a", b"c", b"d"):
        check_answer(graph, None, feeds, tmp_path)
    assert len(runs) == 4                            # still cached
    check_answer(b"b", None, feeds, tmp_path)
    assert len(runs) == 5                            # pruned: computed again


async def test_a_model_the_browser_cannot_train_is_said_so(aiohttp_client, tmp_path, monkeypatch):
    from coordinator.app import create_app
    from coordinator.keys import STEPS
    from coordinator.steps import StepGraphs, StepUnavailable
    from tests.test_coordinator import make_job

    async def fails(self, batch_size):
        raise StepUnavailable("focal loss is not exported")
    monkeypatch.setattr(StepGraphs, "_export", fails)
    monkeypatch.setattr(StepGraphs, "_cached", lambda self, batch_size: None)   # such a graph is never cached
    job = make_job(tmp_path, batch_size=32)
    app = create_app(job.config, job)
    client = await aiohttp_client(app)
    await client.get("/api/v1/steps/cnn/32")
    await asyncio.shield(app[STEPS].entries[32].task)
    resp = await client.post("/api/v1/units/next", json={"protocol": 1, "worker_id": "tab", "backend": "browser"})
    assert resp.status == 204 and "focal loss is not exported" in resp.headers["X-Crowdtrain-Reason"]
    resp = await client.get("/api/v1/steps/cnn/32")
    body = await resp.json()
    assert resp.status == 501 and body["error"]["code"] == "no_browser_step" and "focal" in body["error"]["message"]
    state = (await (await client.get("/api/status")).json())["browser_graph"]
    assert state == "unavailable: focal loss is not exported", state


async def test_an_internal_error_building_the_step_graph_is_tried_again_later(tmp_path, monkeypatch):
    # a failure of the model's (above) is remembered; an unexpected one (CPython 3.11's spurious AST SystemError
    # once left a CI run's tab idle for its 300 s) is built again at a request after RETRY_INTERNAL_S
    import coordinator.steps as steps
    from tests.test_coordinator import make_job

    real, calls = steps.StepGraphs._cached, []

    def once_broken(self, batch_size):
        calls.append(batch_size)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=48, after=42)")
        return real(self, batch_size)
    monkeypatch.setattr(steps.StepGraphs, "_cached", once_broken)
    monkeypatch.setattr(steps, "RETRY_INTERNAL_S", 0.5)
    graphs = steps.StepGraphs(make_job(tmp_path, batch_size=32), steps.step_cache_dir())
    with pytest.raises(steps.StepUnavailable, match="internal error while building the step graph"):
        await graphs.wait(32)
    with pytest.raises(steps.StepUnavailable, match=r"\(SystemError\)"):
        graphs.manifest(32)                       # within the pause: the same answer, no second build
    assert calls == [32] and graphs.state(32).startswith("unavailable: internal error")
    await asyncio.sleep(0.6)
    manifest = await graphs.wait(32)              # after it: built again, and this time it works
    assert calls == [32, 32] and manifest["batch_size"] == 32 and graphs.state(32) == "ready"


async def test_shutdown_stops_an_export_in_progress(aiohttp_server, tmp_path, monkeypatch):
    from coordinator.app import create_app
    from tests.test_coordinator import make_job

    monkeypatch.setenv("CROWDTRAIN_CACHE", str(tmp_path / "fresh-cache"))   # nothing cached: a real export
    job = make_job(tmp_path, batch_size=32)
    server = await aiohttp_server(create_app(job.config, job, warm=True))

    def exports() -> list[str]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "models.onnx_step" in text and str(tmp_path / "fresh-cache") in text:
                found.append(text)
        return found
    deadline = time.time() + 30
    while not exports() and time.time() < deadline:
        await asyncio.sleep(0.1)
    assert exports(), "the warm start did not begin an export"
    await server.close()
    assert exports() == [], "the export outlived the coordinator"


def test_check_patterns_are_the_documented_hash():
    # worker.js rebuilds these with Math.imul(i, 2654435761) >>> 0; pin a few values
    h = [(i * 2654435761) % 2**32 for i in range(6)]
    assert list(check_mask(6, 0.5)) == [1.0 if v / 2**32 >= 0.5 else 0.0 for v in h]
    assert list(check_signs(6)) == [1.0 if (v >> 16) & 1 else -1.0 for v in h]
    assert 0.4 < check_mask(10000, 0.5).mean() < 0.6 and abs(check_signs(10000).mean()) < 0.05


def test_page_and_assets(cluster, data):
    c = cluster("--data", str(data), "--model", "cnn", *TINY)
    c.start_coordinator()
    status, headers, page = get(c.url + "/")
    assert status == 200 and headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin" and "no-cache" in headers["Cache-Control"]
    text = page.decode()
    prefix = text.split('src="')[1].split("/main.js")[0]
    assert prefix.startswith("/static/") and "{{" not in text
    for rel in ("main.js", "worker.js", "contract.js", "style.css", "ort/ort.wasm.min.mjs",
                "ort/ort-wasm-simd-threaded.wasm"):
        status, headers, body = get(f"{c.url}{prefix}/{rel}")
        assert status == 200, rel
        assert "immutable" in headers["Cache-Control"] and headers["Content-Encoding"] == "gzip", rel
        assert headers["Cross-Origin-Resource-Policy"] == "same-origin", rel
        source = (ROOT / "worker_web" / rel) if not rel.startswith("ort/") else \
            ROOT / "worker_web/node_modules/onnxruntime-web/dist" / rel[4:]
        assert gzip.decompress(body) == source.read_bytes(), rel
    assert get(f"{c.url}/static/0000000000000000/main.js")[0] == 404
    assert get(f"{c.url}{prefix}/../../api/status")[0] == 404


# ------------------------------------------------------------------------------ Chromium
@needs_browser
@pytest.mark.parametrize("model", ["cnn", "supermask_fc"])
def test_tab_trains_units_the_coordinator_accepts(cluster, data, model):
    c = cluster("--data", str(data), "--model", model, *TINY, "--epochs", "3")
    c.start_coordinator()
    out = drive(f"{c.url}/?throttle=100&threads=1", "--click", "--units", "6", "--timeout", "300")
    assert out["ok"], out
    state = out["state"]
    assert state["backend"] == "wasm" and state["unitsDone"] >= 6, state
    worker_id = state["workerId"]
    rows = results_of(c, worker_id)
    assert len(rows) >= 6, rows
    status = c.status()
    assert status["units_accepted"] >= 6
    assert any(w["worker_id"] == worker_id and w["backend"] == "browser" for w in status["workers"])
    # from its second unit request on, the tab says what its units train on and why (no WebGPU adapter here)
    row = next(w for w in status["workers"] if w["worker_id"] == worker_id)
    assert row["runtime"] == "wasm" and row["webgpu_check"] is None and "1 thread" in row["runtime_note"], row
    # the loss goes down as the tab trains: the losses at each unit's start and end, in order, fall (a
    # least-squares slope; one unit's before/after are single batches near chance, too noisy to compare
    # alone: 6 units' means once differed by 0.001), and the last units start lower than the first
    befores, afters = [r[1] for r in rows], [r[2] for r in rows]
    losses = [loss for pair in zip(befores, afters) for loss in pair]
    assert np.polyfit(np.arange(len(losses)), losses, 1)[0] < 0, rows
    assert np.mean(befores[-2:]) < befores[0], rows
    assert not [ln for ln in out["console"] if "error" in ln.lower()], out["console"]
    # after the first unit the tab says which versions it holds: units come as version deltas, which it
    # rebuilds and checks by hash (a failed check falls back to the whole base: counted apart). The tab goes on
    # working while the driver reads its state and closes it, so the units issued to it (read after) may
    # outnumber what the state counted: a unit on a version it already held also comes without a delta.
    with c.db() as db:
        wires = [json.loads(w) for (w,) in db.execute("SELECT wire FROM units WHERE worker_id = ? ORDER BY issued",
                                                      (worker_id,))]
    deltas = [u for u in wires if u.get("base_delta")]
    assert state.get("deltaFallbacks") == 0, (state, out["console"])
    assert 1 <= state.get("deltaUnits", 0) <= len(deltas), (state, wires)


@needs_browser
@pytest.mark.parametrize("model", ["cnn", "supermask_fc"])
def test_webgpu_path_is_decided_by_the_known_answer_check(cluster, data, model):
    # SwiftShader (WebGPU on the CPU) is slow: batches of 8, one step per unit. Both models pass the check
    # and train on WebGPU here. supermask_fc failed it (loss 2.59 where 2.69 is right) until its step graph
    # stopped using Sign, which onnxruntime-web runs on the CPU inside a WebGPU session, writing its output
    # over a graph input still to be read (models/onnx_step.py _sign_by_compare); the check caught that.
    c = cluster("--data", str(data), "--model", model, "--batch-size", "8", "--shard-size", "16",
                "--local-steps", "1", "--epochs", "3")
    c.start_coordinator()
    out = drive(f"{c.url}/?throttle=100&threads=1&check=always", "--webgpu", "--click", "--units", "1",
                "--timeout", "400")
    assert out["ok"], out
    state = out["state"]
    verdict = state["knownAnswer"]
    print(f"{model}: backend {state['backend']} ({state['backendReason']})")
    assert verdict is not None, f"the WebGPU check did not run: {state['backendReason']}"
    assert verdict["ok"] and state["backend"] == "webgpu", state
    assert len(results_of(c, state["workerId"])) >= 1


@needs_browser
def test_closed_tab_leaves_its_unit_to_be_reissued(cluster, data):
    c = cluster("--data", str(data), "--model", "cnn", "--batch-size", "32", "--shard-size", "64",
                "--local-steps", "40", "--lease-first", "8", "--lease-min", "3", "--epochs", "50")
    c.start_coordinator()
    manifest(c, "cnn", 32)
    out = drive(f"{c.url}/?throttle=100&threads=1", "--click", "--close-at-step", "2", "--timeout", "300")
    assert out["ok"] and out.get("closed_unit"), out
    unit_id = out["closed_unit"]
    with c.db() as db:
        shards, status = db.execute("SELECT shard_ids, status FROM units WHERE unit_id = ?", (unit_id,)).fetchone()
    # the tab neither finished nor handed back its unit: still leased, or already expired when the cores are
    # busy (its first lease is 8 s; the check came 9+ s after it on a loaded machine)
    assert status in ("leased", "expired"), status
    c.start_worker("py")   # someone else picks up the work once the lease runs out
    deadline = time.time() + 300
    while time.time() < deadline:
        with c.db() as db:
            status = db.execute("SELECT status FROM units WHERE unit_id = ?", (unit_id,)).fetchone()[0]
            redone = db.execute("SELECT r.unit_id FROM results r JOIN units u ON u.unit_id = r.unit_id "
                                "WHERE u.shard_ids = ? AND r.unit_id != ?", (shards, unit_id)).fetchall()
        if status == "expired" and redone:
            break
        time.sleep(1)
    assert status == "expired" and redone, (status, redone)
    assert results_of(c, out["state"]["workerId"]) == [], "the closed tab sent nothing for its unit"


@needs_browser
def test_tab_carries_on_after_coordinator_restart_and_reload(cluster, data, tmp_path):
    c = cluster("--data", str(data), "--model", "cnn", *TINY, "--epochs", "6")
    c.start_coordinator()
    manifest(c, "cnn", 32)
    profile = tmp_path / "profile"
    first = subprocess.Popen([NODE, str(DRIVER), f"{c.url}/?throttle=100&threads=1", "--click", "--units", "4",
                              "--timeout", "300", "--profile", str(profile)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        c.wait(lambda s: s["units_accepted"] >= 1, 200, "the tab's first unit")
        c.coordinator.kill()          # kill -9 mid-job: the tab keeps retrying
        c.coordinator.wait(10)
        time.sleep(2)
        c.start_coordinator()
        out = json.loads(first.communicate(timeout=400)[0].strip().splitlines()[-1])
    finally:
        first.kill()
    assert out["ok"] and out["state"]["unitsDone"] >= 4, out
    worker_id = out["state"]["workerId"]
    # a reload (same browser profile, no click): the same anonymous id, and it starts by itself
    again = drive(f"{c.url}/?threads=1&throttle=100", "--units", "1", "--timeout", "200", "--profile", str(profile))
    assert again["ok"], again
    assert again["state"]["workerId"] == worker_id and again["state"]["unitsDone"] >= 5, again["state"]
    assert len(results_of(c, worker_id)) >= 5


@needs_browser
def test_a_failed_unit_is_reported_and_the_tab_carries_on(cluster, data):
    c = cluster("--data", str(data), "--model", "cnn", *TINY, "--epochs", "3")
    c.start_coordinator()
    manifest(c, "cnn", 32)
    # the tab's first blob (the step graph) arrives corrupted: its sha256 check fails the unit
    out = drive(f"{c.url}/?throttle=100&threads=1", "--click", "--units", "2", "--timeout", "300",
                "--corrupt-once", "/api/v1/blobs/")
    assert out["ok"] and out.get("corrupted"), out
    assert out["state"]["failed"] == 1 and out["state"]["unitsDone"] >= 2, out["state"]
    with c.db() as db:
        failed = db.execute("SELECT shard_ids FROM units WHERE status = 'failed' AND worker_id = ?",
                            (out["state"]["workerId"],)).fetchall()
    assert len(failed) == 1 and c.status()["units_failed"] == 1
    assert len(results_of(c, out["state"]["workerId"])) >= 2


@needs_browser
def test_tab_uploads_with_error_feedback_on_a_lossy_codec(cluster, data):
    """The tab asks for error feedback; the coordinator's units (top-k, no replicated checks) allow it;
    the tab's accepted uploads after its first carry the residual of the earlier ones (worker_web/feedback.js,
    whose arithmetic tests/test_js_contract.py checks against Python's)."""
    c = cluster("--data", str(data), "--model", "cnn", *TINY, "--epochs", "3", "--codec", "topk:0.05")
    c.start_coordinator()
    out = drive(f"{c.url}/?throttle=100&threads=1", "--click", "--units", "4", "--timeout", "300")
    assert out["ok"], out
    state = out["state"]
    worker_id = state["workerId"]
    with c.db() as db:
        wires = [json.loads(w) for (w,) in db.execute("SELECT wire FROM units WHERE worker_id = ? ORDER BY issued",
                                                      (worker_id,))]
    assert len(wires) >= 4 and all(u["codec"] == "topk:0.05" and u.get("error_feedback") is True for u in wires)
    rows = results_of(c, worker_id)
    assert len(rows) >= 4 and state["failed"] == 0, (rows, state)
    assert state.get("feedbackUnits", 0) >= 3, state      # every accepted upload after the first
    assert not [ln for ln in out["console"] if "error" in ln.lower()], out["console"]


@needs_browser
def test_tab_shows_what_it_costs_and_its_credit_after_a_reload(cluster, data, tmp_path):
    c = cluster("--data", str(data), "--model", "cnn", *TINY, "--epochs", "6")
    c.start_coordinator()
    m = manifest(c, "cnn", 32)
    profile = tmp_path / "profile"
    first = drive(f"{c.url}/?throttle=100&threads=1&backend=wasm", "--click", "--units", "2", "--timeout", "300",
                  "--profile", str(profile))
    assert first["ok"], first
    worker_id = first["state"]["workerId"]
    # before Start the page said what it downloads, from the coordinator's real numbers
    donate = first["state"]["donate"]
    assert donate["once"]["step_graph"]["wasm_bytes"] == m["graph_bytes"]
    assert f"{m['graph_bytes'] / 1e6:.2f} MB" in first["state"]["donateText"] and "1 of your" in first["state"]["donateText"]
    c.wait(lambda s: s["updates_applied"] >= 2, 60, "the tab's units folded")
    time.sleep(5.5)   # the credit ranking is cached up to 5 s
    credited = json.loads(get(f"{c.url}/api/v1/credit?worker={worker_id}")[2])["me"]
    assert credited["rank"] == 1 and credited["samples"] > 0, credited
    # a reload (same profile): the same id, and the page shows the coordinator's credit for it
    again = drive(f"{c.url}/?throttle=100&threads=1&backend=wasm", "--units", "1", "--timeout", "200",
                  "--profile", str(profile))
    assert again["ok"] and again["state"]["workerId"] == worker_id, again
    shown = again["state"]["credit"]
    assert again["state"]["creditFresh"] and shown["rank"] == 1 and shown["samples"] >= credited["samples"], shown
    assert f"{shown['samples']:,} samples" in again["state"]["creditText"] and "rank 1 of" in again["state"]["creditText"]
    assert not [ln for ln in first["console"] + again["console"] if "error" in ln.lower()], again["console"]


@needs_browser
def test_a_new_tabs_first_unit_is_one_step_on_a_slice_and_is_accepted(cluster, data):
    # default units of 8 steps (a shard of 256 images at batch 32, no --local-steps): a tab whose speed
    # is not known yet gets one step on a 32-image slice of a shard and the model version as fp16
    c = cluster("--data", str(data), "--model", "cnn", "--batch-size", "32", "--shard-size", "256",
                "--eval-every", "30", "--epochs", "6")
    c.start_coordinator()
    m = manifest(c, "cnn", 32)
    donate = json.loads(get(f"{c.url}/api/v1/donate")[2])["per_unit"]
    assert (donate["local_steps"], donate["batch_size"]) == (8, 32), donate   # what a Python worker gets
    # the step graph travels gzipped to a browser (it shrinks ~10x), the same bytes once decoded
    req = urllib.request.Request(f"{c.url}/api/v1/blobs/{m['graph']}",
                                 headers={"Accept-Encoding": "gzip, deflate, br", "Sec-Fetch-Mode": "cors"})
    with urllib.request.urlopen(req, timeout=30) as r:
        encoding, body = r.headers.get("Content-Encoding"), r.read()
    assert encoding == "gzip" and len(body) < m["graph_bytes"] / 4 and blob_id(gzip.decompress(body)) == m["graph"]
    out = drive(f"{c.url}/?throttle=100&threads=1", "--click", "--units", "2", "--timeout", "300")
    assert out["ok"], out
    worker_id = out["state"]["workerId"]
    with c.db() as db:
        units = [json.loads(w) for (w,) in db.execute("SELECT wire FROM units WHERE worker_id = ? ORDER BY issued",
                                                      (worker_id,))]
        shards = {s for s, _ in json.loads(db.execute("SELECT value FROM meta WHERE key = 'shards'").fetchone()[0])}
    first = units[0]
    assert (first["local_steps"], first["batch_size"]) == (1, 32), first
    [piece] = first["shard_ids"]
    x, _ = decode_shard(get(f"{c.url}/api/v1/blobs/{piece}")[2])
    assert piece not in shards and len(x) == 32
    version = get(f"{c.url}/api/v1/blobs/{first['model_version']}")[2]
    assert json.loads(version[8:8 + int.from_bytes(version[4:8], "little")])["codec"] == "fp16"
    rows = results_of(c, worker_id)
    assert rows[0][0] == first["unit_id"] and rows[0][3] == 32, rows     # accepted, claiming what it trained
    assert len(rows) >= 2 and all(u["batch_size"] == 32 for u in units), units
    assert not [ln for ln in out["console"] if "error" in ln.lower()], out["console"]


@needs_browser
def test_a_lone_tabs_results_are_checked_by_the_coordinator_and_pass(cluster, data):
    """With replicated checks on and no second tab to replicate its units, each held result of the
    tab is recomputed by the coordinator at once (not after --replica-wait, here the default two
    minutes), as a tab computes it
    (models/browser_unit.py: the tab's draws, the same step graph on onnxruntime's CPU kernels).
    An honest tab passes every check and its results are folded; recomputed with torch (as before),
    the same results were refuted as another seed's and the honest tab quarantined."""
    c = cluster("--data", str(data), "--model", "cnn", *TINY, "--epochs", "3", "--replication", "adaptive")
    c.start_coordinator()
    out = drive(f"{c.url}/?throttle=100&threads=1&backend=wasm", "--click", "--units", "4", "--timeout", "300")
    assert out["ok"], out
    worker_id = out["state"]["workerId"]
    deadline, states = time.time() + 120, []
    while time.time() < deadline:   # every result the tab sent is decided (the coordinator checks one per settle)
        with c.db() as db:
            states = [s for (s,) in db.execute("SELECT check_state FROM results WHERE worker_id = ? ORDER BY seq",
                                               (worker_id,))]
        if len(states) >= 4 and "held" not in states:
            break
        time.sleep(1)
    assert len(states) >= 4 and set(states) == {"valid"}, states
    row = next(r for r in c.status()["trust"] if r["worker_id"] == worker_id)
    assert row["backend"] == "browser" and not row["quarantined"], row
    assert row["valid"] >= 4 and row["disagreements"] == 0 and row["credit"] > 0, row
    with c.db() as db:
        folded = db.execute("SELECT COUNT(*) FROM results WHERE worker_id = ? AND applied_step IS NOT NULL",
                            (worker_id,)).fetchone()[0]
    assert folded >= 3, folded   # (the last may still wait for the next aggregation)
    # the tab's id is bound to the key it keeps (localStorage): its id alone, shown on its page, claims nothing
    with c.db() as db:
        record = json.loads(db.execute("SELECT record FROM trust WHERE worker_id = ?", (worker_id,)).fetchone()[0])
    assert len(record["key_digest"]) == 64, record
    ask = urllib.request.Request(f"{c.url}/api/v1/units/next", method="POST", headers={
        "Content-Type": "application/json", WORKER_KEY_HEADER: "someone-else-" + "0" * 20},
        data=json.dumps({"protocol": 1, "worker_id": worker_id, "backend": "browser"}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(ask, timeout=10)
    assert refused.value.code == 403 and json.loads(refused.value.read())["error"]["code"] == "worker_key"


@needs_browser
def test_a_tab_whose_id_is_bound_to_another_key_goes_on_under_a_new_id(cluster, data, tmp_path):
    """A tab's stored id bound on the coordinator to another key (two tabs of one browser that made their keys at
    the same moment): its unit request is refused 403 worker_key, and it goes on under a new id and key, which the
    page keeps (a reload uses them), instead of being refused for ever."""
    c = cluster("--data", str(data), "--model", "cnn", *TINY, "--epochs", "3")
    c.start_coordinator()
    manifest(c, "cnn", 32)
    profile = tmp_path / "profile"
    first = drive(f"{c.url}/?throttle=100&threads=1&backend=wasm", "--until", "workerId", "--timeout", "60",
                  "--profile", str(profile))
    old = first["state"]["workerId"]
    ask = urllib.request.Request(f"{c.url}/api/v1/units/next", method="POST", headers={
        "Content-Type": "application/json", WORKER_KEY_HEADER: "the-other-tabs-key-" + "0" * 16},
        data=json.dumps({"protocol": 1, "worker_id": old, "backend": "python"}).encode())
    with urllib.request.urlopen(ask, timeout=30) as r:   # (binds the id to that key)
        assert r.status in (200, 204)
    out = drive(f"{c.url}/?throttle=100&threads=1&backend=wasm", "--click", "--units", "1", "--timeout", "300",
                "--profile", str(profile))
    new = out["state"]["workerId"]
    assert out["ok"] and new != old and new.startswith("web-"), out
    assert len(results_of(c, new)) >= 1 and not results_of(c, old)
    again = drive(f"{c.url}/?throttle=100&threads=1&backend=wasm", "--until", "workerId", "--timeout", "60",
                  "--profile", str(profile))
    assert again["state"]["workerId"] == new, "the page keeps the new id"
    assert c.status()["units_rejected"].get("worker_key") == 1


@needs_browser
def test_an_invited_tab_works_with_the_token_of_its_link_and_an_uninvited_one_is_told(cluster, data, tmp_path):
    """A closed deployment (--worker-tokens): the page says before Start that only invited volunteers may work;
    a tab without a token stops at the first 401 and says how to get one; a tab opened from the link with
    #token=... trains, and keeps the token across a reload without it."""
    tokens = tmp_path / "tokens"
    tokens.write_text("invite-token-0001\n")
    c = cluster("--data", str(data), "--model", "cnn", *TINY, "--epochs", "3", "--worker-tokens", str(tokens))
    c.start_coordinator()
    manifest(c, "cnn", 32)
    out = drive(f"{c.url}/?throttle=100&threads=1&backend=wasm", "--click", "--units", "1", "--until", "needsToken",
                "--timeout", "60")
    state = out["state"]
    assert out["ok"] and out["until"] == "needsToken" and state["unitsDone"] == 0, out
    assert state["donate"]["invited_only"] and "open the link with your token" in state["donateText"], state
    assert state["needsToken"] and not state["running"] and "invited" in state["status"], state
    profile = tmp_path / "profile"
    invited = drive(f"{c.url}/?throttle=100&threads=1&backend=wasm#token=invite-token-0001", "--click", "--units",
                    "2", "--timeout", "300", "--profile", str(profile))
    assert invited["ok"] and invited["state"]["hasToken"] and not invited["state"]["needsToken"], invited
    worker_id = invited["state"]["workerId"]
    assert len(results_of(c, worker_id)) >= 2
    assert "this browser holds the token" in invited["state"]["donateText"]
    again = drive(f"{c.url}/?throttle=100&threads=1&backend=wasm", "--units", "1", "--timeout", "200",
                  "--profile", str(profile))
    assert again["ok"] and again["state"]["workerId"] == worker_id and again["state"]["hasToken"], again
    assert not [ln for ln in invited["console"] + again["console"] if "error" in ln.lower()], again["console"]


@needs_browser
def test_a_python_worker_replicates_a_tabs_units_as_the_tab_computes_them(cluster, data, tmp_path):
    """A tab and a Python worker of the operator's own (--trusted-tokens: its agreement settles a check, as a
    worker's that earned trust would), checks on: the tab's held results go to the Python worker as replicas
    (compute_as "browser": the tab's draws and step graph, models/browser_unit.py), which agree with
    the tab's; the coordinator recomputes none of them."""
    own = tmp_path / "trusted-tokens"
    own.write_text("own-token-00001\n")
    c = cluster("--data", str(data), "--model", "cnn", *TINY, "--epochs", "6", "--replication", "adaptive",
                "--trusted-tokens", str(own))
    c.start_coordinator()
    manifest(c, "cnn", 32)
    c.env = {**c.env, "CROWDTRAIN_TOKEN": "own-token-00001"}   # (the worker's; the tab has none)
    c.start_worker("py-1", None, "--max-units", "30")
    c.wait(lambda s: any(w["worker_id"] == "py-1" for w in s["workers"]), 120, "the Python worker to ask")
    out = drive(f"{c.url}/?throttle=100&threads=1&backend=wasm", "--click", "--units", "3", "--timeout", "300")
    assert out["ok"], out
    tab = out["state"]["workerId"]
    deadline, rows = time.time() + 180, []
    while time.time() < deadline:
        with c.db() as db:
            rows = db.execute("SELECT r.check_state, u.unit_id FROM results r JOIN units u ON u.unit_id = r.unit_id "
                              "WHERE r.worker_id = ? ORDER BY r.seq", (tab,)).fetchall()
            replicas = db.execute("SELECT u.worker_id, u.wire, r.check_state FROM units u JOIN results r ON "
                                  "r.unit_id = u.unit_id WHERE u.replica_of IN (SELECT unit_id FROM results WHERE "
                                  "worker_id = ?)", (tab,)).fetchall()
        if len(rows) >= 3 and "held" not in {s for s, _ in rows} and replicas:
            break
        time.sleep(1)
    assert len(rows) >= 3 and {s for s, _ in rows} == {"valid"}, rows
    assert replicas and all(w == "py-1" and json.loads(wire)["compute_as"] == "browser" for w, wire, _ in replicas)
    assert {s for _, _, s in replicas} == {"valid"}, replicas
    assert "(browser worker): recomputed here" not in (c.tmp / "coordinator.log").read_text()
    status = c.status()
    assert status["replication"]["agreed"] >= len(replicas) and status["replication"]["disagreed"] == 0, status
    trust = {r["worker_id"]: r for r in status["trust"]}
    assert trust[tab]["valid"] >= 3 and trust["py-1"]["disagreements"] == 0 and not trust[tab]["quarantined"]


@needs_browser
def test_a_lying_tab_is_found_out_by_the_coordinators_check_and_never_folded(cluster, data):
    """A donor whose tab's results leave the browser sign-flipped x10 (drive.mjs --lie): every result is
    answered as any other, each check (the coordinator recomputes the tab's unit as a tab computes it)
    refutes it, the tab is quarantined after two, and none of its updates is folded."""
    c = cluster("--data", str(data), "--model", "cnn", *TINY, "--epochs", "6", "--replication", "adaptive")
    c.start_coordinator()
    manifest(c, "cnn", 32)
    out = drive(f"{c.url}/?throttle=100&threads=1&backend=wasm", "--click", "--units", "4", "--timeout", "300",
                "--lie", "sign_flip")
    assert out["ok"] and out.get("lies", 0) >= 4, out            # the liar's page saw its units accepted
    liar = out["state"]["workerId"]
    status = c.wait(lambda s: any(r["worker_id"] == liar and r["quarantined"] for r in s["trust"]), 120,
                    "the lying tab quarantined")
    row = next(r for r in status["trust"] if r["worker_id"] == liar)
    assert row["disagreements"] == 2 and row["credit"] == 0 and row["backend"] == "browser", row
    with c.db() as db:
        fates = db.execute("SELECT applied_step, dropped, check_state FROM results WHERE worker_id = ?",
                           (liar,)).fetchall()
    assert len(fates) >= 4 and all(applied is None for applied, _, _ in fates), fates
    assert {d for _, d, _ in fates} <= {"distrusted", "quarantined"} and "distrusted" in {d for _, d, _ in fates}
