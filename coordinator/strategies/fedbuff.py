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

from models.state_names import is_running_stat

from .base import (
    BufferedStrategy, Pending, StrategyState, in_range, join_arrays, positive_float, positive_int, split_arrays,
)
from .staleness import StalenessFn
from .tensors import Model, fused_step


class FedBuff(BufferedStrategy):
    name = "fedbuff"
    fused = True

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
        scaled = [w / len(pending) for w in weights]
        momentum = self._momentum if self.server_momentum > 0 else None
        new, info = fused_step(model, [p.update.delta for p in pending], scaled, self.server_lr, momentum=momentum,
                               beta=self.server_momentum, known_sq=[p.sq for p in pending], convex=is_running_stat)
        if momentum is not None:
            self._momentum = info["momentum"]
        return new, {"staleness_weight_mean": float(np.mean(weights)), "_step_sq": info["step_sq"],
                     "_delta_sq": info["delta_sq"]}

    def _extra_state(self) -> StrategyState:
        return StrategyState({}, join_arrays("momentum", self._momentum))

    def _load_extra(self, state: StrategyState) -> None:
        self._momentum = split_arrays(state.arrays, "momentum")
