"""Delta codecs and the ``CTD1`` container that carries an encoded delta on the wire.

A delta is a ``dict[str, np.ndarray]`` of float tensors (weight deltas, or supermask score
deltas). Every codec shares one interface: ``encode(arrays) -> bytes``,
``decode(data, spec=None) -> dict[str, np.ndarray]`` (float32 out) and ``ratio`` (about
how many bytes it sends per fp32 byte). The codec id travels in the container header, so
``decode_delta`` reads any container; ``codec.decode`` also insists on its own id.

Container (byte by byte in docs/protocol.md): magic ``CTD1``, uint32 LE header length,
UTF-8 JSON header ``{"codec", "tensors": [{"name", "shape", "dtype", ...}]}``, then one
payload per tensor in header order, each starting 4-byte aligned, zero padding between.
Everything is little-endian. Anything malformed raises ``ContractError``.
"""
from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from contract.errors import MISSING, ContractError, Said

MAGIC = b"CTD1"
ALIGN = 4                      # every payload starts at a multiple of 4 bytes
MAX_HEADER_BYTES = 1 << 20     # 1 MiB of JSON header at most
MAX_ELEMENTS = 1 << 28         # elements a container may declare in all (1 GiB as float32)
DTYPE = "float32"              # the only logical tensor dtype (decoded arrays are float32)
DEFAULT_TOPK_FRACTION = 0.01   # fraction of each tensor's entries that "topk" keeps
NAME_RE = re.compile(r"[A-Za-z0-9_.:/\-]{1,256}")
CODEC_IDS = ("fp32", "fp16", "int8", "topk")

Arrays = Mapping[str, np.ndarray]
Spec = Mapping[str, tuple[Sequence[int], str]]
_COMMON_KEYS = ("name", "shape", "dtype")
_HEAD = struct.Struct("<4sI")


