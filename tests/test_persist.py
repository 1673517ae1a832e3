"""Versions written on a policy, not on every result: ``kill -9`` after folds that were never
written durably loses nothing and applies nothing twice (the result log and a replay from the
last persisted version rebuild the same model).

A real coordinator process (``tests/helpers/cluster.py``) with the persistence policy set so that
nothing after version 0 is persisted; results are computed here (seeded random deltas, fp32), so
the model the coordinator must hold is known exactly: version 0 plus each applied delta weighted by
async SGD's default 1 / (1 + staleness at the fold). Needs the real CIFAR-10 (CROWDTRAIN_DATA).
"""
from __future__ import annotations

import json
import os
import signal
import urllib.request

import numpy as np
import pytest

from contract.codecs import decode_delta, encode_delta, get_codec
from contract.units import UnitResult, WorkUnit, pack_result

pytestmark = [
    pytest.mark.skipif(not os.environ.get("CROWDTRAIN_DATA"),
                       reason="set CROWDTRAIN_DATA to the folder or archive of CIFAR-10 (e.g. ../shared/data)"),
    pytest.mark.timeout(600),
]

ARGS = ("--model", "cnn", "--limit-train", "2000", "--shard-size", "250", "--batch-size", "32", "--local-steps", "2",
        "--strategy", "async_sgd", "--param", "staleness=polynomial", "--param", "staleness_a=1.0",
        "--eval-every", "100000", "--epochs", "50", "--persist-every-s", "100000", "--persist-every-versions", "1000",
        "--version-download", "fp32")   # a unit's base is then the coordinator's model itself (fp16 or deltas otherwise)


def post(url: str, payload: bytes, content_type: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=payload, headers={"Content-Type": content_type}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read()


def take(c, worker: str) -> WorkUnit:
    status, raw = post(c.url + "/api/v1/units/next", json.dumps(
        {"protocol": 1, "worker_id": worker, "backend": "python"}).encode(), "application/json")
    assert status == 200, status
    return WorkUnit.from_json(json.loads(raw))


def blob(c, blob_id: str) -> dict:
    with urllib.request.urlopen(f"{c.url}/api/v1/blobs/{blob_id}", timeout=30) as r:
        return decode_delta(r.read())


def submit(c, unit: WorkUnit, worker: str, seed: int, like: dict) -> dict:
    """A random delta in the unit's codec; returns what it decodes to (what the coordinator folds)."""
    rng = np.random.default_rng(seed)
    delta = {k: (1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in like.items()}
    encoded = encode_delta(get_codec(unit.codec), delta)
    body = pack_result(UnitResult(unit_id=unit.unit_id, lease=unit.lease, worker_id=worker,
                                  base_version=unit.model_version, delta=encoded,
                                  loss_before=2.3, loss_after=2.2, num_samples=unit.batch_size, compute_seconds=1.0))
    status, raw = post(f"{c.url}/api/v1/units/{unit.unit_id}/result", body, "application/octet-stream")
    assert status == 200 and json.loads(raw)["accepted"], raw
    return decode_delta(encoded)


def expected_model(c, v0: dict, deltas: dict[str, dict]) -> dict:
    """Version 0 plus each applied delta, weighted 1 / (1 + the staleness it was folded with)."""
    with c.db() as db:
        rows = db.execute("SELECT unit_id, base_step, offered_step, applied_step FROM results").fetchall()
    model = {k: v.astype(np.float64) for k, v in v0.items()}
    applied = [r for r in rows if r[3] is not None]
    assert {r[0] for r in applied} == set(deltas), "every submitted result is applied, once"
    for unit_id, base, offered, _ in applied:
        for k, d in deltas[unit_id].items():
            model[k] += d.astype(np.float64) / (1 + offered - base)
    return model


def current_model(c) -> dict:
    """The model a worker is now sent: the base of a fresh unit."""
    return blob(c, take(c, "probe").model_version)


def fold_rounds(c, v0_shape: dict, deltas: dict, rounds: int, seed: int) -> None:
    """Each round: three workers each take a unit, then submit in turn, each result folded before the
    next (so the later ones are stale)."""
    for r in range(rounds):
        units = [(w, take(c, w)) for w in ("w1", "w2", "w3")]
        for i, (w, u) in enumerate(units):
            before = c.status()["updates_applied"]
            deltas[u.unit_id] = submit(c, u, w, seed + 10 * r + i, v0_shape)
            c.wait(lambda s, n=before: s["updates_applied"] == n + 1 and s["updates_pending"] == 0, 60, "the fold")


def kill_and_restart(c) -> None:
    c.coordinator.send_signal(signal.SIGKILL)
    c.coordinator.wait(10)
    c.start_coordinator()


@pytest.mark.parametrize("codec", ["fp32", "topk"])
def test_kill_9_after_unpersisted_folds_rebuilds_the_same_model(cluster, codec):
    """fp32: each result's delta (8.7 MB) is a blob file; topk (about 0.1 MB): appended to the delta log
    (``Store.put_small_result``), from which the replay reads it."""
    c = cluster(*ARGS, "--codec", codec)
    c.start_coordinator()
    v0 = current_model(c)
    deltas: dict[str, dict] = {}
    fold_rounds(c, v0, deltas, rounds=2, seed=1)
    before = c.status()
    with c.db() as db:
        persisted = json.loads(db.execute("SELECT value FROM meta WHERE key = 'persisted_step'").fetchone()[0])
        latest_blob = db.execute("SELECT blob FROM versions ORDER BY step DESC LIMIT 1").fetchone()[0]
    assert before["model_version"] == 6 and persisted == 0 and latest_blob == "", \
        "the folds after version 0 were not written durably (what this test is about)"
    with c.db() as db:
        logged = db.execute("SELECT COUNT(*) FROM result_deltas").fetchone()[0]
    assert logged == (6 if codec == "topk" else 0), "small deltas in the delta log, large ones in files"

    kill_and_restart(c)
    after = c.status()
    for key in ("model_version", "samples", "updates_applied", "units_accepted"):
        assert after[key] == before[key], key
    assert after["updates_dropped"] == {} and after["updates_pending"] == 0
    served = current_model(c)
    want = expected_model(c, v0, deltas)
    for k, v in want.items():
        np.testing.assert_allclose(served[k], v, rtol=0, atol=2e-6, err_msg=k)

    # more folds after the restart, then a second kill: the replay again ends at the same model
    fold_rounds(c, v0, deltas, rounds=1, seed=100)
    before = c.status()
    kill_and_restart(c)
    after = c.status()
    assert (after["model_version"], after["samples"], after["updates_applied"]) == \
        (before["model_version"], before["samples"], before["updates_applied"]) == (9, after["samples"], 9)
    served = current_model(c)
    want = expected_model(c, v0, deltas)
    for k, v in want.items():
        np.testing.assert_allclose(served[k], v, rtol=0, atol=2e-6, err_msg=k)
    with c.db() as db:
        total = db.execute("SELECT SUM(num_samples) FROM results WHERE applied_step IS NOT NULL").fetchone()[0]
        folds = db.execute("SELECT COUNT(*), SUM(updates) FROM versions WHERE step > 0").fetchone()
    assert after["samples"] == total and folds == (9, 9), "each accepted update applied exactly once"
