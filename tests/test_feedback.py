"""Error feedback for lossy upload codecs (worker_py/feedback.py; the browser's twin, worker_web/feedback.js,
is checked against it in tests/test_js_contract.py).

- The maths on tiny arrays: the residual is what the codec dropped; over many units the sum of what
  arrived tracks the sum of the true deltas within the last upload's quantum (int8) or exactly up to
  the residual (top-k); top-k with error feedback eventually sends every coordinate; fp32 is untouched.
- The worker's state: reset on a new job or other tensors, kept only for accepted results.
- The coordinator's rule: a unit may carry the residual only when the worker asked, the codec is lossy
  and replicated checks are off.
- A real ``crowdtrain worker`` process against a fake coordinator sends exactly the error-feedback
  uploads for int8 and top-k units, drops the residual of a refused result, leaves units without the
  flag alone, and sends plain deltas with ``--no-error-feedback``.
"""
from __future__ import annotations

import numpy as np
import pytest

from contract.codecs import decode_delta, encode_delta, get_codec
from contract.errors import ContractError
from coordinator.factory import UnitFactory
from tests.test_unit_sizing import make as make_factory
from tests.test_worker import FakeCoordinator, finish, model_blob, start_worker, unit
from tests.helpers.tiny_cifar import tiny_cifar10
from contract.shards import encode_shard
from contract.units import blob_id
from worker_py.feedback import ErrorFeedback, feedback_step


def int8_quantum(x: np.ndarray) -> float:
    """The int8 codec's step for a tensor: max|x| / 127 (float32)."""
    return float(np.float32(np.abs(x).max()) / np.float32(127))


# ----------------------------------------------------------------------------- the maths
def test_the_residual_is_what_the_codec_dropped():
    d = {"w": np.array([1.0, 0.3, -0.2, 0.01], np.float32), "b": np.array([0.5, -0.25], np.float32)}
    for codec in ("fp16", "int8", "topk:0.5"):
        c = get_codec(codec)
        data, r = feedback_step(c, d, None)
        assert data == encode_delta(c, d)                 # no residual yet: the plain upload
        sent = decode_delta(data)
        for name in d:
            np.testing.assert_array_equal(sent[name] + r[name], d[name])   # nothing lost between the two
        data2, r2 = feedback_step(c, d, r)                # the next unit carries what was dropped
        assert data2 == encode_delta(c, {k: d[k] + r[k] for k in d})
    _, r = feedback_step(get_codec("topk:0.5"), d, None)
    np.testing.assert_array_equal(r["w"], np.array([0, 0, -0.2, 0.01], np.float32))   # top-k dropped the two smallest
    data, r = feedback_step(get_codec("fp32"), d, {"w": np.ones(4, np.float32)})
    assert data == encode_delta(get_codec("fp32"), d) and np.array_equal(r["w"], np.ones(4))   # fp32: untouched


def test_int8_uploads_track_the_true_sum_within_one_quantum():
    rng = np.random.default_rng(0)
    c = get_codec("int8")
    true_sum, sent_sum, plain_sum, r = np.zeros(50), np.zeros(50), np.zeros(50), None
    for _ in range(200):
        d = {"w": (rng.normal(1e-4, 2e-5, 50)).astype(np.float32)}   # a steady drift below half a quantum...
        d["w"][0] = 0.05                                            # ...which one large entry sets (3.9e-4)
        quantum = int8_quantum(d["w"] + (r["w"] if r else 0))       # the step of this upload
        data, r = feedback_step(c, d, r)
        true_sum += d["w"]
        sent_sum += decode_delta(data)["w"]
        plain_sum += decode_delta(encode_delta(c, d))["w"]
        assert np.abs(true_sum - sent_sum).max() <= quantum / 2 * (1 + 1e-3)
    assert np.abs(true_sum - plain_sum)[1:].min() > 0.015        # without error feedback the drift is lost


