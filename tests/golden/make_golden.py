"""Writes the golden files of the wire contract: ``.venv/bin/python tests/golden/make_golden.py``.

- ``delta_<codec>.bin``: ``sample()`` encoded with that codec; ``delta_<codec>.json``: the codec
  string, the input, and the expected decoded values (float32 values as exact JSON numbers).
- ``edge_<name>.bin`` / ``edge_<name>.json``: the same for ``edge_sample()``, the corner cases of
  the codecs (empty and scalar tensors, fp16 halfway values and subnormals, int8 quotients that are
  exact halves, ties in |x| for topk, -0.0), so that another implementation can check its rounding.
- ``unit.json``, ``result.json``, ``result_error.json``: example messages; ``result.bin``: the
  ``POST .../result`` body of ``result.json`` with ``delta_int8.bin`` inside; ``result_error.bin``:
  the body of ``result_error.json`` (a failed unit: no delta).
- ``names.json``: display-name request bodies (``contract.names``), each with the name it is
  accepted as or the error ``field`` and ``code`` it is refused with.
- ``requests.json``: unit request bodies (``contract.units.UnitRequest``), each with the body Python
  makes of it (``to_json``) or the field and code it is refused with.
- ``version_delta.bin`` with ``version_delta.json``: a version delta (``contract.versions``) taking the
  model version ``delta_fp32.bin`` (read as a held model version) to ``version_target()``, the blob id
  and values of the reconstruction, and malformed variants with the error ``field`` they are refused with.
- ``browser_draw.json``: what a browser unit draws from its seed (``models.browser_unit``, which
  worker_web/draw.js must match draw for draw): generator values, permutations, batch orders
  across passes, augmented batches (by sha256 of their float32 bytes), dropout masks and the images' own
  coins of alternating flips (``models.flips``).
- ``invalid/*.bin`` with ``invalid.json``: malformed containers (and two spec mismatches), each
  with the error ``field`` a decoder must name.

tests/test_contract.py checks that the files decode as stated and that ``build()`` reproduces
them byte for byte (format drift fails the test); the browser's codec (worker_web/contract.js,
tested by worker_web/test/contract.test.mjs) reads the same files, the edge_* ones included.
Only rerun this after a deliberate format change (which bumps the protocol, see docs).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent
if str(GOLDEN.parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(GOLDEN.parents[1]))

from contract.codecs import get_codec  # noqa: E402
from contract.errors import ContractError  # noqa: E402
from contract.names import NAME_MAX_CHARS, NameRequest  # noqa: E402
from contract.units import UnitRequest, UnitResult, WorkUnit, blob_id, pack_result, runtime_note  # noqa: E402
from models import browser_unit as draw  # noqa: E402  (numpy only at import)
from models import flips  # noqa: E402  (numpy only)
from contract.versions import make_version_delta, version_blob  # noqa: E402

# file name -> codec string; topk keeps 7 of the kernel's 54 entries, and the 7th is a tie in |x|
SAMPLE_CODECS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "topk": "topk:0.125"}


def sample() -> dict[str, np.ndarray]:
    """The golden delta: a [2,3,3,3] kernel of values in [-0.05, 0.05] and a 4-vector."""
    i = np.arange(54)
    conv = (((i * 7919) % 101 - 50) / 1000).astype(np.float32).reshape(2, 3, 3, 3)
    bias = np.array([0.5, -0.25, 0.1, -1.0], np.float32)
    return {"conv.weight": conv, "fc.bias": bias}


# file name -> codec string for edge_sample(); "topk" keeps 1 entry per tensor (a tie in "ties")
EDGE_CODECS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "topk": "topk", "topk_half": "topk:0.5"}


def edge_sample() -> dict[str, np.ndarray]:
    """Corner cases: an empty and a scalar tensor, fp16 rounding edges, int8 and topk ties."""
    halves = np.array([1 + 2**-11, 1 + 3 * 2**-11, 2**-25, 3 * 2**-25, 1.5 * 2**-25, 2**-24, 65504,
                       -65519.99, -0.0, 6e-8, 1e-45, 2**-14 - 2**-25], np.float32)
    ties = np.array([127, 0.5, 1.5, 2.5, -0.5, -2.5, -127, 3, -3, 3, 0, -0.0], np.float32)  # int8 scale = 1
    return {"empty": np.zeros((0, 3), np.float32), "scalar": np.float32(-2.5), "halves": halves,
            "ties": ties.reshape(2, 6)}


def version_target() -> dict[str, np.ndarray]:
    """Where the golden version delta goes from ``sample()``: small moves, one tensor unchanged."""
    arrays = sample()
    i = np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3)
    return {"conv.weight": arrays["conv.weight"] + np.float32(1e-3) * np.sin(i).astype(np.float32),
            "fc.bias": arrays["fc.bias"]}


def _version_delta(held_bytes: bytes) -> dict[str, bytes]:
    """The golden version delta, its reconstruction, and malformed variants (field named)."""
    blob, recon = make_version_delta(sample(), version_target())
    cases = [{"name": "truncated", "hex": blob[:-3].hex(), "field": "version_delta"},
             {"name": "not_zlib", "hex": blob[2:].hex(), "field": "version_delta"},
             {"name": "other_held", "held": "delta_fp16.bin", "hex": blob.hex(), "field": "unit.model_version"}]
    doc = {"held": "delta_fp32.bin", "held_sha256": blob_id(held_bytes), "bytes": len(blob), "sha256": blob_id(blob),
           "reconstruction_sha256": blob_id(version_blob(recon)), "reconstructed": _tensors(recon), "invalid": cases}
    return {"version_delta.bin": blob, "version_delta.json": _json(doc)}


def _tensors(arrays: dict[str, np.ndarray]) -> dict:
    return {k: {"shape": list(v.shape), "values": [float(x) for x in v.ravel()]} for k, v in arrays.items()}


def _json(obj: object) -> bytes:
    """Indented JSON with innermost lists (shapes, values) kept on one line."""
    text = json.dumps(obj, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    return (text + "\n").encode("utf-8")


def example_unit() -> WorkUnit:
    return WorkUnit(
        job="cifar10-resnet", unit_id="u-000042", model="resnet_fast",
        model_version=blob_id(b"example model blob"), base_step=17,
        shard_ids=[blob_id(b"example shard 0"), blob_id(b"example shard 1")],
        local_steps=50, batch_size=64,
        hyper={"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005,
               "label_smoothing": 0.0, "loss": "ce", "crop_pad": 4, "flip": True},
        seed=12345, codec="int8", lease="v1.u-000042.1767225600.9f2c4e", deadline=1767225600.0,
    )


def _invalid(deltas: dict[str, bytes]) -> tuple[dict[str, bytes], list[dict]]:
    """Malformed variants of the golden containers, each with the field its error names."""
    fp32, topk, int8 = deltas["fp32"], bytearray(deltas["topk"]), bytearray(deltas["int8"])
    head = 8 + int.from_bytes(fp32[4:8], "little")
    start = head + (-head % 4)
    nan = bytearray(fp32)
    nan[start : start + 4] = np.array([np.nan], "<f4").tobytes()
    t_head = 8 + int.from_bytes(topk[4:8], "little")
    t_start = t_head + (-t_head % 4)
    topk[t_start : t_start + 8] = topk[t_start + 4 : t_start + 8] + topk[t_start : t_start + 4]
    i_head = 8 + int.from_bytes(int8[4:8], "little")
    i_bias = i_head + (-i_head % 4) + 4 + 54 + 2     # fc.bias payload: after conv's scale + 54 + pad
    int8[i_bias + 4] = 0x80                           # first int8 value of fc.bias := -128
    cases = {
        "bad_magic": (b"CTD2" + fp32[4:], "delta.magic"),
        "truncated": (fp32[:-4], "delta"),
        "trailing": (fp32 + bytes(4), "delta"),
        "short": (fp32[:6], "delta"),
        "header_length": (fp32[:4] + (10**6).to_bytes(4, "little") + fp32[8:], "delta.header_length"),
        "bad_json": (fp32[:8] + b"[" + fp32[9:], "delta.header"),
        "unknown_codec": (fp32.replace(b'"fp32"', b'"fp64"', 1), "delta.codec"),
        "nan": (bytes(nan), "delta.tensors[conv.weight].values"),
        "topk_unsorted": (bytes(topk), "delta.tensors[conv.weight].indices"),
        "int8_minus128": (bytes(int8), "delta.tensors[fc.bias].values"),
    }
    files = {f"invalid/{name}.bin": data for name, (data, _) in cases.items()}
    manifest = [{"file": f"invalid/{name}.bin", "field": f} for name, (_, f) in cases.items()]
    manifest.append({"file": "delta_fp32.bin", "spec": {"conv.weight": [[2, 3, 3, 3], "float32"],
                     "fc.bias": [[5], "float32"]}, "field": "delta.tensors[fc.bias].shape"})
    manifest.append({"file": "delta_fp32.bin", "spec": {"conv.weight": [[2, 3, 3, 3], "float32"]},
                     "field": "delta.tensors[fc.bias]"})
    return files, manifest


# display-name request bodies (contract.names): each is accepted (with the name it stands for) or refused
NAME_BODIES = [
    {"protocol": 1, "name": "Ada"}, {"protocol": 1, "name": None}, {"protocol": 1, "name": "x" * NAME_MAX_CHARS},
    {"protocol": 1, "name": "Zo\u00eb's lab \u2013 r\u00e9seau 7"}, {"protocol": 1, "name": "<script>alert(1)</script>"},
    {"protocol": 1, "name": "\U0001f600" * NAME_MAX_CHARS}, {"protocol": 1, "name": "a b"},
    {"protocol": 1, "name": "\u5b66\u7fd2\u30c1\u30fc\u30e0"}, {"name": "Ada", "protocol": 1},
    {"protocol": 1, "name": ""}, {"protocol": 1, "name": "x" * (NAME_MAX_CHARS + 1)},
    {"protocol": 1, "name": "\U0001f600" * (NAME_MAX_CHARS + 1)}, {"protocol": 1, "name": " Ada"},
    {"protocol": 1, "name": "Ada "}, {"protocol": 1, "name": "Ada\u3000"}, {"protocol": 1, "name": "\u00a0Ada"},
    {"protocol": 1, "name": "Ada\nLovelace"}, {"protocol": 1, "name": "Ada\tL"}, {"protocol": 1, "name": "A\u0000"},
    {"protocol": 1, "name": "A\u0085B"}, {"protocol": 1, "name": "evil\u202etxt.exe"}, {"protocol": 1, "name": "a\u200bb"},
    {"protocol": 1, "name": "a\u2066b"}, {"protocol": 1, "name": "\ufeffAda"}, {"protocol": 1, "name": "a\u00adb"},
    {"protocol": 1, "name": "lone \ud800"}, {"protocol": 1, "name": 7}, {"protocol": 1, "name": ["Ada"]},
    {"protocol": 1, "name": True}, {"protocol": 1}, {"name": "Ada"}, {"protocol": 2, "name": "Ada"},
    {"protocol": "1", "name": "Ada"}, {"protocol": 1, "name": "Ada", "colour": "red"}, ["Ada"], "Ada", None,
]


def name_cases() -> list[dict]:
    """Each body with Python's verdict: ``{"body", "name"}`` when accepted, ``{"body", "field", "code"}`` when not."""
    cases = []
    for body in NAME_BODIES:
        try:
            cases.append({"body": body, "name": NameRequest.from_json(body).name})
        except ContractError as e:
            cases.append({"body": body, "field": e.field, "code": e.code})
    return cases


