"""Several jobs in one coordinator process (coordinator/jobs.py, the admin API, `crowdtrain jobs`).

The real app on 127.0.0.1 (pytest-aiohttp) with a real SQLite state: the first job is cnn on tiny
data, an operator adds a resnet_fast job through the admin API; a worker's requests are served from
both, pause stops a job's new units while its outstanding result is still folded, remove, the
operator token, a restart that brings the jobs back, the CLI. The end-to-end test runs a real
`crowdtrain coordinator` and a real `crowdtrain worker` process on a tiny CIFAR-10 archive.
"""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import pytest

import coordinator.jobs_cli as jobs_cli
from contract.units import WorkUnit
from coordinator.app import create_app
from coordinator.config import CoordinatorConfig
from coordinator.job import Job
from coordinator.keys import JOBS
from tests.helpers.cluster import ROOT, Cluster
from tests.helpers.fault_worker import body, compute
from tests.helpers.protocol import TINY_JOB, fetch_all, post
from tests.helpers.tiny_cifar import tiny_cifar10, write_official_archive

TOKEN = "operator-token-0123456789"
DATA = tiny_cifar10(n_train=256, n_test=64)
SECOND = {"model": "resnet_fast", "shard_size": 64, "epochs": 8.0, "eval_every_s": 3600.0, "codec": "fp32",
          "limit_train": 128}
ADMIN = "/api/v1/admin/jobs"


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "admin-tokens"
    path.write_text(f"# operators\n{TOKEN}\n")
    return path


@pytest.fixture
def start(aiohttp_client, tmp_path, token_file):
    """``await start(**config)`` -> (client, app): the first job (cnn on tiny data) behind the real app; added
    jobs get the same tiny data. Called again over the same state: a restart."""
    async def make(admin: bool = True, **config):
        cfg = CoordinatorConfig(state=tmp_path / "state", **{**TINY_JOB, **config},
                                **({"admin_token_file": token_file} if admin else {}))
        job = Job(cfg)
        job.open(DATA)
        app = create_app(cfg, job)
        app[JOBS].load_data = lambda c: DATA
        return await aiohttp_client(app), app
    return make


async def take(client, worker: str, **extra) -> WorkUnit | None:
    resp = await client.post("/api/v1/units/next", json={"protocol": 1, "worker_id": worker, "backend": "python",
                                                         **extra})
    assert resp.status in (200, 204), await resp.text()
    return WorkUnit.from_json(await resp.json()) if resp.status == 200 else None


async def add_second(client, name: str = "b", **options) -> dict:
    resp = await client.post(ADMIN, json={"job": name, "options": {**SECOND, **options}}, headers=auth())
    assert resp.status == 201, await resp.text()
    return (await resp.json())["job"]


async def result_of(client, unit: WorkUnit) -> bytes:
    fetch = await fetch_all(client, unit)   # every blob found by its id alone, whichever job holds it
    return body(await asyncio.to_thread(compute, unit, fetch, "w1"))


async def settle(app, name: str) -> None:
    await app[JOBS].get(name).job.settle()


