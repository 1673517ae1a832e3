"""FedAsync: Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", arXiv:1903.03934
(2019; OPT workshop, NeurIPS 2020).

The paper mixes the worker's model into the server model,
``x <- (1 - a_t) x + a_t x_local`` with ``a_t = alpha * s(staleness)``. The worker's model
is ``x_local = x_base + delta``; the strategy holds only the current model, so it uses
``x_base ~ x`` and applies ``x <- x + a_t * delta`` (exact when the staleness is 0).
Buffered updates are applied one after another in arrival order.

Defaults: ``alpha=0.6`` (in (0, 1]), ``staleness="polynomial"`` with ``staleness_a=0.5``
(the paper's FedAsync+Poly); "hinge" defaults to a=10, b=4 and "constant" is also offered.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import BufferedStrategy, Pending, in_range
from .staleness import StalenessFn
from .tensors import Model, add_scaled, weighted_sum


class FedAsync(BufferedStrategy):
    name = "fedasync"

    def __init__(self, alpha: float = 0.6, staleness: str = "polynomial",
                 staleness_a: float | None = None, staleness_b: float | None = None) -> None:
        super().__init__()
        self.alpha = in_range("alpha", alpha, 0.0, 1.0, low_open=True)
        self._s = StalenessFn(staleness, staleness_a, staleness_b)
        self.staleness, self.staleness_a, self.staleness_b = staleness, self._s.a, self._s.b

    def _fold(self, model: Model, pending: list[Pending], version: int) -> tuple[Model, dict[str, Any]]:
        mixing = [self.alpha * self._s(p.staleness) for p in pending]
        step = weighted_sum([p.update.delta for p in pending], mixing)
        return add_scaled(model, step), {"mixing_mean": float(np.mean(mixing))}
