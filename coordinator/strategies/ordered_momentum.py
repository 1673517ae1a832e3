"""Ordered momentum: after Shi, Yang, Li, "Ordered Momentum for Asynchronous SGD", NeurIPS 2024
(arXiv:2407.19234), applied to deltas (pseudo-gradients) of self-contained units.

Server-side heavy-ball momentum, ``m <- beta m + d``, ``model <- model + lr m``, moves each
delta ``lr / (1 - beta)`` in total, spread over the updates after it arrives. A delta that
arrives ``s`` versions late has missed the first ``s`` of those shares: the ones it would
have had if it had been folded into the momentum at its base version, in order. OrMo puts it
back in its place: the missed shares are applied at once, the rest enter the momentum,
``model <- model + lr ((1 - beta^s) / (1 - beta)) d`` and ``m <- beta m + beta^s d``, then
``model <- model + lr m``. Every delta still moves the model ``lr / (1 - beta)`` in total,
as in one process, whatever its staleness; a fresh delta (s = 0) is plain heavy ball.
(OrMo proper orders single gradients by iteration index; here a version is one fold.)

Batch-norm running statistics bypass the momentum: the model takes the mean of the
buffered deltas' statistics (the coordinator rebases them to the current model).

Defaults: ``server_lr=1.0``, ``server_momentum=0.9``, ``staleness="constant"`` (an extra
factor ``s(staleness)`` on each delta; "constant" throws nothing away).
State: the momentum, ``"momentum/<tensor>"``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import BufferedStrategy, Pending, StrategyState, in_range, join_arrays, positive_float, split_arrays
from .delayed_nesterov import split_statistics
from .staleness import StalenessFn
from .tensors import Model, add_scaled, copy_model, scale, weighted_sum


def catch_up(beta: float, staleness: int) -> tuple[float, float]:
    """(share of a delta applied at once, share entering the momentum) for a delta ``staleness`` late.

    ``(1 - beta^s) / (1 - beta)`` and ``beta^s``: together the delta moves the model
    ``1 / (1 - beta)`` over time, as a fresh one does.
    """
    late = beta ** staleness
    now = float(staleness) if beta == 1.0 else (1.0 - late) / (1.0 - beta)
    return now, late


def ordered_step(momentum: Model, delta: Model, beta: float, staleness: int) -> tuple[Model, Model]:
    """(step to add to the model before scaling by lr, new momentum) for one delta."""
    now, late = catch_up(beta, staleness)
    new = weighted_sum([momentum, delta], [beta, late]) if momentum else scale(delta, late)
    step = weighted_sum([new, delta], [1.0, now]) if now else new
    return step, new


class OrderedMomentum(BufferedStrategy):
    name = "ordered_momentum"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9, staleness: str = "constant",
                 staleness_a: float | None = None, staleness_b: float | None = None) -> None:
        super().__init__()
        self.server_lr = positive_float("server_lr", server_lr)
        self.server_momentum = in_range("server_momentum", server_momentum, 0.0, 0.999)
        self._s = StalenessFn(staleness, staleness_a, staleness_b)
        self.staleness, self.staleness_a, self.staleness_b = staleness, self._s.a, self._s.b
        self._momentum: Model = {}

    def _fold(self, model: Model, pending: list[Pending], version: int) -> tuple[Model, dict[str, Any]]:
        weights = [self._s(p.staleness) for p in pending]
        total: Model = {}
        stats = []
        for p, w in zip(pending, weights):
            params, stat = split_statistics(p.update.delta)
            stats.append(stat)
            step, self._momentum = ordered_step(self._momentum, scale(params, w), self.server_momentum, p.staleness)
            self._momentum = {k: v.astype(np.float32) for k, v in self._momentum.items()}
            total = weighted_sum([total, step], [1.0, 1.0]) if total else step
        total = scale(total, self.server_lr)
        if any(stats):
            total.update(scale(weighted_sum(stats, [1.0] * len(stats)), 1.0 / len(stats)))
        new = add_scaled(model, total) if total else copy_model(model)
        return new, {"staleness_weight_mean": float(np.mean(weights)),
                     "catch_up_mean": float(np.mean([catch_up(self.server_momentum, p.staleness)[0] for p in pending]))}

    def _extra_state(self) -> StrategyState:
        return StrategyState({}, join_arrays("momentum", self._momentum))

    def _load_extra(self, state: StrategyState) -> None:
        self._momentum = split_arrays(state.arrays, "momentum")