async def test_two_jobs_serve_one_worker_and_fold_into_their_own_models(start, tmp_path):
    client, app = await start()
    added = await add_second(client)
    assert added["model"] == "resnet_fast" and added["state"] == "active"
    assert added["state_dir"] == str(tmp_path / "state" / "jobs" / "b")
    first, second = await take(client, "w1"), await take(client, "w1")   # least recently served first
    assert (first.job, first.model) == ("cifar10", "cnn") and (second.job, second.model) == ("b", "resnet_fast")
    assert (await take(client, "w2")).job == "cifar10"
    for unit in (first, second):
        status, answer = await post(client, unit, await result_of(client, unit))
        assert status == 200 and answer["accepted"], answer
    await settle(app, "cifar10")
    await settle(app, "b")
    a = await (await client.get("/api/status")).json()
    b = await (await client.get("/api/status", params={"job": "b"})).json()
    assert (a["job"], a["model"], a["units_accepted"]) == ("cifar10", "cnn", 1)
    assert (b["job"], b["model"], b["units_accepted"], b["model_version"]) == ("b", "resnet_fast", 1, 1)
    def timeless(status):   # what may differ between two calls: times, and how long ago a worker was seen
        return {**status, "uptime_s": None, "request_latency": None,
                "workers": [{**w, "last_seen_s": None} for w in status["workers"]]}
    assert timeless(b) == timeless(await (await client.get("/jobs/b/api/status")).json())
    assert [(j["job"], j["first"], j["dashboard"]) for j in a["jobs"]] == [
        ("cifar10", True, "/jobs/cifar10/dashboard"), ("b", False, "/jobs/b/dashboard")]
    assert "options" not in a["jobs"][1] and "state_dir" not in a["jobs"][1]   # public: no paths
    page = await client.get("/jobs/b/dashboard")
    assert page.status == 200 and "<title>" in await page.text()
    missing = await client.get("/jobs/nope/dashboard")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "unknown_job"
    assert (tmp_path / "state" / "jobs" / "b" / "state.db").is_file()


async def test_each_jobs_dashboard_shows_its_job_and_links_the_others(start, tmp_path):
    """Headless Chromium on /jobs/b/dashboard of the real app: the page reads b's status and links both jobs."""
    from tests.test_dashboard_metrics import CHROMIUM

    if not CHROMIUM.exists():
        pytest.skip("chromium not installed (apt-get install chromium)")
    client, _ = await start()
    await add_second(client)
    await client.post(f"{ADMIN}/b/pause", headers=auth())
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000", "--dump-dom", str(client.make_url("/jobs/b/dashboard")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)   # the loop keeps serving meanwhile
    dom, _ = await asyncio.wait_for(proc.communicate(), 120)
    dom = dom.decode()
    assert re.search(r'id="title"[^>]*>b · resnet_fast · ', dom), dom[:3000]
    assert re.search(r'id="state"[^>]*>paused<', dom)
    jobs = re.search(r'id="jobs"[^>]*>(.*?)</span>', dom, re.S).group(1)
    assert re.findall(r'<a href="([^"]+)"[^>]*>([^<]+)</a>', jobs) == [
        ("/jobs/cifar10/dashboard", "cifar10 (cnn, active)"), ("/jobs/b/dashboard", "b (resnet_fast, paused)")]


async def test_each_jobs_model_is_downloadable(start):
    client, _ = await start()
    await add_second(client)
    resp = await client.get("/api/v1/model", params={"job": "b", "format": "pt", "version": "0"})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Disposition"] == 'attachment; filename="b-resnet_fast-v0.pt"'
    resp = await client.get("/api/v1/model", params={"job": "nope", "format": "pt"})
    assert resp.status == 404 and (await resp.json())["error"]["field"] == "job"


async def test_a_worker_that_takes_one_model_gets_only_that_jobs_units(start):
    client, _ = await start()
    await add_second(client)
    units = [await take(client, f"w{i}", models=["resnet_fast"]) for i in range(3)]
    assert {u.job for u in units} == {"b"}


async def test_pause_stops_new_units_but_folds_the_outstanding_result(start):
    client, app = await start()
    await add_second(client)
    await take(client, "w1")
    out = await take(client, "w1")
    assert out.job == "b"
    resp = await client.post(f"{ADMIN}/b/pause", headers=auth())
    assert resp.status == 200 and (await resp.json())["job"]["state"] == "paused"
    assert {(await take(client, f"w{i}")).job for i in range(4)} == {"cifar10"}
    status, answer = await post(client, out, await result_of(client, out))   # its unit was out: still taken
    assert status == 200 and answer["accepted"]
    await settle(app, "b")
    assert app[JOBS].get("b").job.step == 1 and app[JOBS].get("b").job.status().updates_applied == 1
    resp = await client.post(f"{ADMIN}/b/resume", headers=auth())
    assert (await resp.json())["job"]["state"] == "active"
    assert (await take(client, "w9")).job == "b"


