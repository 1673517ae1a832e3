"""The JSON messages of the wire contract: unit request, work unit, unit result.

Each message is a frozen dataclass that validates itself in ``__post_init__`` and raises
``ContractError`` naming the field (``unit.hyper.lr: expected a finite number > 0, got -1``).
``to_json()`` gives a JSON-ready dict; ``from_json(d)`` rejects unknown and missing keys,
and checks ``protocol`` first so a newer peer gets ``unsupported_protocol``.

A result travels as one binary body (``pack_result``/``unpack_result``): magic ``CTR1``,
uint32 LE metadata length, UTF-8 JSON metadata, zero padding to 4 bytes, then the delta
container (see ``contract.codecs`` and docs/protocol.md).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field

from contract.codecs import CODEC_IDS, MAGIC as DELTA_MAGIC, get_codec, immutable, padding, strict_json
from contract.errors import MISSING, ContractError, Said

PROTOCOL_VERSION = 1
RESULT_MAGIC = b"CTR1"
MAX_META_BYTES = 1 << 16        # JSON metadata of a result body, bytes
MAX_ERROR_CHARS = 2000          # a failed unit's error text
MAX_LOCAL_STEPS = 100_000       # SGD steps in one unit
MAX_BATCH_SIZE = 65_536         # samples per step
MAX_HELD = 4                    # model versions a unit request may say it holds
BACKENDS = ("python", "browser")
RUNTIMES = ("cpu", "cuda", "wasm", "webgpu")   # what a worker's units train on (UnitRequest.runtime)
CHECK_OUTCOMES = ("passed", "failed")           # a tab's WebGPU known-answer check (UnitRequest.webgpu_check)
NOTE_RE = re.compile(r"[\x20-\x7e]{1,200}")      # UnitRequest.runtime_note: one line of printable ASCII
LOSSES = ("ce", "focal")
ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")     # job, unit and worker ids (URL-safe)
MODEL_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")   # registered model names
HEX_RE = re.compile(r"[0-9a-f]{64}")              # sha256 blob ids
LEASE_RE = re.compile(r"[\x21-\x7e]{1,1024}")     # printable ASCII, no spaces
# A worker's secret, sent in this header with its unit requests and name changes: the coordinator binds a worker
# id to the key of its first request that carries one, and from then on answers that id only with that key (403),
# so knowing an id (it is its worker's trust) is not enough to claim it. A worker without a key has an unbound id.
WORKER_KEY_HEADER = "Crowdtrain-Worker-Key"
WORKER_KEY_RE = re.compile(r"[A-Za-z0-9_\-]{22,128}")   # base64url, at least 128 bits
_FRAME = struct.Struct("<4sI")


def blob_id(data: bytes) -> str:
    """Content address of a blob (model weights, data shard): lowercase sha256 hex."""
    return hashlib.sha256(data).hexdigest()


def is_blob_id(text: object) -> bool:
    return isinstance(text, str) and HEX_RE.fullmatch(text) is not None


def runtime_note(text: str) -> str | None:
    """``text`` as a ``UnitRequest.runtime_note`` (``NOTE_RE``): runs of ASCII whitespace as one space, none at
    either end, every other character outside printable ASCII (a code point) as ``?``, at most 200 characters;
    None when nothing is left."""
    return re.sub(r"[^\x20-\x7e]", "?", re.sub(r"[\t\n\x0b\x0c\r ]+", " ", text).strip(" "))[:200] or None


def staleness(base_step: int, current_step: int) -> int:
    """How many model versions were published since the unit's base: current - base (>= 0)."""
    if base_step > current_step:
        raise ContractError("unit.base_step", f"at most the current step {current_step}", base_step)
    return current_step - base_step


# --- field checks: each returns the (normalised) value or raises ContractError -------------

def _need(ok: bool, name: str, expected: str, got: object) -> None:
    if not ok:
        raise ContractError(name, expected, got)


def _int(name: str, value: object, lo: int, hi: int) -> int:
    _need(type(value) is int and lo <= value <= hi, name, f"an integer in [{lo}, {hi}]", value)
    return value


