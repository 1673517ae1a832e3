"""Robust aggregation: wrappers that keep a hostile worker's delta from steering the model.

Each wraps any strategy (``AdaptiveClip(FedBuff(...))``, STYLE.md) and reports every update's
fate like the strategy it wraps; the maths are the pure functions below.

- ``AdaptiveClip(inner, multiplier, window, warmup)``: norm clipping whose bound follows the
  honest deltas: ``bound = multiplier x median`` of the last ``window`` accepted norms (each
  recorded as it was let through, so a clipped outlier never raises the bound), applied once
  ``warmup`` norms are in. Norm bounding against model replacement: Sun, Kairouz, Suresh,
  McMahan, "Can You Really Backdoor Federated Learning?", arXiv:1911.07963 (2019); the bound
  from a percentile of the recent norms as in AutoClip: Seetharaman, Wichern, Pardo, Le Roux,
  "AutoClip: Adaptive Gradient Clipping for Source Separation Networks", MLSP 2020 (a quantile
  tracked online: Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
  Adaptive Clipping", NeurIPS 2021).
- ``CenteredClip(inner, radius, window, warmup, beta)``: at fold time every buffered delta
  ``x`` becomes ``v + clip(x - v, tau)``, around the reference ``v`` (the previous aggregate,
  kept as ``v <- beta v + (1 - beta) mean(clipped)``), with ``tau = radius x median`` of the
  recent distances ``|x - v|``. The inner strategy then folds the clipped deltas with its own
  weights: one iteration of centered clipping, Karimireddy, He, Jaggi, "Learning from History
  for Byzantine Robust Optimization", ICML 2021 (one iteration suffices with a good reference,
  their Section 4).
- ``TrimmedMean(inner, trim)`` / ``Median(inner)``: at fold time every buffered delta is
  replaced by the coordinate-wise trimmed mean / median of the buffer, so the inner strategy
  folds the robust centre with the weights it would have used (FedBuff's staleness weights,
  FedAvg's sample weights). Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", ICML 2018. Meaningful for a buffer of three
  or more (FedBuff, FedAvg); with one or two it is the plain (mean) aggregate.

Ledger: an update a robust wrapper changes is still folded (every buffered delta went into
the robust statistic); one the inner strategy will reject (an incompatible delta) takes no
part in the statistic and is dropped by the inner strategy with its reason.

State: the norm and distance windows and the reference are explicit fields in
``state_dict`` (``meta`` and ``"<name>.reference/<tensor>"`` arrays). A state saved without
this wrapper (the inner strategy's alone, or inside another robust wrapper) loads into the
inner strategy, with empty windows, so a job can change ``--robust`` on restart.

``wrap_robust(strategy, "trimmed_mean:0.2")`` builds one from its spec (``none``,
``adaptive_clip[:multiplier]``, ``centered_clip[:radius]``, ``trimmed_mean[:trim]``,
``median``), as the config's ``robust`` option and ``make_strategy(..., robust=...)`` do.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import (
    Admission,
    BufferedStrategy,
    Folded,
    Pending,
    Strategy,
    StrategyState,
    in_range,
    join_arrays,
    positive_int,
    split_arrays,
)
from .tensors import Model, check_delta, clip_by_global_norm, global_norm
from .wrappers import Wrapper

# --- the maths: pure functions ----------------------------------------------------------------


def adaptive_bound(norms: Sequence[float], multiplier: float, warmup: int) -> float:
    """``multiplier x median`` of the positive ``norms``, or ``inf`` while fewer than ``warmup`` are
    known (a zero delta says nothing about the scale of honest ones)."""
    known = [float(n) for n in norms if n > 0]
    if len(known) < max(1, warmup):
        return math.inf
    return multiplier * statistics.median(known)   # (a few dozen: numpy's median costs more than it saves)


def trimmed_mean(stack: np.ndarray, trim: float) -> np.ndarray:
    """Coordinate-wise mean along axis 0 after dropping the ``floor(trim x n)`` smallest and largest
    values of each coordinate (``0 <= trim < 0.5``); float64."""
    values = np.sort(np.asarray(stack, np.float64), axis=0)
    n = values.shape[0]
    k = math.floor(trim * n + 1e-9)
    k = min(k, (n - 1) // 2)   # always keep at least one value
    return values[k:n - k].mean(axis=0)


def coordinate_median(stack: np.ndarray) -> np.ndarray:
    """Coordinate-wise median along axis 0 (the mean of the middle two for an even count); float64."""
    return np.median(np.asarray(stack, np.float64), axis=0)


def robust_center(deltas: Sequence[Model], reduce) -> Model:
    """``reduce`` (stack -> array) applied per tensor over the deltas that carry it, in the first
    carrier's dtype."""
    out: Model = {}
    names = list(dict.fromkeys(k for d in deltas for k in d))
    for k in names:
        carriers = [np.asarray(d[k]) for d in deltas if k in d]
        out[k] = reduce(np.stack(carriers)).astype(carriers[0].dtype)
    return out


