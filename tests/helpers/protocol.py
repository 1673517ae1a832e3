"""A job on tiny data behind the real app (pytest-aiohttp), and the protocol calls a worker makes.

Shared by the tests that drive a real ``Job`` over HTTP on 127.0.0.1 (ledger, robust
aggregation, trust): one definition of starting a job and of taking, fetching and posting.
"""
from __future__ import annotations

import dataclasses
import re

from contract.units import WORKER_KEY_HEADER, WorkUnit
from coordinator.app import create_app
from coordinator.config import CoordinatorConfig
from coordinator.job import Job
from coordinator.trust import Record, key_digest
from tests.helpers.tiny_cifar import tiny_cifar10

# replication off: these jobs' workers stand for the operator's own (a test of the checks says "adaptive")
TINY_JOB = {"model": "cnn", "shard_size": 64, "epochs": 8.0, "eval_every_s": 3600.0, "codec": "fp32",
            "replication": "off"}


def open_job(cfg: CoordinatorConfig, data, clock=None, redis_url: str | None = None) -> Job:
    """The job of ``cfg``, opened: its state in SQLite under ``cfg.state``, or with ``redis_url`` in that
    Redis, as the leader of ``crowdtrain coordinator --redis`` keeps it (``coordinator.cluster``: it takes
    the job's leader lock, released by ``job.close()``)."""
    if redis_url is None:
        job = Job(cfg, **({"clock": clock} if clock else {}))
    else:
        from coordinator.cluster import cluster_job
        from coordinator.leader import LeaderLock
        from coordinator.redis_store import prefix

        lock = LeaderLock(redis_url, prefix(cfg.job) + "leader", 30.0)
        assert lock.try_acquire(), "another holder of the job's leader lock"
        lock.keep(lambda: None)
        job = cluster_job(cfg, redis_url, cfg.state / "blobs", lock, **({"clock": clock} if clock else {}))
        close = job.close

        def close_and_release() -> None:
            close()
            lock.release()
        job.close = close_and_release
    job.open(data)
    return job


async def start_job(aiohttp_client, tmp_path, clock=None, data=None, redis_url: str | None = None, **config):
    """(the test client, the opened job): cnn on 256 tiny images unless ``config`` says otherwise; its state
    in SQLite, or in Redis with ``redis_url`` (``open_job``)."""
    cfg = CoordinatorConfig(state=tmp_path / "state", **{**TINY_JOB, **config})
    job = open_job(cfg, data or tiny_cifar10(n_train=256, n_test=64), clock, redis_url)
    return await aiohttp_client(create_app(cfg, job)), job


def key_of(worker: str) -> str:
    """The worker key ``take`` sends for ``worker`` (as a real worker does: an id earns trust only bound to a key)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"test-key-{worker}").ljust(22, "0")[:128]


def trusted_by_now(job, worker: str) -> None:
    """``worker`` has earned trust (``trusted_after`` valid results in a row, bound to the key ``take`` sends for it),
    as a long honest record would."""
    record = job.trust.get(worker) or Record(worker)
    job.trust.put(dataclasses.replace(record, consecutive_valid=job.policy.trusted_after,
                                      key_digest=key_digest(key_of(worker))))


async def take(client, worker, keyed: bool = True, **headers) -> WorkUnit | None:
    """``POST /api/v1/units/next`` as ``worker``: the unit, or None on a 204. It sends ``key_of(worker)`` unless
    ``keyed`` is false or ``headers`` name a key of their own."""
    if keyed:
        headers = {WORKER_KEY_HEADER: key_of(worker), **headers}
    resp = await client.post("/api/v1/units/next", json={"protocol": 1, "worker_id": worker, "backend": "python"},
                             headers=headers)
    assert resp.status in (200, 204), await resp.text()
    return WorkUnit.from_json(await resp.json()) if resp.status == 200 else None


async def fetch_all(client, unit):
    """The unit's blobs over HTTP; returns ``fetch(blob_id) -> bytes`` for the fault worker."""
    blobs = {}
    for blob in [unit.model_version, *unit.shard_ids]:
        resp = await client.get(f"/api/v1/blobs/{blob}")
        assert resp.status == 200
        blobs[blob] = await resp.read()
    return blobs.__getitem__


async def post(client, unit, data: bytes):
    """``POST /api/v1/units/<id>/result``: (status, JSON answer)."""
    resp = await client.post(f"/api/v1/units/{unit.unit_id}/result", data=data,
                             headers={"Content-Type": "application/octet-stream"})
    return resp.status, await resp.json()
