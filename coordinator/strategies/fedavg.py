"""Synchronous FedAvg: McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-
Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.

A round is one model version. The strategy waits for ``clients_per_round`` updates based on
the current version; an update from any other version is dropped on arrival (counted in
``dropped``), and buffered updates from an earlier round are discarded once the version
moves on. The new model is ``model + server_lr * sum_i n_i delta_i / sum_i n_i`` (n_i =
``num_samples``); ``server_lr = 1`` is the paper's rule. Updates that arrive after the
round is due but before ``aggregate`` runs are folded in too.

Defaults: ``clients_per_round=10``, ``server_lr=1.0``.
"""
from __future__ import annotations

from typing import Any

from .base import BufferedStrategy, Drop, Pending, Update, positive_float, positive_int
from .tensors import Model, add_scaled, weighted_mean


class FedAvg(BufferedStrategy):
    name = "fedavg"

    def __init__(self, clients_per_round: int = 10, server_lr: float = 1.0) -> None:
        super().__init__()
        self.clients_per_round = self.buffer_size = positive_int("clients_per_round", clients_per_round)
        self.server_lr = positive_float("server_lr", server_lr)

    def _evict(self, version: int) -> list[Drop]:
        old = [p for p in self._pending if p.update.base_version != version]
        self._pending = [p for p in self._pending if p.update.base_version == version]
        return [Drop(p.update, "off_round", f"round {p.update.base_version} ended at version {version}") for p in old]

    def _admit(self, update: Update, version: int) -> Drop | None:
        if update.base_version == version:
            return None
        return Drop(update, "off_round", f"computed on version {update.base_version}, the round is {version}")

    def _fold(self, model: Model, pending: list[Pending], version: int) -> tuple[Model, dict[str, Any]]:
        mean = weighted_mean([p.update.delta for p in pending], [p.update.num_samples for p in pending])
        return add_scaled(model, mean, self.server_lr), {}
