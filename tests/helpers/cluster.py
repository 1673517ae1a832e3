"""A coordinator and worker processes on 127.0.0.1, for end-to-end tests and benchmarks."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, tmp_path: Path, *coordinator_args: str, worker_threads: int = 1):
        # the browser's step graph is built when a tab first asks, not at start: a test of headless workers
        # would otherwise spend a minute of CPU exporting it (cold cache) beside its workers, or kill that
        # export half done and repeat it in the next test (a test may still pass --browser-graph at-start)
        if "--browser-graph" not in coordinator_args:
            coordinator_args = (*coordinator_args, "--browser-graph", "on-demand")
        if "--replication" not in coordinator_args:   # its workers stand for the operator's own, unless told
            coordinator_args = (*coordinator_args, "--replication", "off")
        self.tmp, self.port, self.args, self.worker_threads = tmp_path, free_port(), coordinator_args, worker_threads
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = tmp_path / "state"
        self.env = {**os.environ, "CROWDTRAIN_CACHE": os.environ.get("CROWDTRAIN_CACHE", str(Path.home() / ".cache" /
                                                                                              "crowdtrain"))}
        self.coordinator: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    def start_coordinator(self) -> None:
        log = open(self.tmp / "coordinator.log", "a")
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "crowdtrain", "coordinator", "--state", str(self.state), "--port", str(self.port),
             *self.args], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.coordinator.poll() is None, (self.tmp / "coordinator.log").read_text()
            try:
                self.status()
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("coordinator did not come up")

    def start_worker(self, name: str, lie: str | None = None, *extra: str) -> subprocess.Popen:
        """A ``crowdtrain worker`` process; ``lie``: a ``Fault`` value, for a worker that sends each delta
        changed so (``tests.helpers.lying_worker``); ``extra``: more worker flags."""
        log = open(self.tmp / f"{name}.log", "a")
        command = ["crowdtrain", "worker"] if lie is None else ["tests.helpers.lying_worker", lie]
        proc = subprocess.Popen([sys.executable, "-m", *command, "--coordinator", self.url,
                                 "--threads", str(self.worker_threads), "--worker-id", name, "--no-progress",
                                 "--cache", str(self.tmp / f"cache-{name}"), *extra],
                                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(proc)
        return proc

    def status(self) -> dict:
        with urllib.request.urlopen(self.url + "/api/status", timeout=10) as r:
            return json.load(r)

    def wait(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                s = self.status()
                if predicate(s):
                    return s
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; last status: {self.status()}")

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.state / "state.db")

    def stop(self) -> None:
        for p in [*self.workers, self.coordinator]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