def _num(name: str, value: object, lo: float = -math.inf, lo_open: bool = False, hi: float = math.inf,
         hi_open: bool = False, expected: str = "") -> float:
    try:
        ok = type(value) in (int, float) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        ok = False
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    _need(ok, name, expected or "a finite number", value)
    return float(value)


def _str(name: str, value: object, pattern: re.Pattern, expected: str) -> str:
    _need(isinstance(value, str) and pattern.fullmatch(value) is not None, name, expected, value)
    return value


def _bool(name: str, value: object) -> bool:
    _need(type(value) is bool, name, "true or false", value)
    return value


def _choice(name: str, value: object, options: tuple[str, ...]) -> str:
    _need(value in options, name, f"one of {', '.join(options)}", value)
    return value


def _protocol(prefix: str, value: object) -> int:
    if value != PROTOCOL_VERSION or type(value) is not int:
        raise ContractError(f"{prefix}.protocol", str(PROTOCOL_VERSION), value, code="unsupported_protocol")
    return value


# Hyperparameters a work unit may carry (the per-step keys of models.recipe.Recipe); lr is required.
HYPER = {
    "lr": lambda n, v: _num(n, v, 0, lo_open=True, expected="a finite number > 0"),
    "momentum": lambda n, v: _num(n, v, 0, hi=1, hi_open=True, expected="a number in [0, 1)"),
    "nesterov": _bool,
    "weight_decay": lambda n, v: _num(n, v, 0, expected="a finite number >= 0"),
    "label_smoothing": lambda n, v: _num(n, v, 0, hi=1, hi_open=True, expected="a number in [0, 1)"),
    "loss": lambda n, v: _choice(n, v, LOSSES),
    "focal_gamma": lambda n, v: _num(n, v, 0, expected="a finite number >= 0"),
    "crop_pad": lambda n, v: _int(n, v, 0, 16),
    "crop_reflect": _bool,   # crops padded by reflection instead of zeros (sent only when true)
    "flip": _bool,
    "flip_parity": lambda n, v: _int(n, v, 0, 1),   # flips alternate per epoch: mirror when the image's coin xor this
}


def check_hyper(prefix: str, hyper: object) -> dict:
    """A validated copy of a unit's ``hyper`` dict (known keys only, ``lr`` required)."""
    _need(isinstance(hyper, dict), prefix, "an object of hyperparameters", hyper)
    for key in hyper:
        _need(key in HYPER, f"{prefix}.{key}", f"a known hyperparameter ({', '.join(HYPER)})", Said("unknown"))
    _need("lr" in hyper, f"{prefix}.lr", "a finite number > 0", MISSING)
    return {key: HYPER[key](f"{prefix}.{key}", value) for key, value in hyper.items()}


def _from_json(cls: type, prefix: str, d: object, optional: tuple[str, ...] = (), **extra: object) -> object:
    """Build ``cls`` from a JSON dict, naming unknown or missing keys; ``protocol`` first."""
    _need(isinstance(d, dict), prefix, "a JSON object", Said(type(d).__name__))
    _protocol(prefix, d.get("protocol", MISSING))
    names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
    for key in d:
        _need(key in names, f"{prefix}.{key}", f"a known field ({', '.join(names)})", Said("an unknown field"))
    for key in names:
        _need(key in d or key in optional, f"{prefix}.{key}", "a value (required field)", MISSING)
    return cls(**d, **extra)