def distance(delta: Model, reference: Model) -> float:
    """Global L2 norm of ``delta - reference`` over the tensors of ``delta`` (a tensor the
    reference lacks counts as zero there)."""
    total = 0.0
    for k, v in delta.items():
        diff = np.asarray(v, np.float64) - (np.asarray(reference[k], np.float64) if k in reference else 0.0)
        total += float(np.sum(np.square(diff)))
    return math.sqrt(total)


def centered_clip(deltas: Sequence[Model], reference: Model, tau: float) -> tuple[list[Model], list[float]]:
    """Each delta as ``reference + (delta - reference) x min(1, tau / |delta - reference|)`` (its own
    tensors, its dtypes), and each delta's distance to the reference before clipping."""
    out, distances = [], []
    for delta in deltas:
        d = distance(delta, reference)
        distances.append(d)
        if d <= tau:
            out.append(delta)
            continue
        factor = tau / d
        clipped = {}
        for k, v in delta.items():
            ref = np.asarray(reference[k], np.float64) if k in reference else 0.0
            clipped[k] = (ref + (np.asarray(v, np.float64) - ref) * factor).astype(np.asarray(v).dtype)
        out.append(clipped)
    return out, distances


def mean_model(deltas: Sequence[Model]) -> Model:
    """Unweighted per-tensor mean over the deltas that carry each tensor (float32)."""
    return robust_center(deltas, lambda s: s.astype(np.float64).mean(axis=0))


def parse_robust(spec: Any) -> tuple[str, float | None]:
    """``"trimmed_mean:0.2"`` -> ``("trimmed_mean", 0.2)``; ``"median"`` -> ``("median", None)``.
    ValueError naming the choices for anything else (the parameter is checked by the wrapper)."""
    if not isinstance(spec, str):
        raise ValueError(f"robust: expected one of {SPEC_TEXT}, got {spec!r}")
    name, _, raw = spec.partition(":")
    if name not in ROBUST_NAMES or (raw and name in ("none", "median")):
        raise ValueError(f"robust: expected one of {SPEC_TEXT}, got {spec!r}")
    if not raw:
        return name, None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"robust: expected a number after '{name}:', got {spec!r}") from None
    return name, value


def buffered(strategy: Strategy) -> BufferedStrategy:
    """The strategy holding the buffer (under any wrappers); ValueError if there is none."""
    inner = strategy
    while isinstance(inner, Wrapper):
        inner = inner.inner
    if not isinstance(inner, BufferedStrategy):
        raise ValueError(f"inner: expected a buffered strategy, got {type(inner).__name__}")
    return inner