def immutable(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    """``data`` as bytes that never change, without copying bytes or a contiguous view of bytes (a large
    result body: its delta is a view of it, and the decoded tensors views of that); anything else (a
    bytearray, a view of one) is copied."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview) and isinstance(data.obj, bytes) and data.c_contiguous:
        return data if data.format == "B" and data.ndim == 1 else data.cast("B")
    return bytes(data)


def padding(n: int) -> int:
    """Zero bytes that follow ``n`` bytes to reach the next 4-byte boundary."""
    return -n % ALIGN


def topk_count(n: int, fraction: float) -> int:
    """Entries "topk" keeps of an ``n``-element tensor: ceil(fraction * n), at least 1, at most n."""
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


CHUNK = 1 << 13   # elements per chunk of the checks and the norm: in cache, and below the size at which
                  # OpenBLAS spreads a dot product over threads (which spin on a busy machine)


def _finite(name: str, values: np.ndarray, acc: list[float] | None = None, start: int = 0) -> None:
    """Raise unless every value is finite. A chunk whose float32 sum of squares is finite holds only
    finite values (a NaN or an Inf makes the sum NaN or Inf); only a chunk whose sum is not (a
    non-finite value, or finite ones whose squares overflow) is checked value by value.
    ``acc``: add each chunk's sum of squares to ``acc[0]``, as ``delta_norm`` sums them (the same
    chunks, so the same float64 total: ``decode_delta_norm``); ``start``: where ``values`` begin in
    their tensor (a chunk boundary, for the element named in the error)."""
    flat = values.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):   # once: entering it costs as much as a chunk's dot
        for i in range(0, flat.size, CHUNK):
            c = flat[i:i + CHUNK]
            if c.dtype == np.float32:
                sq = float(np.dot(c, c))
                if math.isfinite(sq):
                    if acc is not None:
                        acc[0] += sq
                    continue
            bad = np.flatnonzero(~np.isfinite(c))
            if bad.size:
                where = Said(f"NaN or Inf at element {start + i + bad[0]}")
                raise ContractError(f"delta.tensors[{name}].values", "finite numbers", where)
            if acc is not None:   # finite values whose float32 squares overflow: exact in float64
                c = c.astype(np.float64)
                acc[0] += float(np.dot(c, c))


HALF_CHUNK = 1 << 18   # fp16 values per chunk of ``half_to_float`` (512 KiB; cast, 1 MiB, checked while in cache)
FAST_CAST_MIN = 1 << 16   # below this many values numpy's own cast is quick enough


def half_to_float(half: np.ndarray, name: str | None = None, acc: list[float] | None = None) -> np.ndarray:
    """A float32 copy of float16 values (exact either way). numpy's cast takes about 3.5 ns a value
    here (37 ms for a 10M-parameter delta); torch's takes 0.6 (F16C), so it is used when this process
    has loaded torch already (the coordinator and the Python worker do; nothing here imports it),
    through a small writable buffer (torch warns about read-only arrays such as views of a body).
    ``name``: also check that every value is finite (``_finite`` on the cast values, chunk by chunk
    while they are in cache: a non-finite fp16 value casts to a non-finite float32 one, and squares
    of fp16 values cannot overflow a chunk's float32 sum), raising ``ContractError`` for tensor
    ``name``, and add the sums of squares to ``acc`` as ``_finite`` does."""
    out = np.empty(half.shape, np.float32)
    flat, flat_out = half.reshape(-1), out.reshape(-1)
    torch = sys.modules.get("torch")
    fast = torch is not None and half.size >= FAST_CAST_MIN and hasattr(torch, "from_numpy")
    if not fast and name is None:
        np.copyto(out, half)
        return out
    if fast:
        buf = np.empty(min(half.size, HALF_CHUNK), np.float16)
        src, dst = torch.from_numpy(buf), torch.from_numpy(flat_out)
    checked = 0   # values checked so far: a multiple of CHUNK, so _finite's chunks are delta_norm's
    for i in range(0, flat.size, HALF_CHUNK):
        k = min(HALF_CHUNK, flat.size - i)
        if fast:
            buf[:k] = flat[i:i + k]
            dst[i:i + k].copy_(src[:k])
        else:
            np.copyto(flat_out[i:i + k], flat[i:i + k])
        end = i + k if i + k == flat.size else (i + k) - (i + k) % CHUNK
        if name is not None and end > checked:
            _finite(name, flat_out[checked:end], acc, checked)
            checked = end
    return out


class Codec:
    """One delta codec: packs a flat float32 tensor into a payload and back.

    Subclasses set ``id``, ``ratio`` and ``params`` (extra per-tensor header keys) and define
    ``pack``, ``payload_size`` and ``unpack``; ``check_entry`` validates the extra keys.
    """

    id: str = ""
    ratio: float = 1.0
    params: tuple[str, ...] = ()
    sums_squares = False   # ``unpack`` adds the tensor's sum of squares to ``acc`` (in its one pass)

    @property
    def name(self) -> str:
        """The codec string a work unit carries (``"int8"``, ``"topk:0.05"``); see ``get_codec``."""
        return self.id

    def encode(self, arrays: Arrays) -> bytes:
        return encode_delta(self, arrays)

    def decode(self, data: bytes, spec: Spec | None = None) -> dict[str, np.ndarray]:
        return decode_delta(data, spec, codec_id=self.id)

    def pack(self, name: str, x: np.ndarray) -> tuple[dict, bytes]:
        """(extra header keys, payload) for a flat, finite float32 tensor."""
        raise NotImplementedError

    def check_entry(self, name: str, n: int, entry: dict) -> None:
        """Validate this codec's extra header keys of one tensor."""

    def payload_size(self, n: int, entry: dict) -> int:
        raise NotImplementedError

    def unpack(self, name: str, data: bytes, offset: int, n: int, entry: dict,
               acc: list[float] | None = None) -> np.ndarray:
        """The flat float32 tensor whose payload starts at ``offset``. ``acc``: add its sum of squares
        to ``acc[0]`` as ``delta_norm`` sums them (a codec that does not, ``sums_squares`` false,
        leaves that to ``decode_delta_norm``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Fp32(Codec):
    """Lossless: n float32 values."""

    id, ratio = "fp32", 1.0
    sums_squares = True

    def pack(self, name: str, x: np.ndarray) -> tuple[dict, bytes]:
        return {}, x.astype("<f4").tobytes()

    def payload_size(self, n: int, entry: dict) -> int:
        return 4 * n

    def unpack(self, name: str, data: bytes, offset: int, n: int, entry: dict,
               acc: list[float] | None = None) -> np.ndarray:
        out = np.frombuffer(data, "<f4", n, offset).astype(np.float32, copy=False)   # a view (read-only)
        _finite(name, out, acc)
        return out


class Fp16(Codec):
    """Half precision: n IEEE binary16 values (round to nearest even)."""

    id, ratio = "fp16", 0.5
    sums_squares = True

    def pack(self, name: str, x: np.ndarray) -> tuple[dict, bytes]:
        with np.errstate(over="ignore"):
            half = x.astype("<f2")
        # an fp16 value is Inf or NaN when its five exponent bits are all ones (an integer test: numpy's
        # isfinite on float16 runs element by element in software, ~15x slower)
        if (half.view(np.uint16) & 0x7C00 == 0x7C00).any():
            raise ContractError(f"delta[{name}]", "values within the fp16 range (|x| <= 65504)",
                                Said(f"max |x| = {float(np.abs(x).max())}"))
        return {}, half.tobytes()

    def payload_size(self, n: int, entry: dict) -> int:
        return 2 * n

    def unpack(self, name: str, data: bytes, offset: int, n: int, entry: dict,
               acc: list[float] | None = None) -> np.ndarray:
        # one pass: each chunk cast, then checked finite (and its squares summed) while in cache
        return half_to_float(np.frombuffer(data, "<f2", n, offset), name, acc)


class Int8(Codec):
    """Per-tensor symmetric 8-bit: a float32 scale = max|x| / 127, then n int8 in [-127, 127].

    Encoding rounds x / scale half to even; decoding gives float32(q * scale), so each
    element is within scale / 2 of the input.
    """

    id, ratio = "int8", 0.25

    def pack(self, name: str, x: np.ndarray) -> tuple[dict, bytes]:
        peak = np.float32(np.abs(x).max()) if x.size else np.float32(0)
        scale = np.float32(peak / np.float32(127))
        if scale > 0:
            q = np.clip(np.rint(x / scale), -127, 127).astype("i1")
            with np.errstate(over="ignore"):   # an overflow is what _finite reports
                _finite(name, q.astype(np.float32) * scale)   # what decode gives must be finite too
        else:
            q = np.zeros(x.size, "i1")
        return {}, np.array([scale], "<f4").tobytes() + q.tobytes()

    def payload_size(self, n: int, entry: dict) -> int:
        return 4 + n

    def unpack(self, name: str, data: bytes, offset: int, n: int, entry: dict,
               acc: list[float] | None = None) -> np.ndarray:
        scale = np.frombuffer(data, "<f4", 1, offset)[0]
        if not (np.isfinite(scale) and scale >= 0):
            raise ContractError(f"delta.tensors[{name}].scale", "a finite number >= 0", float(scale))
        q = np.frombuffer(data, "i1", n, offset + 4)
        if n and q.min() < -127:
            raise ContractError(f"delta.tensors[{name}].values", "int8 values in [-127, 127]", -128)
        with np.errstate(over="ignore"):   # an overflow is what _finite reports
            values = q.astype(np.float32) * scale
        _finite(name, values)   # a scale near the float32 maximum can overflow to +-inf
        return values


class TopK(Codec):
    """Sparse: the ``k = topk_count(n, fraction)`` entries largest in |value| per tensor.

    Payload: k uint32 flat (C-order) indices, strictly increasing, then k float32 values.
    Ties in |value| keep the lower index. Decoding puts zeros everywhere else.
    """

    id = "topk"
    params = ("k",)

    def __init__(self, fraction: float = DEFAULT_TOPK_FRACTION) -> None:
        if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction <= 1):
            raise ContractError("codec.fraction", "a number in (0, 1]", fraction)
        self.fraction = float(fraction)
        self.ratio = 2 * self.fraction

    @property
    def name(self) -> str:
        return "topk" if self.fraction == DEFAULT_TOPK_FRACTION else f"topk:{self.fraction!r}"

    def pack(self, name: str, x: np.ndarray) -> tuple[dict, bytes]:
        idx = top_indices(x, topk_count(x.size, self.fraction))
        return {"k": int(idx.size)}, idx.astype("<u4").tobytes() + x[idx].astype("<f4").tobytes()

    def check_entry(self, name: str, n: int, entry: dict) -> None:
        k = entry["k"]
        if not (type(k) is int and 0 <= k <= n):
            raise ContractError(f"delta.tensors[{name}].k", f"an integer in [0, {n}]", k)

    def payload_size(self, n: int, entry: dict) -> int:
        return 8 * entry["k"]

    def unpack(self, name: str, data: bytes, offset: int, n: int, entry: dict,
               acc: list[float] | None = None) -> np.ndarray:
        k = entry["k"]
        idx = np.frombuffer(data, "<u4", k, offset).astype(np.int64)
        values = np.frombuffer(data, "<f4", k, offset + 4 * k).astype(np.float32)
        if k and (idx[-1] >= n or (np.diff(idx) <= 0).any()):
            raise ContractError(f"delta.tensors[{name}].indices", f"strictly increasing indices < {n}",
                                Said(f"{idx[:8].tolist()}..."))
        _finite(name, values)
        out = np.zeros(n, np.float32)
        out[idx] = values
        return out


def top_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest |x| (ties: lower index first), in O(n)."""
    n = x.size
    if k >= n:
        return np.arange(n)
    if k <= 0:
        return np.zeros(0, np.int64)
    a = np.abs(x)
    threshold = np.partition(a, n - k)[n - k]
    above = np.flatnonzero(a > threshold)
    ties = np.flatnonzero(a == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, ties]))


