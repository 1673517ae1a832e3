"""The wire contract: message validation, delta codecs, the golden files, import directions."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from contract import codecs
from contract.codecs import CODEC_IDS, CODECS, decode_delta, delta_norm, get_codec, spec_of, top_indices
from contract.errors import ContractError, error_body
from contract.shards import decode_shard, encode_shard
from contract.units import (PROTOCOL_VERSION, UnitRequest, UnitResult, WorkUnit, blob_id, check_result,
                            pack_result, runtime_note, staleness, unpack_result)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"


def _load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _load_make_golden()


def unit_dict(**changes) -> dict:
    return {**make_golden.example_unit().to_json(), **changes}


def result_dict(**changes) -> dict:
    return {**json.loads((GOLDEN / "result.json").read_text()), **changes}


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(0, 0.1, (8, 3, 3, 3)).astype(np.float32),
            "fc.bias": rng.normal(0, 1, 10).astype(np.float32),
            "bn.scale": np.float32(0.25) * np.ones(5, np.float32)}


def field_of(call) -> str:
    with pytest.raises(ContractError) as info:
        call()
    return info.value.field


# --- import direction ---------------------------------------------------------------------------

def test_contract_imports_neither_torch_nor_server_nor_worker():
    code = ("import contract, contract.units, contract.codecs, sys; "
            "assert not any(m.split('.')[0] in ('torch','aiohttp','coordinator','worker_py') for m in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


# --- messages -------------------------------------------------------------------------------------

def test_error_message_names_field_expectation_and_value():
    with pytest.raises(ContractError) as info:
        WorkUnit.from_json(unit_dict(hyper={"lr": -1}))
    err = info.value
    assert str(err) == "unit.hyper.lr: expected a finite number > 0, got -1"
    assert isinstance(err, ValueError)
    assert error_body(err) == {"error": {"code": "invalid", "field": "unit.hyper.lr", "message": str(err)}}


@pytest.mark.parametrize("changes, field", [
    ({"hyper": {"lr": float("nan")}}, "unit.hyper.lr"),
    ({"hyper": {"momentum": 0.9}}, "unit.hyper.lr"),
    ({"hyper": {"lr": 0.1, "momentum": 1.0}}, "unit.hyper.momentum"),
    ({"hyper": {"lr": 0.1, "loss": "mse"}}, "unit.hyper.loss"),
    ({"hyper": {"lr": 0.1, "flip": 1}}, "unit.hyper.flip"),
    ({"hyper": {"lr": 0.1, "crop_reflect": "yes"}}, "unit.hyper.crop_reflect"),
    ({"hyper": {"lr": 0.1, "flip_parity": 2}}, "unit.hyper.flip_parity"),
    ({"hyper": {"lr": 0.1, "warmup": 0.2}}, "unit.hyper.warmup"),
    ({"local_steps": 0}, "unit.local_steps"),
    ({"local_steps": 2.0}, "unit.local_steps"),
    ({"batch_size": True}, "unit.batch_size"),
    ({"seed": 2**31}, "unit.seed"),
    ({"seed": -1}, "unit.seed"),
    ({"codec": "zip"}, "unit.codec"),
    ({"codec": "topk:2"}, "unit.codec"),
    ({"codec": "int8:3"}, "unit.codec"),
    ({"model_version": "ABC"}, "unit.model_version"),
    ({"shard_ids": []}, "unit.shard_ids"),
    ({"shard_ids": ["0" * 64, "xyz"]}, "unit.shard_ids[1]"),
    ({"unit_id": "a/b"}, "unit.unit_id"),
    ({"lease": ""}, "unit.lease"),
    ({"deadline": float("inf")}, "unit.deadline"),
    ({"deadline": 10**400}, "unit.deadline"),
    ({"base_step": -1}, "unit.base_step"),
])
def test_work_unit_validation_names_the_field(changes, field):
    assert field_of(lambda: WorkUnit.from_json(unit_dict(**changes))) == field
    assert field in str(pytest.raises(ContractError, WorkUnit.from_json, unit_dict(**changes)).value)


def test_work_unit_json_round_trip_and_codec_specs():
    unit = WorkUnit.from_json(json.loads(json.dumps(unit_dict(codec="topk:0.05", deadline=1767225600))))
    assert isinstance(unit.deadline, float) and unit.shard_ids == tuple(unit_dict()["shard_ids"])
    again = WorkUnit.from_json(json.loads(json.dumps(unit.to_json())))
    assert again == unit and again.to_json() == unit.to_json()
    assert get_codec(unit.codec).fraction == 0.05
    assert [get_codec(c).name for c in ("fp16", "topk", "topk:0.05")] == ["fp16", "topk", "topk:0.05"]


def test_work_unit_json_is_a_copy_and_its_wire_text_is_made_once():
    """``to_json`` copies the unit's dicts (a caller that changes what it got changes no unit), and ``wire``,
    the text the coordinator sends and keeps, is that JSON, made once per unit."""
    unit = WorkUnit.from_json(unit_dict(base_delta={"from": "a" * 64, "blob": "b" * 64}))
    d = unit.to_json()
    d["hyper"]["lr"], d["base_delta"]["blob"] = 123.0, "c" * 64
    assert unit.hyper["lr"] == unit_dict()["hyper"]["lr"] and unit.base_delta["blob"] == "b" * 64
    assert json.loads(unit.wire) == unit.to_json() and unit.wire is unit.wire
    assert WorkUnit.from_json(json.loads(unit.wire)) == unit


def test_from_json_rejects_unknown_missing_and_other_protocols():
    assert field_of(lambda: WorkUnit.from_json(unit_dict(colour="red"))) == "unit.colour"
    d = unit_dict()
    del d["lease"]
    assert field_of(lambda: WorkUnit.from_json(d)) == "unit.lease"
    assert "nothing" in str(pytest.raises(ContractError, WorkUnit.from_json, d).value)
    with pytest.raises(ContractError) as info:
        WorkUnit.from_json(unit_dict(protocol=2, colour="red"))
    assert (info.value.field, info.value.code) == ("unit.protocol", "unsupported_protocol")
    assert field_of(lambda: WorkUnit.from_json([])) == "unit"
    assert field_of(lambda: UnitResult.from_json(result_dict(delta="AAAA"), delta=b"CTD1")) == "result.delta"


def test_unit_result_json_round_trip_and_failed_units():
    delta = (GOLDEN / "delta_int8.bin").read_bytes()
    result = UnitResult.from_json(result_dict(), delta=delta)
    assert UnitResult.from_json(json.loads(json.dumps(result.to_json())), delta=delta) == result
    assert "delta" not in result.to_json()
    failed = UnitResult.from_json(json.loads((GOLDEN / "result_error.json").read_text()))
    assert failed.error and failed.delta == b""
    no_error_key = {k: v for k, v in result_dict().items() if k != "error"}
    assert UnitResult.from_json(no_error_key, delta=delta).error is None
    assert field_of(lambda: UnitResult.from_json(result_dict())) == "result.delta"   # success needs a delta
    assert field_of(lambda: UnitResult.from_json(result_dict(error="boom"), delta=delta)) == "result.delta"
    assert field_of(lambda: UnitResult.from_json(result_dict(error=""))) == "result.error"
    assert field_of(lambda: UnitResult.from_json(result_dict(num_samples=-1), delta=delta)) == "result.num_samples"
    assert field_of(lambda: UnitResult.from_json(result_dict(loss_after=-0.5), delta=delta)) == "result.loss_after"
    assert field_of(lambda: UnitResult.from_json(result_dict(worker_id=""), delta=delta)) == "result.worker_id"


def test_unit_request_defaults_and_validation():
    req = UnitRequest.from_json({"protocol": 1, "worker_id": "w1", "backend": "browser"})
    assert req.codecs == CODEC_IDS and req.models == ()
    assert UnitRequest.from_json(req.to_json()) == req
    assert field_of(lambda: UnitRequest(worker_id="w1", backend="gpu")) == "request.backend"
    assert field_of(lambda: UnitRequest(worker_id="w1", backend="python", codecs=["gzip"])) == "request.codecs"
    assert req.error_feedback is False and "error_feedback" not in req.to_json()


def test_unit_requests_match_the_golden_file():
    """Each body of tests/golden/requests.json is accepted as the body it names (its ``to_json``, which reads back
    as the same request) or refused with its field and code; worker_web/test/contract.test.mjs checks contract.js
    against the same file. The golden file is made by tests/golden/make_golden.py, from this contract."""
    cases = json.loads((GOLDEN / "requests.json").read_text())["cases"]
    accepted = 0
    for case in cases:
        try:
            got = UnitRequest.from_json(case["body"])
        except ContractError as e:
            assert "field" in case and (e.field, e.code) == (case["field"], case["code"]), (case, e)
            continue
        assert "request" in case and got.to_json() == case["request"], case
        assert UnitRequest.from_json(case["request"]) == got
        accepted += 1
    assert 0 < accepted < len(cases)
    notes = json.loads((GOLDEN / "requests.json").read_text())["notes"]
    for case in notes:   # the note a worker makes of its text, the same in contract.js (runtimeNote)
        assert runtime_note(case["text"]) == case["note"], case
        assert case["note"] is None or UnitRequest(worker_id="w1", backend="browser", runtime_note=case["note"])
    # what a tab sends about its runtime: on the wire only when set
    tab = UnitRequest.from_json({"protocol": 1, "worker_id": "w1", "backend": "browser", "runtime": "wasm",
                                 "webgpu_check": "failed", "runtime_note": "loss 2.796 where 2.704 was expected"})
    assert (tab.runtime, tab.webgpu_check) == ("wasm", "failed")
    plain = UnitRequest(worker_id="w1", backend="python").to_json()
    assert not {"runtime", "webgpu_check", "runtime_note"} & set(plain)


def test_error_feedback_flags_are_optional_booleans_sent_only_when_true():
    """A worker that keeps an error-feedback residual says so; a unit that may carry it says so; neither
    appears on the wire otherwise, so workers and coordinators that do not know the field never see it."""
    req = UnitRequest(worker_id="w1", backend="python", error_feedback=True)
    assert req.to_json()["error_feedback"] is True and UnitRequest.from_json(req.to_json()) == req
    assert field_of(lambda: UnitRequest(worker_id="w1", backend="python", error_feedback=1)) == "request.error_feedback"
    unit = make_golden.example_unit()
    assert unit.error_feedback is False and "error_feedback" not in unit.to_json()
    on = dataclasses.replace(unit, error_feedback=True)
    assert on.to_json()["error_feedback"] is True and WorkUnit.from_json(on.to_json()) == on
    assert WorkUnit.from_json({**unit.to_json(), "error_feedback": False}) == unit
    assert field_of(lambda: WorkUnit.from_json({**unit.to_json(), "error_feedback": "yes"})) == "unit.error_feedback"


def test_replicas_of_another_backend_are_optional_fields_sent_only_when_used():
    """A Python worker that can compute a tab's unit as the tab does says so (``computes``); a replica of a
    tab's unit for it says how to compute it (``compute_as``); neither is on the wire otherwise."""
    req = UnitRequest(worker_id="w1", backend="python", computes=["browser"])
    assert req.to_json()["computes"] == ["browser"] and UnitRequest.from_json(req.to_json()) == req
    assert "computes" not in UnitRequest(worker_id="w1", backend="python").to_json()
    for bad in (["gpu"], "browser", ["browser", "python", "browser"]):
        assert field_of(lambda: UnitRequest(worker_id="w1", backend="python", computes=bad)) == "request.computes"
    unit = make_golden.example_unit()
    assert unit.compute_as is None and "compute_as" not in unit.to_json()
    replica = dataclasses.replace(unit, compute_as="browser")
    assert replica.to_json()["compute_as"] == "browser" and WorkUnit.from_json(replica.to_json()) == replica
    assert list(replica.to_json())[-2:] == ["compute_as", "protocol"]
    assert WorkUnit.from_json({**unit.to_json(), "compute_as": None}) == unit
    for bad in ("gpu", 1, ["browser"]):
        assert field_of(lambda: WorkUnit.from_json({**unit.to_json(), "compute_as": bad})) == "unit.compute_as"