# unit request bodies (contract.units.UnitRequest): each is accepted (as the body to_json makes of it) or refused
_R = {"protocol": 1, "worker_id": "web-0123456789abcdef", "backend": "browser"}
_HELD = ["0" * 64, "a" * 64]
REQUEST_BODIES = [
    _R, {**_R, "backend": "python", "codecs": ["fp16"], "models": ["cnn"]}, {**_R, "held": _HELD},
    {**_R, "held": []}, {**_R, "error_feedback": True}, {**_R, "error_feedback": False},
    {**_R, "backend": "python", "computes": ["browser"]}, {**_R, "runtime": "webgpu", "webgpu_check": "passed"},
    {**_R, "runtime": "wasm", "webgpu_check": "failed",
     "runtime_note": "WebGPU failed the known-answer check: loss 2.796 where 2.704 was expected"},
    {**_R, "backend": "python", "runtime": "cuda"}, {**_R, "runtime": None, "webgpu_check": None, "runtime_note": None},
    {**_R, "runtime_note": "x" * 200}, {**_R, "runtime_note": " "},
    {**_R, "held": ["0" * 64] * 5}, {**_R, "held": ["A" * 64]}, {**_R, "held": "0" * 64}, {**_R, "held": [7]},
    {**_R, "codecs": []}, {**_R, "codecs": ["gzip"]}, {**_R, "models": "cnn"}, {**_R, "error_feedback": 1},
    {**_R, "computes": ["browser", "python", "python"]}, {**_R, "computes": ["gpu"]},
    {**_R, "runtime": "gpu"}, {**_R, "runtime": "WASM"}, {**_R, "runtime": 1}, {**_R, "webgpu_check": "ok"},
    {**_R, "webgpu_check": True}, {**_R, "runtime_note": ""}, {**_R, "runtime_note": "x" * 201},
    {**_R, "runtime_note": "two\nlines"}, {**_R, "runtime_note": "r\u00e9seau"}, {**_R, "runtime_note": 7},
    {**_R, "backend": "gpu"}, {**_R, "worker_id": "a b"}, {**_R, "colour": "red"},
    {"worker_id": "w1", "backend": "browser"}, {**_R, "protocol": 2}, {"protocol": 1, "backend": "browser"},
    {**_R, "runtime": "gpu", "runtime_note": ""}, ["w1"], None,
]