CODECS: dict[str, Codec] = {"fp32": Fp32(), "fp16": Fp16(), "int8": Int8(), "topk": TopK()}


def _check_registry() -> None:
    """Every declared codec id has a codec registered under that id, and nothing else is."""
    if set(CODECS) != set(CODEC_IDS) or any(CODECS[i].id != i for i in CODEC_IDS):
        raise RuntimeError(f"contract.codecs: CODEC_IDS {CODEC_IDS} do not match CODECS {sorted(CODECS)}")


_check_registry()


def get_codec(name: str) -> Codec:
    """The codec for a codec string: a codec id, or ``"topk:<fraction>"`` (e.g. ``"topk:0.05"``)."""
    if not isinstance(name, str):
        raise ContractError("codec", f"one of {', '.join(CODEC_IDS)}", name)
    codec_id, sep, arg = name.partition(":")
    if codec_id not in CODECS or (sep and codec_id != "topk"):
        raise ContractError("codec", f"one of {', '.join(CODEC_IDS)} (or topk:<fraction>)", name)
    if not sep:
        return CODECS[codec_id]
    try:
        fraction = float(arg)
    except ValueError:
        raise ContractError("codec", "topk:<fraction> with a fraction in (0, 1]", name) from None
    return TopK(fraction)


def delta_norm(arrays: Arrays) -> float:
    """Global L2 norm of all tensors together: float32 dot products over chunks of ``CHUNK`` values,
    summed in float64 (float32 rounding within a chunk: a relative error of order 1e-7; twice as fast
    as squaring in float64). A chunk whose float32 sum overflows (values beyond about 1e19) is summed
    again in float64, where the squares of float32 values are exact and cannot overflow."""
    acc = [0.0]
    for value in arrays.values():
        _sum_squares(value, acc)
    return math.sqrt(acc[0])