def test_result_body_round_trip_and_check_against_unit():
    unit = make_golden.example_unit()
    result = unpack_result((GOLDEN / "result.bin").read_bytes())
    assert result.to_json() == result_dict()
    assert result.delta == (GOLDEN / "delta_int8.bin").read_bytes()
    assert unpack_result(pack_result(result)) == result
    check_result(unit, result)
    assert field_of(lambda: check_result(unit, dataclasses.replace(result, lease="other"))) == "result.lease"
    assert field_of(lambda: check_result(unit, dataclasses.replace(result, num_samples=10**6))) == "result.num_samples"
    body = pack_result(result)
    assert field_of(lambda: unpack_result(b"CTR2" + body[4:])) == "result.magic"
    assert field_of(lambda: unpack_result(body[:10])) == "result.metadata_length"
    length = int.from_bytes(body[4:8], "little")
    assert field_of(lambda: unpack_result(body[:8] + b"{" * length + body[8 + length :])) == "result.metadata"
    assert field_of(lambda: unpack_result(body[:8 + length] + b"\1" * 8)) in ("result.padding", "result.delta")


def test_an_unpacked_delta_and_its_decoded_tensors_are_views_of_the_body_never_of_a_mutable_buffer():
    """A result's delta is not copied out of its body (bytes), nor its fp32 tensors out of the delta
    (``copy=False``): read-only views. A bytearray body, which may change, is copied first."""
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    raw = get_codec("fp32").encode(arrays)
    body = pack_result(UnitResult(unit_id="u1", lease="l", worker_id="w1", base_version="a" * 64, delta=raw,
                                  loss_before=1.0, loss_after=0.5, num_samples=4, compute_seconds=1.0))
    result = unpack_result(body)
    assert isinstance(result.delta, memoryview) and result.delta.obj is body and result.delta == raw
    assert unpack_result(pack_result(result)) == result
    decoded = decode_delta(result.delta, spec_of(arrays), copy=False)
    for name, value in decoded.items():
        np.testing.assert_array_equal(value, arrays[name])
        assert not value.flags.writeable and np.shares_memory(value, np.frombuffer(body, np.uint8))
    assert all(v.flags.writeable for v in decode_delta(result.delta).values())   # copy=True: copies
    mutable = bytearray(body)
    copied = unpack_result(memoryview(mutable))
    assert isinstance(copied.delta, memoryview) and copied.delta.obj is not mutable and copied.delta == raw
    mutable[-4:] = b"\xff" * 4   # the caller's buffer changes; the result does not
    assert copied.delta == raw and decode_delta(copied.delta, copy=False)["b"][-1] == 1.0


