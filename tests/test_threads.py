"""The coordinator's helper threads run SCHED_BATCH (coordinator/threads.py): the app's thread pool
(``asyncio.to_thread``) and a store's writer thread, never the event loop's own thread."""
from __future__ import annotations

import asyncio
import os
import sqlite3
import threading

import pytest

from coordinator.store import Writer
from coordinator.threads import HELPER_PREFIX
from tests.test_coordinator import client_for, take_unit

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")

serve = client_for   # a job on tiny data behind the real app (tests/test_coordinator.py's fixture)


def policy() -> tuple[int, str]:
    return os.sched_getscheduler(0), threading.current_thread().name


async def test_the_apps_thread_pool_runs_batch_and_the_event_loop_does_not(serve):
    client, job = await serve()
    await take_unit(client)   # the app serves as before
    loop_policy, _ = policy()
    assert loop_policy == os.SCHED_OTHER
    helper_policy, name = await asyncio.to_thread(policy)
    assert helper_policy == os.SCHED_BATCH and name.startswith(HELPER_PREFIX)


def test_a_store_writer_thread_runs_batch():
    seen: list[tuple[int, str]] = []
    writer = Writer("test-writer", lambda: seen.append(policy()), (sqlite3.Error,))
    writer.wake()
    writer.stop()
    assert seen and {p for p, _ in seen} == {os.SCHED_BATCH}
    assert {n for _, n in seen} == {"test-writer"}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER   # the caller's thread is left as it was