async def test_pausing_every_job_gives_204_without_finished(start):
    client, _ = await start()
    assert (await client.post(f"{ADMIN}/cifar10/pause", headers=auth())).status == 200
    resp = await client.post("/api/v1/units/next", json={"protocol": 1, "worker_id": "w1", "backend": "python"})
    assert resp.status == 204 and "X-Crowdtrain-Finished" not in resp.headers   # workers wait, they do not stop
    assert (await (await client.get("/api/status")).json())["jobs"][0]["state"] == "paused"


async def test_remove_stops_a_job_and_keeps_or_deletes_its_state(start, tmp_path):
    client, app = await start()
    await add_second(client)
    await add_second(client, "c")
    out = await take(client, "w1", models=["resnet_fast"])
    resp = await client.delete(f"{ADMIN}/{out.job}", headers=auth())
    assert resp.status == 200
    assert await resp.json() == {"removed": out.job, "state_dir": str(tmp_path / "state" / "jobs" / out.job)}
    assert (tmp_path / "state" / "jobs" / out.job / "state.db").is_file()
    other = "c" if out.job == "b" else "b"
    assert {(await take(client, f"w{i}", models=["resnet_fast"])).job for i in range(3)} == {other}
    status, answer = await post(client, out, await result_of(client, out))   # its job is gone: no such unit
    assert status == 404 and answer["error"]["code"] == "unknown_unit"
    resp = await client.delete(f"{ADMIN}/{other}", params={"delete_state": "true"}, headers=auth())
    assert (await resp.json())["state_dir"] is None and not (tmp_path / "state" / "jobs" / other).exists()
    resp = await client.delete(f"{ADMIN}/cifar10", headers=auth())
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "first_job"
    listing = await (await client.get(ADMIN, headers=auth())).json()
    assert [j["job"] for j in listing["jobs"]] == ["cifar10"]
    # adding it again with the same options resumes its state
    again = await add_second(client, out.job)
    assert again["version"] == 0 and app[JOBS].get(out.job).job.store.unit(out.unit_id) is not None


async def test_removal_waits_for_a_result_being_posted(start):
    """A job removed while one of its results is arriving: the result is answered (not a 5xx from a closed
    store), then the job is closed."""
    client, app = await start()
    await add_second(client)
    out = await take(client, "w1", models=["resnet_fast"])
    data = await result_of(client, out)
    go = asyncio.Event()

    async def slow():
        yield data[:10]
        await go.wait()
        yield data[10:]
    posting = asyncio.create_task(client.post(f"/api/v1/units/{out.unit_id}/result", data=slow(), headers={
        "Content-Type": "application/octet-stream", "Content-Length": str(len(data))}))
    await asyncio.sleep(0.5)
    entry = app[JOBS].get("b")
    assert entry.inflight == 1
    removing = asyncio.create_task(client.delete(f"{ADMIN}/b", headers=auth()))
    await asyncio.sleep(0.5)
    assert not removing.done() and entry.job.store is not None
    go.set()
    resp = await posting
    assert resp.status == 200 and (await resp.json())["accepted"]
    assert (await removing).status == 200 and entry.inflight == 0 and "b" not in app[JOBS].entries


async def test_the_admin_api_needs_an_operator_token(start):
    client, _ = await start()
    for headers in ({}, auth("wrong-token-0123456789"), {"Authorization": "Basic " + TOKEN}, auth(TOKEN + "x")):
        resp = await client.get(ADMIN, headers=headers)
        assert resp.status == 401, headers
        error = (await resp.json())["error"]
        assert error["code"] == "unauthorized" and error["field"] == "Authorization"
    resp = await client.post(ADMIN, json={"job": "b", "options": SECOND})
    assert resp.status == 401
    assert (await client.get(ADMIN, headers=auth())).status == 200


async def test_without_a_token_file_the_admin_api_is_off(start):
    client, _ = await start(admin=False)
    resp = await client.get(ADMIN, headers=auth())
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "admin_off" and "--admin-token-file" in error["message"]