def test_blob_id_and_staleness():
    assert blob_id(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert staleness(17, 20) == 3 and staleness(5, 5) == 0
    assert field_of(lambda: staleness(6, 5)) == "unit.base_step"


# --- codecs ---------------------------------------------------------------------------------------

def test_registry_covers_every_codec_id(monkeypatch):
    assert set(CODECS) == set(CODEC_IDS) and all(CODECS[i].id == i for i in CODEC_IDS)
    monkeypatch.delitem(CODECS, "int8")
    with pytest.raises(RuntimeError):
        codecs._check_registry()


def test_fp32_round_trip_is_exact():
    a = arrays()
    out = CODECS["fp32"].decode(CODECS["fp32"].encode(a), spec_of(a))
    assert list(out) == list(a)
    assert all(out[k].dtype == np.float32 and np.array_equal(out[k], a[k]) for k in a)


def test_fp16_round_trip_within_fp16_eps():
    a = arrays(1)
    out = CODECS["fp16"].decode(CODECS["fp16"].encode(a), spec_of(a))
    for k in a:
        assert out[k].dtype == np.float32 and out[k].shape == a[k].shape
        assert np.array_equal(out[k], a[k].astype(np.float16).astype(np.float32))
        assert np.all(np.abs(out[k] - a[k]) <= np.abs(a[k]) * 2.0**-11 + 2.0**-25)


def test_fp16_decode_is_exact_on_every_finite_value_and_finds_a_non_finite_one(monkeypatch):
    """Every finite binary16 value (normal, subnormal, both zeros) decodes to the exact float32, by
    numpy's cast and by torch's (used above ``FAST_CAST_MIN`` values when torch is loaded); an Inf or
    a NaN is refused at its own index, in any chunk."""
    import torch  # noqa: F401 (loaded: the fast cast's condition)
    bits = np.arange(1 << 16, dtype=np.uint16)
    finite = bits[(bits & 0x7C00) != 0x7C00].view(np.float16)
    expected = finite.astype(np.float32)
    raw = np.tile(finite, 3)   # above FAST_CAST_MIN and spanning chunks (HALF_CHUNK made small below)
    monkeypatch.setattr(codecs, "HALF_CHUNK", 40_000)
    for size in (finite.size, raw.size):
        assert (size >= codecs.FAST_CAST_MIN) == (size == raw.size)
        got = codecs.half_to_float(raw[:size])
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), np.tile(expected, 3)[:size].view(np.uint32))   # -0.0 too
    body = CODECS["fp16"].encode({"w": np.ones(raw.size, np.float32)})
    for bad, at in ((np.float16(np.inf), 150_001), (np.float16(np.nan), 7)):
        data = bytearray(body)
        start = len(body) - 2 * raw.size - codecs.padding(2 * raw.size)
        data[start + 2 * at : start + 2 * at + 2] = np.array([bad], np.float16).tobytes()
        with pytest.raises(ContractError) as e:
            decode_delta(bytes(data))
        assert e.value.field == "delta.tensors[w].values" and f"element {at}" in e.value.message


