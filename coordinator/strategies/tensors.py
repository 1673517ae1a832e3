"""Pure array maths on models and deltas (``dict[str, np.ndarray]``); no state, no I/O.

Every function returns new arrays and never writes into its inputs. Sums are accumulated
in float64; functions that produce a model cast back to the model's dtype.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Model = dict[str, np.ndarray]


def copy_model(model: Model) -> Model:
    """A deep copy (new arrays) of a model or delta."""
    return {k: np.array(v, copy=True) for k, v in model.items()}


def check_delta(delta: Model, model: Model) -> str | None:
    """Why ``delta`` cannot be applied to ``model`` (None when it can).

    A delta may cover a subset of the model's tensors (e.g. only supermask scores); every
    tensor it carries must exist in the model with the same shape and be finite.
    """
    if not delta:
        return "empty delta"
    for name, d in delta.items():
        if name not in model:
            return f"unknown tensor {name!r}"
        if np.shape(d) != np.shape(model[name]):
            return f"tensor {name!r}: shape {np.shape(d)} != model shape {np.shape(model[name])}"
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
    """L2 norm of all tensors of ``delta`` taken together (as one flat vector)."""
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in delta.values())))


def clip_by_global_norm(delta: Model, max_norm: float) -> tuple[Model, float]:
    """(delta scaled to global norm <= max_norm, the factor used); factor 1.0 leaves it as is."""
    norm = global_norm(delta)
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
