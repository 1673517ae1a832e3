"""A real Chromium tab (worker_web/drive.mjs, as tests/test_browser.py drives it) trains through the
process that does not lead of two ``crowdtrain coordinator --redis`` processes, and the leader is
killed with ``kill -9`` while it does: the tab carries on through the takeover, every result it
sent is accepted and folded once, and the ledger in Redis says so.

About 30 s on 2 cores. It was opt-in (``CROWDTRAIN_BROWSER_REDIS=1``) until 2026-12-05, and a change of
the defaults (replication on) broke it unseen for a day: it runs with the rest now.
"""
from __future__ import annotations

import signal
import threading
import time

import pytest

from coordinator.cluster import LOST_EXIT
from tests import test_redis as TR
from tests.helpers.tiny_cifar import write_official_archive
from tests.test_browser import HAVE_BROWSER, drive, get

pytestmark = [
    pytest.mark.skipif(TR.REDIS is None, reason="redis-server is not installed"),
    pytest.mark.skipif(not HAVE_BROWSER, reason="needs node, /usr/bin/chromium and worker_web/node_modules"),
    pytest.mark.timeout(600),
]

ARGS = ("--model", "cnn", "--batch-size", "32", "--shard-size", "64", "--local-steps", "4", "--eval-every", "2",
        "--epochs", "3", "--leader-ttl", "3")


def test_a_tab_trains_through_the_other_process_across_kill_9_of_the_leader(redis_url, tmp_path, monkeypatch):
    from coordinator.redis_store import RedisStore

    url = redis_url
    monkeypatch.setattr(TR, "ARGS", ARGS)
    ps = TR.Processes(tmp_path, url, write_official_archive(tmp_path / "data", n_train=512, n_test=100))
    try:
        ps.start(0)
        ps.start(1)
        first = ps.leader()
        other = 1 - first
        deadline = time.time() + 300
        while get(f"{ps.url(other)}/api/v1/steps/cnn/32")[0] != 200:   # the browser's step graph
            assert time.time() < deadline, ps.logs()
            time.sleep(1)
        killed = []

        def kill_the_leader() -> None:
            while ps.status(other)["units_accepted"] < 3:
                time.sleep(0.3)
            seen = ps.cluster(other)   # with replication on (the default) a tab's results go to the leader
            killed.append(seen["results_taken"] + seen["results_passed_to_leader"])
            ps.procs[first].send_signal(signal.SIGKILL)

        threading.Thread(target=kill_the_leader, daemon=True).start()
        restarted = []   # as the deploy's systemd unit does (Restart=always): a process starved of CPU past
        done = threading.Event()   # --leader-ttl loses the lock and exits with LOST_EXIT; it comes back

        def supervise() -> None:
            while not done.wait(0.5):
                for i, p in enumerate(ps.procs):
                    if p is not None and p.poll() == LOST_EXIT:
                        restarted.append(i)
                        ps.start(i)

        threading.Thread(target=supervise, daemon=True).start()
        try:
            out = drive(f"{ps.url(other)}/?throttle=100&threads=1", "--click", "--units", "8", "--timeout", "300")
        finally:
            done.set()
        assert out["ok"], (f"the tab stopped: {str({k: v for k, v in out.items() if k != 'console'})[:4000]}\n"
                           f"its console's last lines: {out['console'][-40:]}\n"
                           f"exit statuses: {[p.poll() for p in ps.procs]}, restarted after a lost lock: {restarted}\n"
                           f"the job (process {other}): {ps.status(other)}\nlogs:\n{ps.logs()}")
        assert killed and killed[0] >= 1, "the tab's results reached the process it talks to, before the kill"
        assert out["state"]["unitsDone"] >= 8
        assert ps.cluster(other)["leader"] or (restarted and ps.cluster(first)["leader"]), "the other process took over"
        deadline = time.time() + 60
        while (job := ps.status(other))["updates_applied"] < job["units_accepted"]:
            assert time.time() < deadline, job
            time.sleep(0.5)
        store = RedisStore(url, "cifar10", tmp_path / "state" / "blobs")
        rows = store.ledger()
        assert len(rows) == len({r["unit_id"] for r in rows}) == job["units_accepted"] >= 8
        assert all(r["applied_step"] is not None and r["dropped"] is None for r in rows), "each folded once"
        assert job["samples"] == sum(r["num_samples"] for r in rows)
        print(f"tab: {out['state']['unitsDone']} units, {killed[0]} results handled by the other process before the "
              f"kill; console: {[ln for ln in out['console'] if 'error' in ln.lower()]}")
    finally:
        ps.stop()