def _sum_squares(value, acc: list[float]) -> None:
    """Add the chunks' sums of squares of ``value`` to ``acc[0]`` (``delta_norm``'s arithmetic)."""
    v = np.asarray(value)
    flat = v.reshape(-1) if v.flags.c_contiguous else np.ravel(v)
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(0, flat.size, CHUNK):
            c = flat[i:i + CHUNK]
            sq = float(np.dot(c, c))
            if not math.isfinite(sq) and c.dtype != np.float64:
                c = c.astype(np.float64)
                sq = float(np.dot(c, c))
            acc[0] += sq


def spec_of(arrays: Arrays) -> dict[str, tuple[tuple[int, ...], str]]:
    """The decode spec (name -> (shape, "float32")) that a delta of these tensors must match."""
    return {name: (tuple(np.shape(value)), DTYPE) for name, value in arrays.items()}


def _check_name(field: str, name: object) -> str:
    if not (isinstance(name, str) and NAME_RE.fullmatch(name)):
        raise ContractError(field, f"a tensor name matching {NAME_RE.pattern}", name)
    return name


def encode_delta(codec: Codec, arrays: Arrays) -> bytes:
    """The ``CTD1`` container of ``arrays`` (float tensors, finite) under ``codec``."""
    if not isinstance(arrays, Mapping) or not arrays:
        raise ContractError("delta", "a non-empty dict of name -> float array", Said(type(arrays).__name__))
    entries, payloads, total = [], [], 0
    for name, value in arrays.items():
        _check_name("delta", name)
        x = np.asarray(value)
        if x.dtype.kind != "f":
            raise ContractError(f"delta[{name}]", "a floating-point array", Said(str(x.dtype)))
        flat = np.ascontiguousarray(x, np.float32).reshape(-1)
        if not np.isfinite(flat).all():
            raise ContractError(f"delta[{name}]", "finite values (no NaN/Inf)", Said("a NaN or Inf"))
        total += flat.size
        if total > MAX_ELEMENTS:
            raise ContractError("delta", f"at most {MAX_ELEMENTS} elements in all", Said(f"{total} or more"))
        extra, payload = codec.pack(name, flat)
        entries.append({"name": name, "shape": [int(d) for d in x.shape], "dtype": DTYPE, **extra})
        payloads.append(payload)
    header = json.dumps({"codec": codec.id, "tensors": entries}, separators=(",", ":"), allow_nan=False)
    head = header.encode("utf-8")
    parts = [_HEAD.pack(MAGIC, len(head)), head, bytes(padding(8 + len(head)))]
    for payload in payloads:
        parts += [payload, bytes(padding(len(payload)))]
    return b"".join(parts)


