"""Robust aggregation (coordinator/strategies/robust.py) and the attack workers (tests/helpers/fault_worker.py).

Pure maths on tiny arrays; each wrapper built by ``make_strategy`` and the config; state round
trips; the attack workers produce what they claim on a tiny model; and inside a real job (the
real app, SQLite store, as tests/test_ledger.py) a sign-flipped x10 update is clipped or trimmed
while the ledger still matches what the model folded.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.codecs import decode_delta
from contract.units import UnitRequest, WorkUnit, pack_result, unpack_result
from coordinator.config import CoordinatorConfig, OptionError
from coordinator.job import Job, build_strategy
from coordinator.strategies import (
    ROBUST,
    AdaptiveClip,
    AsyncSGD,
    CenteredClip,
    FedAvg,
    FedBuff,
    Median,
    NormClip,
    StalenessCap,
    TrimmedMean,
    Update,
    make_strategy,
)
from coordinator.strategies import robust as R
from models.local import is_running_stat
from tests.helpers.fault_worker import (
    Collusion,
    Fault,
    FaultWorker,
    a_little,
    a_little_z,
    body,
    compute,
    flip_labels,
    lie,
)
from tests.helpers.tiny_cifar import tiny_cifar10
from tests.helpers.protocol import fetch_all, start_job
from tests.helpers.protocol import take as take_http
from worker_py.unit import run_unit


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def upd(base: int, key: int, n: int = 1, **delta: np.ndarray) -> Update:
    return Update(dict(delta), base_version=base, num_samples=n, worker_id=f"w{key}", key=key)


# --- the maths ---------------------------------------------------------------------------------

def test_adaptive_bound_waits_for_warmup_and_ignores_zeros() -> None:
    assert R.adaptive_bound([1.0, 2.0], multiplier=4, warmup=3) == math.inf
    assert R.adaptive_bound([1.0, 2.0, 3.0], multiplier=4, warmup=3) == 8.0
    assert R.adaptive_bound([0.0, 0.0, 0.0, 1.0, 3.0], multiplier=2, warmup=2) == 4.0   # median of 1, 3
    assert R.adaptive_bound([0.0] * 10, multiplier=2, warmup=2) == math.inf


def test_trimmed_mean_and_median_per_coordinate() -> None:
    stack = np.array([[1.0, -5.0], [2.0, 0.0], [100.0, 1.0], [3.0, 2.0], [4.0, 1000.0]])
    np.testing.assert_allclose(R.trimmed_mean(stack, 0.2), [3.0, 1.0])        # drops one low, one high
    np.testing.assert_allclose(R.trimmed_mean(stack, 0.0), stack.mean(axis=0))
    np.testing.assert_allclose(R.trimmed_mean(stack, 0.49), [3.0, 1.0])       # floor(2.45) = 2: the median
    np.testing.assert_allclose(R.trimmed_mean(stack[:2], 0.49), [1.5, -2.5])  # always keeps one value a side
    np.testing.assert_allclose(R.coordinate_median(stack), [3.0, 1.0])
    np.testing.assert_allclose(R.coordinate_median(stack[:4]), [2.5, 0.5])


def test_robust_center_keeps_dtypes_and_handles_missing_tensors() -> None:
    deltas = [{"a": arr(1, 9), "b": arr(2)}, {"a": arr(2, 8)}, {"a": arr(30, -70), "b": arr(4)}]
    center = R.robust_center(deltas, R.coordinate_median)
    assert center["a"].dtype == np.float32
    np.testing.assert_allclose(center["a"], [2, 8])
    np.testing.assert_allclose(center["b"], [3])   # the median of the two that carry it


def test_centered_clip_around_a_reference() -> None:
    reference = {"w": arr(1, 1)}
    near, far = {"w": arr(1, 2)}, {"w": arr(1 + 30, 1 + 40)}
    out, distances = R.centered_clip([near, far], reference, tau=5.0)
    assert distances == [1.0, 50.0]
    assert out[0] is near                                  # within tau: untouched
    np.testing.assert_allclose(out[1]["w"], [1 + 3, 1 + 4])  # 1 + (30, 40) * 5 / 50
    zero_ref, _ = R.centered_clip([far], {}, tau=5.0)      # no reference: plain norm clipping
    np.testing.assert_allclose(np.linalg.norm(zero_ref[0]["w"]), 5.0, rtol=1e-6)


# the same maths on any small stack (hypothesis): the properties each rule is chosen for
finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
stacks = st.integers(1, 9).flatmap(lambda n: st.integers(1, 4).flatmap(
    lambda m: st.lists(st.lists(finite, min_size=m, max_size=m), min_size=n, max_size=n))).map(np.array)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(stack=stacks, trim=st.floats(0.0, 0.499), order=st.randoms(use_true_random=False))
def test_trimmed_mean_and_median_stay_inside_the_values_and_ignore_their_order(stack, trim, order) -> None:
    low, high = stack.min(axis=0), stack.max(axis=0)
    shuffled = stack[order.sample(range(len(stack)), len(stack))]
    slack = 1e-9 * np.maximum(1.0, np.abs(stack).max(axis=0))
    for center in (R.trimmed_mean(stack, trim), R.coordinate_median(stack)):
        assert np.all(center >= low - slack) and np.all(center <= high + slack)
    np.testing.assert_allclose(R.trimmed_mean(shuffled, trim), R.trimmed_mean(stack, trim), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(R.trimmed_mean(stack, 0.0), stack.mean(axis=0), rtol=1e-12, atol=1e-9)
    # one value moved as far as you like moves a trimmed coordinate no further than the kept values reach
    k = min(math.floor(trim * len(stack) + 1e-9), (len(stack) - 1) // 2)
    if k >= 1:
        wild = stack.copy()
        wild[0] = 1e12
        assert np.all(R.trimmed_mean(wild, trim) <= stack[1:].max(axis=0) + 1e-6)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(deltas=st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=5),
       reference=st.lists(finite, min_size=3, max_size=3), tau=st.floats(1e-3, 1e6))
def test_centered_clip_brings_each_delta_within_tau_of_the_reference_along_its_own_direction(deltas, reference,
                                                                                            tau) -> None:
    ref = {"w": np.array(reference, np.float64)}
    given_deltas = [{"w": np.array(d, np.float64)} for d in deltas]
    out, distances = R.centered_clip(given_deltas, ref, tau)
    for before, after, d in zip(given_deltas, out, distances):
        assert d == pytest.approx(np.linalg.norm(before["w"] - ref["w"]), rel=1e-9, abs=1e-9)
        moved = after["w"] - ref["w"]
        assert np.linalg.norm(moved) <= tau * (1 + 1e-9) + 1e-6
        if d <= tau:
            assert after is before
        elif d > 0:
            np.testing.assert_allclose(moved, (before["w"] - ref["w"]) * (tau / d), rtol=1e-9, atol=1e-6)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(norms=st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e6)), max_size=30),   # (no subnormal that scales to 0)
       multiplier=st.floats(0.1, 100), warmup=st.integers(0, 12),
       scale=st.floats(1e-3, 1e3))
def test_adaptive_bound_scales_with_the_norms_and_waits_for_enough_of_them(norms, multiplier, warmup, scale) -> None:
    bound = R.adaptive_bound(norms, multiplier, warmup)
    positive = [n for n in norms if n > 0]
    if len(positive) < max(1, warmup):
        assert bound == math.inf
        return
    assert min(positive) * multiplier <= bound * (1 + 1e-12) and bound <= max(positive) * multiplier * (1 + 1e-12)
    assert R.adaptive_bound([n * scale for n in norms], multiplier, warmup) == pytest.approx(bound * scale, rel=1e-9)


def test_specs_parse_and_refuse() -> None:
    assert R.parse_robust("trimmed_mean:0.2") == ("trimmed_mean", 0.2)
    assert R.parse_robust("median") == ("median", None)
    for bad in ("krum", "median:3", "none:1", "trimmed_mean:x", 3, None):
        with pytest.raises(ValueError, match="robust"):
            R.parse_robust(bad)
    assert R.is_robust_spec("adaptive_clip:3") and R.is_robust_spec("none")
    assert not R.is_robust_spec("trimmed_mean:0.5") and not R.is_robust_spec("adaptive_clip:0.5")
    with pytest.raises(ValueError, match="buffered strategy"):
        R.buffered(object())
    assert isinstance(R.buffered(StalenessCap(NormClip(FedAvg(), 1.0), 2)), FedAvg)


# --- each wrapper inside make_strategy -------------------------------------------------------

@pytest.mark.parametrize("spec, cls", [("adaptive_clip", AdaptiveClip), ("centered_clip:3", CenteredClip),
                                       ("trimmed_mean:0.25", TrimmedMean), ("median", Median)])
def test_make_strategy_builds_each_wrapper_innermost(spec: str, cls: type) -> None:
    s = make_strategy("fedbuff", buffer_size=4, robust=spec, max_norm=10.0, max_staleness=3)
    assert isinstance(s, StalenessCap) and isinstance(s.inner, NormClip) and isinstance(s.inner.inner, cls)
    assert isinstance(s.inner.inner.inner, FedBuff) and s.inner.inner.inner.buffer_size == 4
    inner = s.inner.inner
    assert type(inner)(inner.inner, **inner.params()).describe() == inner.describe()
    assert set(ROBUST) == {"adaptive_clip", "centered_clip", "trimmed_mean", "median"}
    assert make_strategy("fedbuff", robust="none").name == "fedbuff"


def test_the_config_builds_the_wrapper_and_refuses_a_second_way() -> None:
    cfg = CoordinatorConfig(state="s", strategy="fedavg", strategy_params={"clients_per_round": 3},
                            robust="trimmed_mean:0.34", on_large_norm="clip")
    name, s = build_strategy(cfg, "dense")
    assert name == "fedavg" and isinstance(s, NormClip) and isinstance(s.inner, TrimmedMean)
    assert s.inner.trim == 0.34 and isinstance(s.inner.inner, FedAvg)
    assert isinstance(build_strategy(CoordinatorConfig(state="s"), "dense")[1], AdaptiveClip)   # the default
    assert build_strategy(CoordinatorConfig(state="s", robust="none"), "dense")[1].name == "async_sgd"
    with pytest.raises(OptionError, match="robust"):
        CoordinatorConfig(state="s", robust="krum")
    with pytest.raises(OptionError, match="--robust"):
        CoordinatorConfig(state="s", strategy_params={"robust": "median"})
    # a statistic over a buffer it cannot trim is refused when the job builds it, saying what would work
    for robust, match in (("median", "at least 3"), ("trimmed_mean:0.2", "at least 5")):
        with pytest.raises(ValueError, match=match):
            build_strategy(CoordinatorConfig(state="s", robust=robust), "dense")   # async_sgd folds 1 at a time
    with pytest.raises(ValueError, match="trim of 0.2 removes none"):
        make_strategy("fedbuff", buffer_size=4, robust="trimmed_mean:0.2")
    assert make_strategy("fedbuff", buffer_size=5, robust="trimmed_mean:0.2").name == "trimmed_mean"


def test_adaptive_clip_bounds_an_outlier_after_warmup() -> None:
    s = AdaptiveClip(AsyncSGD(), multiplier=2.0, window=4, warmup=3)
    model = {"w": arr(0, 0)}
    norms = [1.0, 2.0, 3.0]
    for i, n in enumerate(norms):
        assert s.offer(upd(0, i, w=arr(n, 0)), 0).admitted
    model = s.fold(model, 0).model
    np.testing.assert_allclose(model["w"], [6, 0])            # warm-up: nothing clipped
    admission = s.offer(upd(0, 9, w=arr(0, -100)), 0)          # 100 > 2 x median(1, 2, 3) = 4
    folded = s.fold(model, 0)
    assert admission.admitted and [u.key for u in folded.folded] == [9]
    np.testing.assert_allclose(folded.model["w"], [6, -4])
    assert folded.metrics["adaptive_clipped"] == 1 and s.describe()["adaptive_clipped"] == 1
    assert list(s._norms) == [1.0, 2.0, 3.0, 4.0]              # the clipped norm is recorded, not 100
    assert s.bound == 2 * 2.5


def test_trimmed_mean_folds_the_robust_center_with_the_inner_weights() -> None:
    s = TrimmedMean(FedBuff(buffer_size=5, staleness="constant"), trim=0.2)
    model = {"w": arr(1, 1)}
    values = [(1, 2), (2, 3), (3, 4), (4, 5), (-40, -50)]        # the last: a sign-flipped x10 liar
    for i, v in enumerate(values):
        s.offer(upd(0, i, w=arr(*v)), 0)
    folded = s.fold(model, 0)
    np.testing.assert_allclose(folded.model["w"], [1 + 2, 1 + 3])  # + trimmed mean (2, 3) per coordinate
    assert sorted(u.key for u in folded.folded) == [0, 1, 2, 3, 4] and not folded.dropped
    assert folded.metrics["trimmed"] == 5


def test_median_of_a_fedavg_round_and_the_inner_drops() -> None:
    s = Median(FedAvg(clients_per_round=3))
    model = {"w": arr(0)}
    assert s.offer(upd(0, 0, w=arr(1)), 1).dropped[0].reason == "off_round"   # the inner strategy still decides
    for i, v in enumerate((1.0, 2.0, 500.0)):
        s.offer(upd(1, 10 + i, n=1 + i, w=arr(v)), 1)
    s.offer(upd(1, 13, w=arr(1.0, 2.0)), 1)                        # an incompatible delta: no part of the median
    folded = s.fold(model, 1)
    np.testing.assert_allclose(folded.model["w"], [2.0])
    assert sorted(u.key for u in folded.folded) == [10, 11, 12]
    assert [(d.update.key, d.reason) for d in folded.dropped] == [(13, "incompatible")]


def test_centered_clip_bounds_a_liar_around_the_previous_aggregate() -> None:
    s = CenteredClip(FedBuff(buffer_size=2, staleness="constant"), radius=2.0, window=8, warmup=2)
    model = {"w": arr(0, 0)}
    rng = np.random.default_rng(0)
    for r in range(4):                       # honest rounds around (1, 1): the reference and the distances
        for k in range(2):
            s.offer(upd(0, 10 * r + k, w=(arr(1, 1) + 0.1 * rng.standard_normal(2)).astype(np.float32)), 0)
        model = s.fold(model, 0).model
    assert s.tau < 1.0 and s.describe()["centered_clipped"] == 0
    before = model["w"].copy()
    s.offer(upd(0, 90, w=arr(1.05, 0.95)), 0)
    s.offer(upd(0, 91, w=arr(-10, -10)), 0)                        # the liar
    folded = s.fold(model, 0)
    step = folded.model["w"] - before
    assert sorted(u.key for u in folded.folded) == [90, 91] and folded.metrics["centered_clipped"] == 1
    assert np.linalg.norm(step - np.array([1, 1])) < s.radius * 0.5   # near the honest mean, not (-4.5, -4.5)


# --- state ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["adaptive_clip", "centered_clip", "trimmed_mean:0.34", "median"])
def test_state_round_trip(spec: str) -> None:
    def run(strategy, start: int, stop: int, model):
        for r in range(start, stop):
            for k in range(3):
                v = np.float32(1 + 0.1 * k + 0.01 * r)
                strategy.offer(upd(r, 10 * r + k, w=arr(v, -v), b=arr(v * 10 if k == 2 and r == 5 else v)), r)
            model = strategy.fold(model, r).model
        return model

    params = {"buffer_size": 3, "staleness": "constant"}
    a = make_strategy("fedbuff", robust=spec, **params)
    model = run(a, 0, 4, {"w": arr(0, 0), "b": arr(0)})
    saved = a.state_dict(include_buffer=False)
    b = make_strategy("fedbuff", robust=spec, **params)
    b.load_state_dict(type(saved).from_bytes(saved.to_bytes()))
    assert b.describe() == a.describe()
    np.testing.assert_array_equal(run(a, 4, 7, model)["b"], run(b, 4, 7, model)["b"])
    assert b.describe() == a.describe()


def test_a_state_saved_without_the_wrapper_loads_into_its_inner_strategy() -> None:
    old = FedBuff(buffer_size=2, server_momentum=0.5)
    old.offer(upd(0, 1, w=arr(1)), 0)
    old.offer(upd(0, 2, w=arr(3)), 0)
    old.fold({"w": arr(0)}, 0)
    new = AdaptiveClip(FedBuff(buffer_size=2, server_momentum=0.5))
    new.load_state_dict(old.state_dict(include_buffer=False))
    assert new.inner._momentum.keys() == {"w"} and new.describe()["norms"] == 0
    other = CenteredClip(FedBuff(buffer_size=2, server_momentum=0.5))      # from --robust centered_clip to median
    other.load_state_dict(new.state_dict())
    median = Median(FedBuff(buffer_size=3, server_momentum=0.5))
    median.load_state_dict(other.state_dict())
    np.testing.assert_array_equal(median.inner._momentum["w"], old._momentum["w"])


# --- the attack workers (tests/helpers/fault_worker.py) -----------------------------------------

@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    cfg = CoordinatorConfig(state=tmp_path_factory.mktemp("attacks") / "state", model="cnn", shard_size=64,
                            epochs=8.0, codec="fp32", strategy="async_sgd")
    job = Job(cfg)
    job.open(tiny_cifar10(n_train=256, n_test=64))
    yield job
    job.close()


def take(job: Job, worker: str) -> WorkUnit:
    unit = job.next_unit(UnitRequest(worker_id=worker, backend="python"))
    assert unit is not None
    return unit


def flat(delta: dict) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float64).ravel() for _, v in sorted(delta.items())])


@pytest.mark.parametrize("fault", [Fault.SIGN_FLIP, Fault.SCALE, Fault.NOISE, Fault.FREE_RIDE])
def test_attack_changes_the_honest_delta_as_it_claims(tiny_job, fault) -> None:
    unit = take(tiny_job, "liar")
    honest = compute(unit, tiny_job.store.get_blob, "liar")
    h = flat(decode_delta(honest.delta))
    sent = FaultWorker("liar", fault).result(unit, tiny_job.store.get_blob)
    got = flat(decode_delta(sent.delta))
    assert sent.num_samples == honest.num_samples == unit.local_steps * unit.batch_size   # the full claim
    if fault is Fault.SIGN_FLIP:
        np.testing.assert_allclose(got, -10 * h, rtol=1e-6, atol=1e-9)
    elif fault is Fault.SCALE:
        np.testing.assert_allclose(got, 10 * h, rtol=1e-6, atol=1e-9)
    elif fault is Fault.FREE_RIDE:
        assert not got.any()
    else:
        assert np.linalg.norm(got) == pytest.approx(10 * np.linalg.norm(h), rel=0.05)
        assert abs(got @ h) / (np.linalg.norm(got) * np.linalg.norm(h)) < 0.05     # unrelated to the honest one
    assert unpack_result(pack_result(sent)).delta == sent.delta     # a well-formed body
    np.testing.assert_allclose(flat(decode_delta(unpack_result(body(honest, fault)).delta)), got, atol=1e-9) \
        if fault is not Fault.NOISE else None                         # body() tells the same lie


def test_a_turncoat_sends_honest_results_first_then_lies(tiny_job) -> None:
    """``honest_first`` (the simulator's ``liars.honest_first``): a liar that earns trust before it lies."""
    unit = take(tiny_job, "turncoat")
    honest = compute(unit, tiny_job.store.get_blob, "turncoat")
    liar = FaultWorker("turncoat", Fault.SIGN_FLIP, honest_first=2)
    sent = [flat(decode_delta(liar.result(unit, tiny_job.store.get_blob).delta)) for _ in range(3)]
    h = flat(decode_delta(honest.delta))
    np.testing.assert_array_equal(sent[0], h)
    np.testing.assert_array_equal(sent[1], h)
    np.testing.assert_allclose(sent[2], -10 * h, rtol=1e-6, atol=1e-9)


def test_label_flip_trains_honestly_on_shifted_labels(tiny_job) -> None:
    unit = take(tiny_job, "flipper")
    fetch = tiny_job.store.get_blob
    flipped = compute(unit, fetch, "flipper", Fault.LABEL_FLIP)
    honest = compute(unit, fetch, "flipper")
    from contract.shards import decode_shard
    x, y = (a.copy() for a in decode_shard(fetch(unit.shard_ids[0])))
    assert np.array_equal(flip_labels(y), (y.astype(int) + 1) % 10) and flip_labels(y).dtype == y.dtype
    again = run_unit(unit, decode_delta(fetch(unit.model_version)), x, flip_labels(y), "flipper")
    f, a, h = (flat(decode_delta(r.delta)) for r in (flipped, again, honest))
    np.testing.assert_allclose(f, a, atol=1e-6)
    # relative to the honest delta's size: a unit cut at the start of the schedule (the first unit of the job,
    # when this test runs first) has a tiny lr, so both deltas are ~1e-7 and any absolute tolerance passes
    assert np.linalg.norm(h) > 0 and np.linalg.norm(f - h) > 0.05 * np.linalg.norm(h), \
        (np.linalg.norm(f - h), np.linalg.norm(h))


def test_replay_sends_its_first_delta_again_with_a_full_claim(tiny_job) -> None:
    worker = FaultWorker("replayer", Fault.REPLAY)
    first, second = take(tiny_job, "replayer"), take(tiny_job, "replayer")
    r1 = worker.result(first, tiny_job.store.get_blob)
    r2 = worker.result(second, tiny_job.store.get_blob)
    assert r2.delta == r1.delta and (r2.unit_id, r2.lease) == (second.unit_id, second.lease)
    assert r2.base_version == second.model_version and r2.num_samples == second.local_steps * second.batch_size


def test_a_little_is_enough_shifts_inside_the_honest_spread(tiny_job) -> None:
    assert a_little_z(3, 1) == pytest.approx(0.4307, abs=1e-4)
    z = a_little_z(3, 1)
    pool = Collusion(z=z)
    colluders = [FaultWorker(f"c{i}", Fault.A_LITTLE, pool) for i in range(2)]
    units = [take(tiny_job, w.worker_id) for w in colluders]
    sent = [w.result(u, tiny_job.store.get_blob) for w, u in zip(colluders, units)]
    lies = [flat(decode_delta(r.delta)) for r in sent]
    honest = [flat(d) for d in pool.honest]
    assert len(honest) == 3      # the first colluder added a second run of its unit to see the spread
    np.testing.assert_allclose(lies[1], flat(a_little(pool.honest, z)), rtol=1e-6, atol=1e-9)
    mean, std = np.mean(honest, axis=0), np.std(honest, axis=0, ddof=1)
    np.testing.assert_allclose(lies[1], mean - z * std, rtol=1e-5, atol=1e-8)
    assert np.all(np.abs(lies[1] - mean) <= z * std + 1e-7)                 # each coordinate within z std
    assert np.linalg.norm(lies[1] - mean) < np.mean([np.linalg.norm(h - mean) for h in honest])  # closer than
    # an honest delta is to the honest mean: it hides inside the honest spread
    with pytest.raises(ValueError, match="FaultWorker"):
        body(sent[0], Fault.A_LITTLE)
    with pytest.raises(ValueError):
        lie({"w": arr(1)}, Fault.REPLAY)


# --- inside a real job: the liar is bounded and the ledger still matches -----------------------

async def start(aiohttp_client, tmp_path, **config):
    return await start_job(aiohttp_client, tmp_path, **config)


async def ledger_matches(client, job) -> list[dict]:
    """What tests/test_ledger.py checks: every accepted result applied or dropped as /api/status says."""
    rows = list(job.store.results())
    applied = [r for r in rows if r["applied_step"] is not None]
    dropped = [r for r in rows if r["dropped"] is not None]
    pending = [r for r in rows if r["applied_step"] is None and r["dropped"] is None]
    assert not [r for r in applied if r["dropped"] is not None]
    assert len(pending) == job.aggregator.buffered
    s = await (await client.get("/api/status")).json()
    assert s["updates_applied"] == len(applied) and s["updates_pending"] == len(pending)
    assert s["updates_dropped"] == dict(Counter(r["dropped"] for r in dropped))
    assert s["samples"] == sum(r["num_samples"] for r in applied) == job.store.latest_version().samples
    return applied


def weights(state: dict) -> dict:
    return {k: np.asarray(v, np.float64) for k, v in state.items() if not is_running_stat(k)}


async def test_in_a_job_adaptive_clip_bounds_a_sign_flipped_update(aiohttp_client, tmp_path):
    client, job = await start(aiohttp_client, tmp_path, strategy="async_sgd",
                              strategy_params={"staleness": "constant"}, robust="adaptive_clip:2")
    clip = job.strategy
    assert isinstance(clip, AdaptiveClip) and clip.warmup == 10
    v0, sent, liar = weights(job.state), {}, None
    for i in range(clip.warmup + 2):                    # warm-up, then one liar and one honest
        unit = await take_http(client, "w")
        result = compute(unit, await fetch_all(client, unit), "w")
        data = body(result, Fault.SIGN_FLIP if i == clip.warmup else Fault.NONE)
        sent[unit.unit_id] = decode_delta(unpack_result(data).delta)
        if i == clip.warmup:
            liar, bound = unit.unit_id, clip.bound
            assert R.global_norm(sent[liar]) > 3 * bound
        resp = await client.post(f"/api/v1/units/{unit.unit_id}/result", data=data)
        assert resp.status == 200 and (await resp.json())["accepted"]
        await job.settle()
    applied = await ledger_matches(client, job)
    assert len(applied) == clip.warmup + 2 and clip.describe()["adaptive_clipped"] == 1   # the liar, and only it
    # the model is version 0 plus the deltas the ledger calls applied, the liar's scaled down to the bound
    factor = bound / R.global_norm(sent[liar])
    for name, start_value in v0.items():
        expected = start_value + sum(sent[r["unit_id"]][name] * (factor if r["unit_id"] == liar else 1.0)
                                     for r in applied)
        np.testing.assert_allclose(job.state[name], expected, rtol=1e-4, atol=1e-5, err_msg=name)


async def test_in_a_job_trimmed_mean_drops_a_sign_flipped_update_per_coordinate(aiohttp_client, tmp_path):
    client, job = await start(aiohttp_client, tmp_path, strategy="fedbuff", robust="trimmed_mean:0.34",
                              strategy_params={"buffer_size": 3, "staleness": "constant"})
    before = weights(job.state)
    units = [(w, await take_http(client, w)) for w in ("honest1", "honest2", "liar")]
    deltas = {}
    for worker, unit in units:
        result = compute(unit, await fetch_all(client, unit), worker)
        deltas[worker] = weights(decode_delta(result.delta))
        resp = await client.post(f"/api/v1/units/{unit.unit_id}/result",
                                 data=body(result, Fault.SIGN_FLIP if worker == "liar" else Fault.NONE))
        assert resp.status == 200 and (await resp.json())["accepted"]
    await job.settle()
    assert job.step == 1
    applied = await ledger_matches(client, job)
    assert sorted(r["worker_id"] for r in applied) == ["honest1", "honest2", "liar"]   # all went into the median
    for name, start_value in before.items():
        step = weights(job.state)[name] - start_value
        h1, h2, bad = deltas["honest1"][name], deltas["honest2"][name], -10 * deltas["liar"][name]
        np.testing.assert_allclose(step, np.median(np.stack([h1, h2, bad]), axis=0), rtol=1e-4, atol=1e-6)
        assert np.all(step >= np.minimum(h1, h2) - 1e-6) and np.all(step <= np.maximum(h1, h2) + 1e-6), name