@pytest.mark.parametrize("codec_id", CODEC_IDS)
def test_decode_delta_norm_is_decode_delta_and_delta_norm_to_the_last_bit(codec_id, monkeypatch):
    """The norm summed in the decode's own pass (fp32, fp16: ``Codec.sums_squares``) or after it (int8,
    topk) is ``delta_norm`` of what ``decode_delta`` gives: the same chunks in the same order. Several
    tensors, fp16 chunks that do not end on a norm chunk, and fp32 values whose float32 squares overflow."""
    import torch  # noqa: F401 (loaded: fp16 takes the fast cast above FAST_CAST_MIN)
    monkeypatch.setattr(codecs, "HALF_CHUNK", 40_000)
    rng = np.random.default_rng(3)
    a = {"big": rng.standard_normal(150_001).astype(np.float32), "small": rng.standard_normal((3, 5)).astype(np.float32),
         "empty": np.zeros(0, np.float32), "tail": rng.standard_normal(70_000).astype(np.float32) * 1e-3}
    if codec_id == "fp32":
        a["huge"] = np.full(20_000, 1e30, np.float32)   # a float32 chunk sum overflows: summed in float64
    data = get_codec(codec_id).encode(a)
    decoded, norm = codecs.decode_delta_norm(data, spec_of(a), copy=False)
    expected = decode_delta(data, spec_of(a))
    assert list(decoded) == list(expected) and all(np.array_equal(decoded[k], expected[k]) for k in a)
    assert norm == delta_norm(expected) and math.isfinite(norm)


