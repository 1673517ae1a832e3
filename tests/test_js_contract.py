"""worker_web/contract.js (the browser's side of the wire contract) against the Python reference.

- ``node --test worker_web/test/``: the JavaScript tests against the golden files.
- Cross-language properties through ``worker_web/test/codec_cli.mjs``: random deltas (empty,
  scalar and odd shapes; exact ties in |x|; subnormal, huge and fp16-boundary values; float64
  input) encoded by both languages must be byte-identical, or refused naming the same field;
  JavaScript decodes Python's containers to the same float32 bits; corrupted containers, work
  units, result bodies, codec strings and data shards get the same verdict in both languages.

Skipped (with the reason) only when ``node`` 20 or newer is not installed.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from contract.codecs import decode_delta, get_codec, spec_of
from contract.errors import ContractError
from contract.shards import decode_shard, encode_shard
from contract.units import UnitResult, WorkUnit, pack_result, unpack_result

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
CLI = ROOT / "worker_web" / "test" / "codec_cli.mjs"
NODE = shutil.which("node")
CODECS = ["fp32", "fp16", "int8", "topk", "topk:0.1", "topk:0.5", "topk:1", "topk:0.3333"]


def _node_major() -> int:
    if NODE is None:
        return 0
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return int(out.lstrip("v").split(".")[0] or 0)


NODE_MAJOR = _node_major()
pytestmark = [
    pytest.mark.skipif(NODE_MAJOR < 20, reason="node is not installed (worker_web/contract.js is tested with node >= 20)" if NODE is None
                       else f"node >= 20 is needed for worker_web/contract.js, found v{NODE_MAJOR}"),
    # numpy's overflow warnings from the Python reference on extreme inputs (which are part of the test)
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def run_cli(requests: list[dict]) -> list[dict]:
    """Answers of codec_cli.mjs, one per request; fails on anything but a ContractError in JS."""
    run = subprocess.run([NODE, str(CLI), "-"], input=json.dumps(requests), capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, f"codec_cli.mjs failed (exit {run.returncode}):\n{run.stderr}"
    answers = json.loads(run.stdout)
    assert len(answers) == len(requests)
    crashes = [(r, a["crash"]) for r, a in zip(requests, answers) if "crash" in a]
    assert not crashes, f"JavaScript threw something other than ContractError: {crashes[:3]}"
    return answers


def py_verdict(call) -> tuple[str, object]:
    """("ok", value) or ("error", (field, code)) of a Python call."""
    try:
        return "ok", call()
    except ContractError as e:
        return "error", (e.field, e.code)


def js_error(answer: dict) -> tuple[str, str] | None:
    return (answer["error"]["field"], answer["error"]["code"]) if "error" in answer else None


# --- the node tests -----------------------------------------------------------------------------

def test_node_contract_tests_pass():
    run = subprocess.run([NODE, "--test", "worker_web/test/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        pytest.fail(f"node --test worker_web/test/ failed (exit {run.returncode}):\n{run.stdout[-20000:]}\n{run.stderr[-5000:]}",
                    pytrace=False)


# --- random deltas ------------------------------------------------------------------------------

SHAPES = [(), (0,), (0, 3), (1,), (2,), (3,), (7,), (3, 5), (2, 3, 3, 3), (1, 1, 1), (17, 13), (1000,)]
NAMES = ["conv.weight", "fc.bias", "0", "12", "a/b:c-d_e.9", "x" * 256, "layer1.0.bn.running_var"]


def random_values(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """n values of one flavour, as float32 (float64 for "float64")."""
    if kind == "normal":
        return rng.normal(0, 0.1, n).astype(np.float32)
    if kind == "ties":          # few distinct magnitudes: many exact ties in |x|, zeros of both signs
        return rng.choice(np.array([-2, -1, -0.5, -0.0, 0, 0.5, 1, 2], np.float32) * np.float32(0.25), n)
    if kind == "extreme":       # every binade of float32, subnormals included, and the largest float32
        mags = 10.0 ** rng.uniform(-45, 38.5, n)
        x = (mags * rng.choice([-1, 1], n)).astype(np.float32)
        x[rng.random(n) < 0.1] = np.float32(3.4028235e38)
        return x
    if kind == "fp16":          # halfway cases and subnormals of binary16, and values near 65504
        k = rng.integers(-3000, 3000, n)
        picks = np.stack([1 + k * 2.0**-11, k * 2.0**-25, 65504 - np.abs(k) * 2.0**-3, k * 2.0**-14 / 3,
                          (k % 64) * 2.0**-29])
        return picks[rng.integers(0, 5, n), np.arange(n)].astype(np.float32)
    if kind == "int8":          # max |x| = 127: x / scale hits exact .5 quotients
        x = (rng.integers(-254, 255, n) / 2).astype(np.float32)
        if n:
            x[rng.integers(n)] = rng.choice([-127, 127])
        return x
    if kind == "tiny":          # max |x| so small that max|x| / 127 underflows or loses bits
        return (rng.integers(-200, 201, n) * 2.0**-149).astype(np.float32)
    if kind == "float64":       # not float32-representable: both sides round to float32 first
        return rng.normal(0, 1, n) * 10.0 ** rng.integers(-50, 50, n)
    raise ValueError(kind)


KINDS = ["normal", "ties", "extreme", "fp16", "int8", "tiny", "float64"]


def random_deltas(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    deltas = []
    for kind in KINDS:
        for shape in SHAPES:
            names = list(rng.choice(NAMES, size=int(rng.integers(1, 4)), replace=False))
            delta = {}
            for i, name in enumerate(names):
                s = shape if i == 0 else SHAPES[int(rng.integers(len(SHAPES) - 1))]
                delta[str(name)] = random_values(rng, int(np.prod(s, dtype=np.int64)), kind).reshape(s)
            deltas.append(delta)
    deltas.append({"w": np.array([1, -3, 2, 3, -2, 3], np.float32)})               # ties in |x| for topk
    deltas.append({"w": np.array([65519.99], np.float32), "v": np.ones(2, np.float32)})   # fp16 overflow
    deltas.append({"w": np.array([1.0, np.nan], np.float32)})                       # refused by every codec
    deltas.append({"w": np.array([1e39, 1.0])})                                    # float64 -> inf in float32
    return deltas


def tensors_arg(delta: dict[str, np.ndarray]) -> list:
    out = []
    for name, x in delta.items():
        kind = "f8" if x.dtype == np.float64 else "f4"
        out.append([name, list(x.shape), kind, b64(np.ascontiguousarray(x, "<" + kind).tobytes())])
    return out


def test_js_encoding_is_byte_identical_to_python_and_python_decodes_it():
    deltas = random_deltas()
    cases = [(codec, delta) for delta in deltas for codec in CODECS]
    answers = run_cli([{"op": "encode", "codec": codec, "tensors": tensors_arg(delta)} for codec, delta in cases])
    encoded = 0
    for (codec, delta), answer in zip(cases, answers):
        verdict, value = py_verdict(lambda: get_codec(codec).encode(delta))
        where = f"{codec} of {[(k, v.shape, v.dtype.name) for k, v in delta.items()]}"
        if verdict == "error":
            assert js_error(answer) == value, f"{where}: Python refuses with {value}, JavaScript says {answer}"
            continue
        assert "ok" in answer, f"{where}: Python encodes, JavaScript refuses: {answer}"
        js_bytes = unb64(answer["ok"])
        assert js_bytes == value, f"{where}: bytes differ"
        out = get_codec(codec).decode(js_bytes, spec_of(delta))    # and Python reads what JavaScript wrote
        assert list(out) == list(delta)
        encoded += 1
    assert encoded > 0.7 * len(cases)


def test_js_decodes_python_containers_to_the_same_float32_bits():
    containers = []
    for delta in random_deltas(1):
        for codec in CODECS:
            verdict, data = py_verdict(lambda: get_codec(codec).encode(delta))
            if verdict == "ok":
                containers.append((codec, delta, data))
    requests = [{"op": "decode", "data": b64(data), "codec": codec,
                 "spec": [[k, list(v.shape), "float32"] for k, v in delta.items()]} for codec, delta, data in containers]
    for (codec, delta, data), answer in zip(containers, run_cli(requests)):
        assert "ok" in answer, f"{codec}: JavaScript refuses Python's container: {answer}"
        expected = decode_delta(data)
        assert [name for name, _, _ in answer["ok"]] == list(expected)
        for name, shape, values in answer["ok"]:
            assert tuple(shape) == expected[name].shape
            assert unb64(values) == expected[name].astype("<f4").tobytes(), f"{codec} {name}: values differ"


# --- same verdict on malformed input --------------------------------------------------------------

def _mutations(rng: np.random.Generator, data: bytes, count: int) -> list[bytes]:
    """Corrupted copies: random bytes, JSON-significant characters in the header, cuts, extensions."""
    head_end = 8 + int.from_bytes(data[4:8], "little")
    out = []
    for _ in range(count):
        b = bytearray(data)
        how = rng.integers(5)
        if how == 0:
            for _ in range(int(rng.integers(1, 4))):
                b[int(rng.integers(len(b)))] = int(rng.integers(256))
        elif how == 1 and head_end > 8:
            for _ in range(int(rng.integers(1, 3))):
                b[int(rng.integers(8, min(head_end, len(b))))] = ord(rng.choice(list('0123456789.,:[]{}"eE-+ tfnul\\')))
        elif how == 2:
            b = b[: int(rng.integers(len(b)))]
        elif how == 3:
            b += bytes(int(rng.integers(1, 9)))
        elif how == 4 and len(b) > head_end + 4:     # payload bytes: NaN/Inf, -128, broken indices
            i = int(rng.integers(head_end, len(b) - 3))
            b[i : i + 4] = bytes(rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x80\x80\x80\x80",
                                              b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x7c\x00\xfc"]))
        out.append(bytes(b))
    return out


def test_corrupted_containers_get_the_same_verdict():
    rng = np.random.default_rng(2)
    blobs = [get_codec(c).encode(d) for d in random_deltas(3)[::3] for c in CODECS
             if all(np.isfinite(v).all() and np.abs(v).max(initial=0) < 6e4 for v in d.values())]
    samples = [m for data in blobs for m in _mutations(rng, data, 6)]
    samples += [(GOLDEN / p).read_bytes() for p in sorted(p.relative_to(GOLDEN) for p in GOLDEN.rglob("*.bin"))]
    answers = run_cli([{"op": "decode", "data": b64(s)} for s in samples])
    accepted = 0
    for data, answer in zip(samples, answers):
        with np.errstate(over="ignore"):
            verdict, value = py_verdict(lambda: decode_delta(data))
        if verdict == "error":
            assert js_error(answer) == value, f"Python refuses with {value}, JavaScript says {answer} for {data[:80]!r}"
            continue
        accepted += 1
        assert "ok" in answer, f"Python decodes, JavaScript refuses: {answer} for {data[:80]!r}"
        assert [n for n, _, _ in answer["ok"]] == list(value)
        for name, shape, values in answer["ok"]:
            assert tuple(shape) == value[name].shape and unb64(values) == value[name].astype("<f4").tobytes()
    assert 0 < accepted < len(samples)


def _unit() -> dict:
    return json.loads((GOLDEN / "unit.json").read_text())


UNIT_VALUES = [0, 1, -1, 2.0, 2.5, -0.0, 0.0, 1e-300, 10**400, 2**31 - 1, 2**31, 2**53, 2**53 + 1, 16, 17, 65536,
               65537, 100000, 100001, True, False, None, "", "x", "a/b", "int8", "topk:0.5", "topk:1.5", "ce", "focal",
               "0" * 64, "A" * 64, "a" * 129, "~" * 1024, [], ["0" * 64], ["0" * 64, 1], {}, {"lr": 0.1}, 1767225600.5]


def test_work_unit_validation_agrees():
    rng = np.random.default_rng(4)
    texts = [json.dumps(_unit())]
    for _ in range(400):
        unit = _unit()
        how = rng.integers(6)
        key = str(rng.choice(list(unit)))
        value = UNIT_VALUES[int(rng.integers(len(UNIT_VALUES)))]
        if how <= 2:
            unit[key] = value
        elif how == 3:
            del unit[key]
        elif how == 4:
            unit[str(rng.choice(["colour", "delta", "hyper2"]))] = value
        else:
            hk = str(rng.choice(["lr", "momentum", "nesterov", "weight_decay", "label_smoothing", "loss", "focal_gamma",
                                 "crop_pad", "flip", "warmup"]))
            unit["hyper"] = {**unit["hyper"], hk: value} if rng.random() < 0.8 else {hk: value}
        texts.append(json.dumps(unit))
    bid = "ab" * 32   # a version delta's fields (docs/protocol.md): valid, null, and broken
    for bd in ({"from": bid, "blob": bid}, None, {"blob": bid, "from": bid}, {"from": bid}, {"from": bid, "blob": 7},
               {"from": bid, "blob": bid, "x": 1}, [bid], bid, {}):
        texts.append(json.dumps({**_unit(), "base_delta": bd}))
    for ef in (True, False, None, 1, 0, "true", [True]):   # error feedback allowed (docs/protocol.md): a bool or absent
        texts.append(json.dumps({**_unit(), "error_feedback": ef}))
        texts.append(json.dumps({**_unit(), "base_delta": {"from": bid, "blob": bid}, "error_feedback": ef}))
    for how in ("browser", "python", None, "gpu", 1, ["browser"]):   # a replica for another backend's worker
        texts.append(json.dumps({**_unit(), "compute_as": how}))
        texts.append(json.dumps({**_unit(), "error_feedback": True, "compute_as": how}))
    answers = run_cli([{"op": "unit", "text": t} for t in texts])
    ok = 0
    for text, answer in zip(texts, answers):
        verdict, value = py_verdict(lambda: WorkUnit.from_json(json.loads(text)))
        if verdict == "error":
            assert js_error(answer) == value, f"Python refuses with {value}, JavaScript says {answer} for {text}"
        else:
            ok += 1
            assert answer.get("ok") == json.loads(json.dumps(value.to_json())), f"{answer} for {text}"
    assert 0 < ok < len(texts)


def _random_text(rng: np.random.Generator) -> str:
    alphabet = list("abc xyz") + ['"', "\\", "/", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "\u2028", "€", "😀", "'"]
    return "".join(rng.choice(alphabet, size=int(rng.integers(1, 40))))


def _random_float(rng: np.random.Generator) -> float:
    picks = [float(rng.random() * 10), 0.0, 1e-5, 1e-4, 1e16, 1e15, 9999999999999998.0, 2.302585, 5e-324,
             float(rng.integers(0, 1000)), float(rng.random() * 10.0 ** rng.integers(-30, 300)), 0.1 + 0.2, 1 / 3]
    return picks[int(rng.integers(len(picks)))]


def _meta(d: dict) -> dict:
    """Result metadata with its float fields as floats (JSON from JavaScript writes 1e+21 as an integer)."""
    return {k: float(v) if k in ("loss_before", "loss_after", "compute_seconds") else v for k, v in d.items()}


def test_result_bodies_agree():
    rng = np.random.default_rng(5)
    delta = (GOLDEN / "delta_int8.bin").read_bytes()
    base = json.loads((GOLDEN / "result.json").read_text())
    results = []
    for i in range(150):
        failed = rng.random() < 0.3
        fields = {**base, "loss_before": _random_float(rng), "loss_after": _random_float(rng),
                  "compute_seconds": _random_float(rng), "num_samples": int(rng.integers(0, 2**53)),
                  "error": _random_text(rng) if failed else None}
        fields.pop("protocol")
        results.append(UnitResult(**fields, delta=b"" if failed else delta))
    bodies = [pack_result(r) for r in results]
    requests = [{"op": "pack", "meta": json.dumps(r.to_json()), "delta": b64(r.delta)} for r in results]
    requests += [{"op": "unpack", "data": b64(b)} for b in bodies]
    mutated = [m for b in bodies[:40] for m in _mutations(rng, b, 5)]
    requests += [{"op": "unpack", "data": b64(m)} for m in mutated]
    answers = run_cli(requests)
    packs, unpacks, rest = answers[: len(results)], answers[len(results) : 2 * len(results)], answers[2 * len(results) :]
    for result, body, packed, unpacked in zip(results, bodies, packs, unpacks):
        assert unb64(packed["ok"]) == body, f"{result.to_json()}: JavaScript packs\n{unb64(packed['ok'])[:300]!r}"
        assert _meta(unpacked["ok"]["meta"]) == result.to_json() and unb64(unpacked["ok"]["delta"]) == result.delta
    for body, answer in zip(mutated, rest):
        verdict, value = py_verdict(lambda: unpack_result(body))
        if verdict == "error":
            assert js_error(answer) == value, f"Python refuses with {value}, JavaScript says {answer} for {body[:200]!r}"
        else:
            assert _meta(answer["ok"]["meta"]) == value.to_json() and unb64(answer["ok"]["delta"]) == value.delta


def test_error_feedback_agrees():
    """worker_web/feedback.js against worker_py/feedback.py: the same sequence of deltas through error
    feedback gives byte-identical uploads and bit-identical residuals (float32 d + r and difference),
    for every codec and flavour of values, or the same refusal."""
    from worker_py.feedback import feedback_step

    rng = np.random.default_rng(7)
    cases = []
    for kind in KINDS:
        for shapes in ([(7,), (3, 5)], [(1000,)], [(2, 3, 3, 3), ()], [(0,), (17, 13)]):
            names = [str(n) for n in rng.choice(NAMES, size=len(shapes), replace=False)]
            steps = [{n: random_values(rng, int(np.prod(s, dtype=np.int64)), kind).reshape(s)
                      for n, s in zip(names, shapes)} for _ in range(int(rng.integers(2, 7)))]
            for codec in ("fp32", "fp16", "int8", "topk", "topk:0.1", "topk:0.5"):
                cases.append((codec, steps))
    same = [np.full(4, 0.25, np.float32)] * 8   # constant deltas: top-k rotates through every coordinate
    cases += [("topk:0.25", [{"w": x} for x in same]), ("int8", [{"w": np.array([1.0, np.nan], np.float32)}])]
    answers = run_cli([{"op": "feedback", "codec": codec, "deltas": [tensors_arg(d) for d in steps]}
                       for codec, steps in cases])

    def python(codec, steps):
        residual, sent = None, []
        for d in steps:
            data, residual = feedback_step(get_codec(codec), d, residual)
            sent.append(data)
        return sent, residual

    compared = 0
    for (codec, steps), answer in zip(cases, answers):
        verdict, value = py_verdict(lambda: python(codec, steps))
        where = f"{codec} over {len(steps)} deltas of {[(k, v.shape, v.dtype.name) for k, v in steps[0].items()]}"
        if verdict == "error":
            assert js_error(answer) == value, f"{where}: Python refuses with {value}, JavaScript says {answer}"
            continue
        assert "ok" in answer, f"{where}: Python runs, JavaScript refuses: {answer}"
        sent, residual = value
        assert [unb64(x) for x in answer["ok"]["sent"]] == sent, f"{where}: uploads differ"
        js_residual = {name: np.frombuffer(unb64(x), "<f4") for name, x in answer["ok"]["residual"]}
        assert list(js_residual) == list(residual), where
        for name, r in residual.items():
            assert js_residual[name].tobytes() == r.astype("<f4").ravel().tobytes(), f"{where}: residual {name} differs"
        compared += 1
    assert compared > 0.7 * len(cases)


def test_codec_strings_agree():
    texts = ["fp32", "fp16", "int8", "topk", "topk:0.05", "topk:0.01", "topk:1", "topk:1.0", "topk:0.125", "topk: 0.5 ",
             "topk:0.1_25", "topk:1_0", "topk:_1", "topk:1__0", "topk:inf", "topk:-inf", "topk:nan", "topk:", "topk::",
             "fp32:", "int8:3", "topk:0x1", "topk:1e-3", "topk:+.5", "topk:5.", "topk:.5e1", "TOPK", "zip", "",
             "topk:-0.5", "topk:0", "topk:1e-400", "topk:0.3333333333333333", "topk:1e0", "topk:\t0.2\n", "topk:0.2 x"]
    answers = run_cli([{"op": "codec", "text": t} for t in texts])
    for text, answer in zip(texts, answers):
        verdict, value = py_verdict(lambda: get_codec(text))
        if verdict == "error":
            assert js_error(answer) == value, f"{text!r}: Python refuses with {value}, JavaScript says {answer}"
        else:
            got = answer.get("ok")
            assert got and (got["id"], got["name"], got["ratio"]) == (value.id, value.name, value.ratio), f"{text!r}: {answer}"
            assert got["fraction"] == getattr(value, "fraction", None)


def test_shards_agree():
    rng = np.random.default_rng(6)
    blobs = [encode_shard(rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8), rng.integers(0, 10, n))
             for n, h, w in [(1, 1, 1), (3, 4, 5), (7, 32, 32)]]
    samples = blobs + [m for b in blobs for m in _mutations(rng, b, 10)]
    for b in blobs:
        samples += [b[:4] + (0).to_bytes(4, "little") + b[8:], b[:-1] + bytes([10])]
    for data, answer in zip(samples, run_cli([{"op": "shard", "data": b64(s)} for s in samples])):
        verdict, value = py_verdict(lambda: decode_shard(data))
        if verdict == "error":
            assert js_error(answer) == value, f"Python refuses with {value}, JavaScript says {answer}"
        else:
            x, y = value
            got = answer["ok"]
            assert (got["n"], got["h"], got["w"]) == x.shape[:1] + x.shape[2:]
            assert unb64(got["x"]) == x.tobytes() and list(unb64(got["y"])) == y.tolist()


def test_a_tabs_worker_key_is_what_the_coordinator_takes():
    """contract.js WORKER_KEY_HEADER / WORKER_KEY_RE / newWorkerKey against contract/units.py: the same header, the
    same keys valid, and a tab's fresh keys (random each time) valid in Python."""
    from contract.units import WORKER_KEY_HEADER, WORKER_KEY_RE

    keys = ["A" * 22, "a" * 21, "x" * 128, "x" * 129, "abc-DEF_123-456-789-0xyz", "has space in it 0123456789",
            "plus+slash/equals=0123456", "é" * 30, ""]
    first, second = run_cli([{"op": "worker_key", "keys": keys}] * 2)
    assert first["ok"]["header"] == WORKER_KEY_HEADER
    assert first["ok"]["valid"] == [WORKER_KEY_RE.fullmatch(k) is not None for k in keys] == \
        [True, False, True, False, True, False, False, False, False]
    fresh = [first["ok"]["fresh"], second["ok"]["fresh"]]
    assert all(WORKER_KEY_RE.fullmatch(k) and len(k) == 32 for k in fresh) and fresh[0] != fresh[1], fresh


