"""The job's status, typed: what ``/api/status``, ``/metrics`` and the dashboard show.

``JobStatus.to_json()`` is the ``/api/status`` body. ``samples`` counts only samples of
updates folded into the model; ``updates_applied`` counts those updates and
``updates_dropped`` (reason -> count) the accepted updates the aggregator dropped.
``samples_per_second`` is the sum of the workers' rows, each over the last ``rate_window_s``
seconds; ``strategy_settings`` is the strategy's ``describe()`` named and explained
(``coordinator.strategy_docs.settings``). ``updates_held`` (part of ``updates_pending``) are
results held for a replicated check; ``trust`` is each worker's record (``coordinator.trust``)
and ``replication`` the checks' totals.
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
    runtime: str | None = None       # what its units train on, as its last unit request said (UnitRequest.runtime)
    webgpu_check: str | None = None  # a tab's WebGPU known-answer check: passed, failed (then it trains on WASM)
    runtime_note: str | None = None  # why, in the worker's words (shown only to the operator on this machine)


@dataclass(frozen=True)
class TrustRow:
    worker_id: str
    backend: str
    reputation: float                # the chance a result of it is used without a check (0 when new)
    replication_rate: float          # the chance its next result is checked
    results: int                     # results accepted from it
    checked: int                     # of those, held for a check
    valid: int                       # checks it passed (its own results and replicas it computed)
    disagreements: int               # checks it lost
    consecutive_valid: int
    quarantined: bool
    credit: int                      # samples of its results that passed a check or were used unchecked
    operator: bool = False           # one of the operator's own workers (--trusted-tokens): results used unchecked
    inconclusive: int = 0            # checks neither passed nor lost (in the band between; several in a row lose)
    keyed: bool = False              # its id is bound to a worker key (an unbound id never earns trust)


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
    updates_held: int = 0            # accepted results held for a replicated check (within updates_pending)
    replication: dict = dataclasses.field(default_factory=dict)   # policy and totals of the checks
    trust: list[TrustRow] = dataclasses.field(default_factory=list)   # quarantined first, then most recent
    staleness_cap: int | None = None  # the staleness a result may have now (--max-staleness, --stale-median)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