def warmup_within(name: str, value: Any, window: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= window:
        raise ValueError(f"{name}: expected an integer in [1, window={window}], got {value!r}")
    return value


# --- the wrappers ------------------------------------------------------------------------------

class RobustWrapper(Wrapper):
    """A wrapper with its own state (``_own_state`` / ``_load_own``) next to the inner strategy's."""

    def _own_state(self) -> StrategyState:
        return StrategyState({})

    def _load_own(self, state: StrategyState) -> None:
        pass

    def state_dict(self, include_buffer: bool = True) -> StrategyState:
        state = super().state_dict(include_buffer)
        own = self._own_state()
        state.meta["own"] = own.meta
        return StrategyState(state.meta, {**state.arrays, **own.arrays})

    def load_state_dict(self, state: StrategyState) -> None:
        saved = state.meta.get("name")
        if saved != self.name:   # saved with another robust wrapper, or none: the inner state, empty windows
            other = f"{saved}."
            inner = StrategyState(state.meta["inner"], {k: v for k, v in state.arrays.items()
                                                        if not k.startswith(other)}) if saved in ROBUST else state
            self.inner.load_state_dict(inner)
            self.total = self.recent = 0
            self._load_own(StrategyState({}))
            return
        prefix = self.name + "."
        inner_arrays = {k: v for k, v in state.arrays.items() if not k.startswith(prefix)}
        super().load_state_dict(StrategyState(state.meta, inner_arrays))
        self._load_own(StrategyState(state.meta.get("own", {}), state.arrays))


class AdaptiveClip(RobustWrapper):
    """Clips a delta above ``multiplier x median`` of the last ``window`` accepted norms (``adaptive_clipped``)."""

    name = "adaptive_clip"
    counter = "adaptive_clipped"

    def __init__(self, inner: Strategy, multiplier: float = 4.0, window: int = 50, warmup: int = 10) -> None:
        super().__init__(inner)
        self.multiplier = in_range("multiplier", multiplier, 1.0, 1e6)
        self.window = positive_int("window", window)
        self.warmup = warmup_within("warmup", warmup, self.window)
        self._norms: deque[float] = deque(maxlen=self.window)

    @property
    def bound(self) -> float:
        return adaptive_bound(self._norms, self.multiplier, self.warmup)

    def offer(self, update, version: int) -> Admission:
        bound = self.bound
        norm = update.norm if update.norm is not None else global_norm(update.delta)
        if norm > bound:
            delta, factor = clip_by_global_norm(update.delta, bound, norm)
            update = dataclasses.replace(update, delta=delta, norm=norm * factor)
            self._count()
        elif update.norm is None:
            update = dataclasses.replace(update, norm=norm)   # measured once: the strategy needs it too
        admission = self.inner.offer(update, version)
        if admission.admitted:
            self._norms.append(min(norm, bound))
        return admission

    def fold(self, model: Model, version: int) -> Folded:
        folded = super().fold(model, version)
        bound = self.bound
        return dataclasses.replace(folded, metrics={**folded.metrics,
                                                    "adaptive_bound": None if math.isinf(bound) else bound})

    def describe(self) -> dict[str, Any]:
        bound = self.bound
        return {**super().describe(), "bound": None if math.isinf(bound) else bound, "norms": len(self._norms)}

    def _own_state(self) -> StrategyState:
        return StrategyState({"norms": list(self._norms)})

    def _load_own(self, state: StrategyState) -> None:
        self._norms = deque((float(x) for x in state.meta.get("norms", [])), maxlen=self.window)


class FoldTimeRobust(RobustWrapper):
    """Rewrites the inner strategy's buffered deltas just before it folds them (``_rewrite``)."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self._buffer = buffered(inner)

    def _rewrite(self, deltas: list[Model]) -> list[Model]:
        raise NotImplementedError

    def fold(self, model: Model, version: int) -> Folded:
        pending = self._buffer._pending
        usable = [i for i, p in enumerate(pending)
                  if check_delta(p.update.delta, model, None if p.sq is None else math.isfinite(p.sq)) is None]
        if usable:
            new = self._rewrite([pending[i].update.delta for i in usable])
            for i, delta in zip(usable, new):
                if delta is not pending[i].update.delta:
                    pending[i] = Pending(dataclasses.replace(pending[i].update, delta=delta, norm=None),
                                         pending[i].staleness)
        return super().fold(model, version)


class CenteredClip(FoldTimeRobust):
    """Clips each buffered delta to within ``tau`` of the reference (``centered_clipped``)."""

    name = "centered_clip"
    counter = "centered_clipped"

    def __init__(self, inner: Strategy, radius: float = 4.0, window: int = 50, warmup: int = 10,
                 beta: float = 0.5) -> None:
        super().__init__(inner)
        self.radius = in_range("radius", radius, 1.0, 1e6)
        self.window = positive_int("window", window)
        self.warmup = warmup_within("warmup", warmup, self.window)
        self.beta = in_range("beta", beta, 0.0, 0.999)
        self._distances: deque[float] = deque(maxlen=self.window)
        self._reference: Model = {}

    @property
    def tau(self) -> float:
        return adaptive_bound(self._distances, self.radius, self.warmup)

    def _rewrite(self, deltas: list[Model]) -> list[Model]:
        if not self._reference:   # the first fold: start from the buffer's median, clip nothing yet
            reference, tau = robust_center(deltas, coordinate_median), math.inf
        else:
            reference, tau = self._reference, self.tau
        clipped, distances = centered_clip(deltas, reference, tau)
        for d in distances:
            if d > tau:
                self._count()
            if self._reference:
                self._distances.append(min(d, tau))
        center = mean_model(clipped)
        self._reference = {k: (self.beta * np.asarray(reference[k], np.float64) + (1 - self.beta) * v).astype(v.dtype)
                           if k in reference else v for k, v in center.items()}
        return clipped

    def fold(self, model: Model, version: int) -> Folded:
        folded = super().fold(model, version)
        tau = self.tau
        return dataclasses.replace(folded, metrics={**folded.metrics, "centered_tau": None if math.isinf(tau) else tau})

    def describe(self) -> dict[str, Any]:
        tau = self.tau
        return {**super().describe(), "tau": None if math.isinf(tau) else tau, "distances": len(self._distances)}

    def _own_state(self) -> StrategyState:
        return StrategyState({"distances": list(self._distances)},
                             join_arrays(f"{self.name}.reference", self._reference))

    def _load_own(self, state: StrategyState) -> None:
        self._distances = deque((float(x) for x in state.meta.get("distances", [])), maxlen=self.window)
        self._reference = split_arrays(state.arrays, f"{self.name}.reference")


class TrimmedMean(FoldTimeRobust):
    """Replaces the buffered deltas by their coordinate-wise trimmed mean (``trimmed``: updates
    that went into a statistic that trimmed at least one value per coordinate)."""

    name = "trimmed_mean"
    counter = "trimmed"

    def __init__(self, inner: Strategy, trim: float = 0.2) -> None:
        super().__init__(inner)
        if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0 <= trim < 0.5:
            raise ValueError(f"trim: expected a number in [0, 0.5), got {trim!r}")
        self.trim = float(trim)
        size = self._buffer.buffer_size
        if trim > 0 and math.floor(self.trim * size + 1e-9) < 1:
            raise ValueError(f"robust trimmed_mean:{trim:g}: {self._buffer.name} folds {size} update(s) at a time, of "
                             f"which a trim of {trim:g} removes none; use a buffered strategy (fedbuff, fedavg) with a "
                             f"buffer of at least {math.ceil(1 / self.trim - 1e-9)}, or a larger trim")

    def _rewrite(self, deltas: list[Model]) -> list[Model]:
        if len(deltas) < 2:
            return deltas
        if math.floor(self.trim * len(deltas) + 1e-9) >= 1:
            for _ in deltas:
                self._count()
        center = robust_center(deltas, lambda s: trimmed_mean(s, self.trim))
        return [center] * len(deltas)


class Median(FoldTimeRobust):
    """Replaces the buffered deltas by their coordinate-wise median (``medianed``: updates in a
    buffer of three or more)."""

    name = "median"
    counter = "medianed"

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        if self._buffer.buffer_size < 3:
            raise ValueError(f"robust median: {self._buffer.name} folds {self._buffer.buffer_size} update(s) at a time, "
                             "whose median is their mean; use a buffered strategy (fedbuff, fedavg) with a buffer of "
                             "at least 3")

    def _rewrite(self, deltas: list[Model]) -> list[Model]:
        if len(deltas) < 2:
            return deltas
        if len(deltas) >= 3:
            for _ in deltas:
                self._count()
        center = robust_center(deltas, coordinate_median)
        return [center] * len(deltas)


ROBUST: dict[str, type[RobustWrapper]] = {cls.name: cls for cls in (AdaptiveClip, CenteredClip, TrimmedMean, Median)}
ROBUST_NAMES = ("none", *ROBUST)
SPEC_TEXT = "none, adaptive_clip[:multiplier], centered_clip[:radius], trimmed_mean[:trim], median"


def wrap_robust(strategy: Strategy, spec: str | None) -> Strategy:
    """``strategy`` wrapped as ``spec`` says (``None`` or ``"none"``: as it is)."""
    if spec is None:
        return strategy
    name, value = parse_robust(spec)
    if name == "none":
        return strategy
    return ROBUST[name](strategy) if value is None else ROBUST[name](strategy, value)


def is_robust_spec(spec: Any) -> bool:
    """Does ``spec`` name a robust wrapper with a valid parameter? (The config's check.)"""
    try:
        wrap_robust(_Probe(), spec)
    except ValueError:
        return False
    return True


class _Probe(BufferedStrategy):
    """A do-nothing buffered strategy to check a wrapper's parameter against (its buffer large enough for any: the
    strategy's own buffer is checked when the job builds it)."""

    name = "probe"
    buffer_size = 1 << 20

    def _fold(self, model, pending, version):
        return model, {}