# --- messages ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnitRequest:
    """Body of ``POST /api/v1/units/next``: who asks, and what it can do."""

    worker_id: str
    backend: str                                  # "python" or "browser"
    codecs: tuple[str, ...] = CODEC_IDS           # codec ids the worker can encode
    models: tuple[str, ...] = ()                  # model names it can train; empty = any
    held: tuple[str, ...] = ()                    # blob ids of model versions it holds (version deltas)
    error_feedback: bool = False                  # it keeps an error-feedback residual (units may say use it)
    computes: tuple[str, ...] = ()                # other backends whose units it computes exactly as they do
    runtime: str | None = None                    # what its units train on (RUNTIMES), for the operator's eyes
    webgpu_check: str | None = None               # a tab's WebGPU known-answer check, when one ran (failed: WASM)
    runtime_note: str | None = None               # why, in its own words (a failed check's losses)
    protocol: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _protocol("request", self.protocol)
        _str("request.worker_id", self.worker_id, ID_RE, f"an id matching {ID_RE.pattern}")
        _choice("request.backend", self.backend, BACKENDS)
        _need(isinstance(self.codecs, (list, tuple)) and len(self.codecs) > 0, "request.codecs",
              "a non-empty list of codec ids", self.codecs)
        for c in self.codecs:
            _choice("request.codecs", c, CODEC_IDS)
        _need(isinstance(self.models, (list, tuple)), "request.models", "a list of model names", self.models)
        for m in self.models:
            _str("request.models", m, MODEL_RE, f"a model name matching {MODEL_RE.pattern}")
        _need(isinstance(self.held, (list, tuple)) and len(self.held) <= MAX_HELD, "request.held",
              f"a list of at most {MAX_HELD} blob ids", self.held)
        for i, bid in enumerate(self.held):
            _str(f"request.held[{i}]", bid, HEX_RE, "a sha256 hex blob id")
        _bool("request.error_feedback", self.error_feedback)
        _need(isinstance(self.computes, (list, tuple)) and len(self.computes) <= len(BACKENDS), "request.computes",
              f"a list of at most {len(BACKENDS)} backends", self.computes)
        for b in self.computes:
            _choice("request.computes", b, BACKENDS)
        if self.runtime is not None:
            _choice("request.runtime", self.runtime, RUNTIMES)
        if self.webgpu_check is not None:
            _choice("request.webgpu_check", self.webgpu_check, CHECK_OUTCOMES)
        if self.runtime_note is not None:
            _str("request.runtime_note", self.runtime_note, NOTE_RE, "1 to 200 printable ASCII characters")
        object.__setattr__(self, "computes", tuple(self.computes))
        object.__setattr__(self, "codecs", tuple(self.codecs))
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "held", tuple(self.held))

    def to_json(self) -> dict:
        d = {"protocol": self.protocol, "worker_id": self.worker_id, "backend": self.backend,
             "codecs": list(self.codecs), "models": list(self.models)}
        if self.held:
            d["held"] = list(self.held)
        if self.error_feedback:
            d["error_feedback"] = True
        if self.computes:
            d["computes"] = list(self.computes)
        for key in ("runtime", "webgpu_check", "runtime_note"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "UnitRequest":
        return _from_json(cls, "request", d, optional=("codecs", "models", "held", "error_feedback", "computes",
                                                      "runtime", "webgpu_check", "runtime_note"))


@dataclass(frozen=True)
class WorkUnit:
    """A self-contained unit of training: what to start from, what to run, how to report."""

    job: str                      # job id
    unit_id: str                  # unique, URL-safe
    model: str                    # registered model name
    model_version: str            # blob id of the base model weights
    base_step: int                # model version counter the unit was cut from (staleness)
    shard_ids: tuple[str, ...]    # blob ids of the data shards to train on
    local_steps: int              # SGD steps to run
    batch_size: int               # samples per step
    hyper: dict                   # per-step hyperparameters, see HYPER
    seed: int                     # RNG seed for shuffling, augmentation, dropout
    codec: str                    # codec string for the delta: a codec id or "topk:<fraction>"
    lease: str                    # opaque signed token; echoed back in the result
    deadline: float               # unix seconds; results after it are refused
    base_delta: dict | None = None   # {"from": held blob id, "blob": version delta blob id}, or None
    error_feedback: bool = False  # the worker may add its error-feedback residual to this unit's delta
    compute_as: str | None = None  # a replica of another backend's unit: compute it as that backend does
    protocol: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        p = "unit"
        _protocol(p, self.protocol)
        _str(f"{p}.job", self.job, ID_RE, f"an id matching {ID_RE.pattern}")
        _str(f"{p}.unit_id", self.unit_id, ID_RE, f"an id matching {ID_RE.pattern}")
        _str(f"{p}.model", self.model, MODEL_RE, f"a model name matching {MODEL_RE.pattern}")
        _str(f"{p}.model_version", self.model_version, HEX_RE, "a sha256 hex blob id")
        _int(f"{p}.base_step", self.base_step, 0, 2**53)
        _need(isinstance(self.shard_ids, (list, tuple)) and len(self.shard_ids) > 0, f"{p}.shard_ids",
              "a non-empty list of blob ids", self.shard_ids)
        for i, shard in enumerate(self.shard_ids):
            _str(f"{p}.shard_ids[{i}]", shard, HEX_RE, "a sha256 hex blob id")
        _int(f"{p}.local_steps", self.local_steps, 1, MAX_LOCAL_STEPS)
        _int(f"{p}.batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        hyper = check_hyper(f"{p}.hyper", self.hyper)
        _int(f"{p}.seed", self.seed, 0, 2**31 - 1)
        try:
            get_codec(self.codec)
        except ContractError as e:
            raise ContractError(f"{p}.codec", e.expected, self.codec) from None
        _str(f"{p}.lease", self.lease, LEASE_RE, "a token of 1..1024 printable ASCII characters")
        deadline = _num(f"{p}.deadline", self.deadline, 0, lo_open=True, expected="unix seconds > 0")
        if self.base_delta is not None:
            bd = self.base_delta
            _need(isinstance(bd, dict), f"{p}.base_delta", 'null or an object {"from", "blob"}', bd)
            for key in bd:
                _need(key in ("from", "blob"), f"{p}.base_delta.{key}", "a known field (from, blob)",
                      Said("an unknown field"))
            for key in ("from", "blob"):
                _str(f"{p}.base_delta.{key}", bd.get(key, MISSING), HEX_RE, "a sha256 hex blob id")
            object.__setattr__(self, "base_delta", {"from": bd["from"], "blob": bd["blob"]})
        _bool(f"{p}.error_feedback", self.error_feedback)
        if self.compute_as is not None:
            _choice(f"{p}.compute_as", self.compute_as, BACKENDS)
        object.__setattr__(self, "shard_ids", tuple(self.shard_ids))
        object.__setattr__(self, "hyper", hyper)
        object.__setattr__(self, "deadline", deadline)

    def to_json(self) -> dict:
        # the fields hold strings, numbers, a tuple and flat dicts: copied one level (``dataclasses.asdict``'s
        # deep copy cost more than the rest of cutting a unit)
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["shard_ids"], d["hyper"] = list(self.shard_ids), dict(self.hyper)
        if self.base_delta is None:   # only units cut from a version delta carry it
            del d["base_delta"]
        else:
            d["base_delta"] = dict(self.base_delta)
        if not self.error_feedback:   # only units for a worker that said it keeps a residual carry it
            del d["error_feedback"]
        if self.compute_as is None:   # only a replica for a worker of another backend carries it
            del d["compute_as"]
        return d

    @functools.cached_property
    def wire(self) -> str:
        """The unit's JSON text, made once: what the coordinator sends, keeps, and checks a result against."""
        return json.dumps(self.to_json())

    @classmethod
    def from_json(cls, d: dict) -> "WorkUnit":
        return _from_json(cls, "unit", d, optional=("base_delta", "error_feedback", "compute_as"))


@dataclass(frozen=True)
class UnitResult:
    """What a worker sends back: metadata (JSON) plus the encoded delta (binary).

    A failed unit sets ``error`` (and sends an empty delta and zero numbers).
    """

    unit_id: str
    lease: str
    worker_id: str
    base_version: str             # model_version the worker trained from
    delta: bytes | memoryview = field(repr=False)   # CTD1 container (unpacked: a view of the body); b"" on error
    loss_before: float            # mean training loss of the first step (before any update)
    loss_after: float             # mean training loss of the last step
    num_samples: int              # samples seen in all (steps * batch size, at most)
    compute_seconds: float        # wall time spent training
    error: str | None = None      # why the unit failed, for a failed unit
    protocol: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        p = "result"
        _protocol(p, self.protocol)
        _str(f"{p}.unit_id", self.unit_id, ID_RE, f"an id matching {ID_RE.pattern}")
        _str(f"{p}.lease", self.lease, LEASE_RE, "a token of 1..1024 printable ASCII characters")
        _str(f"{p}.worker_id", self.worker_id, ID_RE, f"an id matching {ID_RE.pattern}")
        _str(f"{p}.base_version", self.base_version, HEX_RE, "a sha256 hex blob id")
        values = {
            "loss_before": _num(f"{p}.loss_before", self.loss_before, 0, expected="a finite number >= 0"),
            "loss_after": _num(f"{p}.loss_after", self.loss_after, 0, expected="a finite number >= 0"),
            "compute_seconds": _num(f"{p}.compute_seconds", self.compute_seconds, 0,
                                    expected="a finite number >= 0"),
        }
        _int(f"{p}.num_samples", self.num_samples, 0, 2**53)
        _need(self.error is None or (isinstance(self.error, str) and 0 < len(self.error) <= MAX_ERROR_CHARS),
              f"{p}.error", f"null or a text of 1..{MAX_ERROR_CHARS} characters", self.error)
        _need(isinstance(self.delta, (bytes, bytearray, memoryview)), f"{p}.delta", "bytes",
              Said(type(self.delta).__name__))
        if self.error is None:
            _need(bytes(self.delta[:4]) == DELTA_MAGIC, f"{p}.delta", "a CTD1 delta container", self.delta)
        else:
            _need(len(self.delta) == 0, f"{p}.delta", "no delta for a failed unit", self.delta)
        for key, value in values.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "delta", immutable(self.delta))   # bytes, or a view of bytes: never copied

    def to_json(self) -> dict:
        """The metadata: every field but ``delta`` (which travels as binary)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "delta"}
        return {"protocol": d.pop("protocol"), **d}

    @classmethod
    def from_json(cls, d: dict, delta: bytes = b"") -> "UnitResult":
        return _from_json(cls, "result", d, optional=("error",), delta=delta)


def check_result(unit: WorkUnit, result: UnitResult) -> None:
    """The result answers this unit: same id and lease, trained from its base, plausible sample count."""
    _need(result.unit_id == unit.unit_id, "result.unit_id", repr(unit.unit_id), result.unit_id)
    _need(result.lease == unit.lease, "result.lease", "the unit's lease", Said("another token"))
    _need(result.base_version == unit.model_version, "result.base_version", repr(unit.model_version),
          result.base_version)
    most = unit.local_steps * unit.batch_size
    _need(result.num_samples <= most, "result.num_samples", f"at most local_steps * batch_size = {most}",
          result.num_samples)


def pack_result(result: UnitResult) -> bytes:
    """The request body of ``POST /api/v1/units/<unit_id>/result``."""
    meta = json.dumps(result.to_json(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"".join([_FRAME.pack(RESULT_MAGIC, len(meta)), meta, bytes(padding(len(meta))), result.delta])


def unpack_result(body: bytes) -> UnitResult:
    """Parse a result body; the delta inside is checked only for its magic (decode it with a spec).
    The result's ``delta`` is a read-only view of ``body`` (bytes): a large delta is not copied."""
    _need(isinstance(body, (bytes, bytearray, memoryview)), "result", "bytes", Said(type(body).__name__))
    body = immutable(body)
    _need(len(body) >= _FRAME.size, "result", "at least 8 bytes (magic + metadata length)", body)
    magic, length = _FRAME.unpack_from(body)
    _need(magic == RESULT_MAGIC, "result.magic", repr(RESULT_MAGIC), Said(repr(magic)))
    _need(length <= MAX_META_BYTES and 8 + length <= len(body), "result.metadata_length",
          f"at most {min(MAX_META_BYTES, len(body) - 8)}", length)
    start = 8 + length + padding(length)
    _need(len(body) >= start and not bytes(body[8 + length : start]).strip(b"\0"), "result.padding",
          f"{padding(length)} zero bytes after the metadata", Said("missing or non-zero padding"))
    meta = strict_json(body[8 : 8 + length], "result.metadata")
    return UnitResult.from_json(meta, delta=memoryview(body)[start:])