# texts a worker may make a runtime note of (contract.units.runtime_note), each with the note it makes
NOTE_TEXTS = ["cpu", "WebGPU failed the known-answer check: loss 2.796 where 2.704 was expected, 1 thread",
              "  cuda:0\t(NVIDIA  H100)\n", "r\u00e9seau \u2013 \U0001f600", "a\u00a0b\u2028c\x1fd", "x" * 250, "", " \n\t "]


def request_cases() -> list[dict]:
    """Each body with Python's verdict: ``{"body", "request"}`` (its ``to_json``) or ``{"body", "field", "code"}``."""
    cases = []
    for body in REQUEST_BODIES:
        try:
            cases.append({"body": body, "request": UnitRequest.from_json(body).to_json()})
        except ContractError as e:
            cases.append({"body": body, "field": e.field, "code": e.code})
    return cases


def draw_images() -> tuple[np.ndarray, np.ndarray]:
    """Three 32x32 RGB "images" whose every pixel differs from its neighbours (a crop or a mirror
    shows), and their labels."""
    x = (np.arange(3 * 3 * 32 * 32, dtype=np.int64) * 7 % 251).astype(np.uint8).reshape(3, 3, 32, 32)
    return x, np.array([4, 9, 1], np.uint8)


def coin_images(n: int = 16) -> np.ndarray:
    """Images for the coin golden: pixel k (flat, C, H, W) of image i is (k * 7 + i * 13) % 251."""
    k, i = np.arange(3 * 32 * 32), np.arange(n)[:, None]
    return ((k * 7 + i * 13) % 251).astype(np.uint8).reshape(n, 3, 32, 32)


