"""Delayed Nesterov momentum: Liu, Chhaparia, Douillard, Kale, Rusu, Shen, Szlam, Ranzato,
"Asynchronous Local-SGD Training for Language Modeling", arXiv:2401.09135 (2024).

Each delta is a pseudo-gradient for an outer optimizer, as in DiLoCo (Douillard et al.,
arXiv:2311.08105: outer Nesterov momentum), but the updates arrive one at a time from stale
bases, so the momentum is updated only once every ``period`` updates (the paper's N), with
the mean ``g`` of the deltas gathered since: ``m <- beta m + g`` and
``model <- model + lr (beta m + g)`` (Nesterov; ``lr m`` without). In between, each delta
is applied at once at ``lr c`` (the paper's c in [0, 1/N]; 0 holds them back), and the
momentum step leaves out what was applied that way. ``period=1`` is outer Nesterov on
every update (asynchronous DiLoCo / FedAvgM).

Batch-norm running statistics (``*.running_mean``, ``*.running_var``) are estimates, not
gradients: they bypass the momentum and take the mean of the buffered deltas (which the
coordinator rebases to the current model, so the model gets the workers' mean statistics).

Staleness: ``s(staleness)`` scales each delta (default "constant": nothing thrown away).
State: the momentum (``"momentum/<tensor>"``), the deltas gathered since the last momentum
step (``"gathered/<tensor>"``) and their count.

Defaults: ``server_lr=1.0``, ``server_momentum=0.9``, ``period=1``, ``c=0.0``,
``nesterov=True``, ``staleness="constant"``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from models.state_names import is_running_stat

from .base import (
    BufferedStrategy, Pending, StrategyState, in_range, join_arrays, positive_float, positive_int, split_arrays,
)
from .staleness import StalenessFn
from .tensors import Model, add_scaled, copy_model, scale, weighted_sum


def split_statistics(delta: Model) -> tuple[Model, Model]:
    """(trainable part, running-statistics part) of a delta."""
    return ({k: v for k, v in delta.items() if not is_running_stat(k)},
            {k: v for k, v in delta.items() if is_running_stat(k)})


def accumulate(total: Model, delta: Model, weight: float = 1.0) -> Model:
    """total + weight * delta over the union of names (float64; a missing tensor counts as zero)."""
    return weighted_sum([total, delta], [1.0, weight]) if total else scale(delta, weight)


def momentum_update(momentum: Model, gathered: Model, count: int, beta: float, lr: float, c: float,
                    nesterov: bool) -> tuple[Model, Model]:
    """One delayed momentum step: (step to add to the model, new momentum).

    ``g = gathered / count``, ``m' = beta m + g``, step ``= lr (beta m' + g)`` (Nesterov) or
    ``lr m'``, minus ``lr c gathered``: the share already applied as the deltas arrived.
    """
    g = scale(gathered, 1.0 / count)
    new = weighted_sum([momentum, g], [beta, 1.0]) if momentum else g
    step = weighted_sum([new, g], [beta, 1.0]) if nesterov else new
    step = scale(step, lr)
    if c:
        step = weighted_sum([step, gathered], [1.0, -lr * c])
    return step, new


class DelayedNesterov(BufferedStrategy):
    name = "delayed_nesterov"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9, period: int = 1, c: float = 0.0,
                 nesterov: bool = True, staleness: str = "constant", staleness_a: float | None = None,
                 staleness_b: float | None = None) -> None:
        super().__init__()
        self.server_lr = positive_float("server_lr", server_lr)
        self.server_momentum = in_range("server_momentum", server_momentum, 0.0, 0.999)
        self.period = positive_int("period", period)
        self.c = in_range("c", c, 0.0, 1.0 / self.period)
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov: expected true or false, got {nesterov!r}")
        self.nesterov = nesterov
        self._s = StalenessFn(staleness, staleness_a, staleness_b)
        self.staleness, self.staleness_a, self.staleness_b = staleness, self._s.a, self._s.b
        self._momentum: Model = {}
        self._gathered: Model = {}
        self._count = 0

    def _fold(self, model: Model, pending: list[Pending], version: int) -> tuple[Model, dict[str, Any]]:
        weights = [self._s(p.staleness) for p in pending]
        step: Model = {}
        stats = []
        momentum_steps = 0
        for p, w in zip(pending, weights):
            params, stat = split_statistics(p.update.delta)
            stats.append(stat)
            self._gathered = accumulate(self._gathered, params, w)
            self._count += 1
            if self.c:
                step = accumulate(step, params, self.server_lr * self.c * w)
            if self._count >= self.period:
                delayed, self._momentum = momentum_update(self._momentum, self._gathered, self._count,
                                                          self.server_momentum, self.server_lr, self.c, self.nesterov)
                self._momentum = {k: v.astype(np.float32) for k, v in self._momentum.items()}
                step = accumulate(step, delayed)
                self._gathered, self._count = {}, 0
                momentum_steps += 1
        if any(stats):
            step.update(scale(weighted_sum(stats, [1.0] * len(stats)), 1.0 / len(stats)))
        new = add_scaled(model, step) if step else copy_model(model)
        return new, {"staleness_weight_mean": float(np.mean(weights)), "momentum_steps": momentum_steps,
                     "gathered": self._count}

    def _extra_state(self) -> StrategyState:
        arrays = {**join_arrays("momentum", self._momentum),
                  **join_arrays("gathered", {k: np.asarray(v, np.float32) for k, v in self._gathered.items()})}
        return StrategyState({"count": self._count}, arrays)

    def _load_extra(self, state: StrategyState) -> None:
        self._momentum = split_arrays(state.arrays, "momentum")
        self._gathered = {k: v.astype(np.float64) for k, v in split_arrays(state.arrays, "gathered").items()}
        self._count = int(state.meta.get("count", 0))
