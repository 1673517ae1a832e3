"""Pure array maths on models and deltas (``dict[str, np.ndarray]``); no state, no I/O.

Every function returns new arrays and never writes into its inputs. Sums are accumulated
in float64; functions that produce a model cast back to the model's dtype.

The hot path is ``fused_step`` (``model + factor * sum_i w_i delta_i`` with the norms of every
delta and of the step) and ``sq_norm``: one pass over the arrays in float32, in cache-sized
chunks, with the chunks' dot products summed in float64, so a fold reads the model and the
deltas once and writes the new model once (instead of float64 copies and separate passes).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Model = dict[str, np.ndarray]
CHUNK = 1 << 17   # elements per chunk of the fused passes (512 KiB of float32: the chunk's work stays in cache)


class NonFinite(ValueError):
    """``fused_step`` met deltas with a non-finite value: ``indices`` into its ``deltas``."""

    def __init__(self, indices: list[int]):
        self.indices = indices
        super().__init__(f"non-finite values in deltas {indices}")


def _flat(v) -> np.ndarray:
    a = np.asarray(v)
    return a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)


def _dot_sq(flat: np.ndarray) -> float:
    """sum(x^2) of a flat array: float32 dots over chunks, summed in float64; exact float64 when
    the float32 dots overflow (a finite but huge delta) or the array is not float32."""
    if flat.dtype != np.float32:
        x = flat.astype(np.float64)
        return float(np.dot(x, x))
    total = 0.0
    for i in range(0, flat.size, CHUNK):
        c = flat[i:i + CHUNK]
        total += float(np.dot(c, c))
    if not math.isfinite(total):
        x = flat.astype(np.float64)
        total = float(np.dot(x, x))
    return total


def sq_norm(delta: Model) -> float:
    """Squared global L2 norm of all tensors of ``delta`` (inf or nan when a value is not finite)."""
    return sum(_dot_sq(_flat(v)) for v in delta.values())


def copy_model(model: Model) -> Model:
    """A deep copy (new arrays) of a model or delta."""
    return {k: np.array(v, copy=True) for k, v in model.items()}


def check_delta(delta: Model, model: Model, finite: bool | None = None) -> str | None:
    """Why ``delta`` cannot be applied to ``model`` (None when it can).

    A delta may cover a subset of the model's tensors (e.g. only supermask scores); every
    tensor it carries must exist in the model with the same shape and be finite.
    ``finite``: already known (from the delta's norm), so the values are not scanned again.
    """
    if not delta:
        return "empty delta"
    for name, d in delta.items():
        if name not in model:
            return f"unknown tensor {name!r}"
        if np.shape(d) != np.shape(model[name]):
            return f"tensor {name!r}: shape {np.shape(d)} != model shape {np.shape(model[name])}"
    if finite is True:
        return None
    for name, d in delta.items():
        if finite is None and math.isfinite(_dot_sq(_flat(d))):
            continue
        if not np.all(np.isfinite(d)):
            return f"tensor {name!r}: non-finite values"
    return None


def subtract(a: Model, b: Model) -> Model:
    """a - b over the tensors of ``a`` (float64)."""
    return {k: np.asarray(v, np.float64) - np.asarray(b[k], np.float64) for k, v in a.items()}


def scale(delta: Model, factor: float) -> Model:
    """factor * delta (float64)."""
    return {k: np.asarray(v, np.float64) * factor for k, v in delta.items()}


def weighted_sum(deltas: Sequence[Model], weights: Sequence[float]) -> Model:
    """sum_i w_i * delta_i over the union of tensor names (a missing tensor counts as zero)."""
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    out: Model = {}
    for delta, w in zip(deltas, weights):
        for k, v in delta.items():
            term = float(w) * np.asarray(v, np.float64)
            out[k] = out[k] + term if k in out else term
    return out


def weighted_mean(deltas: Sequence[Model], weights: Sequence[float]) -> Model:
    """sum_i w_i * delta_i / sum_i w_i; weights must be >= 0 with a positive sum."""
    total = float(sum(weights))
    if any(w < 0 for w in weights) or not total > 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    return scale(weighted_sum(deltas, weights), 1.0 / total)


def add_scaled(model: Model, delta: Model, factor: float = 1.0) -> Model:
    """model + factor * delta, as a new model in the model's dtypes (all tensors copied)."""
    out = copy_model(model)
    for k, d in delta.items():
        base = np.asarray(model[k])
        out[k] = (base.astype(np.float64) + factor * np.asarray(d, np.float64)).astype(base.dtype)
    return out


def momentum_step(momentum: Model, step: Model, beta: float) -> Model:
    """Heavy-ball buffer update m <- beta * m + step (a missing tensor of m counts as zero)."""
    out = {k: beta * np.asarray(v, np.float64) for k, v in momentum.items()}
    for k, v in step.items():
        out[k] = out[k] + np.asarray(v, np.float64) if k in out else np.asarray(v, np.float64).copy()
    return out


def global_norm(delta: Model) -> float:
    """L2 norm of all tensors of ``delta`` taken together (as one flat vector); one float32 pass."""
    return math.sqrt(sq_norm(delta)) if delta else 0.0


def fused_step(model: Model, deltas: Sequence[Model], weights: Sequence[float], factor: float = 1.0,
               momentum: Model | None = None, beta: float = 0.0,
               known_sq: Sequence[float | None] | None = None,
               convex: Callable[[str], bool] | None = None) -> tuple[Model, dict]:
    """``model + factor * step`` with ``step = sum_i w_i delta_i`` (a tensor a delta lacks counts as
    zero there), or with ``momentum`` given, heavy ball: ``m' = beta m + step``, ``model + factor m'``.
    One pass per tensor in float32 chunks; returns the new model (the model's dtypes; tensors no
    delta carries are copied) and ``{"step_sq": |new - model|^2 (before rounding), "delta_sq": [...],
    "momentum": m'}``. ``known_sq``: squared norms already known (None: computed in the same pass).
    ``convex`` (no momentum): the tensors whose deltas are differences to the model (batch-norm
    statistics rebased on it: ``statistic - model``) get at most a convex combination: where
    ``factor * sum_i w_i`` over the deltas that carry it exceeds 1, that tensor's step is divided by it
    (the weighted mean of the deltas' targets); summed as they are, many such deltas folded at once
    overshoot, and a fold after another grows the statistics without bound.
    Raises ``NonFinite`` naming every delta with a non-finite value (nothing is returned then)."""
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    known = list(known_sq) if known_sq is not None else [None] * len(deltas)
    delta_sq = [0.0] * len(deltas)
    step_sq = 0.0
    capped: dict[str, float] = {}   # tensor -> its own factor, where the convex cap applies
    if convex is not None and momentum is None:
        for k in model:
            if convex(k):
                total = factor * sum(float(w) for d, w in zip(deltas, weights) if k in d)
                if total > 1.0:
                    capped[k] = factor / total
    # one delta and no momentum: |step| = |factor w| |delta| (the delta's norm is known or measured in the pass)
    single = len(deltas) == 1 and momentum is None and not capped
    out: Model = {}
    new_momentum: Model = {} if momentum is not None else None
    for k, base in model.items():
        base = np.asarray(base)
        carriers = [(i, _flat(d[k]), float(weights[i])) for i, d in enumerate(deltas) if k in d]
        mom = momentum.get(k) if momentum is not None else None
        if not carriers and mom is None:
            out[k] = np.array(base, copy=True)
            continue
        dtype = np.float64 if base.dtype == np.float64 else np.float32
        flat_base = _flat(base)
        new = np.empty(base.size, base.dtype)
        m_flat = _flat(mom) if mom is not None else None
        m_new = np.empty(base.size, np.float32) if momentum is not None else None
        n = base.size
        acc = np.empty(min(CHUNK, n), dtype)
        tmp = np.empty(min(CHUNK, n), dtype)
        key_factor = capped.get(k, factor)
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            a, t = acc[:hi - lo], tmp[:hi - lo]
            first = True
            for i, d, w in carriers:
                c = d[lo:hi]
                if known[i] is None:
                    delta_sq[i] += float(np.dot(c, c)) if c.dtype == dtype else float(np.dot(c.astype(dtype), c))
                if first:
                    np.multiply(c, w, out=a)
                    first = False
                else:
                    np.multiply(c, w, out=t)
                    np.add(a, t, out=a)
            if first:
                a.fill(0)
            if m_flat is not None or m_new is not None:
                if m_flat is not None:
                    np.multiply(m_flat[lo:hi], beta, out=t)
                    np.add(a, t, out=a)
                m_new[lo:hi] = a
            if key_factor != 1.0:
                np.multiply(a, key_factor, out=a)
            if not single:
                step_sq += float(np.dot(a, a))
            if base.dtype == a.dtype:
                np.add(flat_base[lo:hi], a, out=new[lo:hi])
            else:
                new[lo:hi] = (flat_base[lo:hi].astype(np.float64) + a).astype(base.dtype)
        out[k] = new.reshape(base.shape)
        if m_new is not None:
            new_momentum[k] = m_new.reshape(base.shape)
    for i, d in enumerate(deltas):   # a float32 dot that overflowed: the exact norm (or a real non-finite)
        if known[i] is None and not math.isfinite(delta_sq[i]):
            delta_sq[i] = sq_norm(d)
    bad = [i for i, d in enumerate(deltas)
           if not math.isfinite(known[i] if known[i] is not None else delta_sq[i])]
    if bad:
        raise NonFinite(bad)
    if not single and not math.isfinite(step_sq):   # finite deltas whose float32 step overflowed: measure it exactly
        step_sq = sum(float(np.sum(np.square(np.asarray(out[k], np.float64) - np.asarray(model[k], np.float64))))
                      for k in out)
    sq = [known[i] if known[i] is not None else delta_sq[i] for i in range(len(deltas))]
    if single:
        step_sq = (float(weights[0]) * factor) ** 2 * sq[0]
    return out, {"step_sq": step_sq, "delta_sq": sq, "momentum": new_momentum}


def clip_by_global_norm(delta: Model, max_norm: float, norm: float | None = None) -> tuple[Model, float]:
    """(delta scaled to global norm <= max_norm, the factor used); factor 1.0 leaves it as is.
    ``norm``: the delta's norm when already known."""
    norm = global_norm(delta) if norm is None else norm
    if norm <= max_norm:
        return delta, 1.0
    factor = max_norm / norm
    return {k: (np.asarray(v, np.float64) * factor).astype(np.asarray(v).dtype) for k, v in delta.items()}, factor


def elementwise_max(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Per-element maximum of equally shaped arrays (a new array)."""
    if not arrays:
        raise ValueError("elementwise_max of no arrays")
    return np.maximum.reduce([np.asarray(a) for a in arrays])


def elementwise_max_abs(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Per element, the value with the largest magnitude (sign kept; ties: the earliest array)."""
    if not arrays:
        raise ValueError("elementwise_max_abs of no arrays")
    stack = np.stack([np.asarray(a) for a in arrays])
    pick = np.argmax(np.abs(stack), axis=0)
    return np.take_along_axis(stack, pick[None], axis=0)[0]


def max_merge(current: Model, reported: Sequence[Model], by_magnitude: bool = False) -> Model:
    """For each tensor in any ``reported``: max(current, reported_1, ..., reported_n) per element.

    ``by_magnitude`` compares ``|value|`` and keeps the winner's sign. Tensors no report
    carries are copied unchanged; the result keeps ``current``'s dtypes.
    """
    reduce = elementwise_max_abs if by_magnitude else elementwise_max
    out = copy_model(current)
    for k in {k for r in reported for k in r}:
        candidates = [np.asarray(current[k], np.float64)]
        candidates += [np.asarray(r[k], np.float64) for r in reported if k in r]
        out[k] = reduce(candidates).astype(np.asarray(current[k]).dtype)
    return out
