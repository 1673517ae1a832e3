"""Fixtures shared by the test modules, and how the suite is split over two test processes."""
import json
import os
import resource
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.cluster import Cluster
from tests.helpers.redis_server import MISSING, REDIS, redis_server


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts with one torch thread (a test may set more). Three test processes share the 2 cores
    (pyproject.toml), and a second thread each only burns CPU waiting for the other: test_train's
    every-model test took 139 CPU-seconds with 2 threads and 39 with 1 while the cores were shared
    (2026-12-03), in 54 s of wall time instead of 141. A command a test runs in-process may set its own
    count (`crowdtrain eval` takes all cores by default): it is back to one for the next test."""
    torch.set_num_threads(1)


@pytest.fixture
def redis_url(tmp_path):
    """A private redis-server on 127.0.0.1 for the test (skipped with the reason where it is missing)."""
    if REDIS is None:
        pytest.skip(MISSING)
    with redis_server(tmp_path) as url:
        yield url


@pytest.fixture
def cluster(tmp_path):
    """``cluster(*coordinator_args)`` -> a Cluster (coordinator and worker processes on 127.0.0.1),
    every one of them stopped at the end of the test."""
    made = []

    def make(*args):
        c = Cluster(tmp_path, *args)
        made.append(c)
        return c
    yield make
    for c in made:
        c.stop()


# Test files whose tests start several processes of their own (coordinators, workers, Chromium, Redis,
# Caddy): within each of the two groups below they run one after another, so that at most two such tests
# share the 2 cores (pyproject.toml: `-n 3 --dist loadgroup`; the third test process runs the others).
# Two groups of about equal time, not one: with one, that group was the suite's critical path (980 s of a
# 980 s run on 2026-12-02). Every other file is a group of its own, so module-scoped fixtures
# (exported step graphs, decoded CIFAR-10) are built once.
PROCESS_HEAVY = {
    "test_browser.py": "browser", "test_browser_redis.py": "browser",
    "test_e2e.py": "processes", "test_e2e_trust.py": "processes", "test_run.py": "processes",
    "test_load.py": "processes", "test_deploy.py": "processes", "test_deploy_redis.py": "processes",
    "test_persist.py": "processes",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        name = Path(str(item.fspath)).name
        item.add_marker(pytest.mark.xdist_group(PROCESS_HEAVY.get(name, name)))


# CROWDTRAIN_TEST_CPU=FILE: one JSON line per test (setup, call and teardown together) with its wall time and
# the CPU seconds it cost, this test process's and its reaped subprocesses' (coordinators, workers, Chromium,
# exports). CPU seconds hardly depend on what else shares the cores, so they rank the suite's costs even on a
# busy machine, where wall times triple; the suite's least wall time on 2 cores is about their sum / 2.
_CPU_REPORT = os.environ.get("CROWDTRAIN_TEST_CPU")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _CPU_REPORT:
        yield
        return
    before, t0 = _cpu_now(), time.monotonic()
    yield
    after = _cpu_now()
    row = {"test": item.nodeid, "wall_s": round(time.monotonic() - t0, 2),
           "cpu_s": round(after[0] - before[0], 2), "children_cpu_s": round(after[1] - before[1], 2)}
    with open(_CPU_REPORT, "a") as f:   # one short append per line: the test processes do not interleave
        f.write(json.dumps(row) + "\n")


def _cpu_now() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime
