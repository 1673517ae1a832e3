"""A browser tab's work unit, computed in Python: what the coordinator recomputes to check a tab.

A tab (worker_web/worker.js) trains with the exported step graph (``models.onnx_step``) in
onnxruntime-web and draws its batches, crops, mirrors and dropout masks from the unit's seed
with its own small generator (worker_web/draw.js), not torch's. So a Python worker's delta for
the same unit is a different (equally honest) sample, and a tab's result can only be checked
against a computation that draws exactly as the tab does and runs the same graph: this one.
It mirrors worker_web/draw.js draw for draw (the order is in that file and in
tests/golden/browser_draw.json, which both languages are tested against) and runs the graph
with onnxruntime's CPU kernels, the kernels the tab's WebAssembly backend runs.

``run_with_graph`` is the tab's ``runUnit`` without the network, on a step graph given as bytes
with its spec: it returns the delta (trained - base, float32) before the upload codec, and the first
and last step's losses, as the tab reports them. Units are run through ``worker_py.unit.run_unit``
(``WorkUnit.compute_as == "browser"``), by a Python worker computing a replica of a tab's unit (the
graph the coordinator serves) and by the coordinator checking a tab (the graph of its cache).
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from models.flips import mirrors

_MUL = np.uint32(0x6D2B79F5)
_SESSIONS_KEPT = 2


class Mulberry32:
    """worker_web/draw.js's ``mulberry32``: a stream of floats in [0, 1). Its state only counts up,
    so ``take(n)`` draws n values at once."""

    def __init__(self, seed: int) -> None:
        self.a = int(seed) & 0xFFFFFFFF

    def take(self, n: int) -> np.ndarray:
        k = np.arange(1, n + 1, dtype=np.uint64)
        a = ((self.a + k * int(_MUL)) & 0xFFFFFFFF).astype(np.uint32)
        self.a = (self.a + n * int(_MUL)) & 0xFFFFFFFF
        with np.errstate(over="ignore"):
            t = (a ^ (a >> np.uint32(15))) * (a | np.uint32(1))
            t = t ^ (t + (t ^ (t >> np.uint32(7))) * (t | np.uint32(61)))
            t = t ^ (t >> np.uint32(14))
        return t.astype(np.float64) / 4294967296.0

    def __call__(self) -> float:
        return float(self.take(1)[0])


def permutation(n: int, rng: Mulberry32) -> list[int]:
    """Fisher-Yates from the end, one draw per swap (draw.js ``permutation``)."""
    p = list(range(n))
    if n < 2:
        return p
    draws = rng.take(n - 1)
    for k, i in enumerate(range(n - 1, 0, -1)):
        j = int(math.floor(draws[k] * (i + 1)))
        p[i], p[j] = p[j], p[i]
    return p


def batch_indices(n: int, steps: int, batch: int, rng: Mulberry32) -> list[list[int]]:
    """``steps`` batches without replacement, reshuffling at each pass (draw.js ``batchIndices``)."""
    if batch > n:
        raise ValueError(f"batch size {batch} is larger than the unit's {n} samples")
    order, pos, out = permutation(n, rng), 0, []
    for _ in range(steps):
        if pos + batch > n:
            take = order[pos:]
            order = permutation(n, rng)
            pos = batch - len(take)
            out.append(take + order[:pos])
        else:
            out.append(order[pos:pos + batch])
            pos += batch
    return out


def augment_batch(x: np.ndarray, y: np.ndarray, idx: list[int], rng: Mulberry32, pad: int, flip: bool,
                  reflect: bool = False, parity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One batch (float32 NCHW of the uint8 pixels, int64 labels): per image a crop row and column
    in [-pad, pad] (zero padding, or with ``reflect`` the edges mirrored: row -1 reads row 1, row 32
    row 30, as torch's reflect padding) and a mirror, drawn in that order (draw.js ``augmentBatch``);
    with ``parity`` (0 or 1: alternating flips) the mirror is not drawn but the image's coin
    (``models.flips.image_coins``) xor ``parity``."""
    alternate = flip and parity is not None
    per = (2 if pad else 0) + (1 if flip and not alternate else 0)
    draws = rng.take(per * len(idx)).reshape(len(idx), per) if per else np.zeros((len(idx), 0))
    coins = mirrors(x[np.asarray(idx, dtype=np.int64)], parity) if alternate else None
    out = np.zeros((len(idx), 3, 32, 32), np.float32)
    j = np.arange(32)
    for b, i in enumerate(idx):
        dy = int(math.floor(draws[b, 0] * (2 * pad + 1))) - pad if pad else 0
        dx = int(math.floor(draws[b, 1] * (2 * pad + 1))) - pad if pad else 0
        mirror = bool(coins[b]) if alternate else bool(flip and draws[b, per - 1] < 0.5)
        rows, cols = j + dy, (31 - j if mirror else j) + dx
        if reflect:
            rows, cols = np.abs(rows), np.abs(cols)
            rows, cols = np.where(rows > 31, 62 - rows, rows), np.where(cols > 31, 62 - cols, cols)
        r_ok, c_ok = (rows >= 0) & (rows < 32), (cols >= 0) & (cols < 32)
        out[b][:, np.flatnonzero(r_ok)[:, None], np.flatnonzero(c_ok)[None, :]] = \
            x[i][:, rows[r_ok][:, None], cols[c_ok][None, :]]
    return out, np.asarray(y, np.int64)[idx]


def keep_mask(n: int, p: float, rng: Mulberry32) -> np.ndarray:
    """A dropout keep-mask: element i is kept when its draw is >= p (draw.js ``keepMask``)."""
    return (rng.take(n) >= p).astype(np.float32)


# ---------------------------------------------------------------------------- the unit
@dataclass(frozen=True)
class BrowserRun:
    delta: dict[str, np.ndarray]     # trained - base, float32, in the base's order
    loss_before: float               # the first step's loss (as the tab reports it)
    loss_after: float                # the last step's


_sessions: OrderedDict = OrderedDict()
_lock = threading.Lock()


def _session(graph: bytes, spec):
    """onnxruntime's CPU session of a step graph (one thread), kept for the next units (by the graph's hash)."""
    import onnxruntime as ort

    key = hashlib.sha256(graph).hexdigest()
    with _lock:
        if key in _sessions:
            _sessions.move_to_end(key)
            return _sessions[key]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    entry = (ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"]), spec)
    with _lock:
        _sessions[key] = entry
        while len(_sessions) > _SESSIONS_KEPT:
            _sessions.popitem(last=False)
    return entry


def spec_of_manifest(manifest: dict):
    """The ``StepSpec`` of a step manifest (``GET /api/v1/steps/<model>/<batch>``, coordinator/steps.py)."""
    from models.onnx_step import StepSpec

    return StepSpec.from_json(json.dumps({**manifest["spec"], "model": manifest["model"],
                                          "batch_size": manifest["batch_size"], "opset": 0}))


def run_with_graph(unit, base: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, graph: bytes,
                   spec) -> BrowserRun:
    """What a tab computes for ``unit`` (a ``contract.units.WorkUnit``) from ``base`` on the unit's images
    ``x`` (uint8, N x 3 x 32 x 32) and labels ``y``: ``local_steps`` steps of the step graph ``graph`` (its
    bytes) with ``spec`` (its ``StepSpec``) at ``batch_size``, momentum from zero, batches and masks drawn
    from ``unit.seed``. Raises ValueError on a graph of another model or batch, and on a unit a tab would
    refuse (a loss outside the graph, a non-finite loss)."""
    if spec.model != unit.model or spec.batch_size != unit.batch_size:
        raise ValueError(f"the step graph is for {spec.model} at batch {spec.batch_size}, the unit is "
                         f"{unit.model} at batch {unit.batch_size}")
    return _run(*_session(graph, spec), unit, base, x, y)


def _run(session, spec, unit, base, x, y) -> BrowserRun:
    hyper = unit.hyper
    if hyper.get("loss", "ce") != "ce":
        raise ValueError(f"loss '{hyper['loss']}' is not in the browser's step graph")
    if "nesterov" in hyper and bool(hyper["nesterov"]) != spec.nesterov:
        raise ValueError(f"hyper.nesterov={hyper['nesterov']} but the step graph was exported with "
                         f"nesterov={spec.nesterov}")
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        if t.role in ("param", "fixed", "stat"):
            if t.state not in base:
                raise ValueError(f"the model version has no '{t.state}'")
            feeds[t.name] = np.asarray(base[t.state], np.float32).reshape(t.shape)
        elif t.role == "momentum":
            feeds[t.name] = np.zeros(t.shape, np.float32)
    rng = Mulberry32(unit.seed)
    batches = batch_indices(len(y), unit.local_steps, unit.batch_size, rng)
    names, losses = spec.output_names, []
    for step, idx in enumerate(batches):
        feeds["x"], feeds["y"] = augment_batch(x, y, idx, rng, int(hyper.get("crop_pad") or 0),
                                               bool(hyper.get("flip") or False), bool(hyper.get("crop_reflect")),
                                               hyper.get("flip_parity"))
        for t in spec.inputs:
            if t.role == "dropout":
                feeds[t.name] = keep_mask(math.prod(t.shape), t.p, rng).reshape(t.shape)
            elif t.role == "hyper":
                feeds[t.name] = np.array(hyper.get(t.name) or 0, np.float32)
        out = dict(zip(names, session.run(names, feeds)))
        loss = float(np.asarray(out["loss"]).reshape(-1)[0])
        if not math.isfinite(loss):
            raise ValueError(f"the loss is {loss} at step {step + 1}")
        losses.append(loss)
        for t in spec.outputs[1:]:
            feeds[t.feeds] = out[t.name]
    trained = {t.state: feeds[t.name] for t in spec.inputs if t.role in ("param", "stat")}
    delta = {name: (trained[name].reshape(np.shape(v)) - np.asarray(v, np.float32)).astype(np.float32)
             for name, v in base.items() if name in trained}
    return BrowserRun(delta, losses[0], losses[-1])
