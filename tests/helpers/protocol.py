"""A job on tiny data behind the real app (pytest-aiohttp), and the protocol calls a worker makes.

Shared by the tests that drive a real ``Job`` over HTTP on 127.0.0.1 (ledger, robust
aggregation, trust): one definition of starting a job and of taking, fetching and posting.
"""
from __future__ import annotations

from contract.units import WorkUnit
from coordinator.app import create_app
from coordinator.config import CoordinatorConfig
from coordinator.job import Job
from tests.helpers.tiny_cifar import tiny_cifar10

TINY_JOB = {"model": "cnn", "shard_size": 64, "epochs": 8.0, "eval_every_s": 3600.0, "codec": "fp32"}


async def start_job(aiohttp_client, tmp_path, clock=None, data=None, **config):
    """(the test client, the opened job): cnn on 256 tiny images unless ``config`` says otherwise."""
    cfg = CoordinatorConfig(state=tmp_path / "state", **{**TINY_JOB, **config})
    job = Job(cfg, **({"clock": clock} if clock else {}))
    job.open(data or tiny_cifar10(n_train=256, n_test=64))
    return await aiohttp_client(create_app(cfg, job)), job


async def take(client, worker, **headers) -> WorkUnit | None:
    """``POST /api/v1/units/next`` as ``worker``: the unit, or None on a 204."""
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
