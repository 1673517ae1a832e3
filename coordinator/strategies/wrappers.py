"""Cross-cutting guards that wrap any strategy instead of subclassing it.

- ``StalenessCap(inner, max_staleness)``: drops updates staler than the cap on arrival;
  FedAsync (Xie et al. 2019) assumes bounded staleness, this enforces it.
- ``NormClip(inner, max_norm)``: scales a delta whose global L2 norm exceeds ``max_norm``
  down to that norm before the inner strategy sees it; norm bounding against outsized or
  malicious updates as in Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor
  Federated Learning?", arXiv:1911.07963 (2019).
- ``Lookahead(inner, total_samples, every_samples)``: airbench94's lookahead (Jordan, "94% on
  CIFAR-10 in 3.29 seconds", 2024; after Zhang et al., "Lookahead Optimizer", NeurIPS 2019) on the
  coordinator: a running average of the versions, synced after every ``every_samples`` folded
  samples by ``models.recipe.lookahead_decay`` of the job's progress; the new version is the
  average (none of it early in the run, most at the end), and units train on from it.
- ``Freeze(inner, after)``: tensors a model trains for its first epochs only (airbench's whitening
  bias, 3 epochs): once ``after[name]`` samples are folded, each new version keeps the tensor as the
  version folded into had it (units still train it; what they did to it is not applied).

Compose them: ``StalenessCap(NormClip(FedBuff(), 5.0), 20)`` (cap first: a dropped update
is never normed). A wrapper counts what it did in total (``describe``) and since the last
aggregation (``metrics``); its state wraps the inner state's ``meta`` and passes the inner
``arrays`` through unchanged. An update a wrapper drops is reported in the ``Admission``
like any other drop, so the ledger records it with its reason.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from models.recipe import lookahead_decay

from .base import Admission, Drop, Folded, Strategy, StrategyState, Update, positive_float, positive_int
from .tensors import Model, clip_by_global_norm, global_norm


class Wrapper(Strategy):
    """Delegates to ``inner``; ``counter`` names what the wrapper counts."""

    counter: str = "count"

    def __init__(self, inner: Strategy) -> None:
        if not isinstance(inner, Strategy):
            raise ValueError(f"inner: expected a Strategy, got {type(inner).__name__}")
        self.inner = inner
        self.total = 0  # since construction (or the loaded state)
        self.recent = 0  # since the last aggregate

    def _count(self) -> None:
        self.total += 1
        self.recent += 1

    def offer(self, update: Update, version: int) -> Admission:
        return self.inner.offer(update, version)

    def fold(self, model: Model, version: int) -> Folded:
        folded = self.inner.fold(model, version)
        metrics = {**folded.metrics, self.counter: self.recent}
        self.recent = 0
        return dataclasses.replace(folded, metrics=metrics)

    def withdraw(self, worker_id: str) -> list[Update]:
        return self.inner.withdraw(worker_id)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params(), self.counter: self.total,
                "inner": self.inner.describe()}

    def state_dict(self, include_buffer: bool = True) -> StrategyState:
        inner = self.inner.state_dict(include_buffer)
        meta = {"name": self.name, "params": self.params(), "total": self.total,
                "recent": self.recent, "inner": inner.meta}
        return StrategyState(meta, inner.arrays)

    def load_state_dict(self, state: StrategyState) -> None:
        self._check_name(state)
        self.inner.load_state_dict(StrategyState(state.meta["inner"], state.arrays))
        self.total, self.recent = int(state.meta["total"]), int(state.meta["recent"])


class StalenessCap(Wrapper):
    """Drops (``add`` returns False, counted as ``capped``) updates with staleness > cap."""

    name = "staleness_cap"
    counter = "capped"

    def __init__(self, inner: Strategy, max_staleness: int) -> None:
        super().__init__(inner)
        if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 0:
            raise ValueError(f"max_staleness: expected an integer >= 0, got {max_staleness!r}")
        self.max_staleness = max_staleness

    def offer(self, update: Update, version: int) -> Admission:
        staleness = version - update.base_version
        if staleness > self.max_staleness:
            self._count()
            return Admission(False, False, (Drop(update, "stale", f"staleness {staleness} > {self.max_staleness}"),))
        return self.inner.offer(update, version)


class NormClip(Wrapper):
    """Scales deltas with global L2 norm > ``max_norm`` down to ``max_norm`` (``clipped``)."""

    name = "norm_clip"
    counter = "clipped"

    def __init__(self, inner: Strategy, max_norm: float) -> None:
        super().__init__(inner)
        self.max_norm = positive_float("max_norm", max_norm)

    def offer(self, update: Update, version: int) -> Admission:
        norm = update.norm if update.norm is not None else global_norm(update.delta)
        delta, factor = clip_by_global_norm(update.delta, self.max_norm, norm)
        if factor < 1.0:
            self._count()
        if factor < 1.0 or update.norm is None:
            update = dataclasses.replace(update, delta=delta, norm=norm * factor)
        return self.inner.offer(update, version)


class Lookahead(Wrapper):
    """The versions' running average (``avg``), synced after every ``every_samples`` folded samples and at
    the end of the budget (``total_samples``): ``avg += (1 - d) (new - avg)`` with ``d`` =
    ``lookahead_decay(samples folded / total_samples, samples since the last sync / batch)``, where the
    batch is ``every_samples / 5`` (one process's step, which syncs every 5), and the new version is
    ``avg``. Floating-point tensors only (integer counters pass through). ``syncs`` counts them."""

    name = "lookahead"
    counter = "syncs"
    PER_SYNC = 5   # one process's steps between syncs (models.train.Lookahead.EVERY)

    def __init__(self, inner: Strategy, total_samples: int, every_samples: int) -> None:
        super().__init__(inner)
        self.total_samples = positive_int("total_samples", total_samples)
        self.every_samples = positive_int("every_samples", every_samples)
        self.avg: Model | None = None    # from the first model folded into
        self.folded_samples = 0          # in total, since the job began (progress)
        self.since = 0                   # since the last sync

    def fold(self, model: Model, version: int) -> Folded:
        if self.avg is None:
            self.avg = {k: np.array(v, dtype=v.dtype, copy=True) for k, v in model.items()
                        if np.issubdtype(v.dtype, np.floating)}
        folded = self.inner.fold(model, version)
        samples = sum(u.num_samples for u in folded.folded)
        self.folded_samples += samples
        self.since += samples
        if samples and (self.since >= self.every_samples or self.folded_samples >= self.total_samples):
            steps = self.since * self.PER_SYNC / self.every_samples
            decay = lookahead_decay(self.folded_samples / self.total_samples, steps)
            new = dict(folded.model)   # the inner fold's own model: its tensors are replaced, none is changed
            for k, avg in self.avg.items():
                if k in new:
                    avg += (1.0 - decay) * (new[k].astype(avg.dtype, copy=False) - avg)
                    new[k] = avg.astype(new[k].dtype, copy=True)
            self.since = 0
            self._count()
            folded = dataclasses.replace(folded, model=new, metrics={**folded.metrics, "lookahead_decay": decay})
        metrics = {**folded.metrics, self.counter: self.recent}
        self.recent = 0
        return dataclasses.replace(folded, metrics=metrics)

    def state_dict(self, include_buffer: bool = True) -> StrategyState:
        state = super().state_dict(include_buffer)
        state.meta.update(folded_samples=self.folded_samples, since=self.since)
        mine = {f"lookahead_avg/{k}": np.array(v, copy=True) for k, v in (self.avg or {}).items()}
        return StrategyState(state.meta, {**state.arrays, **mine})

    def load_state_dict(self, state: StrategyState) -> None:
        prefix = "lookahead_avg/"
        inner = {k: v for k, v in state.arrays.items() if not k.startswith(prefix)}
        super().load_state_dict(StrategyState(state.meta, inner))
        avg = {k[len(prefix):]: np.array(v, copy=True) for k, v in state.arrays.items() if k.startswith(prefix)}
        self.avg = avg or None
        self.folded_samples, self.since = int(state.meta["folded_samples"]), int(state.meta["since"])


class Freeze(Wrapper):
    """Once ``after[name]`` samples are folded, the new version's ``name`` is the one the fold started
    from: the tensor stays as it is, as one process stops training it (``models.airbench``: the
    whitening bias after 3 epochs, ``start_epoch``). The fold that crosses the mark is applied whole.
    ``held`` counts the folds that kept a tensor."""

    name = "freeze"
    counter = "held"

    def __init__(self, inner: Strategy, after: dict[str, int]) -> None:
        super().__init__(inner)
        if not isinstance(after, dict) or not after:
            raise ValueError(f"after: expected a non-empty dict of tensor name -> samples, got {after!r}")
        self.after = {str(k): positive_int(f"after[{k}]", v) for k, v in after.items()}
        self.folded_samples = 0

    def fold(self, model: Model, version: int) -> Folded:
        folded = self.inner.fold(model, version)
        frozen = [k for k, n in self.after.items() if self.folded_samples >= n and k in model and k in folded.model]
        self.folded_samples += sum(u.num_samples for u in folded.folded)
        if frozen and folded.folded:
            new = dict(folded.model)   # the inner fold's own model: its tensors are replaced, none is changed
            for k in frozen:
                new[k] = np.array(model[k], copy=True)
            self._count()
            folded = dataclasses.replace(folded, model=new)
        metrics = {**folded.metrics, self.counter: self.recent}
        self.recent = 0
        return dataclasses.replace(folded, metrics=metrics)

    def state_dict(self, include_buffer: bool = True) -> StrategyState:
        state = super().state_dict(include_buffer)
        state.meta.update(folded_samples=self.folded_samples)
        return state

    def load_state_dict(self, state: StrategyState) -> None:
        super().load_state_dict(state)
        self.folded_samples = int(state.meta["folded_samples"])