def strict_json(raw: bytes, field: str) -> object:
    """Parse UTF-8 JSON, rejecting duplicate keys and NaN/Infinity, as ``ContractError(field)``."""
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        out = {}
        for key, value in pairs:
            if key in out:
                raise ContractError(field, "JSON without duplicate keys", Said(f"key {key!r} twice"))
            out[key] = value
        return out

    def no_constant(token: str) -> None:
        raise ContractError(field, "JSON numbers (no NaN/Infinity)", Said(token))

    try:
        return json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except ContractError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ContractError(field, "UTF-8 JSON", Said(str(e)[:60])) from None


def _parse_header(data: bytes, length: int) -> dict:
    header = strict_json(data[8 : 8 + length], "delta.header")
    if not isinstance(header, dict) or set(header) != {"codec", "tensors"}:
        keys = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise ContractError("delta.header", "an object with exactly the keys codec, tensors", keys)
    return header


def _check_entry(codec: Codec, i: int, entry: object, seen: set[str]) -> tuple[str, tuple[int, ...], int]:
    """Validate one header tensor entry; returns (name, shape, element count)."""
    keys = (*_COMMON_KEYS, *codec.params)
    if not isinstance(entry, dict) or set(entry) != set(keys):
        got = sorted(entry) if isinstance(entry, dict) else entry
        raise ContractError(f"delta.tensors[{i}]", f"an object with exactly the keys {', '.join(keys)}", got)
    name = _check_name(f"delta.tensors[{i}].name", entry["name"])
    if name in seen:
        raise ContractError(f"delta.tensors[{name}]", "a name used once", Said("a repeated name"))
    seen.add(name)
    shape = entry["shape"]
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 1 << 31 for d in shape)):
        raise ContractError(f"delta.tensors[{name}].shape", "a list of integers >= 0", shape)
    if entry["dtype"] != DTYPE:
        raise ContractError(f"delta.tensors[{name}].dtype", repr(DTYPE), entry["dtype"])
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise ContractError(f"delta.tensors[{name}].shape", f"at most {MAX_ELEMENTS} elements", n)
    codec.check_entry(name, n, entry)
    return name, tuple(shape), n


