"""FedBuff: Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS 2022.

Updates of any base version are buffered; once ``buffer_size`` (the paper's K) are in,
``step = (1/K) sum_i s(staleness_i) delta_i`` and ``model <- model + server_lr * step``.
Dividing by the count (not by the sum of weights) follows the paper: stale updates shrink
the step. A deadline flush with n < K updates divides by n. Optional server momentum
(heavy ball, ``m <- beta m + step``, ``model <- model + server_lr * m``) keeps ``m`` as
explicit state, saved by ``state_dict`` under ``"momentum/<tensor>"``.

Defaults: ``buffer_size=10``, ``server_lr=1.0``, ``staleness="polynomial"`` with
``staleness_a=0.5`` (s(t) = 1 / sqrt(1 + t), the paper's choice), ``server_momentum=0.0``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import (
    BufferedStrategy, Pending, StrategyState, in_range, join_arrays, positive_float, positive_int, split_arrays,
)
from .staleness import StalenessFn
from .tensors import Model, add_scaled, momentum_step, scale, weighted_sum


class FedBuff(BufferedStrategy):
    name = "fedbuff"

    def __init__(self, buffer_size: int = 10, server_lr: float = 1.0, staleness: str = "polynomial",
                 staleness_a: float | None = None, staleness_b: float | None = None,
                 server_momentum: float = 0.0) -> None:
        super().__init__()
        self.buffer_size = positive_int("buffer_size", buffer_size)
        self.server_lr = positive_float("server_lr", server_lr)
        self._s = StalenessFn(staleness, staleness_a, staleness_b)
        self.staleness, self.staleness_a, self.staleness_b = staleness, self._s.a, self._s.b
        self.server_momentum = in_range("server_momentum", server_momentum, 0.0, 0.999)
        self._momentum: Model = {}

    def _fold(self, model: Model, pending: list[Pending], version: int) -> tuple[Model, dict[str, Any]]:
        weights = [self._s(p.staleness) for p in pending]
        step = scale(weighted_sum([p.update.delta for p in pending], weights), 1.0 / len(pending))
        if self.server_momentum > 0:
            self._momentum = {k: v.astype(np.float32)
                              for k, v in momentum_step(self._momentum, step, self.server_momentum).items()}
            step = self._momentum
        return add_scaled(model, step, self.server_lr), {"staleness_weight_mean": float(np.mean(weights))}

    def _extra_state(self) -> StrategyState:
        return StrategyState({}, join_arrays("momentum", self._momentum))

    def _load_extra(self, state: StrategyState) -> None:
        self._momentum = split_arrays(state.arrays, "momentum")
