"""Version deltas (contract/versions.py, coordinator/factory.py ``_download``, worker_py/runner.py):
a unit's base sent as a compressed difference from a model version the worker says it holds,
rebuilt by the worker and checked by hash. The browser's side is checked against the same golden
files by worker_web/test/contract.test.mjs (run by tests/test_js_contract.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from contract.codecs import decode_delta, encode_delta, get_codec
from contract.errors import ContractError
from contract.shards import encode_shard
from contract.units import UnitRequest, WorkUnit, blob_id
from contract.versions import make_version_delta, reconstruct, reconstruct_checked, version_blob
from coordinator.config import CoordinatorConfig
from coordinator.factory import Base, UnitFactory
from coordinator.store import Store
from models.recipe import Recipe
from worker_py.runner import Runner

GOLDEN = Path(__file__).resolve().parent / "golden"


def test_golden_version_delta_rebuilds_the_named_reconstruction_and_refuses_the_rest():
    doc = json.loads((GOLDEN / "version_delta.json").read_text())
    held = decode_delta((GOLDEN / doc["held"]).read_bytes())
    state = reconstruct_checked(held, (GOLDEN / "version_delta.bin").read_bytes(), doc["reconstruction_sha256"])
    for name, want in doc["reconstructed"].items():
        assert np.array_equal(state[name].ravel(), np.array(want["values"], np.float32))
    for case in doc["invalid"]:
        other = decode_delta((GOLDEN / case["held"]).read_bytes()) if "held" in case else held
        with pytest.raises(ContractError) as e:
            reconstruct_checked(other, bytes.fromhex(case["hex"]), doc["reconstruction_sha256"])
        assert e.value.field == case["field"], case["name"]


def test_the_reconstruction_is_close_and_a_zip_bomb_is_refused():
    rng = np.random.default_rng(0)
    held = {"w": rng.normal(0, 0.1, (64, 3, 3, 3)).astype(np.float32), "b": np.zeros(0, np.float32)}
    target = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(np.float32) for k, v in held.items()}
    blob, recon = make_version_delta(held, target)
    step = np.sqrt(np.mean((target["w"] - held["w"]) ** 2)) / 2      # the quantiser's step: RMS / 2
    assert np.abs(recon["w"] - target["w"]).max() <= step / 2 * 1.0001
    assert len(blob) < 0.2 * len(version_blob(target))
    with pytest.raises(ContractError) as e:
        reconstruct({"w": held["w"][:1], "b": held["b"]}, blob)       # not the tensors it was made for
    assert e.value.field.startswith("delta.tensors[w]")
    import zlib
    with pytest.raises(ContractError) as e:
        reconstruct(held, zlib.compress(bytes(50_000_000)))          # inflates far beyond a model's size
    assert e.value.field == "version_delta" and "inflated" in str(e.value)


def test_unit_request_held_and_unit_base_delta_are_checked():
    bid = blob_id(b"x")
    assert UnitRequest.from_json({"protocol": 1, "worker_id": "w", "backend": "python", "held": [bid]}).held == (bid,)
    for held, field in (([bid] * 5, "request.held"), (["nope"], "request.held[0]"), ("x", "request.held")):
        with pytest.raises(ContractError) as e:
            UnitRequest.from_json({"protocol": 1, "worker_id": "w", "backend": "python", "held": held})
        assert e.value.field == field
    unit = json.loads((GOLDEN / "unit.json").read_text())
    assert "base_delta" not in WorkUnit.from_json(unit).to_json()
    with_delta = WorkUnit.from_json({**unit, "base_delta": {"from": bid, "blob": bid}})
    assert with_delta.to_json()["base_delta"] == {"from": bid, "blob": bid}
    for bad, field in (({"from": bid}, "unit.base_delta.blob"), ({"from": bid, "blob": bid, "x": 1}, "unit.base_delta.x"),
                       ([bid], "unit.base_delta")):
        with pytest.raises(ContractError) as e:
            WorkUnit.from_json({**unit, "base_delta": bad})
        assert e.value.field == field


def make(tmp_path, **overrides):
    cfg = CoordinatorConfig(state=tmp_path / "state", model="cnn", shard_size=64, **overrides)
    store = Store(tmp_path / "state")
    rng = np.random.default_rng(1)
    shard = store.put_blob(encode_shard(rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8),
                                        rng.integers(0, 10, 64, dtype=np.uint8)))
    states = [{"w": rng.normal(0, 0.1, (200, 30)).astype(np.float32), "bn.running_var": np.ones(30, np.float32)}]
    for _ in range(3):
        states.append({k: (v + rng.normal(0, 1e-3, v.shape)).astype(np.float32) for k, v in states[-1].items()})
    bases = [Base(i, store.put_blob(encode_delta(get_codec("fp32"), s))) for i, s in enumerate(states)]
    factory = UnitFactory(cfg, Recipe(batch_size=16, lr=0.05), store, b"k" * 32, {shard: 64}, budget=10**7,
                          clock=lambda: 1000.0)
    return factory, store, bases, states, shard


class StoreClient:
    """The parts of ``worker_py.client.Client`` a ``Runner`` uses, reading blobs from the store (and
    counting the bytes it "downloads")."""

    def __init__(self, store: Store) -> None:
        self.store, self.cache, self.got, self.logged = store, None, [], []

    def fetch_blob(self, bid: str) -> bytes:
        data = self.store.get_blob(bid)
        self.got.append((bid, len(data)))
        return data

    def bytes_of(self, bid: str) -> int:
        return sum(n for b, n in self.got if b == bid)

    def retry(self, call, stop=None):
        return call()

    def log(self, text: str) -> None:
        self.logged.append(text)


def test_a_worker_that_holds_a_version_gets_a_delta_and_rebuilds_the_unit_base(tmp_path):
    factory, store, bases, states, _ = make(tmp_path)
    client = StoreClient(store)
    runner = Runner(client, "py-1")
    # nothing held: the whole version as fp16
    first = factory.make("py-1", "fp16", bases[0], 0, backend="python", held=runner.held())
    assert first.base_delta is None and first.model_version != bases[0].blob
    runner.prepare(first)
    assert runner.held() == (first.model_version,)
    assert client.bytes_of(first.model_version) < 0.6 * len(version_blob(states[0]))
    # two versions later: a version delta from what it holds, rebuilt exactly as the coordinator made it
    unit = factory.make("py-1", "fp16", bases[2], 0, backend="python", held=runner.held())
    assert unit.base_delta == {"from": first.model_version, "blob": unit.base_delta["blob"]}
    prepared = runner.prepare(unit)
    assert prepared.error is None and client.bytes_of(unit.model_version) == 0
    assert client.bytes_of(unit.base_delta["blob"]) < 0.15 * len(version_blob(states[2]))
    coordinator_view = decode_delta(store.get_blob(unit.model_version))   # what replicas and checks read
    for name, value in states[2].items():
        assert np.array_equal(prepared.base[name], coordinator_view[name])
        assert np.abs(prepared.base[name] - value).max() < 1e-3
    # it holds that reconstruction now: at the same version it downloads nothing
    again = factory.make("py-1", "fp16", bases[2], 0, backend="python", held=runner.held())
    assert again.model_version == unit.model_version and again.base_delta is None
    # a held id the coordinator does not know as a model version (a shard, a made-up id): the whole version
    for held in ((factory.shard_sizes and next(iter(factory.shard_sizes)),), (blob_id(b"?"),)):
        other = factory.make("py-2", "fp16", bases[3], 0, backend="python", held=held)
        assert other.base_delta is None and decode_delta(store.get_blob(other.model_version))["w"].shape == (200, 30)


def test_a_worker_that_lies_about_what_it_holds_fails_the_hash_check_and_downloads_the_base(tmp_path):
    factory, store, bases, states, _ = make(tmp_path)
    client = StoreClient(store)
    runner = Runner(client, "liar")
    first = factory.make("liar", "fp16", bases[0], 0, backend="python")
    runner.prepare(first)
    # it holds the fp16 copy of version 0 and says it holds version 0 itself (a liar, or a corrupt memory)
    runner._states[bases[0].blob] = runner._states.pop(first.model_version)
    unit = factory.make("liar", "fp16", bases[1], 0, backend="python", held=runner.held())
    assert unit.base_delta["from"] == bases[0].blob
    prepared = runner.prepare(unit)   # its fp16 copy + the delta is not the base: refused, then fetched whole
    assert prepared.error is None and "version delta not usable" in client.logged[-1]
    assert "unit.model_version" in client.logged[-1]
    assert blob_id(version_blob(prepared.base)) == unit.model_version


def test_fp32_keeps_the_whole_version(tmp_path):
    factory, _, bases, _, _ = make(tmp_path, version_download="fp32")
    unit = factory.make("py-1", "fp16", bases[1], 0, backend="python", held=(bases[0].blob,))
    assert unit.model_version == bases[1].blob and unit.base_delta is None


def test_replicated_checks_keep_the_blob_a_held_result_was_computed_from(tmp_path, monkeypatch):
    """With checks on, units still come as fp16 copies or version deltas; a replica names the blob its
    original trained from (no delta: its worker may hold nothing), and that blob outlives the sweeps
    while the original's result is held, then goes like any other."""
    import coordinator.factory as F

    factory, store, bases, _, _ = make(tmp_path, replication="adaptive")
    first = factory.make("py-1", "fp16", bases[0], 0, backend="python")
    assert first.model_version != bases[0].blob and first.base_delta is None          # the fp16 copy
    unit = factory.make("py-1", "fp16", bases[1], 0, backend="python", held=(first.model_version,))
    assert unit.base_delta is not None and unit.base_delta["from"] == first.model_version   # a version delta
    fake = store.put_blob(b"a delta")
    for u in (first, unit):
        store.add_result(u.unit_id, "py-1", u.base_step, 0, 16, 2.3, 2.2, 1.0, fake, check_state="held")
    assert factory.checked_bases() == {first.model_version, unit.model_version}
    replica = factory.replicate("py-2", store.unit(unit.unit_id))
    assert replica.model_version == unit.model_version and replica.base_delta is None
    assert (replica.shard_ids, replica.seed, replica.local_steps) == (unit.shard_ids, unit.seed, unit.local_steps)
    # every deadline long past, nothing kept for re-use: the held results' bases stay all the same
    monkeypatch.setattr(F, "DERIVED_KEPT", 0)
    monkeypatch.setattr(F, "HALF_KEPT", 0)
    factory.clock = lambda: 1e12
    store.expire_leases(1e12)   # the replica's lease too
    factory._sweep_derived()
    factory._sweep_half(keep="another version")
    assert store.blob_path(unit.model_version) is not None and store.blob_path(first.model_version) is not None
    # once the checks are settled (here: dropped), the next sweeps delete them
    store.mark_dropped([(r["seq"], "replica") for r in store.held_results()])
    assert factory.checked_bases() == set()
    factory._sweep_derived()
    factory._sweep_half(keep="another version")
    assert store.blob_path(unit.model_version) is None and store.blob_path(first.model_version) is None


def test_a_new_version_delta_is_not_swept_before_its_unit_names_it(tmp_path, monkeypatch):
    """With more reconstructions than DERIVED_KEPT all named by units still out, the one just made was the
    only one past its (zero) deadline and was deleted at once: the unit named blobs that were gone (the
    simulator's KeyError with 32 workers)."""
    import coordinator.factory as F

    monkeypatch.setattr(F, "DERIVED_KEPT", 1)
    factory, store, bases, _, _ = make(tmp_path)
    factory.make("a", "fp16", bases[0], 0, backend="python")            # the factory knows version 0
    units = [factory.make(w, "fp16", bases[k], 0, backend="python", held=(bases[0].blob,))
             for w, k in (("a", 1), ("b", 2), ("c", 3))]
    for unit in units:
        assert unit.base_delta is not None
        assert store.blob_path(unit.model_version) is not None and store.blob_path(unit.base_delta["blob"]) is not None
