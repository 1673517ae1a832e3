"""Units sized to the tab that asks (coordinator/factory.py, ``unit_seconds``): pure factory tests.

A real Store in a temporary folder, a handful of tiny shard blobs and a small model version; no
HTTP, no training. A browser tab's unit is a number of steps at the recipe's (the step graph's)
batch chosen from its measured seconds per sample; its first unit (speed unknown) is one step on
a slice of a shard with the model version as fp16; Python workers' units are unchanged.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from contract.codecs import decode_delta, encode_delta, get_codec
from contract.errors import ContractError
from contract.shards import decode_shard, encode_shard
from contract.units import UnitResult, WorkUnit, check_result
from coordinator.config import CoordinatorConfig
from coordinator.factory import FIRST_SAVE_S, FIRST_STEPS, GROWTH, MAX_UNIT_SHARDS, Base, UnitFactory
from coordinator.store import Store
from models.recipe import Recipe
from models.train import lr_at

BATCH, SHARD, SHARDS = 16, 64, 8


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path, **overrides):
    """A factory over SHARDS shards of SHARD random images, batch BATCH, and version 0's blob; whole fp32
    versions after a tab's first unit unless ``version_download`` is given."""
    overrides.setdefault("version_download", "fp32")
    overrides.setdefault("replication", "off")
    cfg = CoordinatorConfig(state=tmp_path / "state", model="cnn", shard_size=SHARD, **overrides)
    store = Store(tmp_path / "state")
    rng = np.random.default_rng(0)
    sizes = {}
    for i in range(SHARDS):
        x = rng.integers(0, 256, (SHARD, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, SHARD, dtype=np.uint8)
        sizes[store.put_blob(encode_shard(x, y))] = SHARD
    state = {"w": rng.standard_normal((40, 30)).astype(np.float32), "bn.running_var": np.ones(30, np.float32)}
    base = Base(0, store.put_blob(encode_delta(get_codec("fp32"), state)))
    clock = Clock()
    factory = UnitFactory(cfg, Recipe(batch_size=BATCH, lr=0.05), store, b"k" * 32, sizes, budget=10**7, clock=clock)
    return factory, store, base, state, clock


def issue(factory, worker: str, base: Base, backend: str, trusted: bool = False) -> WorkUnit:
    return factory.make(worker, "fp16", base, 0, backend=backend, trusted=trusted)


def row(store: Store, unit: WorkUnit) -> dict:
    return store.unit(unit.unit_id)


def test_an_unknown_tab_gets_one_step_on_a_slice_and_an_fp16_model(tmp_path):
    factory, store, base, state, _ = make(tmp_path)
    unit = issue(factory, "web-1", base, "browser")
    assert (unit.local_steps, unit.batch_size) == (FIRST_STEPS, BATCH)
    assert row(store, unit)["samples"] == FIRST_STEPS * BATCH
    # its one shard is a slice of a job shard: exactly the unit's samples, the parent's first images
    [slice_id] = unit.shard_ids
    assert slice_id not in factory.shard_sizes and factory.size_of(slice_id) == FIRST_STEPS * BATCH
    x, y = decode_shard(store.get_blob(slice_id))
    parent = next(iter(factory.shard_sizes))
    px, py = decode_shard(store.get_blob(parent))
    assert np.array_equal(x, px[:len(x)]) and np.array_equal(y, py[:len(y)])
    # the model version is the base as fp16: half the bytes, the same values to fp16 precision
    assert unit.model_version != base.blob
    half = store.get_blob(unit.model_version)
    assert json.loads(half[8:8 + int.from_bytes(half[4:8], "little")])["codec"] == "fp16"
    assert len(half) < 0.6 * len(store.get_blob(base.blob))
    got = decode_delta(half)
    for name, value in state.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-3, atol=1e-4)
    # a Python worker's unit is as before: one shard, one pass over it, the fp32 version
    py_unit = issue(factory, "py-1", base, "python")
    assert py_unit.local_steps == math.ceil(SHARD / BATCH) and py_unit.model_version == base.blob
    assert [factory.size_of(s) for s in py_unit.shard_ids] == [SHARD]