def browser_draw() -> dict:
    """worker_web/draw.js's draws, as models.browser_unit makes them."""
    seeds = [0, 1, 7, 2**31 - 1, 4294967295]
    out = {"mulberry32": [{"seed": s, "values": draw.Mulberry32(s).take(6).tolist()} for s in seeds]}
    out["permutation"] = [{"n": n, "seed": s, "order": draw.permutation(n, draw.Mulberry32(s))}
                          for n, s in ((1, 3), (2, 3), (10, 5), (37, 11))]
    out["batch_indices"] = [{"n": n, "steps": k, "batch": b, "seed": s,
                             "batches": draw.batch_indices(n, k, b, draw.Mulberry32(s))}
                            for n, k, b, s in ((10, 5, 4, 7), (6, 3, 6, 2), (9, 4, 2, 13))]
    x, y = draw_images()
    out["images"] = {"x_sha256": blob_id(x.tobytes()), "shape": list(x.shape), "y": y.tolist()}
    batches = []
    for pad, flip, seed, reflect, parity in ((0, False, 1, False, None), (4, True, 11, False, None),
                                             (2, False, 12, False, None), (0, True, 13, False, None),
                                             (4, True, 14, True, None), (16, False, 15, True, None),
                                             (2, True, 16, True, 0), (2, True, 16, True, 1), (0, True, 17, False, 1)):
        rng = draw.Mulberry32(seed)
        xb, yb = draw.augment_batch(x, y, [2, 0, 1, 2, 0], rng, pad, flip, reflect, parity)
        batches.append({"idx": [2, 0, 1, 2, 0], "pad": pad, "flip": flip, "seed": seed,
                        **({"reflect": True} if reflect else {}), **({"parity": parity} if parity is not None else {}),
                        "x_sha256": blob_id(xb.astype("<f4").tobytes()), "y": yb.tolist(), "next": rng()})
    out["augment_batch"] = batches
    coin_x = coin_images()
    out["image_coins"] = {"rule": "pixel k of image i is (k * 7 + i * 13) % 251", "shape": list(coin_x.shape),
                          "coins": flips.image_coins(coin_x).astype(int).tolist()}
    out["keep_mask"] = [{"n": n, "p": p, "seed": s, "mask": draw.keep_mask(n, p, draw.Mulberry32(s)).astype(int).tolist()}
                        for n, p, s in ((20, 0.3, 3), (8, 0.5, 4), (5, 0.0, 5))]
    return out