def test_a_lying_tab_tells_the_lies_of_the_python_liars():
    """worker_web/lies.mjs (drive.mjs --lie) against coordinator/sim/faults.py: sign flip, scale and free
    ride give the same float32 values as ``lie``; noise has the same law (10x the honest RMS, unrelated to the
    honest delta; its own generator), and so has band (each tensor at cosine ``BAND_COSINE`` with the honest one,
    its norm kept); replay sends the first delta again, as a ``Liar`` does."""
    from coordinator.sim.faults import BAND_COSINE, LIE_FACTOR, LIES, Fault, lie

    [names] = run_cli([{"op": "lies"}])
    assert names["ok"] == [f.value for f in LIES]   # the tab tells every lie the Python liars tell, by the same name
    rng = np.random.default_rng(3)
    deltas = [{"conv.weight": rng.normal(0, 1e-2, (8, 3, 3, 3)).astype(np.float32),
               "fc.bias": rng.normal(0, 1e-3, (10,)).astype(np.float32), "scalar": np.float32(rng.normal())}
              for _ in range(3)]
    kinds = ["sign_flip", "scale", "free_ride", "noise", "replay", "band"]
    answers = run_cli([{"op": "lie", "kind": k, "seed": 5, "deltas": [tensors_arg(d) for d in deltas]} for k in kinds])
    said = {k: [{name: np.frombuffer(unb64(x), "<f4").reshape(shape) for name, shape, x in sent} for sent in a["ok"]]
            for k, a in zip(kinds, answers)}
    for kind in ("sign_flip", "scale", "free_ride"):
        for honest, js in zip(deltas, said[kind]):
            want = lie(honest, Fault(kind))
            assert list(js) == list(want) and all(js[n].tobytes() == want[n].tobytes() for n in want), kind
    flat = lambda d: np.concatenate([np.ravel(v).astype(np.float64) for v in d.values()])  # noqa: E731
    for honest, js in zip(deltas, said["noise"]):
        h, n = flat(honest), flat(js)
        rms_h, rms_n = np.sqrt(np.mean(h * h)), np.sqrt(np.mean(n * n))
        assert 0.8 * LIE_FACTOR * rms_h < rms_n < 1.2 * LIE_FACTOR * rms_h          # 10x the honest scale
        assert abs(float(h @ n) / (np.linalg.norm(h) * np.linalg.norm(n))) < 0.3    # not the honest direction
    assert not np.array_equal(flat(said["noise"][0]), flat(said["noise"][1]))       # fresh noise per unit
    for js in said["replay"]:
        assert all(js[n].tobytes() == np.asarray(deltas[0][n], np.float32).tobytes() for n in deltas[0])
    cos = lambda a, b: float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
    for honest, js in zip(deltas, said["band"]):
        py = lie(honest, Fault.BAND, seed=5)
        for name in ("conv.weight", "fc.bias"):   # (a scalar cannot turn: sent as it is, by both)
            h = np.ravel(honest[name]).astype(np.float64)
            for sent in (np.ravel(js[name]).astype(np.float64), np.ravel(py[name]).astype(np.float64)):
                assert cos(h, sent) == pytest.approx(BAND_COSINE, abs=1e-5), name
                assert np.linalg.norm(sent) == pytest.approx(np.linalg.norm(h), rel=1e-5), name
        assert js["scalar"].tobytes() == py["scalar"].tobytes() == np.float32(honest["scalar"]).tobytes()