@pytest.mark.parametrize("payload, field", [
    ({"job": "../x", "options": {}}, "job"),
    ({"job": "", "options": {}}, "job"),
    ({"job": 3, "options": {}}, "job"),
    ({"options": {}}, "job"),
    ({"job": "cifar10", "options": {}}, "job"),
    ({"job": "b", "options": [1]}, "options"),
    ({"job": "b", "options": {"lr": -1}}, "options.lr"),
    ({"job": "b", "options": {"model": "nope"}}, "options.model"),
    ({"job": "b", "options": {"port": 1}}, "options.port"),
    ({"job": "b", "options": {"state": "/tmp"}}, "options.state"),
    ({"job": "b", "options": {"no_such": 1}}, "options.no_such"),
    ({"job": "b", "options": {"strategy": "fedbuff", "strategy_params": {"buffer_size": [1]}}},
     "options.strategy_params"),
    ({"job": "b", "options": {}, "extra": 1}, "extra"),
    ([], "body"),
])
async def test_a_bad_job_is_refused_naming_the_field(start, payload, field, tmp_path):
    client, app = await start()
    resp = await client.post(ADMIN, json=payload, headers=auth())
    assert 400 <= resp.status < 500
    assert (await resp.json())["error"]["field"] == field
    assert list(app[JOBS].entries) == ["cifar10"] and not (tmp_path / "state" / "jobs" / "b").exists()


async def test_unknown_jobs_and_bad_queries_are_4xx(start):
    client, _ = await start()
    for method, path in (("POST", f"{ADMIN}/nope/pause"), ("POST", f"{ADMIN}/nope/resume"),
                         ("DELETE", f"{ADMIN}/nope"), ("GET", "/jobs/nope/api/status")):
        resp = await client.request(method, path, headers=auth())
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_job", path
    resp = await client.get("/api/status", params={"job": "nope"})
    assert resp.status == 404 and (await resp.json())["error"]["field"] == "job"
    resp = await client.delete(f"{ADMIN}/cifar10", params={"delete_state": "yes"}, headers=auth())
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "delete_state"


async def test_a_restart_brings_back_the_same_jobs_and_states(start, aiohttp_client):
    client, app = await start()
    await add_second(client)
    out = await take(client, "w1", models=["resnet_fast"])
    status, _ = await post(client, out, await result_of(client, out))
    assert status == 200
    await settle(app, "b")
    assert (await client.post(f"{ADMIN}/cifar10/pause", headers=auth())).status == 200
    await client.close()   # shutdown: every job closed
    client, app = await start()
    listing = (await (await client.get(ADMIN, headers=auth())).json())["jobs"]
    assert [(j["job"], j["model"], j["state"], j["version"]) for j in listing] == [
        ("cifar10", "cnn", "paused", 0), ("b", "resnet_fast", "active", 1)]
    assert listing[1]["options"] == SECOND
    assert (await take(client, "w2")).job == "b"   # the first job is paused


