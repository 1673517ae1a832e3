"""The job's status, typed: what ``/api/status``, ``/metrics`` and the dashboard show.

``JobStatus.to_json()`` is the ``/api/status`` body. ``samples`` counts only samples of
updates folded into the model; ``updates_applied`` counts those updates and
``updates_dropped`` (reason -> count) the accepted updates the aggregator dropped.
``samples_per_second`` is the sum of the workers' rows, each over the last ``rate_window_s``
seconds; ``strategy_settings`` is the strategy's ``describe()`` named and explained
(``coordinator.strategy_docs.settings``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    backend: str
    units: int
    samples_per_second: float        # accepted samples / s over the job's rate window
    last_seen_s: float


@dataclass(frozen=True)
class JobStatus:
    job: str
    model: str
    strategy: dict                   # the strategy's describe()
    strategy_settings: list[dict]    # the same, named and explained, outermost level first
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
    samples_per_second: float        # the sum of the workers' samples_per_second
    units_per_second: float
    rate_window_s: float             # the window both rates are measured over, seconds
    uptime_s: float
    staleness_histogram: dict[str, int]
    aggregation_seconds: dict
    accuracy_history: list[dict]
    best: dict | None = None         # the best evaluation so far: version, samples, test_acc

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
