"""Mean of supermask score deltas: FedAvg (McMahan et al., AISTATS 2017) applied to the
scores of an edge-popup model (Ramanujan et al., "What's Hidden in a Randomly Weighted
Neural Network?", CVPR 2020), made asynchronous with a buffer as in FedBuff.

Workers train only the scores (the random weights stay frozen), so their deltas carry only
score tensors; the strategy applies to whatever tensors a delta carries. Once
``buffer_size`` updates of any base version are in:
``scores <- scores + server_lr * sum_i w_i delta_i / sum_i w_i`` with
``w_i = num_samples_i * s(staleness_i)``. Being a normalised mean, a staleness function
only shifts weight between updates of one buffer; it does not shrink the step.

Defaults: ``buffer_size=4``, ``server_lr=1.0``, ``staleness="constant"``.
"""
from __future__ import annotations

from typing import Any

from .base import BufferedStrategy, Pending, positive_float, positive_int
from .staleness import StalenessFn
from .tensors import Model, add_scaled, weighted_mean


class SupermaskMean(BufferedStrategy):
    name = "supermask_mean"

    def __init__(self, buffer_size: int = 4, server_lr: float = 1.0, staleness: str = "constant",
                 staleness_a: float | None = None, staleness_b: float | None = None) -> None:
        super().__init__()
        self.buffer_size = positive_int("buffer_size", buffer_size)
        self.server_lr = positive_float("server_lr", server_lr)
        self._s = StalenessFn(staleness, staleness_a, staleness_b)
        self.staleness, self.staleness_a, self.staleness_b = staleness, self._s.a, self._s.b

    def _fold(self, model: Model, pending: list[Pending], version: int) -> tuple[Model, dict[str, Any]]:
        weights = [p.update.num_samples * self._s(p.staleness) for p in pending]
        mean = weighted_mean([p.update.delta for p in pending], weights)
        return add_scaled(model, mean, self.server_lr), {}
