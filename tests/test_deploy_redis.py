"""The deployment with several coordinator processes (issue 12 items 2 and 3): Redis (Debian's
redis-server with deploy/redis.conf), two ``crowdtrain coordinator --redis`` processes and Caddy
(the rendered Caddyfile with both upstreams, ``tls internal``), in a private network namespace
as tests/test_deploy.py sets it up; a real ``crowdtrain worker`` trains through HTTPS while the
leading process is killed with ``kill -9``: the worker finishes the job, and the ledger in Redis
holds each accepted result once, with one fate.
"""
from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import sys
import time
import http.client

import pytest

from tests.helpers.caddy import caddy_env, caddy_root_ca
from tests.test_deploy import CADDY, ROOT, Net, free_port, render, request
from tests.helpers.tiny_cifar import write_official_archive

REDIS = shutil.which("redis-server")
JOB = ("--model", "cnn", "--batch-size", "32", "--shard-size", "64", "--local-steps", "2", "--eval-every", "100000",
       "--epochs", "2", "--leader-ttl", "3")

pytestmark = [
    pytest.mark.skipif(CADDY is None, reason="caddy is not installed (bash deploy/setup.sh --test installs Debian's "
                                             "caddy package)"),
    pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (bash deploy/setup.sh --test installs "
                                             "Debian's redis-server package)"),
    pytest.mark.timeout(400),
]


def test_two_processes_behind_caddy_survive_kill_9_of_the_leader(tmp_path):
    try:
        net = Net(tmp_path)
    except OSError as e:
        pytest.skip(f"needs a private network namespace (unshare --net, as root): {e}")
    try:
        data = tmp_path / "data"
        write_official_archive(data, n_train=256, n_test=50)
        rport, hport, http_port, admin = (net.call(free_port) for _ in range(4))
        ports = [net.call(free_port) for _ in range(2)]
        (tmp_path / "redis").mkdir()
        net.popen([REDIS, str(ROOT / "deploy" / "redis.conf"), "--port", str(rport), "--dir", str(tmp_path / "redis"),
                   "--supervised", "no"], tmp_path / "redis.log")
        url = f"redis://127.0.0.1:{rport}/0"
        procs = [net.popen([sys.executable, "-m", "crowdtrain", "coordinator", "--state", str(tmp_path / "state"),
                            "--port", str(p), "--data", str(data), "--redis", url, *JOB], tmp_path / f"coordinator{i}.log")
                 for i, p in enumerate(ports)]
        caddyfile = tmp_path / "Caddyfile"
        render(caddyfile, "--site", f"https://127.0.0.1:{hport}", "--upstream", f"127.0.0.1:{ports[0]}",
               "--upstream", f"127.0.0.1:{ports[1]}", "--tls-internal", "--http-port", str(http_port),
               "--admin", f"127.0.0.1:{admin}", "--health-uri", "/api/v1/cluster")
        home = tmp_path / "caddy-home"
        caddy = net.popen([CADDY, "run", "--config", str(caddyfile), "--adapter", "caddyfile"], tmp_path / "caddy.log",
                          caddy_env(home))
        root_ca = caddy_root_ca(home)

        def logs() -> str:
            return "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))

        def cluster(i: int) -> dict:
            return json.loads(net.call(request, ports[i], "GET", "/api/v1/cluster")[2])

        ctx, deadline = None, time.time() + 180
        while time.time() < deadline:
            assert all(p.poll() is None for p in [*procs, caddy]), logs()
            try:
                answers = [net.call(request, p, "GET", "/api/status")[0] for p in ports]
                if root_ca.is_file() and answers == [200, 200]:
                    ctx = ssl.create_default_context(cafile=str(root_ca))
                    if net.call(request, hport, "GET", "/api/status", ctx=ctx)[0] == 200:
                        break
            except (OSError, ssl.SSLError, http.client.HTTPException):
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("not up: " + logs())
        leader, = (i for i in (0, 1) if cluster(i)["leader"])
        assert cluster(1 - leader)["leader_url"] == cluster(leader)["leader_url"]

        worker = net.popen([sys.executable, "-m", "crowdtrain", "worker", "--coordinator", f"https://127.0.0.1:{hport}",
                            "--threads", "1", "--worker-id", "redis-worker", "--no-progress", "--cache",
                            str(tmp_path / "worker-cache"), "--max-retry-time", "60"], tmp_path / "worker.log",
                           {**caddy_env(home), "SSL_CERT_FILE": str(root_ca)})

        def status() -> dict:
            """The job's status through Caddy (a busy moment may answer 502/503: asked again, as workers do)."""
            deadline = time.time() + 30
            while True:
                code, _, raw = net.call(request, hport, "GET", "/api/status", ctx=ctx)
                if code == 200:
                    return json.loads(raw)
                assert time.time() < deadline, (code, raw[:300], logs())
                time.sleep(0.5)

        deadline = time.time() + 120
        while status()["updates_applied"] < 3:
            assert time.time() < deadline and worker.poll() is None, logs()
            time.sleep(0.3)
        procs[leader].send_signal(signal.SIGKILL)
        procs[leader].wait(10)
        killed = time.time()
        try:
            rc = worker.wait(240)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, logs()
        deadline = time.time() + 30
        while not (job := status())["finished"]:
            assert time.time() < deadline, job
            time.sleep(0.5)
        assert cluster(1 - leader)["leader"]

        def ledger() -> list[dict]:
            from coordinator.redis_store import RedisStore

            store = RedisStore(url, "cifar10", tmp_path / "state" / "blobs")
            try:
                return store.ledger()
            finally:
                store.close()

        rows = net.call(ledger)
        assert len({r["unit_id"] for r in rows}) == len(rows) == job["units_accepted"], "each result logged once"
        assert all((r["applied_step"] is None) != (r["dropped"] is None) for r in rows), "one fate each"
        assert job["samples"] == sum(r["num_samples"] for r in rows if r["applied_step"] is not None)
        assert job["samples"] >= job["budget_samples"] and job["updates_applied"] == sum(
            r["applied_step"] is not None for r in rows)
        after = [r for r in rows if r["accepted"] > killed]
        assert after, "results were accepted after the kill, by the process that took over"
        print(f"two processes behind Caddy: {len(rows)} results, {len(after)} after the kill; "
              f"dropped {job['updates_dropped']}")
    finally:
        net.close()
