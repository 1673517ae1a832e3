"""Max-merge of supermask scores, the thesis rule for edge-popup models (Ramanujan et al.,
"What's Hidden in a Randomly Weighted Neural Network?", CVPR 2020): per weight, keep the
largest score any worker reported.

Which max, exactly: a worker trained from the scores of version ``base_version`` and sent
``delta = reported - base``. Its *reported* scores are ``base + delta``, with ``base`` the
server's scores at ``base_version`` (not the current ones). The merge is

    new[k] = max(current[k], base_1[k] + delta_1[k], ..., base_n[k] + delta_n[k])

per element, for every tensor ``k`` the deltas carry (other tensors are copied).

Stale bases: scores never decrease under this rule (``compare="value"``), so ``base <= current`` element-wise.
Taking the max of absolute reported scores means a stale report can raise a score only
above what the server holds now, never undo a later raise, and submitting the same report
twice changes nothing. (``current + delta`` instead would add every stale worker's gain
on top of gains made since, and drift upward.) To rebuild ``base``, the strategy keeps a
copy of the delta-carried tensors at each version it aggregated at, for the current version
and the ``history`` before it, so updates up to ``history`` versions stale are exact
(explicit state, saved as ``"history.<version>/<tensor>"``; memory ~ (history + 1) x score
size). A base the strategy never saw (staler than ``history``, or from before a restart
without saved state) is handled by ``missing_base``: "drop" (default; counted in
``metrics["rejected"]``) or "current" (use ``current + delta``, with the upward bias above).

``compare="value"`` (default) is the signed max above. ``models/supermask.py`` ranks weights
by ``|score|``; with that ranking ``compare="magnitude"`` fits better: per element it keeps
the candidate (current or reported) with the largest ``|score|``, sign included, so the
same properties hold for ``|score|``. Ties keep the current score.

Defaults: ``buffer_size=1``, ``history=8``, ``missing_base="drop"``, ``compare="value"``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import (
    BufferedStrategy, Drop, Folded, Pending, StrategyState, choice, join_arrays, positive_int, split_arrays,
)
from .tensors import Model, add_scaled, max_merge

MISSING_BASE = ("drop", "current")
COMPARE = ("value", "magnitude")


class SupermaskMax(BufferedStrategy):
    name = "supermask_max"

    def __init__(self, buffer_size: int = 1, history: int = 8, missing_base: str = "drop",
                 compare: str = "value") -> None:
        super().__init__()
        self.buffer_size = positive_int("buffer_size", buffer_size)
        self.history = positive_int("history", history)
        self.missing_base = choice("missing_base", missing_base, MISSING_BASE)
        self.compare = choice("compare", compare, COMPARE)
        self._history: dict[int, Model] = {}  # version -> score tensors at that version

    def _base(self, p: Pending, model: Model, version: int) -> Model | None:
        """Server scores at the update's base version (for its tensors), if known."""
        if p.update.base_version == version:
            return model
        snap = self._history.get(p.update.base_version)
        if snap is not None and all(k in snap for k in p.update.delta):
            return snap
        return model if self.missing_base == "current" else None

    def fold(self, model: Model, version: int) -> Folded:
        self._remember(model, version)
        return super().fold(model, version)

    def _remember(self, model: Model, version: int) -> None:
        keys = {k for p in self._pending for k in p.update.delta if k in model}
        snap = self._history.setdefault(version, {})
        snap.update({k: np.array(model[k], copy=True) for k in keys if k not in snap})
        for old in sorted(self._history)[:-(self.history + 1)]:
            del self._history[old]

    def _reject(self, p: Pending, model: Model, version: int) -> Drop | None:
        drop = super()._reject(p, model, version)
        if drop is None and self._base(p, model, version) is None:
            drop = Drop(p.update, "base_unknown",
                        f"scores of base version {p.update.base_version} no longer kept (history={self.history})")
        return drop

    def _fold(self, model: Model, pending: list[Pending], version: int) -> tuple[Model, dict[str, Any]]:
        reported = []
        for p in pending:
            base = self._base(p, model, version)
            base = {k: base[k] for k in p.update.delta}
            reported.append(add_scaled(base, p.update.delta))
        new = max_merge(model, reported, by_magnitude=self.compare == "magnitude")
        keys = {k for r in reported for k in r}
        total = sum(np.size(model[k]) for k in keys)
        changed = sum(int(np.count_nonzero(new[k] != model[k])) for k in keys)
        return new, {"changed_fraction": changed / total if total else 0.0}

    def _extra_state(self) -> StrategyState:
        arrays = {}
        for v, snap in self._history.items():
            arrays.update(join_arrays(f"history.{v}", snap))
        return StrategyState({"history_versions": sorted(self._history)}, arrays)

    def _load_extra(self, state: StrategyState) -> None:
        versions = state.meta.get("history_versions", [])
        self._history = {int(v): split_arrays(state.arrays, f"history.{v}") for v in versions}
