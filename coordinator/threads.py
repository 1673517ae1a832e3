"""The coordinator's helper threads: they never push the event loop off its core when they wake.

Everything a coordinator does off its event loop runs on helper threads: ``asyncio.to_thread``'s pool (a
result's decoding and checks, an update's norm, a fold, a model version's write, the fdatasync of a group
commit, an evaluation) and a store's writer thread (``coordinator.store.Writer``). Each of them wakes
hundreds of times a second under load, and on Linux a thread that wakes preempts the one running on its
core: the event loop, stopped mid-request 630-660 times a second (``bench/load.py``, 1,000 clients, one
process, 2 cores), then waited on the run queue for 9-10% of the time. A helper runs ``SCHED_BATCH``
instead (``as_helper``): the same share of the CPU, the same niceness, but no preemption when it wakes,
only at a tick or when the loop blocks (which it does in ``epoll`` between requests). Measured side by
side (2026-12-06, docs/results.md, the load section): the loop preempted 40-62 times a second, on the
run queue 5-6% of the time, ``units/next`` p99 6.9 / 9.1 ms against 15.8 / 11.3 (90 s), 15.1 against
21.7 (5 minutes).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import weakref

log = logging.getLogger("crowdtrain.coordinator")

HELPER_PREFIX = "crowdtrain-helper"


def as_helper() -> None:
    """Make the calling thread a helper: ``SCHED_BATCH`` where the platform has it (Linux); elsewhere, or
    where the kernel refuses, the thread stays as it is."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as e:   # (a seccomp filter, say): correct either way, only slower under load
        log.debug("helper thread stays SCHED_OTHER: %s", e)


_pooled: weakref.WeakSet = weakref.WeakSet()   # event loops whose default executor is a pool of helpers


async def helper_threads(app):
    """A ``cleanup_ctx``: the app's event loop runs its threads' work (``asyncio.to_thread``,
    ``run_in_executor(None, ...)``) on helpers: its default executor becomes a pool whose threads call
    ``as_helper``, once per loop (the loop shuts it down when it closes, as it does its own)."""
    loop = asyncio.get_running_loop()
    if loop not in _pooled:
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(thread_name_prefix=HELPER_PREFIX,
                                                                        initializer=as_helper))
        _pooled.add(loop)
    yield