def test_a_lying_tab_colludes_a_little_as_the_python_liar_does():
    """lies.mjs ``a_little``: per coordinate mean - z std of its newest 8 honest deltas, as faults.py ``a_little``
    with z = ``a_little_z(3, 1)``; a lone tab sends its first unit honest (two deltas make a spread)."""
    from coordinator.sim.faults import a_little, a_little_z

    rng = np.random.default_rng(4)
    deltas = [{"conv.weight": rng.normal(0, 1e-2, (4, 3, 3, 3)).astype(np.float32),
               "fc.bias": rng.normal(0, 1e-3, (10,)).astype(np.float32)} for _ in range(11)]
    [answer] = run_cli([{"op": "lie", "kind": "a_little", "deltas": [tensors_arg(d) for d in deltas]}])
    said = [{name: np.frombuffer(unb64(x), "<f4").reshape(shape) for name, shape, x in sent} for sent in answer["ok"]]
    assert all(said[0][n].tobytes() == deltas[0][n].tobytes() for n in deltas[0])   # first: honest
    z = a_little_z(3, 1)
    for k in range(1, len(deltas)):
        want = a_little(deltas[max(0, k - 7):k + 1], z)   # the newest 8, this one included
        for n in want:
            np.testing.assert_allclose(said[k][n], want[n], rtol=1e-6, atol=1e-9, err_msg=f"unit {k}, {n}")
        assert not np.allclose(said[k]["conv.weight"], deltas[k]["conv.weight"])   # not what it computed


def test_a_label_flipping_tab_trains_on_the_next_class():
    """drive.mjs --lie label_flip serves the page a worker.js whose training shards are decoded with labels
    (y + 1) mod 10 (lies.mjs flipLabelsSource): the rewritten line of worker.js, run as the tab runs it on a
    shard made by Python, gives faults.py ``flip_labels`` of its labels."""
    from coordinator.sim.faults import flip_labels

    rng = np.random.default_rng(7)
    y = rng.integers(0, 10, 50)
    [answer] = run_cli([{"op": "label_flip", "data": b64(encode_shard(rng.integers(0, 256, (50, 3, 32, 32),
                                                                                   dtype=np.uint8), y))}])
    assert "ok" in answer, answer
    got = np.frombuffer(unb64(answer["ok"]["y"]), np.uint8)
    assert got.tolist() == flip_labels(y.astype(np.uint8)).tolist() and not np.array_equal(got, y)
