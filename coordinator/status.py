"""The job's status, typed: what ``/api/status``, ``/metrics`` and the dashboard show.

``JobStatus.to_json()`` is the ``/api/status`` body. ``samples`` counts only samples of
updates folded into the model; ``updates_applied`` counts those updates and
``updates_dropped`` (reason -> count) the accepted updates the aggregator dropped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    backend: str
    units: int
    samples_per_second: float
    last_seen_s: float


@dataclass(frozen=True)
class JobStatus:
    job: str
    model: str
    strategy: dict                   # the strategy's describe()
    model_version: int
    model_blob: str
    samples: int                     # applied samples (folded into the model)
    budget_samples: int
    finished: bool
    units_issued: int
    units_accepted: int              # results accepted at the boundary (applied, dropped or waiting)
    units_failed: int
    units_expired: int
    units_leased: int
    units_rejected: dict[str, int]   # refusals at the boundary, by error code
    updates_applied: int             # accepted results folded into a version
    updates_dropped: dict[str, int]  # accepted results the aggregator dropped, by reason
    updates_pending: int             # accepted results neither folded nor dropped yet
    workers_online: int
    workers: list[WorkerRow]
    samples_per_second: float
    units_per_second: float
    uptime_s: float
    staleness_histogram: dict[str, int]
    aggregation_seconds: dict
    accuracy_history: list[dict]
    best: dict | None = None         # the best evaluation so far: version, samples, test_acc

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