def test_topk_with_feedback_sends_every_coordinate_and_loses_nothing():
    rng = np.random.default_rng(1)
    c = get_codec("topk:0.1")
    n = 40
    weights = np.linspace(1.0, 0.02, n).astype(np.float32)      # a few large coordinates dominate every delta
    true_sum, sent_sum, r = np.zeros(n), np.zeros(n), None
    ever, ever_plain = np.zeros(n, bool), np.zeros(n, bool)
    for _ in range(300):
        d = {"w": (weights * (1 + 0.1 * rng.standard_normal(n))).astype(np.float32)}
        data, r = feedback_step(c, d, r)
        sent = decode_delta(data)["w"]
        ever |= sent != 0
        ever_plain |= decode_delta(encode_delta(c, d))["w"] != 0
        true_sum += d["w"]
        sent_sum += sent
    assert ever.all()                        # every coordinate was sent at some point
    assert ever_plain.sum() < n // 2         # without EF the small half is never sent
    np.testing.assert_allclose(true_sum - sent_sum, r["w"], rtol=0, atol=1e-3)   # what is missing is the residual
    assert np.abs(r["w"]).max() < 0.05 * np.abs(true_sum).max()


def test_feedback_step_checks_its_input():
    c = get_codec("int8")
    with pytest.raises(ContractError, match=r"residual\[w\]"):
        feedback_step(c, {"w": np.zeros(3, np.float32)}, {"w": np.zeros(4, np.float32)})
    with pytest.raises(ContractError, match=r"delta\[w\]"):
        feedback_step(c, {"w": np.arange(3)}, None)
    with pytest.raises(ContractError, match=r"delta\[w\]"):
        feedback_step(c, {"w": np.array([1.0, np.nan], np.float32)}, None)


# ----------------------------------------------------------------------------- the worker's state
def test_residual_is_kept_only_for_accepted_results_and_reset_on_a_new_job_or_shapes():
    d = {"w": np.array([1.0, 0.3, -0.2, 0.01], np.float32)}
    ef = ErrorFeedback()
    plain = encode_delta(get_codec("int8"), d)
    assert ef.encode("job", "u1", "int8", d) == plain
    assert ef.residual == {}                                    # nothing kept before the answer
    assert ef.commit("other") is False and ef.commit("u1") is True
    kept = ef.residual["w"].copy()
    assert np.abs(kept).max() > 0
    corrected = encode_delta(get_codec("int8"), {"w": d["w"] + kept})
    assert ef.encode("job", "u2", "int8", d) == corrected
    ef.discard("u2")                                            # refused / superseded / failed: old residual stays
    np.testing.assert_array_equal(ef.residual["w"], kept)
    assert ef.encode("job", "u3", "int8", d, use=False) == plain   # a unit without the flag: plain, untouched
    assert ef.encode("job", "u4", "fp32", d) == encode_delta(get_codec("fp32"), d)
    assert ef.commit("u4") is False
    np.testing.assert_array_equal(ef.residual["w"], kept)
    assert ef.encode("job2", "u5", "int8", d) == plain           # another job: from zero
    assert ef.encode("job", "u6", "int8", {"w": d["w"][:3]}) == encode_delta(get_codec("int8"), {"w": d["w"][:3]})
    assert ef.commit("u6") and ef.residual["w"].shape == (3,)    # other shapes: from zero, then theirs
    assert ef.encode("job", "u7", "topk:0.5", {"v": d["w"]}) == encode_delta(get_codec("topk:0.5"), {"v": d["w"]})
    assert ef.commit("u7") and list(ef.residual) == ["v"]        # one residual per tensor: the old ones are gone


# ----------------------------------------------------------------------------- the coordinator's rule
@pytest.mark.parametrize("replication, codec, asked, trusted, allowed", [
    ("off", "int8", True, False, True), ("off", "topk:0.05", True, False, True), ("off", "fp16", True, False, True),
    ("off", "fp32", True, False, False), ("off", "int8", False, False, False), ("adaptive", "int8", True, False, False),
    ("adaptive", "int8", True, True, True), ("adaptive", "fp32", True, True, False)])
def test_units_carry_error_feedback_only_without_replicated_checks(tmp_path, replication, codec, asked, trusted,
                                                                   allowed):
    """With checks on, only the operator's own workers (``trusted``: --trusted-tokens), whose results are never
    checked, keep a residual."""
    factory, store, base, _, _ = make_factory(tmp_path, replication=replication)
    assert isinstance(factory, UnitFactory)
    u = factory.make("py-1", codec, base, 0, backend="python", error_feedback=asked, trusted=trusted)
    assert u.error_feedback is allowed and u.codec == codec
    assert ("error_feedback" in u.to_json()) is allowed