def _check_spec(spec: Spec, shapes: dict[str, tuple[int, ...]]) -> None:
    """The header's names and shapes (all float32) against the expected ``spec``."""
    for name, (shape, dtype) in spec.items():
        if name not in shapes:
            raise ContractError(f"delta.tensors[{name}]", "present (the model has this tensor)", MISSING)
        want = np.dtype(dtype).name
        if want != DTYPE:
            raise ContractError(f"delta.tensors[{name}].dtype", repr(want), DTYPE)
        if tuple(shape) != shapes[name]:
            raise ContractError(f"delta.tensors[{name}].shape", str(list(shape)), list(shapes[name]))
    for name in shapes:
        if name not in spec:
            raise ContractError(f"delta.tensors[{name}]", "only tensors the model has", Said("an unknown tensor"))


def decode_delta_norm(data: bytes, spec: Spec | None = None,
                      copy: bool = True) -> tuple[dict[str, np.ndarray], float]:
    """``decode_delta`` and the ``delta_norm`` of what it decodes, together: the fp32 and fp16 codecs sum
    the squares in the pass that checks the values finite (fp16: while each cast chunk is in cache)
    instead of a second pass over the decoded delta. The same chunks in the same order as
    ``delta_norm``, so the same norm to the last bit."""
    acc = [0.0]
    return _decode(data, spec, None, copy, acc), math.sqrt(acc[0])


def decode_delta(data: bytes, spec: Spec | None = None, codec_id: str | None = None,
                 copy: bool = True) -> dict[str, np.ndarray]:
    """Decode a ``CTD1`` container to float32 arrays (in header order).

    ``spec`` (name -> (shape, dtype)) must match the tensors exactly when given; ``codec_id``
    restricts the codec the container may use. ``copy=False``: fp32 tensors may be read-only views
    of ``data`` (bytes or a view of bytes, so they never change) instead of copies. Raises
    ``ContractError`` on anything malformed.
    """
    return _decode(data, spec, codec_id, copy, None)


def _decode(data, spec: Spec | None, codec_id: str | None, copy: bool,
            acc: list[float] | None) -> dict[str, np.ndarray]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ContractError("delta", "bytes", Said(type(data).__name__))
    data = immutable(data)
    if len(data) < _HEAD.size:
        raise ContractError("delta", "at least 8 bytes (magic + header length)", data)
    magic, length = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ContractError("delta.magic", repr(MAGIC), Said(repr(magic)))
    if length > MAX_HEADER_BYTES or 8 + length > len(data):
        raise ContractError("delta.header_length", f"at most {min(MAX_HEADER_BYTES, len(data) - 8)}", length)
    header = _parse_header(data, length)
    name = header["codec"]
    if not isinstance(name, str) or name not in CODECS:
        raise ContractError("delta.codec", f"one of {', '.join(CODEC_IDS)}", name)
    if codec_id is not None and name != codec_id:
        raise ContractError("delta.codec", repr(codec_id), name)
    codec, tensors = CODECS[name], header["tensors"]
    if not isinstance(tensors, list) or not tensors:
        raise ContractError("delta.tensors", "a non-empty list", tensors)
    seen: set[str] = set()
    checked = [_check_entry(codec, i, entry, seen) for i, entry in enumerate(tensors)]
    if sum(n for _, _, n in checked) > MAX_ELEMENTS:
        raise ContractError("delta.tensors", f"at most {MAX_ELEMENTS} elements in all", Said("more"))
    if spec is not None:
        _check_spec(spec, {name: shape for name, shape, _ in checked})
    offsets, end = [], 8 + length + padding(8 + length)
    for entry, (_, _, n) in zip(tensors, checked):
        size = codec.payload_size(n, entry)
        offsets.append((end, size))
        end += size + padding(size)
    if len(data) != end:
        what = "truncated" if len(data) < end else "trailing bytes"
        raise ContractError("delta", f"{end} bytes (as the header says)", Said(f"{len(data)} bytes ({what})"))
    gaps = [(8 + length, offsets[0][0])] + [(o + s, o + s + padding(s)) for o, s in offsets]
    if any(bytes(data[a:b]).strip(b"\0") for a, b in gaps):
        raise ContractError("delta.padding", "zero bytes", Said("non-zero padding"))
    out = {}
    for entry, (name, shape, n), (offset, _) in zip(tensors, checked, offsets):
        values = codec.unpack(name, data, offset, n, entry, acc)
        if acc is not None and not codec.sums_squares:
            _sum_squares(values, acc)
        if copy and not values.flags.writeable:
            values = values.copy()
        out[name] = values.reshape(shape)
    return out
