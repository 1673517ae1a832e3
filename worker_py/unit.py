"""One work unit, the way every Python worker runs it: train, encode, build the result.

Shared by the headless worker (``worker_py.runner``), the churn simulator
(``coordinator.sim.engine``) and the tests' fault worker, so a unit computes the same result
wherever it runs. Imports the contract and the models, never the worker's CLI nor the
coordinator. Also the worker policy the simulator reproduces: when to ask for the next unit.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from torch import nn

import time

from contract.codecs import encode_delta, get_codec
from contract.units import MAX_ERROR_CHARS, UnitResult, WorkUnit
from worker_py.feedback import ErrorFeedback
from models.browser_unit import run_with_graph
from models.local import run_local
from models.recipe import Recipe

HAND_BACK = "returned: worker stopping"   # error text of a unit handed back unstarted or unfinished
PREFETCH_MARGIN = 2.0     # ask for the next unit when the current one has about this many times the
                          # last fetch's duration left: late, so its base model is fresh (an early
                          # ask adds staleness), early enough that its blobs arrive in time


def run_unit(unit: WorkUnit, base: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, worker_id: str,
             model: nn.Module | None = None, compute_seconds: float | None = None,
             feedback: ErrorFeedback | None = None, step_graph: tuple[bytes, Any] | None = None,
             device: Any = "cpu") -> UnitResult:
    """Train ``unit`` from the decoded base state on its shards (``x`` uint8 [n, 3, 32, 32], ``y``)
    and return its result, the delta encoded with the unit's codec.

    ``model``: a built ``unit.model`` to reuse (its state is overwritten). ``compute_seconds``:
    reported instead of the measured training time (the simulator's clock). ``feedback``: the
    worker's error-feedback state, used when the unit says so (``unit.error_feedback``); the caller
    commits or discards it once it knows whether the result was accepted. Any failure raises;
    a caller that carries on sends ``failed_result(unit, worker_id, describe(e))``.

    A replica of a tab's unit (``unit.compute_as == "browser"``) is computed as the tab computes it
    (``models.browser_unit``: its seeded draws, its step graph, given as ``step_graph`` = (the graph's
    bytes, its ``StepSpec``)); such a unit never carries the error-feedback residual. ``device``: where
    ``run_local`` trains (a replica of a tab's unit runs on onnxruntime's CPU, as the tab's WASM step does).
    """
    if unit.compute_as == "browser":
        if step_graph is None:
            raise ValueError("a replica of a browser tab's unit needs the tab's step graph")
        t0 = time.perf_counter()
        run = run_with_graph(unit, base, x, y, *step_graph)
        trained, losses = run.delta, (run.loss_before, run.loss_after)
        samples, seconds, feedback = unit.local_steps * unit.batch_size, time.perf_counter() - t0, None
    else:
        hyper = dict(unit.hyper)
        lr, parity = hyper.pop("lr"), hyper.pop("flip_parity", None)
        out = run_local(unit.model, base, x, y, Recipe(batch_size=unit.batch_size, **hyper), unit.local_steps, lr,
                        unit.seed, model=model, flip_parity=parity, device=device)
        trained, losses, samples, seconds = out.delta, (out.loss_before, out.loss_after), out.num_samples, out.seconds
    codec = get_codec(unit.codec)
    if feedback is None:
        delta = encode_delta(codec, trained)
    else:
        delta = feedback.encode(unit.job, unit.unit_id, codec, trained, use=unit.error_feedback)
    return UnitResult(unit_id=unit.unit_id, lease=unit.lease, worker_id=worker_id, base_version=unit.model_version,
                      delta=delta, loss_before=losses[0], loss_after=losses[1], num_samples=samples,
                      compute_seconds=seconds if compute_seconds is None else compute_seconds)


def failed_result(unit: WorkUnit | Mapping[str, Any], worker_id: str, error: str,
                  seconds: float = 0.0) -> UnitResult:
    """The result of a unit that failed or is handed back (``error`` starting with ``returned:``):
    ``error`` set, empty delta, zero numbers.

    ``unit`` may also be the JSON dict of a unit that broke the contract; its ``unit_id``,
    ``lease`` and ``model_version`` are used as they are (``UnitResult`` raises ``ContractError``
    if they are missing or malformed).
    """
    if isinstance(unit, Mapping):
        unit_id, lease, version = unit.get("unit_id"), unit.get("lease"), unit.get("model_version")
    else:
        unit_id, lease, version = unit.unit_id, unit.lease, unit.model_version
    return UnitResult(unit_id=unit_id, lease=lease, worker_id=worker_id, base_version=version, delta=b"",
                      loss_before=0.0, loss_after=0.0, num_samples=0, compute_seconds=max(0.0, seconds),
                      error=(error or "failed")[:MAX_ERROR_CHARS])


def describe(e: BaseException) -> str:
    """One line naming an exception, short enough for ``UnitResult.error``."""
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text}"[:MAX_ERROR_CHARS]


def prefetch_due(step: int, total: int, elapsed: float, fetch_seconds: float) -> bool:
    """Ask for the next unit as step ``step`` of ``total`` starts, ``elapsed`` seconds into the unit?

    Yes at the last step, or when the steps left will take at most ``PREFETCH_MARGIN`` times
    as long as the last fetch did; an earlier ask only makes the next unit's base older.
    """
    if step >= total:
        return True
    if step <= 1:
        return False
    left = (total - step + 1) * elapsed / (step - 1)
    return left <= PREFETCH_MARGIN * fetch_seconds