def test_int8_round_trip_within_half_a_step():
    a = arrays(2)
    a["zeros"] = np.zeros(3, np.float32)
    out = CODECS["int8"].decode(CODECS["int8"].encode(a), spec_of(a))
    for k in a:
        scale = np.abs(a[k]).max() / 127
        assert np.all(np.abs(out[k] - a[k]) <= scale / 2 * (1 + 1e-5) + 1e-12)
    assert np.array_equal(out["zeros"], a["zeros"])


def test_int8_that_would_decode_to_infinity_is_refused():
    # 127 * float32(3.4028235e38 / 127) rounds above the float32 maximum: the decoded value is inf
    big = {"w": np.array([3.4028235e38, 1.0], np.float32)}
    with pytest.raises(ContractError) as e:
        CODECS["int8"].encode(big)
    assert e.value.field == "delta.tensors[w].values"
    scale = np.float32(big["w"][0] / np.float32(127))   # a crafted container with that scale
    data = codecs.encode_delta(CODECS["fp32"], {"w": np.zeros(2, np.float32)})
    head = json.dumps({"codec": "int8", "tensors": [{"name": "w", "shape": [2], "dtype": "float32"}]},
                      separators=(",", ":")).encode()
    body = b"CTD1" + len(head).to_bytes(4, "little") + head + bytes(codecs.padding(8 + len(head)))
    body += np.array([scale], "<f4").tobytes() + bytes([127, 1]) + bytes(2)
    with pytest.raises(ContractError) as e:
        decode_delta(body)
    assert e.value.field == "delta.tensors[w].values"