# ----------------------------------------------------------------------------- a real worker process
class Judging(FakeCoordinator):
    """The fake coordinator, refusing the results of the unit ids in ``refuse`` (409 too_stale)."""

    def __init__(self, *args, refuse: set[str] = frozenset(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.refuse = set(refuse)

    async def result(self, request):
        if request.match_info["uid"] in self.refuse:
            self.replies.insert(0, (409, "too_stale"))
        return await super().result(request)


def run_worker(tmp_path, blobs: list[bytes], units: list[dict], *extra: str, refuse=frozenset()):
    fake = Judging(blobs, units, refuse=refuse, finish=True).start()
    try:
        code, log = finish(start_worker(fake.url, tmp_path / f"cache{len(extra)}", "--no-progress",
                                        "--worker-id", "w-ef", *extra), timeout=120)
        return fake, code, log
    finally:
        fake.stop()


def test_a_worker_process_sends_error_feedback_uploads(tmp_path):
    data = tiny_cifar10(n_train=64, n_test=1)
    shards = [encode_shard(data.train_x[i:i + 16], data.train_y[i:i + 16]) for i in range(0, 64, 16)]
    model = model_blob("supermask_fc")
    blobs = [model, *shards]
    m, s = blob_id(model), [blob_id(x) for x in shards]
    plan = [("u1", "int8", True), ("u2", "int8", True), ("u3", "int8", True), ("u4", "int8", False),
            ("u5", "int8", True), ("u6", "topk:0.05", True), ("u7", "topk:0.05", True)]

    def units(codec_of=lambda c: c, flag=True):
        return [{**unit(uid, m, [s[i % 4]], steps=2, batch=8, codec=codec_of(codec)), "seed": 7 + i,
                 **({"error_feedback": True} if ef and flag else {})} for i, (uid, codec, ef) in enumerate(plan)]

    # the true deltas: the same units with fp32 uploads (lossless; the worker is deterministic at 1 thread)
    truth, code, log = run_worker(tmp_path, blobs, units(lambda c: "fp32", flag=False), refuse={"u2"})
    assert code == 0, log
    true = {r.unit_id: decode_delta(r.delta) for r in truth.results}
    assert list(true) == [uid for uid, _, _ in plan]

    fake, code, log = run_worker(tmp_path, blobs, units(), refuse={"u2"})
    assert code == 0, log
    assert all(r.error_feedback for r in fake.requests), "the worker says it keeps a residual"
    sent = {r.unit_id: r.delta for r in fake.results}
    residual: dict[str, np.ndarray] = {}
    corrected_units = 0
    for uid, codec, ef in plan:          # one residual throughout: same job and tensors (int8, then top-k)
        c = get_codec(codec)
        if not ef:
            assert sent[uid] == encode_delta(c, true[uid]), f"{uid}: a unit without the flag is sent as it is"
            continue
        expected, after = feedback_step(c, true[uid], residual or None)
        assert sent[uid] == expected, f"{uid}: not C(d + r)"
        corrected_units += bool(residual)
        if uid != "u2":                  # u2 was refused (too_stale): its residual is dropped, the old one stays
            residual = after
    assert corrected_units >= 4
    assert sent["u3"] != encode_delta(get_codec("int8"), true["u3"])   # the residual changed what was sent

    plain, code, log = run_worker(tmp_path, blobs, units(), "--no-error-feedback")
    assert code == 0, log
    assert not any(r.error_feedback for r in plain.requests)
    for r in plain.results:
        codec = next(c for uid, c, _ in plan if uid == r.unit_id)
        assert r.delta == encode_delta(get_codec(codec), true[r.unit_id]), f"{r.unit_id}: --no-error-feedback"


# ----------------------------------------------------------------------------- the bench's helpers
def test_upload_bench_parses_variants_and_sizes_uploads_from_the_model():
    from bench.upload_codecs import container_bytes, parse_variant
    from models import registry
    from models.local import delta_spec

    assert parse_variant("topk:0.05+ef") == ("topk:0.05", True) and parse_variant("fp16") == ("fp16", False)
    for bad in ("int9", "int8+EF", "topk:2+ef"):
        with pytest.raises(SystemExit, match="--variants"):
            parse_variant(bad)
    zeros = {k: np.zeros(shape, np.float32) for k, (shape, _) in delta_spec(registry.build("supermask_fc")).items()}
    for codec in ("fp16", "int8", "topk:0.05"):
        assert container_bytes("supermask_fc", codec) == len(encode_delta(get_codec(codec), zeros))
