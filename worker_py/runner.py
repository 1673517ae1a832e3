"""Computes one work unit: fetch and decode its blobs (``prepare``), train (``compute``).

``prepare`` runs in the prefetch thread: it fetches the base model blob and the data shards
through the client's verified cache and keeps the decoded arrays in memory (the latest model
versions, and shards up to a byte budget), so each blob is downloaded and decoded once.
``compute`` runs ``worker_py.unit.run_unit`` (the one shared computation of a unit) on a
cached model with a per-step hook (progress, the stop check). A unit that fails for any
reason becomes ``failed_result`` (``error`` set, empty delta); ``Cancelled`` (the worker is
stopping and the grace period is over) is the only exception that leaves ``compute``.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from torch import nn

from contract.codecs import decode_delta
from contract.errors import ContractError
from contract.shards import decode_shard
from contract.units import MAX_HELD, UnitResult, WorkUnit
from contract.versions import reconstruct_checked
from models import registry
from worker_py.client import BlobError, Client, Stopped
from worker_py.feedback import ErrorFeedback
from worker_py.unit import describe, failed_result, run_unit

MODEL_VERSIONS_KEPT = 2                    # decoded base models kept in memory (and on disk)
SHARD_BYTES_KEPT = 1 << 30                 # decoded shards kept in memory, bytes
MODELS_KEPT = 2                            # built torch modules kept for reuse


class Cancelled(Exception):
    """Training was abandoned because the worker is stopping; hand the unit back."""


@dataclass
class Prepared:
    """A unit and its decoded inputs, or why it cannot run (``error``), or ``stopped`` before
    its blobs were fetched (then it is handed back)."""

    unit: WorkUnit
    base: dict[str, np.ndarray] | None = None
    x: np.ndarray | None = None   # uint8 [n, 3, 32, 32]: the unit's shards, concatenated
    y: np.ndarray | None = None   # int64 [n]
    step_graph: tuple | None = None   # (graph bytes, StepSpec) of a replica of a tab's unit (compute_as)
    error: str | None = None
    stopped: bool = False


class Runner:
    """Prepares and computes units for one worker; keeps decoded blobs and built models."""

    def __init__(self, client: Client, worker_id: str, shard_bytes: int = SHARD_BYTES_KEPT,
                 feedback: ErrorFeedback | None = None, device: Any = "cpu") -> None:
        self.client = client
        self.device = device         # where units train (models.local.run_local): the CPU or a CUDA GPU
        self.worker_id = worker_id
        self.feedback = feedback     # the error-feedback residual between units (None: off)
        self.shard_bytes = shard_bytes
        self._lock = threading.Lock()
        self._states: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._shards: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._models: OrderedDict[str, nn.Module] = OrderedDict()
        self._hook: tuple[Callable[[], bool] | None, Callable[[int, int], None] | None, int] | None = None
        self._step = 0

    # ------------------------------------------------------------------ blobs
    def prepare(self, unit: WorkUnit, stop: threading.Event | None = None) -> Prepared:
        """Fetch and decode the unit's blobs; a blob that is missing or malformed (or any other
        failure) gives a ``Prepared`` with ``error``; ``stopped`` if the worker stops first."""
        try:
            base = self._base(unit, stop)
            parts = [self._shard(sid, stop) for sid in unit.shard_ids]
            graph = self._step_graph(unit, stop) if unit.compute_as == "browser" else None
        except Stopped:
            return Prepared(unit, stopped=True)
        except Exception as e:   # BlobError, ContractError (a malformed blob), MemoryError, ...
            return Prepared(unit, error=describe(e))
        if len(parts) == 1:
            x, y = parts[0]
        else:
            x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return Prepared(unit, base, x, y, step_graph=graph)

    def _step_graph(self, unit: WorkUnit, stop: threading.Event | None) -> tuple:
        """The tab's step graph for a replica of a tab's unit: the coordinator's manifest, then its graph
        blob (through the verified blob cache)."""
        from models.browser_unit import spec_of_manifest

        manifest = self.client.retry(lambda: self.client.step_manifest(unit.model, unit.batch_size), stop)
        return self._fetch(manifest["graph"], stop), spec_of_manifest(manifest)

    def _fetch(self, bid: str, stop: threading.Event | None) -> bytes:
        if stop is not None and stop.is_set():
            raise Stopped("stopping")
        return self.client.retry(lambda: self.client.fetch_blob(bid), stop)

    def held(self) -> tuple[str, ...]:
        """The model versions this worker holds decoded, newest first (``UnitRequest.held``)."""
        with self._lock:
            return tuple(reversed(self._states))[:MAX_HELD]

    def _base(self, unit: WorkUnit, stop: threading.Event | None) -> dict[str, np.ndarray]:
        """The unit's base model: rebuilt from a held version and the unit's version delta when it
        names one (checked by hash: docs/protocol.md, version deltas), else downloaded whole. A
        reconstruction that fails its check (a version this worker no longer holds, a corrupt delta)
        falls back to downloading ``model_version`` whole."""
        bd = unit.base_delta
        with self._lock:
            held = self._states.get(bd["from"]) if bd is not None and unit.model_version not in self._states else None
        if held is not None:
            try:
                data = self._fetch(bd["blob"], stop)
                if self.client.cache is not None:   # used once: not worth the disk
                    self.client.cache.discard(bd["blob"])
                return self._keep(unit.model_version, reconstruct_checked(held, data, unit.model_version))
            except (ContractError, BlobError) as e:
                self.client.log(f"unit {unit.unit_id}: version delta not usable ({e}); downloading the whole base")
        return self._state(unit.model_version, stop)

    def _state(self, version: str, stop: threading.Event | None) -> dict[str, np.ndarray]:
        """The decoded base model ``version`` (a CTD1 container of the float state: fp32, or fp16)."""
        with self._lock:
            if version in self._states:
                self._states.move_to_end(version)
                return self._states[version]
        return self._keep(version, decode_delta(self._fetch(version, stop)))

    def _keep(self, version: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self._states[version] = state
            while len(self._states) > MODEL_VERSIONS_KEPT:
                old, _ = self._states.popitem(last=False)
                if self.client.cache is not None:   # old versions would only fill the disk
                    self.client.cache.discard(old)
        return state

    def _shard(self, bid: str, stop: threading.Event | None) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if bid in self._shards:
                self._shards.move_to_end(bid)
                return self._shards[bid]
        x, y = decode_shard(self._fetch(bid, stop))
        x = x.copy()   # a writable array of its own (torch warns on read-only views of the blob bytes)
        with self._lock:
            self._shards[bid] = (x, y)
            while len(self._shards) > 1 and sum(a.nbytes + b.nbytes for a, b in self._shards.values()) \
                    > self.shard_bytes:
                self._shards.popitem(last=False)
        return x, y

    # ------------------------------------------------------------------ training
    def _model(self, name: str) -> nn.Module:
        """A built module for ``name``, reused across units (``run_local`` overwrites its state)."""
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        model = registry.build(name)
        model.register_forward_pre_hook(self._on_forward)
        self._models[name] = model
        while len(self._models) > MODELS_KEPT:
            self._models.popitem(last=False)
        return model

    def _on_forward(self, module: nn.Module, args: tuple) -> None:
        """Runs before every forward pass (one per SGD step): progress, and the stop check."""
        if self._hook is None:
            return
        should_stop, on_step, total = self._hook
        if should_stop is not None and should_stop():
            raise Cancelled("the worker is stopping")
        self._step += 1
        if on_step is not None:
            on_step(self._step, total)

    def compute(self, prepared: Prepared, should_stop: Callable[[], bool] | None = None,
                on_step: Callable[[int, int], None] | None = None) -> UnitResult:
        """Train the unit and return its result (an error result if anything fails).

        ``should_stop()`` is polled before each step; when it says yes, ``Cancelled`` is raised.
        ``on_step(step, total)`` reports progress.
        """
        unit, t0 = prepared.unit, time.perf_counter()
        if prepared.error is not None:
            return failed_result(unit, self.worker_id, prepared.error)
        try:
            model = self._model(unit.model)
            self._hook, self._step = (should_stop, on_step, unit.local_steps), 0
            return run_unit(unit, prepared.base, prepared.x, prepared.y, self.worker_id, model=model,
                            feedback=self.feedback, step_graph=prepared.step_graph, device=self.device)
        except Cancelled:
            raise
        except Exception as e:   # any failure of this unit is reported, and the worker carries on
            return failed_result(unit, self.worker_id, describe(e), time.perf_counter() - t0)
        finally:
            self._hook = None

    def settled(self, unit_id: str, accepted: bool) -> None:
        """The coordinator's answer to ``unit_id``'s result: an accepted result's error-feedback residual
        is kept; otherwise (failed, refused, superseded, undelivered) the previous one stays."""
        if self.feedback is not None:
            if accepted:
                self.feedback.commit(unit_id)
            else:
                self.feedback.discard(unit_id)