@pytest.mark.parametrize("spec, fraction", [("topk", 0.01), ("topk:0.2", 0.2), ("topk:1", 1.0)])
def test_topk_keeps_largest_entries_exactly(spec, fraction):
    a = arrays(3)
    codec = get_codec(spec)
    out = codec.decode(codec.encode(a), spec_of(a))
    for k, x in a.items():
        kept = np.flatnonzero(out[k].ravel())
        expect = codecs.topk_count(x.size, fraction)
        assert kept.size == expect
        assert np.array_equal(out[k].ravel()[kept], x.ravel()[kept])
        dropped = np.setdiff1d(np.arange(x.size), kept)
        if dropped.size:
            assert np.abs(x.ravel()[dropped]).max() <= np.abs(x.ravel()[kept]).min()
    assert math.isclose(codec.ratio, 2 * fraction)


def test_top_indices_breaks_ties_by_lower_index():
    x = np.array([1, -3, 2, 3, -2, 3], np.float32)
    assert top_indices(x, 2).tolist() == [1, 3]
    assert top_indices(x, 4).tolist() == [1, 2, 3, 5]


def test_ratios():
    assert [CODECS[i].ratio for i in ("fp32", "fp16", "int8")] == [1.0, 0.5, 0.25]
    a = {"w": np.ones(10_000, np.float32)}
    for codec in CODECS.values():
        assert abs(len(codec.encode(a)) / 40_000 - codec.ratio) < 0.01


def test_empty_and_scalar_tensors():
    a = {"empty": np.zeros((0, 3), np.float32), "scalar": np.float32(-2.5)}
    for codec in CODECS.values():
        out = codec.decode(codec.encode(a), spec_of(a))
        assert out["empty"].shape == (0, 3) and out["scalar"].shape == () and out["scalar"] == -2.5


@pytest.mark.parametrize("codec_id", CODEC_IDS)
def test_decode_rejects_malformed_containers(codec_id):
    a = arrays(4)
    data = CODECS[codec_id].encode(a)
    assert field_of(lambda: decode_delta(data[:-1])) == "delta"
    assert field_of(lambda: decode_delta(data[:-4])) == "delta"
    assert field_of(lambda: decode_delta(data + b"\0\0\0\0")) == "delta"
    assert field_of(lambda: decode_delta(b"XTD1" + data[4:])) == "delta.magic"
    assert field_of(lambda: decode_delta(data[:3])) == "delta"
    assert field_of(lambda: decode_delta("text")) == "delta"
    wrong = dict(spec_of(a), **{"fc.bias": ((11,), "float32")})
    assert field_of(lambda: decode_delta(data, wrong)) == "delta.tensors[fc.bias].shape"
    wrong = dict(spec_of(a), **{"fc.bias": ((10,), "float16")})
    assert field_of(lambda: decode_delta(data, wrong)) == "delta.tensors[fc.bias].dtype"
    assert field_of(lambda: decode_delta(data, dict(spec_of(a), extra=((1,), "float32")))) == "delta.tensors[extra]"
    fewer = {k: v for k, v in spec_of(a).items() if k != "bn.scale"}
    assert field_of(lambda: decode_delta(data, fewer)) == "delta.tensors[bn.scale]"
    other = "fp32" if codec_id != "fp32" else "fp16"
    assert field_of(lambda: CODECS[other].decode(data)) == "delta.codec"


