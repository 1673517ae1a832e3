"""The coordinator over real HTTP on 127.0.0.1 (pytest-aiohttp), with a real SQLite store.

Workers here are in-process (tests/helpers/fault_worker.py); real worker processes, kill -9
and restarts are in tests/test_e2e.py.
"""
import asyncio
import json

import numpy as np
import pytest
import torch

from contract.codecs import CODEC_IDS, decode_delta
from contract.units import WorkUnit
from coordinator.app import create_app
from coordinator.config import CoordinatorConfig
from coordinator.job import Job
from coordinator.strategies import STRATEGIES
from models import registry
from tests.helpers.fault_worker import Fault, body, compute
from worker_py.unit import HAND_BACK, failed_result
from tests.helpers.tiny_cifar import tiny_cifar10

DENSE_STRATEGIES = sorted(n for n in STRATEGIES if not n.startswith("supermask"))
SUPERMASK_STRATEGIES = sorted(n for n in STRATEGIES if n.startswith("supermask"))


def make_job(tmp_path, **overrides) -> Job:
    cfg = CoordinatorConfig(state=tmp_path / "state", **{"model": "cnn", "shard_size": 64, "epochs": 4.0,
                                                         "eval_every_s": 0.2, "replication": "off", **overrides})
    job = Job(cfg)
    job.open(tiny_cifar10(n_train=256, n_test=64))
    return job


@pytest.fixture
async def client_for(aiohttp_client, tmp_path):
    async def make(**overrides):
        job = make_job(tmp_path, **overrides)
        return await aiohttp_client(create_app(job.config, job)), job
    return make


async def take_unit(client, worker="w1", **extra) -> WorkUnit:
    resp = await client.post("/api/v1/units/next", json={"protocol": 1, "worker_id": worker, "backend": "python",
                                                          **extra})
    assert resp.status == 200, await resp.text()
    return WorkUnit.from_json(await resp.json())


async def fetcher(client):
    cache = {}

    async def fetch_all(unit):
        for blob in [unit.model_version, *unit.shard_ids]:
            if blob not in cache:
                resp = await client.get(f"/api/v1/blobs/{blob}")
                assert resp.status == 200
                cache[blob] = await resp.read()
        return cache.__getitem__
    return fetch_all


async def submit(client, unit, data: bytes):
    resp = await client.post(f"/api/v1/units/{unit.unit_id}/result", data=data,
                             headers={"Content-Type": "application/octet-stream"})
    return resp.status, await resp.json()


def snapshot(job):
    totals = job.store.result_totals()
    return (job.step, job.store.latest_version().blob, totals["accepted"], totals["samples"],
            json.dumps(job.store.unit_counts(), sort_keys=True), {k: v.copy() for k, v in job.state.items()})


def same(a, b):
    return a[:5] == b[:5] and all(np.array_equal(a[5][k], b[5][k]) for k in a[5])