def test_a_measured_tab_gets_steps_for_the_target_seconds_growing_at_most_4x(tmp_path):
    factory, store, base, _, clock = make(tmp_path, unit_seconds=20.0)
    rate = 0.05                       # seconds per sample, a slow tab: 20 s is 400 samples = 25 steps of 16
    want = round(20.0 / (rate * BATCH))
    steps = []
    for _ in range(5):
        unit = issue(factory, "web-slow", base, "browser")
        steps.append(unit.local_steps)
        assert unit.batch_size == BATCH                      # the step graph's batch, always
        samples = unit.local_steps * unit.batch_size
        # its shards hold at least its samples (no pass repeats an image), all job shards after the first unit
        assert sum(factory.size_of(s) for s in unit.shard_ids) >= samples
        assert row(store, unit)["samples"] == samples
        clock.t += rate * samples
        factory.observe("web-slow", rate * samples, samples)
    assert steps == [FIRST_STEPS, GROWTH * FIRST_STEPS, GROWTH ** 2 * FIRST_STEPS, want, want]
    assert want * BATCH * rate == pytest.approx(20.0, rel=0.02)
    # a tab twice as fast gets twice the steps once measured
    factory.observe("web-fast", rate / 2 * BATCH, BATCH)
    factory.last_steps["web-fast"] = want
    assert factory.sized_steps("web-fast") == min(round(20.0 / (rate / 2 * BATCH)), MAX_UNIT_SHARDS * SHARD // BATCH)
    # the later units' model version is the job's own (fp32) blob
    assert issue(factory, "web-slow", base, "browser").model_version == base.blob


def test_bounds(tmp_path):
    factory, _, base, _, _ = make(tmp_path, unit_seconds=60.0)
    # very slow: never less than one step
    factory.observe("web-crawl", 1000.0, BATCH)
    assert factory.sized_steps("web-crawl") == 1
    # very fast: at most MAX_UNIT_SHARDS shards' worth of samples (and the growth cap)
    factory.observe("web-gpu", 1e-4 * BATCH, BATCH)
    factory.last_steps["web-gpu"] = 10**6
    cap = MAX_UNIT_SHARDS * SHARD // BATCH
    assert factory.sized_steps("web-gpu") == cap
    unit = issue(factory, "web-gpu", base, "browser")
    assert unit.local_steps == cap and len(unit.shard_ids) == SHARDS   # all the shards there are
    # --local-steps fixes every unit's steps, tabs' too: no sizing, no slice, no fp16 copy
    factory2, _, base2, _, _ = make(tmp_path / "b", unit_seconds=60.0, local_steps=3)
    for speed in (None, 1e-4):
        if speed is not None:
            factory2.observe("web-gpu", speed * BATCH, BATCH)
        unit = issue(factory2, "web-gpu", base2, "browser")
        assert unit.local_steps == 3 and unit.model_version == base2.blob
        assert [factory2.size_of(s) for s in unit.shard_ids] == [SHARD]
    # unit_seconds none: tabs get the default units, like Python workers
    factory3, _, base3, _, _ = make(tmp_path / "c", unit_seconds=None)
    unit = issue(factory3, "web-new", base3, "browser")
    assert unit.local_steps == math.ceil(SHARD / BATCH) and unit.model_version == base3.blob
    with pytest.raises(ValueError, match="unit_seconds"):
        CoordinatorConfig(state=tmp_path, unit_seconds=0.0)


def test_replicated_checks_keep_units_short(tmp_path):
    """With checks on, no unit of a worker that may be checked has more than check_max_steps steps (two honest
    computations of a longer one drift apart past the check's tolerance): a fast tab's units are cut to it, a
    Python worker's too, and --local-steps; the operator's own workers' (never checked) are not."""
    factory, _, base, _, _ = make(tmp_path, unit_seconds=60.0, replication="adaptive", check_max_steps=3,
                                  shards_per_unit=2)
    factory.observe("web-gpu", 1e-4 * BATCH, BATCH)
    factory.last_steps["web-gpu"] = 10**6
    assert factory.sized_steps("web-gpu") == 3
    assert issue(factory, "web-gpu", base, "browser").local_steps == 3
    assert issue(factory, "py-1", base, "python").local_steps == 3     # 2 shards of 64 at 16: 8 steps otherwise
    off, _, base_off, _, _ = make(tmp_path / "off", shards_per_unit=2)
    assert issue(off, "py-1", base_off, "python").local_steps == 2 * SHARD // BATCH
    assert factory.sized_steps("web-gpu", trusted=True) > 3, "the operator's own (never checked): not cut"
    assert issue(factory, "py-1", base, "python", trusted=True).local_steps == 2 * SHARD // BATCH
    long, _, base_long, _, _ = make(tmp_path / "long", replication="adaptive", check_max_steps=3, local_steps=9)
    assert issue(long, "py-1", base_long, "python").local_steps == 3
    assert issue(long, "py-1", base_long, "python", trusted=True).local_steps == 9


def test_the_claim_a_result_may_make_is_the_units_samples(tmp_path):
    factory, store, base, state, _ = make(tmp_path)
    delta = encode_delta(get_codec("fp16"), {k: np.zeros_like(v) for k, v in state.items()})
    for worker, backend in (("web-claim", "browser"), ("py-claim", "python")):
        unit = issue(factory, worker, base, backend)
        samples = unit.local_steps * unit.batch_size
        assert row(store, unit)["samples"] == samples        # what the intake bounds num_samples by

        def result(n: int, unit: WorkUnit = unit, worker: str = worker) -> UnitResult:
            return UnitResult(unit_id=unit.unit_id, lease=unit.lease, worker_id=worker,
                              base_version=unit.model_version, delta=delta, loss_before=2.3, loss_after=2.2,
                              num_samples=n, compute_seconds=1.0)
        check_result(unit, result(samples))
        with pytest.raises(ContractError, match="num_samples"):
            check_result(unit, result(samples + 1))


def test_slices_never_enter_the_queue_and_fp16_copies_are_dropped_when_done(tmp_path):
    factory, store, base, state, clock = make(tmp_path)
    first = issue(factory, "web-a", base, "browser")
    half = first.model_version
    # the lease ends: the slice does not go back in line (it is an extra), the job's shards do
    clock.t = first.deadline + 1
    assert factory.expire() == 1
    assert not set(factory.retrying()) & set(first.shard_ids)
    # another first unit on a newer version: the old fp16 copy (its unit no longer out) is deleted
    newer = Base(1, store.put_blob(encode_delta(get_codec("fp32"), {k: v + 1 for k, v in state.items()})))
    second = issue(factory, "web-b", newer, "browser")
    assert second.model_version not in (half, newer.blob)
    assert store.blob_path(half) is None and store.blob_path(second.model_version) is not None
    # while its unit is out, a newer version's first unit keeps it
    newest = Base(2, store.put_blob(encode_delta(get_codec("fp32"), {k: v + 2 for k, v in state.items()})))
    issue(factory, "web-c", newest, "browser")
    assert store.blob_path(second.model_version) is not None
    # slices rotate over the shards, one blob per shard, and a new factory on the same store knows them
    slices = {issue(factory, f"web-{i}", newest, "browser").shard_ids[0] for i in range(SHARDS + 2)}
    assert len(slices) == SHARDS
    factory.flush(force=True)   # as the job does on close (saves are at most every FIRST_SAVE_S)
    again = UnitFactory(factory.config, factory.recipe, store, b"k" * 32, factory.shard_sizes, 10**7, clock)
    assert all(again.size_of(s) == BATCH for s in slices)


def test_the_list_of_fp16_copies_is_saved_at_most_every_first_save_s_and_on_flush(tmp_path):
    """One copy per version, each saved when made and when first named: the list's JSON was written twice
    per version. Now at most every FIRST_SAVE_S: the job flushes at each settle (once due) and on close."""
    factory, store, base, state, clock = make(tmp_path)
    saved = lambda: store.get_meta("first_units")["half"]
    issue(factory, "web-a", base, "browser")   # the slice it cuts is saved at once, then its copy is made
    assert base.blob in factory.half and base.blob not in saved()   # within FIRST_SAVE_S: put off
    factory.flush()
    assert base.blob not in saved()                                   # a settle's flush: not before FIRST_SAVE_S
    factory.flush(force=True)
    assert saved() == json.loads(json.dumps(factory.half))          # on close: the list as it is
    newer = Base(1, store.put_blob(encode_delta(get_codec("fp32"), {k: v + 1 for k, v in state.items()})))
    issue(factory, "web-b", newer, "browser")
    assert newer.blob in factory.half and newer.blob not in saved()
    clock.t += FIRST_SAVE_S
    factory._sweep_half(keep=newer.blob)                              # (once per new copy: it saves the list)
    assert newer.blob in saved()                                      # FIRST_SAVE_S later: saved at once


# --- Python workers: the batch split over the workers in flight (``unit_batch_workers``) -------------------
def split_factory(tmp_path, **overrides):
    """As ``make``, at a recipe batch of 256 (the default job's unit batch) on shards of 1,024 images."""
    global SHARD
    old, SHARD = SHARD, 1024
    try:
        factory, store, base, state, clock = make(tmp_path, **overrides)
    finally:
        SHARD = old
    factory.recipe = Recipe(batch_size=256, lr=0.2)
    return factory, base, clock


def test_python_units_split_their_batch_over_the_workers_in_flight(tmp_path):
    factory, base, clock = split_factory(tmp_path)
    lone = [issue(factory, f"w{i}", base, "python") for i in range(2)]
    assert [(u.batch_size, u.local_steps) for u in lone] == [(256, 4)] * 2      # two workers: the recipe's units
    for i in range(2, 8):                                                      # eight workers ask
        schedule = lr_at(factory.committed(0) / factory.budget, factory.recipe)
        unit = issue(factory, f"w{i}", base, "python")
    assert (unit.batch_size, unit.local_steps) == (64, 16)                     # 256 * 2 / 8, the same samples
    assert math.isclose(unit.hyper["lr"], schedule * 64 / 256, rel_tol=1e-9)   # scaled with the split (unit_lr)
    assert factory.store.unit(unit.unit_id)["samples"] == 64 * 16
    for i in range(8, 40):
        unit = issue(factory, f"w{i}", base, "python")
    assert unit.batch_size == 32                                               # never below MIN_SPLIT_BATCH
    clock.t += 10_000                                                          # they all went quiet
    unit = issue(factory, "w0", base, "python")
    assert (unit.batch_size, factory.in_flight(clock.t)) == (256, 1)


@pytest.mark.parametrize("rule, scale", [("split", 64 / 256), ("linear", 64 / 256), ("recipe", 1.0)])
def test_unit_lr_rule_of_a_split_unit(tmp_path, rule, scale):
    factory, base, _ = split_factory(tmp_path, unit_lr=rule)
    for i in range(8):
        schedule = lr_at(factory.committed(0) / factory.budget, factory.recipe)
        unit = issue(factory, f"w{i}", base, "python")
    assert unit.batch_size == 64 and math.isclose(unit.hyper["lr"], schedule * scale, rel_tol=1e-9)


def test_the_split_is_off_with_an_explicit_batch_or_the_option(tmp_path):
    for overrides in ({"batch_size": 256}, {"unit_batch_workers": False}):
        factory, base, _ = split_factory(tmp_path / str(len(overrides)) / next(iter(overrides)), **overrides)
        units = [issue(factory, f"w{i}", base, "python") for i in range(8)]
        assert {u.batch_size for u in units} == {256}, overrides


def test_dynamic_steps_cut_a_slow_workers_unit_to_the_fastest_ones_time(tmp_path):
    """``--dynamic-steps``: a Python worker k times slower than the fastest one in flight trains 1/k of a whole
    unit's steps (at least one); unknown speed, or the option off, a whole unit."""
    whole = SHARD // BATCH   # one pass over one shard
    for on in (False, True):
        factory, _, base, _, _ = make(tmp_path / str(on), dynamic_steps=on)
        assert issue(factory, "new", base, "python").local_steps == whole   # speed not known yet
        for worker, rate in (("fast", 0.01), ("half", 0.02), ("quarter", 0.04), ("crawl", 10.0)):
            issue(factory, worker, base, "python")   # in flight: it asked
            factory.observe(worker, rate * SHARD, SHARD)
        steps = {w: issue(factory, w, base, "python").local_steps for w in ("fast", "half", "quarter", "crawl")}
        want = {"fast": whole, "half": whole // 2, "quarter": whole // 4, "crawl": 1} if on else \
            dict.fromkeys(steps, whole)
        assert steps == want, (on, steps)
        unit = issue(factory, "half", base, "python")
        assert factory.store.unit(unit.unit_id)["samples"] == unit.local_steps * unit.batch_size


def test_flight_samples_shrink_python_units_as_more_workers_are_in_flight(tmp_path):
    """``--flight-samples F``: with N workers in flight a Python worker's unit trains about F / N samples of its
    shard (at least one step), and claims what it trains; fewer than F / shard workers, or the option off, a
    whole shard; ``--local-steps`` fixes the steps whatever F."""
    whole = SHARD // BATCH
    for flight in (None, 2 * SHARD):
        factory, store, base, _, clock = make(tmp_path / str(flight), flight_samples=flight)
        lone = [issue(factory, f"w{i}", base, "python") for i in range(2)]
        assert [u.local_steps for u in lone] == [whole] * 2                     # 2 in flight: 2 shards' worth
        clock.t += 1.0                                                           # (in_flight prunes once a second)
        crowd = [issue(factory, f"w{i}", base, "python") for i in range(2, 8)]  # 8 in flight
        want = whole if flight is None else whole * 2 // 8                       # F / 8 = a quarter of a shard
        assert crowd[-1].local_steps == want, (flight, [u.local_steps for u in crowd])
        assert store.unit(crowd[-1].unit_id)["samples"] == want * BATCH
        for i in range(8, 200):
            clock.t += 1.0
            unit = issue(factory, f"w{i}", base, "python")
        assert unit.local_steps == (whole if flight is None else 1)              # 200 in flight: one step at least
        clock.t += 10_000                                                         # they all went quiet
        assert issue(factory, "w0", base, "python").local_steps == whole
    factory, _, base, _, _ = make(tmp_path / "fixed", flight_samples=SHARD, local_steps=3)
    assert {issue(factory, f"w{i}", base, "python").local_steps for i in range(8)} == {3}


def test_a_worker_with_a_shrunk_unit_counts_in_flight_for_a_few_of_that_units_durations(tmp_path):
    """A worker that left stops counting as in flight after ``IN_FLIGHT_UNITS`` durations of the unit it got,
    not of a whole shard: with ``--flight-samples`` shrinking units, a fleet under churn is not overcounted."""
    from coordinator.factory import IN_FLIGHT_MIN_S, IN_FLIGHT_UNITS
    factory, _, base, _, clock = make(tmp_path, flight_samples=2 * SHARD)
    rate = 4 * IN_FLIGHT_MIN_S / SHARD            # seconds per sample: a whole shard takes 4 x IN_FLIGHT_MIN_S
    for i in range(8):
        factory.observe(f"w{i}", rate * SHARD, SHARD)
        issue(factory, f"w{i}", base, "python")   # the first ones get more: fewer were in flight yet
    clock.t += 1.0                                # (in_flight prunes once a second)
    again = [issue(factory, f"w{i}", base, "python") for i in range(8)]
    assert {u.local_steps * u.batch_size for u in again} == {SHARD // 4}   # 8 in flight: a quarter shard each
    got = SHARD // 4
    clock.t += IN_FLIGHT_UNITS * rate * got + 1.0  # past 3 of its quarter-shard units, within 3 whole shards
    assert IN_FLIGHT_UNITS * rate * got + 1.0 < IN_FLIGHT_UNITS * rate * SHARD
    assert factory.in_flight(clock.t) == 0        # all went quiet: none counted (a shard's window kept all 8)
    assert issue(factory, "w0", base, "python").local_steps == SHARD // BATCH


def test_unit_momentum_replaces_the_recipes_in_every_unit(tmp_path):
    """``--unit-momentum``: every unit's ``hyper.momentum``, a Python worker's or a tab's; without it the recipe's."""
    factory, _, base, _, _ = make(tmp_path / "recipe")
    assert issue(factory, "w", base, "python").hyper["momentum"] == Recipe().momentum
    factory, _, base, _, _ = make(tmp_path / "set", unit_momentum=0.5)
    assert {issue(factory, w, base, b).hyper["momentum"] for w, b in (("w", "python"), ("tab", "browser"))} == {0.5}