def test_decode_rejects_unknown_codec_nan_and_bad_headers():
    data = CODECS["fp32"].encode({"w": np.arange(4, dtype=np.float32)})
    assert field_of(lambda: decode_delta(data.replace(b'"fp32"', b'"fp64"'))) == "delta.codec"
    nan = data[:-16] + np.array([0, np.nan, 0, 0], "<f4").tobytes()
    assert field_of(lambda: decode_delta(nan)) == "delta.tensors[w].values"
    inf = data[:-16] + np.array([0, np.inf, 0, 0], "<f4").tobytes()
    assert field_of(lambda: decode_delta(inf)) == "delta.tensors[w].values"

    def container(header: object) -> bytes:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        return b"CTD1" + len(raw).to_bytes(4, "little") + raw + bytes(-len(raw) % 4) + bytes(16)

    good = {"codec": "fp32", "tensors": [{"name": "w", "shape": [4], "dtype": "float32"}]}
    assert decode_delta(container(good))["w"].tolist() == [0, 0, 0, 0]
    bad_headers = {
        b'{"codec":"fp32","codec":"fp32","tensors":[]}': "delta.header",
        b"\xff\xfe": "delta.header",
        b"[1]": "delta.header",
        json.dumps({**good, "extra": 1}).encode(): "delta.header",
    }
    for raw, field in bad_headers.items():
        assert field_of(lambda: decode_delta(container(raw))) == field
    tensor = good["tensors"][0]
    bad_entries = [
        ({**tensor, "shape": [4.0]}, "delta.tensors[w].shape"),
        ({**tensor, "shape": [-4]}, "delta.tensors[w].shape"),
        ({**tensor, "shape": [1 << 20, 1 << 20]}, "delta.tensors[w].shape"),
        ({**tensor, "dtype": "float64"}, "delta.tensors[w].dtype"),
        ({**tensor, "name": "a b"}, "delta.tensors[0].name"),
        ({**tensor, "scale": 1}, "delta.tensors[0]"),
    ]
    for entry, field in bad_entries:
        assert field_of(lambda: decode_delta(container({**good, "tensors": [entry]}))) == field
    assert field_of(lambda: decode_delta(container({**good, "tensors": [tensor, tensor]}))) == "delta.tensors[w]"
    assert field_of(lambda: decode_delta(container({**good, "tensors": []}))) == "delta.tensors"
    topk = {"codec": "topk", "tensors": [{**tensor, "k": 5}]}
    assert field_of(lambda: decode_delta(container(topk))) == "delta.tensors[w].k"
    padded = bytearray(CODECS["fp32"].encode({"abc": np.ones(1, np.float32)}))
    head_end = 8 + int.from_bytes(padded[4:8], "little")
    if head_end % 4:
        padded[head_end] = 1
        assert field_of(lambda: decode_delta(bytes(padded))) == "delta.padding"


def test_decode_never_raises_anything_but_contract_errors():
    rng = np.random.default_rng(5)
    blobs = [CODECS[c].encode(arrays(6)) for c in CODEC_IDS]
    for _ in range(400):
        data = bytearray(blobs[rng.integers(len(blobs))])
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(len(data)))
            data[i] = int(rng.integers(256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(len(data)))]
        try:
            out = decode_delta(bytes(data))
        except ContractError:
            continue
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())


def test_encode_rejects_bad_input():
    assert field_of(lambda: CODECS["fp32"].encode({})) == "delta"
    assert field_of(lambda: CODECS["fp32"].encode({"w": np.arange(3)})) == "delta[w]"
    assert field_of(lambda: CODECS["int8"].encode({"w": np.array([1, np.nan], np.float32)})) == "delta[w]"
    assert field_of(lambda: CODECS["fp16"].encode({"w": np.array([1e6], np.float32)})) == "delta[w]"
    # the edge of binary16: 65519 rounds down to its largest value 65504, 65520 rounds up to Inf
    edge = CODECS["fp16"].decode(CODECS["fp16"].encode({"w": np.array([65504, -65519, 6e-8], np.float32)}))
    assert edge["w"].tolist() == [65504, -65504, np.float32(np.float16(6e-8))]
    for x in (65520.0, -65520.0):
        assert field_of(lambda: CODECS["fp16"].encode({"w": np.array([0, x], np.float32)})) == "delta[w]"
    assert field_of(lambda: CODECS["fp32"].encode({"bad name": np.ones(1, np.float32)})) == "delta"