def build() -> dict[str, bytes]:
    """Every golden file: relative path -> exact bytes."""
    arrays, files, deltas = sample(), {}, {}
    for name, spec in SAMPLE_CODECS.items():
        codec = get_codec(spec)
        data = deltas[name] = codec.encode(arrays)
        files[f"delta_{name}.bin"] = data
        expected = {"codec": spec, "bytes": len(data), "sha256": blob_id(data),
                    "input": _tensors(arrays), "decoded": _tensors(codec.decode(data))}
        files[f"delta_{name}.json"] = _json(expected)
    edge = edge_sample()
    for name, spec in EDGE_CODECS.items():
        codec = get_codec(spec)
        data = codec.encode(edge)
        files[f"edge_{name}.bin"] = data
        expected = {"codec": spec, "bytes": len(data), "sha256": blob_id(data),
                    "input": _tensors(edge), "decoded": _tensors(codec.decode(data))}
        files[f"edge_{name}.json"] = _json(expected)
    unit = example_unit()
    ids = {"unit_id": unit.unit_id, "lease": unit.lease, "base_version": unit.model_version}
    result = UnitResult(**ids, worker_id="w-py-7f3a", delta=deltas["int8"], loss_before=2.302585,
                        loss_after=1.9875, num_samples=3200, compute_seconds=12.5)
    failed = UnitResult(**ids, worker_id="w-web-19bc", delta=b"", loss_before=0.0, loss_after=0.0,
                        num_samples=0, compute_seconds=0.8,
                        error="onnxruntime-web: session creation failed (out of memory)")
    files["unit.json"] = _json(unit.to_json())
    files["result.json"] = _json(result.to_json())
    files["result_error.json"] = _json(failed.to_json())
    files["result.bin"] = pack_result(result)
    files["result_error.bin"] = pack_result(failed)
    invalid, manifest = _invalid(deltas)
    files.update(invalid)
    files["invalid.json"] = _json(manifest)
    files.update(_version_delta(deltas["fp32"]))
    files["names.json"] = _json({"max_chars": NAME_MAX_CHARS, "cases": name_cases()})
    files["requests.json"] = _json({"cases": request_cases(),
                                    "notes": [{"text": t, "note": runtime_note(t)} for t in NOTE_TEXTS]})
    files["browser_draw.json"] = _json(browser_draw())
    return files


def main() -> None:
    for rel, data in build().items():
        path = GOLDEN / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path.relative_to(GOLDEN.parents[1])} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
