"""Asynchronous SGD in the spirit of Downpour SGD: Dean et al., "Large Scale Distributed
Deep Networks", NeurIPS 2012.

Every update is applied as soon as it arrives, whatever its base version:
``model <- model + server_lr * s(staleness) * delta``. With several updates buffered (the
loop was busy) they are applied one after another, which for this rule is their sum; batch-norm
statistics, rebased on the model, take at most a convex combination (``fused_step``'s ``convex``:
summed, a hundred stale ones folded at once overshot and grew without bound).

Defaults: ``server_lr=1.0``, ``staleness="constant"`` (plain Downpour; see ``staleness.py``
for "polynomial" and "hinge" and their ``staleness_a`` / ``staleness_b``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from models.state_names import is_running_stat

from .base import BufferedStrategy, Pending, positive_float
from .staleness import StalenessFn
from .tensors import Model, fused_step


class AsyncSGD(BufferedStrategy):
    name = "async_sgd"
    fused = True

    def __init__(self, server_lr: float = 1.0, staleness: str = "constant",
                 staleness_a: float | None = None, staleness_b: float | None = None) -> None:
        super().__init__()
        self.server_lr = positive_float("server_lr", server_lr)
        self._s = StalenessFn(staleness, staleness_a, staleness_b)
        self.staleness, self.staleness_a, self.staleness_b = staleness, self._s.a, self._s.b

    def _fold(self, model: Model, pending: list[Pending], version: int) -> tuple[Model, dict[str, Any]]:
        weights = [self._s(p.staleness) for p in pending]
        new, info = fused_step(model, [p.update.delta for p in pending], weights, self.server_lr,
                               known_sq=[p.sq for p in pending], convex=is_running_stat)
        return new, {"staleness_weight_mean": float(np.mean(weights)), "_step_sq": info["step_sq"],
                     "_delta_sq": info["delta_sq"]}