def test_delta_norm_is_global_l2():
    assert delta_norm({"a": np.array([3.0], np.float32), "b": np.array([[4.0]], np.float32)}) == 5.0
    a = arrays(7)
    flat = np.concatenate([np.ravel(v) for v in a.values()]).astype(np.float64)
    assert math.isclose(delta_norm(a), float(np.linalg.norm(flat)), rel_tol=1e-6)
    big = np.full(20_000, 3e19, np.float32)   # float32 squares overflow: summed again in float64
    assert math.isclose(delta_norm({"w": big}), float(np.linalg.norm(big.astype(np.float64))), rel_tol=1e-12)
    half = np.array([3.0, 4.0], np.float16)
    assert delta_norm({"w": half}) == 5.0
    bad = np.ones(10, np.float32)
    bad[3] = np.nan
    assert math.isnan(delta_norm({"w": bad}))


# --- golden files -----------------------------------------------------------------------------

def test_golden_files_are_reproduced_byte_for_byte():
    built = make_golden.build()
    on_disk = {str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*") if p.is_file() and p.suffix in (".bin", ".json")}
    assert on_disk == set(built), "stale or missing golden files: rerun tests/golden/make_golden.py"
    for rel, data in built.items():
        assert (GOLDEN / rel).read_bytes() == data, f"{rel} changed: the wire format drifted"


@pytest.mark.parametrize("name", list(make_golden.SAMPLE_CODECS))
def test_golden_deltas_decode_to_expected_values(name):
    expected = json.loads((GOLDEN / f"delta_{name}.json").read_text())
    data = (GOLDEN / f"delta_{name}.bin").read_bytes()
    assert len(data) == expected["bytes"] and blob_id(data) == expected["sha256"]
    spec = {k: (tuple(v["shape"]), "float32") for k, v in expected["decoded"].items()}
    out = get_codec(expected["codec"]).decode(data, spec)
    assert list(out) == list(expected["decoded"])
    for k, v in expected["decoded"].items():
        assert np.array_equal(out[k], np.array(v["values"], np.float32).reshape(v["shape"]))
        assert np.array_equal(np.array(expected["input"][k]["values"], np.float32), make_golden.sample()[k].ravel())


def test_golden_invalid_files_name_the_field():
    for case in json.loads((GOLDEN / "invalid.json").read_text()):
        spec = {k: (tuple(s), d) for k, (s, d) in case["spec"].items()} if "spec" in case else None
        data = (GOLDEN / case["file"]).read_bytes()
        assert field_of(lambda: decode_delta(data, spec)) == case["field"], case["file"]


def test_golden_messages_parse():
    assert WorkUnit.from_json(json.loads((GOLDEN / "unit.json").read_text())).protocol == PROTOCOL_VERSION


# --- data shards ------------------------------------------------------------------------------


def test_shard_round_trip_is_exact():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, 7)
    data = encode_shard(x, y)
    assert len(data) == 16 + 7 * (3 * 32 * 32 + 1)
    gx, gy = decode_shard(data)
    assert np.array_equal(gx, x) and np.array_equal(gy, y) and gy.dtype == np.int64


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b[:-1], "shard"),
    (lambda b: b + b"\0", "shard"),
    (lambda b: b"XXXX" + b[4:], "shard.magic"),
    (lambda b: b[:-1] + b"\x0a", "shard.labels"),
    (lambda b: b[:4] + b"\0\0\0\0" + b[8:], "shard.shape"),
])
def test_shard_errors_name_the_field(mutate, field):
    data = encode_shard(np.zeros((2, 3, 4, 4), np.uint8), np.array([1, 2]))
    with pytest.raises(ContractError) as e:
        decode_shard(mutate(data))
    assert e.value.field == field