async def test_unit_blobs_are_immutable_and_cached(client_for):
    client, job = await client_for()
    unit = await take_unit(client)
    resp = await client.get(f"/api/v1/blobs/{unit.model_version}")
    assert resp.status == 200
    assert resp.headers["ETag"] == f'"{unit.model_version}"'
    assert "immutable" in resp.headers["Cache-Control"]
    again = await client.get(f"/api/v1/blobs/{unit.model_version}", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304
    missing = await client.get("/api/v1/blobs/" + "a" * 64)
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "unknown_blob"


@pytest.mark.parametrize("fault, status, code", [
    (Fault.GARBAGE, 400, "invalid"),
    (Fault.TRUNCATED, 400, "invalid"),
    (Fault.NAN, 400, "invalid"),
    (Fault.WRONG_SHAPE, 400, "invalid"),
    (Fault.HUGE_NORM, 422, "norm_bound"),
    (Fault.FORGED_LEASE, 403, "lease_invalid"),
    (Fault.OTHER_WORKER, 403, "lease_invalid"),
    (Fault.WRONG_BASE, 400, "invalid"),
])
async def test_bad_submissions_are_refused_and_change_nothing(client_for, fault, status, code):
    client, job = await client_for(codec="fp32")
    unit = await take_unit(client)
    fetch = await (await fetcher(client))(unit)
    honest = compute(unit, fetch, "w1")
    before = snapshot(job)
    got_status, got = await submit(client, unit, body(honest, fault))
    assert got_status == status and got["error"]["code"] == code, got
    assert got["error"]["message"] and "Traceback" not in json.dumps(got)
    assert same(snapshot(job), before)
    status_body = await (await client.get("/api/status")).json()
    assert status_body["units_rejected"] == {code: 1}
    ok_status, ok = await submit(client, unit, body(honest))  # the honest result still goes through
    assert ok_status == 200 and ok["accepted"], ok


async def test_oversize_body_is_refused_before_reading(client_for):
    client, job = await client_for()
    unit = await take_unit(client)
    before = snapshot(job)
    too_big = b"\0" * (job.max_body + 1)
    status, got = await submit(client, unit, too_big)
    assert status == 413 and got["error"]["code"] == "too_large"
    assert same(snapshot(job), before)


async def test_replayed_result_is_harmless(client_for):
    client, job = await client_for(strategy="async_sgd")
    unit = await take_unit(client)
    fetch = await (await fetcher(client))(unit)
    data = body(compute(unit, fetch, "w1"))
    status, first = await submit(client, unit, data)
    assert status == 200 and first["accepted"]
    await job.settle()   # the first result folded (the aggregation task may get there first, or not)
    after_first = snapshot(job)
    status, again = await submit(client, unit, data)
    assert status == 409 and again["error"]["code"] == "duplicate"
    assert same(snapshot(job), after_first)


async def test_unknown_unit_and_bad_requests(client_for):
    client, job = await client_for()
    unit = await take_unit(client)
    fetch = await (await fetcher(client))(unit)
    data = body(compute(unit, fetch, "w1"))
    resp = await client.post("/api/v1/units/ffffffffffffffff/result", data=data)
    assert resp.status == 400  # the body names another unit than the URL
    resp = await client.post("/api/v1/units/next", data=b"{nope")
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid"
    resp = await client.post("/api/v1/units/next", json={"protocol": 1, "worker_id": "w 1", "backend": "python"})
    got = await resp.json()
    assert resp.status == 400 and got["error"]["field"] == "request.worker_id", got
    resp = await client.post("/api/v1/units/next", json={"protocol": 9, "worker_id": "w1", "backend": "python"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "unsupported_protocol"


async def test_failed_and_returned_units_are_reissued(client_for):
    client, job = await client_for(shard_size=256)   # one shard: the reissue must hand out the same one
    unit = await take_unit(client)
    fetch = await (await fetcher(client))(unit)
    honest = compute(unit, fetch, "w1")
    returned = failed_result(unit, "w1", HAND_BACK)
    status, got = await submit(client, unit, body(returned))
    assert status == 200 and got == {"accepted": False, "status": "returned"}
    again = await take_unit(client, "w2")
    assert again.shard_ids == unit.shard_ids and again.unit_id != unit.unit_id
    status, got = await submit(client, unit, body(honest))   # the handed-back lease is over
    assert status == 410 and got["error"]["code"] == "lease_expired"


async def one_folded_one_stale(client, job):
    """Two units out at once; the first one's result folded: (the second unit, its blobs), now 1 version stale."""
    first, second = await take_unit(client, "w1"), await take_unit(client, "w2")
    fetch_all = await fetcher(client)
    fetch, fetch_second = await fetch_all(first), await fetch_all(second)
    status, got = await submit(client, first, body(compute(first, fetch, "w1")))
    assert status == 200 and got["accepted"]
    await job.settle()
    assert job.step == 1
    return second, fetch_second


async def test_a_result_staler_than_the_cap_is_refused_before_its_delta_is_read(client_for):
    client, job = await client_for(codec="fp32", strategy="async_sgd", max_staleness=0)
    second, fetch_second = await one_folded_one_stale(client, job)
    before = snapshot(job)
    # a NaN in its delta too: the staleness (1 > 0) refuses it before the delta is decoded
    status, got = await submit(client, second, body(compute(second, fetch_second, "w2"), Fault.NAN))
    assert status == 409 and got["error"]["code"] == "too_stale", got
    after = snapshot(job)   # (but for the units' counts: the unit is now "stale")
    assert after[:4] == before[:4] and all(np.array_equal(after[5][k], before[5][k]) for k in before[5])
    assert job.store.unit(second.unit_id)["status"] == "stale"
    again = await take_unit(client, "w3")   # its shards are handed out again first
    assert again.shard_ids == second.shard_ids and again.base_step == 1


def test_the_staleness_cap_follows_the_median_of_the_last_results(tmp_path):
    from coordinator.intake import STALE_WARM, STALE_WINDOW, Intake

    cfg = CoordinatorConfig(state=tmp_path, model="cnn", max_staleness=20, stale_median=2.0, stale_floor=3)
    intake = Intake(cfg, None, b"", {}, lambda: 0.0)
    for _ in range(STALE_WARM - 1):
        intake.arrived(5)
    assert intake.stale_cap() == 20             # not warm yet: max_staleness alone
    intake.arrived(5)
    assert intake.stale_cap() == 10             # 2 x the median 5
    for _ in range(STALE_WINDOW):
        intake.arrived(50)
    assert intake.stale_cap() == 20             # never above max_staleness
    for _ in range(STALE_WINDOW // 2 + 1):
        intake.arrived(1)
    assert intake.stale_cap() == 3              # the older half gone from the window; never below the floor
    off = Intake(CoordinatorConfig(state=tmp_path, model="cnn", max_staleness=20), None, b"", {}, lambda: 0.0)
    for _ in range(STALE_WINDOW):
        off.arrived(1)
    assert off.stale_cap() == 20                # without --stale-median: max_staleness alone


async def test_a_result_above_the_fleets_median_cap_is_refused(client_for):
    client, job = await client_for(codec="fp32", strategy="async_sgd", stale_median=1.0, stale_floor=0)
    assert (await (await client.get("/api/status")).json())["staleness_cap"] == 64   # --max-staleness until warm
    for _ in range(64):
        job.intake.arrived(0)                   # the fleet's results all came back fresh
    assert (await (await client.get("/api/status")).json())["staleness_cap"] == 0
    assert "crowdtrain_staleness_cap 0.0" in await (await client.get("/metrics")).text()
    second, fetch_second = await one_folded_one_stale(client, job)
    status, got = await submit(client, second, body(compute(second, fetch_second, "w2")))   # staleness 1 > 1 x 0
    assert status == 409 and got["error"]["code"] == "too_stale" and "expected <= 0, got 1" in got["error"]["message"]
    assert job.store.unit(second.unit_id)["status"] == "stale" and job.step == 1


async def test_expired_lease_is_reissued_and_late_result_used_once(client_for):
    client, job = await client_for(shard_size=256, lease_min_s=0.05, lease_first_s=0.05, lease_max_s=0.05,
                                   strategy="async_sgd")
    unit = await take_unit(client)
    fetch = await (await fetcher(client))(unit)
    honest = compute(unit, fetch, "w1")
    await asyncio.sleep(1.5)   # the coordinator's expiry loop runs every second
    assert job.store.unit(unit.unit_id)["status"] == "expired"
    reissued = await take_unit(client, "w2")
    assert reissued.shard_ids == unit.shard_ids
    status, got = await submit(client, unit, body(honest))   # late but used (late_results="use")
    assert status == 200 and got["late"] is True
    status, got = await submit(client, unit, body(honest))
    assert status == 409 and got["error"]["code"] == "duplicate"
    assert job.store.result_totals()["accepted"] == 1


async def run_units(client, job, n, workers=("w1", "w2")):
    """Interleave ``n`` honest units from several workers (so async strategies see staleness)."""
    fetch_all = await fetcher(client)
    queue = [(w, await take_unit(client, w)) for w in workers]
    for _ in range(n):
        worker, unit = queue.pop(0)
        status, got = await submit(client, unit, body(compute(unit, await fetch_all(unit), worker)))
        assert status == 200 and got["accepted"], got
        queue.append((worker, await take_unit(client, worker)))
    await job.settle()   # folding runs in the app's aggregation task; make sure it has caught up


# every strategy once and every codec at least once, the codecs taken in turn (a delta is decoded to dense
# arrays before any strategy sees it, so the pairs are independent; the whole grid was 24 runs, 2 minutes)
STRATEGY_CODEC = [(s, CODEC_IDS[i % len(CODEC_IDS)]) for i, s in enumerate(DENSE_STRATEGIES)]
assert {c for _, c in STRATEGY_CODEC} == set(CODEC_IDS)


@pytest.mark.parametrize("strategy,codec", STRATEGY_CODEC)
async def test_every_strategy_and_codec_end_to_end(client_for, strategy, codec):
    params = {"fedavg": {"clients_per_round": 2}, "fedbuff": {"buffer_size": 2}}.get(strategy, {})
    client, job = await client_for(strategy=strategy, strategy_params=params,
                                   codec="topk:0.25" if codec == "topk" else codec)
    await run_units(client, job, 4)
    assert job.step >= 1, f"{strategy}: no new version after 4 units"
    assert job.store.result_totals()["applied"] >= 2
    version0 = decode_delta(job.store.get_blob(job.store.version(0).blob))
    assert any(not np.array_equal(v, version0[k]) for k, v in job.state.items())
    assert all(np.isfinite(v).all() for v in job.state.values())
    # the version a unit is cut from (written on demand: versions are persisted on a policy, so the newest
    # fold's version may not be written yet when no unit was asked for after it)
    base = await job.publish()
    assert base.step == job.step
    served = decode_delta(job.store.get_blob(base.blob))
    assert all(np.array_equal(served[k], v) for k, v in job.state.items()), "the served blob is the model"


@pytest.mark.parametrize("strategy", SUPERMASK_STRATEGIES)
async def test_supermask_strategies_end_to_end(client_for, strategy):
    client, job = await client_for(model="supermask_fc", strategy=strategy, codec="fp32")
    base = {k: v.copy() for k, v in job.state.items()}
    await run_units(client, job, 4)
    assert job.step >= 1
    changed = {k for k in base if not np.array_equal(base[k], job.state[k])}
    assert changed and all("score" in k for k in changed), changed


async def test_airbench_job_sets_its_whitening_stem_from_the_images_and_python_workers_train_it(aiohttp_client,
                                                                                             tmp_path):
    """A model that sets part of itself from training images (airbench's whitening stem): the job's version 0
    carries the stem as one process's ``init_from_data`` sets it, units train the rest and leave the stem
    alone, and a tab is told plainly that it cannot train this model."""
    job = make_job(tmp_path, model="airbench", codec="fp32")
    client = await aiohttp_client(create_app(job.config, job, warm=True))   # as `crowdtrain coordinator` starts
    version0 = decode_delta(job.store.get_blob(job.store.version(0).blob))
    want = registry.build("airbench")
    registry.init_from_data(want, torch.from_numpy(tiny_cifar10(n_train=256, n_test=64).train_x))
    assert np.array_equal(version0["whiten.weight"], want.whiten.weight.numpy())
    assert np.count_nonzero(version0["whiten.weight"]) > 0
    await run_units(client, job, 3)
    assert job.step >= 1 and all(np.isfinite(v).all() for v in job.state.values())
    assert np.array_equal(job.state["whiten.weight"], version0["whiten.weight"])
    assert not np.array_equal(job.state["head.weight"], version0["head.weight"])
    # the recipe's lookahead is the coordinator's: a running average of the versions, synced every 5 of one
    # process's steps of folded samples, by the job's progress through its budget
    from coordinator.strategies import Lookahead
    assert isinstance(job.strategy, Lookahead) and job.strategy.total_samples == job.budget
    assert job.strategy.every_samples == 5 * registry.get("airbench").recipe.batch_size
    assert job.strategy.folded_samples == job.aggregator.samples > 0
    status = await (await client.get("/api/status")).json()
    assert status["strategy"]["name"] == "lookahead", status["strategy"]
    # its crops are padded by reflection, in units too (a recipe without it sends no such key)
    assert (await take_unit(client, "w3")).hyper["crop_reflect"] is True
    resp = await client.get(f"/api/v1/steps/airbench/{job.recipe.batch_size}")   # known at once, no export
    got = await resp.json()
    assert resp.status == 501 and "cannot be trained in a browser" in got["error"]["message"], got
    assert "31x31" in got["error"]["message"], got


def test_the_lookahead_follows_the_recipe_unless_the_operator_says(tmp_path, caplog):
    """``--lookahead recipe`` (the default) wraps the strategy of a recipe with lookahead only; ``on`` any
    job's, ``off`` none (and the coordinator then says units and it leave the recipe's lookahead out)."""
    from coordinator.strategies import Lookahead
    assert not isinstance(make_job(tmp_path / "a").strategy, Lookahead)   # cnn's recipe: no lookahead
    job = make_job(tmp_path / "b", lookahead="on")
    assert isinstance(job.strategy, Lookahead) and job.strategy.every_samples == 5 * registry.get("cnn").recipe.batch_size
    with caplog.at_level("INFO", logger="crowdtrain.coordinator"):
        job = make_job(tmp_path / "c", model="airbench", lookahead="off")
    assert not isinstance(job.strategy, Lookahead)
    assert any("sets lookahead: one process" in r.getMessage() for r in caplog.records), caplog.text


async def test_airbench_units_alternate_their_flips_by_epoch_and_the_whitening_bias_stops_after_3_epochs(
        aiohttp_client, tmp_path):
    """airbench's alternating flips travel with its units (``hyper.flip_parity``: the parity of the epoch the
    shard queue is in), and its whitening bias, which one process trains for 3 epochs only, stays as it is in
    every version folded once 3 epochs of samples are in (``strategies.Freeze``), while the rest trains on."""
    from coordinator.strategies import Freeze
    job = make_job(tmp_path, model="airbench", codec="fp32", lookahead="off")   # 4 shards of 64: 4 units an epoch
    assert isinstance(job.strategy, Freeze) and job.strategy.after == {"whiten.bias": 3 * 256}
    client = await aiohttp_client(create_app(job.config, job))
    fetch_all = await fetcher(client)
    parities, bias, head = [], [job.state["whiten.bias"].copy()], [job.state["head.weight"].copy()]
    for _ in range(16):
        unit = await take_unit(client, "w1")
        parities.append(unit.hyper["flip_parity"])
        status, got = await submit(client, unit, body(compute(unit, await fetch_all(unit), "w1")))
        assert status == 200 and got["accepted"], got
        await job.settle()
        bias.append(job.state["whiten.bias"].copy())
        head.append(job.state["head.weight"].copy())
    assert job.step == 16 and job.aggregator.samples == 16 * 64
    assert parities == [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4
    moved = [not np.array_equal(a, b) for a, b in zip(bias, bias[1:])]
    assert moved == [True] * 12 + [False] * 4, moved     # the 13th fold starts at 768 samples folded: held
    assert all(not np.array_equal(a, b) for a, b in zip(head, head[1:]))
    assert job.strategy.describe()["held"] == 4
    status = await (await client.get("/api/status")).json()
    assert status["strategy"]["name"] == "freeze", status["strategy"]
    again = Job(job.config)   # the folded samples are strategy state: opened again, it still holds the bias
    again.open(tiny_cifar10(n_train=256, n_test=64))
    assert again.strategy.folded_samples == 16 * 64


@pytest.mark.parametrize("persist_every", [10_000, 5])
async def test_a_lookahead_job_killed_replays_to_the_same_model(client_for, monkeypatch, persist_every):
    """The lookahead's average is strategy state: a job opened again from its state directory (as after
    kill -9: the first is never closed) replays the result log, from version 0 (nothing persisted since)
    or from a persisted version whose state holds the average, through the same syncs to the same model
    and the same average."""
    from coordinator.strategies import Lookahead
    monkeypatch.setattr(Lookahead, "PER_SYNC", 1)   # a sync every 256 samples (cnn's batch), not 1,280
    client, job = await client_for(lookahead="on", persist_every_s=1e6, persist_every_versions=persist_every)
    assert "crop_reflect" not in (await take_unit(client, "w0")).hyper   # cnn's recipe pads with zeros
    await run_units(client, job, 14)
    la = job.strategy
    assert la.describe()["syncs"] >= 2, la.describe()
    assert (0 if persist_every > 14 else 5) <= job.persisted_step < job.step, (job.persisted_step, job.step)
    assert job.persisted_step == 0 or job.store.get_meta("strategy_state")
    again = Job(job.config)
    again.open(tiny_cifar10(n_train=256, n_test=64))
    assert again.step == job.step and again.strategy.folded_samples == la.folded_samples
    for k, v in job.state.items():
        assert np.array_equal(again.state[k], v), k
    for k, v in la.avg.items():
        assert np.array_equal(again.strategy.avg[k], v), k


async def test_status_metrics_and_dashboard(client_for):
    client, job = await client_for(strategy="async_sgd")
    await run_units(client, job, 2)
    for _ in range(50):
        status = await (await client.get("/api/status")).json()
        if status["accuracy_history"] and status["accuracy_history"][-1]["version"] == job.step:
            break
        await asyncio.sleep(0.1)
    for key in ("model_version", "units_issued", "units_accepted", "units_rejected", "workers_online",
                "samples_per_second", "accuracy_history"):
        assert key in status
    assert status["units_accepted"] == 2 and status["workers_online"] == 2
    assert all(0 <= row["test_acc"] <= 1 for row in status["accuracy_history"])
    metrics = await (await client.get("/metrics")).text()
    assert "crowdtrain_units_accepted_total 2" in metrics
    page = await client.get("/dashboard")
    assert page.status == 200 and "<html" in (await page.text()).lower()


async def test_evaluations_take_at_most_their_share_of_the_time_and_the_final_one_is_prompt(monkeypatch):
    """``eval_loop``: after an evaluation that computed for t, the next waits max(eval_every_s, t (1 - share) /
    share), not eval_every_s alone, except after the first (it runs while the workers start, and pays one-off
    costs); time an evaluation spent waiting (for a core, on a loaded machine) does not count; when the job
    finishes, its final version is evaluated within about a second of it however long the pause."""
    import time
    from types import SimpleNamespace

    from coordinator import app as app_module

    monkeypatch.setattr(app_module, "EVAL_SHARE", 0.5)   # a pause as long as the evaluation took
    starts: list[tuple[int, float]] = []
    ends: list[float] = []   # the pause is measured from an evaluation's end: a busy machine slows the computing

    class FakeJob:
        config = SimpleNamespace(eval_every_s=0.05)
        step, finished = 1, False

        def evaluate_current(self):
            starts.append((self.step, time.monotonic()))
            if len(starts) == 3:
                time.sleep(0.4)   # waiting, as an evaluation slowed by other work on the machine does
            began = time.thread_time()
            while time.thread_time() - began < {1: 0.6, 2: 0.4, 4: 0.3}.get(len(starts), 0.0):
                pass              # computing
            ends.append(time.monotonic())
            return {"version": self.step, "test_acc": 0.5, "samples": 0}

        def record_eval(self, row):
            self.step += 1   # a new version is there at once after every evaluation

    job = FakeJob()
    task = asyncio.create_task(app_module.eval_loop(job, {}))
    try:
        while len(starts) < 3:
            await asyncio.sleep(0.01)
        assert starts[1][1] - ends[0] < 0.4         # the first (0.6 s computing): eval_every_s after it, not 0.6
        assert starts[2][1] - ends[1] >= 0.4 - 0.02  # 0.4 s computing: 0.4 paused, not 0.05
        while len(starts) < 4:
            await asyncio.sleep(0.01)
        assert starts[3][1] - ends[2] < 0.3          # 0.4 s waiting: 0.05 paused, not 0.4
        monkeypatch.setattr(app_module, "EVAL_SHARE", 1e-4)   # the fourth (0.3 s) pauses 0.3 s x 9,999...
        while job.step < 5:                                   # the fourth is recorded...
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)                              # ... and its pause began
        finished_at = time.monotonic()
        job.finished = True                                  # ... but the job is done
        while len(starts) < 5:
            await asyncio.sleep(0.01)
            assert time.monotonic() - finished_at < 3.0
        assert starts[4][0] == 5   # the final version (read before the test could see its record_eval)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_update_that_comes_in_while_the_inbox_is_prepared_waits_for_the_next_settle(tmp_path, monkeypatch):
    """``settle`` offers the updates its thread prepared (rebase and norm off the event loop); one logged while
    that thread ran stays in line for the next settle, which prepares it too, unless the budget may be reached."""
    from contract.units import UnitRequest
    from coordinator import aggregator as aggregator_module

    job = make_job(tmp_path, strategy="async_sgd", codec="fp32", epochs=64.0)
    offered: list[tuple[int, bool]] = []
    add = aggregator_module.Aggregator.add

    def recorded(self, seq, delta, base_step, samples, worker_id="", loss=None, prepared=None):
        offered.append((seq, prepared is not None))
        return add(self, seq, delta, base_step, samples, worker_id, loss, prepared)

    monkeypatch.setattr(aggregator_module.Aggregator, "add", recorded)
    units = [(w, job.next_unit(UnitRequest(worker_id=w, backend="python"))) for w in ("w1", "w2", "w3")]
    results = [body(compute(u, job.store.get_blob, w)) for w, u in units]
    for (_, unit), data in zip(units[:2], results[:2]):
        assert (await job.submit(unit.unit_id, data))["accepted"]
    prepare = job._prepare_inbox

    async def prepare_while_one_comes_in():
        prepared = await prepare()
        assert (await job.submit(units[2][1].unit_id, results[2]))["accepted"]   # logged meanwhile
        return prepared

    monkeypatch.setattr(job, "_prepare_inbox", prepare_while_one_comes_in)
    job.work.clear()
    await job.settle()
    first = [seq for seq, _ in offered]
    assert len(first) == 2 and all(p for _, p in offered), offered
    assert len(job.inbox) == 1 and job.work.is_set(), "the third waits, and the aggregation task is woken"
    monkeypatch.setattr(job, "_prepare_inbox", prepare)
    await job.settle()
    assert len(offered) == 3 and offered[2][1] and not job.inbox, offered
    job.close()