async def test_the_cli_lists_adds_pauses_resumes_and_removes(start, token_file, capsys):
    client, app = await start()
    url = str(client.make_url("")).rstrip("/")

    async def jobs(*argv: str) -> tuple[int, str]:
        code = await asyncio.to_thread(jobs_cli.cli, [*argv[:1], "--coordinator", url, "--token-file",
                                                      str(token_file), *argv[1:]])
        out = capsys.readouterr()
        return code, out.out + out.err

    code, out = await jobs("add", "b", "--model", "resnet_fast", "--shard-size", "64", "--limit-train", "128",
                           "--codec", "fp32", "--eval-every", "3600", "--param", "staleness_a=0.5", "--no-download")
    assert code == 0 and "added job 'b' (resnet_fast)" in out and "/jobs/b/dashboard" in out, out
    assert app[JOBS].get("b").options == {"model": "resnet_fast", "shard_size": 64, "limit_train": 128,
                                          "codec": "fp32", "eval_every_s": 3600.0,
                                          "strategy_params": {"staleness_a": 0.5}, "download": False}
    code, out = await jobs("pause", "b")
    assert (code, out.strip()) == (0, "job 'b': paused")
    code, out = await jobs("list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["JOB", "MODEL", "STATE"]
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [["cifar10", "(first)", "cnn"],
                                                                  ["b", "resnet_fast", "paused"]]
    code, out = await jobs("resume", "b")
    assert (code, out.strip()) == (0, "job 'b': active")
    code, out = await jobs("add", "c", "--lr", "-1")
    assert code == 1 and "options.lr: expected a number > 0" in out
    code, out = await jobs("remove", "b")
    assert code == 0 and "removed job 'b'; its state stays in" in out
    code, out = await jobs("pause", "b")
    assert code == 1 and "(404)" in out
    token_file.write_text("another-token-0123456789\n")
    code, out = await jobs("list")
    assert code == 1 and "(401)" in out


def test_redis_mode_refuses_several_jobs(tmp_path, token_file):
    """--redis with --admin-token-file: one line saying why, before any slow work (no Redis needed)."""
    proc = subprocess.run([sys.executable, "-m", "crowdtrain", "coordinator", "--redis", "redis://127.0.0.1:1/0",
                           "--admin-token-file", str(token_file), "--state", str(tmp_path / "s"), "--port", "0",
                           "--download"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "argument --admin-token-file: several jobs in one deployment need the embedded SQLite" in proc.stderr


@pytest.mark.timeout(120)
def test_a_real_worker_trains_units_of_two_jobs(tmp_path, token_file):
    """`crowdtrain coordinator` + `crowdtrain jobs add` + one `crowdtrain worker` process: the worker computes
    units of both jobs (two models) until both budgets are spent, then exits 0."""
    data = write_official_archive(tmp_path / "data", n_train=100, n_test=20)
    small = ("--shard-size", "50", "--local-steps", "1", "--batch-size", "25", "--epochs", "1", "--eval-every",
             "3600", "--codec", "fp32")
    c = Cluster(tmp_path, "--model", "cnn", "--data", str(data), "--admin-token-file", str(token_file), *small)
    started = time.monotonic()
    try:
        c.start_coordinator()
        added = subprocess.run([sys.executable, "-m", "crowdtrain", "jobs", "add", "small", "--model", "resnet_fast",
                                *small, "--coordinator", c.url, "--token-file", str(token_file)],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        worker = c.start_worker("w1")
        assert worker.wait(90) == 0, (tmp_path / "w1.log").read_text()[-3000:]
        jobs = {j["job"]: j for j in c.status()["jobs"]}
        assert jobs["cifar10"]["finished"] and jobs["small"]["finished"], jobs
        import sqlite3

        for state in (c.state, c.state / "jobs" / "small"):
            with sqlite3.connect(state / "state.db") as db:
                workers = db.execute("SELECT DISTINCT worker_id FROM results").fetchall()
            assert workers == [("w1",)], state
    finally:
        c.stop()
    assert time.monotonic() - started < 120


def test_jobs_add_help_states_every_job_option_and_its_default_without_torch():
    """`crowdtrain jobs add --help`: a flag for each job option (coordinator.config.JOB_FIELDS, the same
    generator as `crowdtrain coordinator`), each with its default; none of the process's; no torch."""
    code = ("import sys, io, contextlib, crowdtrain\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            "        crowdtrain.main(['jobs', 'add', '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'torch' not in sys.modules\n"
            "print(out.getvalue())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from coordinator.config import JOB_FIELDS, flag_of, shown_default
    from tests.test_cli import option_entries

    entries = {e.split()[0].rstrip(","): e for e in option_entries(proc.stdout)}
    for name in JOB_FIELDS:
        flag = flag_of(name)
        assert flag in entries, flag
        assert " ".join(f"(default: {shown_default(name)})".split()) in entries[flag], entries[flag]
    for flag in ("--port", "--host", "--state", "--job", "--worker-tokens", "--admin-token-file"):
        assert flag not in entries, flag
    assert "(required)" in entries["--token-file"]
