"""The job's metrics for Prometheus: a ``prometheus_client`` collector over the ``/api/status`` dict.

``JobCollector(status)`` reads ``status()`` (a ``/api/status`` dict, or None when there is none to
read) on each scrape and yields the job's metric families; ``render(status)`` is the text
exposition of one dict (no I/O, no global state). The HTTP side (a registry per app, the request
histograms, process memory, the exposition's content negotiation) is ``coordinator.observe``.

Missing or malformed keys are tolerated: counters and gauges read them as 0, the latest test
accuracy/loss are omitted when there is no evaluation yet, and an empty staleness histogram still
has its ``+Inf`` bucket.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
                                    SummaryMetricFamily)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.exposition import generate_latest

PREFIX = "crowdtrain_"

_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("units_issued_total", "units_issued", "Work units handed out to workers."),
    ("units_accepted_total", "units_accepted", "Work units whose result passed the checks and was logged."),
    ("units_failed_total", "units_failed", "Work units reported as failed by a worker."),
    ("units_expired_total", "units_expired", "Work units whose lease ran out before a result came back."),
    ("samples_total", "samples", "Training samples folded into the model."),
    ("updates_applied_total", "updates_applied", "Accepted results folded into a model version."),
)

_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("model_version", "model_version", "Current model version."),
    ("workers_online", "workers_online", "Workers seen recently."),
    ("samples_per_second", "samples_per_second", "Recent training throughput in samples per second."),
    ("units_per_second", "units_per_second", "Recent accepted work units per second."),
    ("units_leased", "units_leased", "Work units currently leased to workers."),
    ("budget_samples", "budget_samples", "Training budget in samples."),
    ("uptime_seconds", "uptime_s", "Seconds since the coordinator started."),
    ("updates_held", "updates_held", "Accepted results held for a replicated check."),
)

# Per worker (label ``worker``), from /api/status ``trust``: metric suffix, key, type, help.
_TRUST: tuple[tuple[str, str, str, str], ...] = (
    ("worker_reputation", "reputation", "gauge", "Chance a result of the worker is used without a check."),
    ("worker_replication_rate", "replication_rate", "gauge", "Chance the worker's next result is checked."),
    ("worker_valid_checks_total", "valid", "counter", "Checks the worker passed."),
    ("worker_disagreements_total", "disagreements", "counter", "Checks the worker lost."),
    ("worker_inconclusive_checks_total", "inconclusive", "counter", "Checks of the worker neither passed nor lost "
     "(several in a row count as a lost one)."),
    ("worker_quarantined", "quarantined", "gauge", "1 when the worker is quarantined (its results are not used)."),
    ("worker_operator", "operator", "gauge", "1 when the worker is the operator's own (--trusted-tokens: its "
     "results are used unchecked)."),
    ("worker_credit_samples_total", "credit", "counter", "Samples of the worker's results that passed a check or "
     "were used unchecked."),
)

# The job's metric family names (as exposed, counters with ``_total``): docs/protocol.md lists them.
JOB_METRICS = tuple(PREFIX + n for n in (
    "info", *(s for s, _, _ in _COUNTERS), "units_rejected_total", "updates_dropped_total",
    *(s for s, _, _ in _GAUGES), "finished", "test_accuracy", "test_loss", "staleness", "staleness_cap",
    "aggregation_seconds", "aggregation_seconds_max", *(s for s, _, _, _ in _TRUST), "replicas_issued_total",
    "checks_total", "workers_quarantined", "workers_online_runtime", "webgpu_check_failed_workers"))


def _num(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing or not a number (bools count as 0/1)."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _or0(value: Any) -> float:
    num = _num(value)
    return 0.0 if num is None else num


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _family(kind: str, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Metric:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(name, help_text, labels=list(labels))


def _simple(kind: str, name: str, help_text: str, value: float) -> Metric:
    family = _family(kind, name, help_text)
    family.add_metric([], value)
    return family


def _by_reason(status: Mapping[str, Any], key: str, help_text: str) -> Metric:
    family = _family("counter", PREFIX + key + "_total", help_text, ("reason",))
    for reason, n in sorted(_dict(status.get(key)).items(), key=str):
        family.add_metric([str(reason)], _or0(n))
    return family


def _num_key(key: Any) -> float | None:
    try:
        return float(key)
    except (TypeError, ValueError):
        return None


def _staleness(status: Mapping[str, Any]) -> Metric:
    """The staleness histogram ``{"0": n0, "1": n1, ...}`` as cumulative Prometheus buckets."""
    counts: dict[float, float] = {}
    for key, count in _dict(status.get("staleness_histogram")).items():
        bound = _num_key(key)
        if bound is not None and math.isfinite(bound):
            counts[bound] = counts.get(bound, 0.0) + _or0(count)
    buckets, cumulative, total = [], 0.0, 0.0
    for bound in sorted(counts):
        cumulative += counts[bound]
        total += bound * counts[bound]
        buckets.append((_bound(bound), cumulative))
    buckets.append(("+Inf", cumulative))
    return HistogramMetricFamily(PREFIX + "staleness", "Staleness (model versions behind) of accepted results.",
                                 buckets=buckets, sum_value=total)


def _bound(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _aggregation(status: Mapping[str, Any]) -> Iterator[Metric]:
    agg = _dict(status.get("aggregation_seconds"))
    count = _or0(agg.get("count"))
    yield SummaryMetricFamily(PREFIX + "aggregation_seconds", "Time spent folding results into the model.",
                              count_value=count, sum_value=_or0(agg.get("mean")) * count)
    yield _simple("gauge", PREFIX + "aggregation_seconds_max", "Longest aggregation so far, in seconds.",
                  _or0(agg.get("max")))


def _latest_eval(status: Mapping[str, Any]) -> Iterator[Metric]:
    history = status.get("accuracy_history")
    if not isinstance(history, list) or not history:
        return
    last = _dict(history[-1])
    acc, loss = _num(last.get("test_acc")), _num(last.get("test_loss"))
    if acc is not None:
        yield _simple("gauge", PREFIX + "test_accuracy", "Latest test accuracy (fraction).", acc)
    if loss is not None:
        yield _simple("gauge", PREFIX + "test_loss", "Latest test loss.", loss)


def _info(status: Mapping[str, Any]) -> Metric:
    strategy, level = "", _dict(status.get("strategy"))
    for _ in range(8):      # past the wrappers (robust, clip, cap) to the strategy itself
        strategy = level.get("name", "")
        if not _dict(level.get("inner")):
            break
        level = _dict(level.get("inner"))
    family = _family("gauge", PREFIX + "info", "Job, model and strategy of this coordinator.",
                     ("job", "model", "strategy"))
    family.add_metric([str(status.get("job", "")), str(status.get("model", "")), str(strategy)], 1.0)
    return family


def _trust(status: Mapping[str, Any]) -> Iterator[Metric]:
    rows = [r for r in status.get("trust") or [] if isinstance(r, Mapping)]
    for suffix, key, kind, help_text in _TRUST:
        family = _family(kind, PREFIX + suffix, help_text, ("worker",))
        for r in rows:
            family.add_metric([str(r.get("worker_id", ""))], _or0(r.get(key)))
        yield family
    replication = _dict(status.get("replication"))
    yield _simple("counter", PREFIX + "replicas_issued_total", "Replicas of held results handed out.",
                  _or0(replication.get("replicas_issued")))
    checks = _family("counter", PREFIX + "checks_total", "Replicated checks decided: agreed, agreed between two "
                     "workers neither of which has earned trust (agreed_unvouched, then recomputed), disagreed (then "
                     "recomputed), and units the coordinator recomputed itself.", ("outcome",))
    for outcome in ("agreed", "agreed_unvouched", "disagreed", "recomputed"):
        checks.add_metric([outcome], _or0(replication.get(outcome)))
    yield checks
    yield _simple("gauge", PREFIX + "workers_quarantined", "Workers quarantined.",
                  _or0(replication.get("quarantined")))


def _runtimes(status: Mapping[str, Any]) -> Iterator[Metric]:
    """Online workers by what their units train on, and the tabs among them whose WebGPU failed its check."""
    rows = [r for r in status.get("workers") or [] if isinstance(r, Mapping)]
    by = _family("gauge", PREFIX + "workers_online_runtime", "Workers seen recently, by what their units train on "
                 "(cpu, cuda, wasm, webgpu; unknown: not said yet).", ("runtime",))
    counts: dict[str, int] = {}
    for r in rows:
        runtime = r.get("runtime") if isinstance(r.get("runtime"), str) else "unknown"
        counts[runtime] = counts.get(runtime, 0) + 1
    for runtime in sorted(counts):
        by.add_metric([runtime], float(counts[runtime]))
    yield by
    yield _simple("gauge", PREFIX + "webgpu_check_failed_workers", "Tabs seen recently whose WebGPU failed its "
                  "known-answer check (they train on WebAssembly).",
                  float(sum(r.get("webgpu_check") == "failed" for r in rows)))


def families(status: Mapping[str, Any]) -> Iterator[Metric]:
    """The job's metric families from one ``/api/status`` dict, in a fixed order."""
    yield _info(status)
    for suffix, key, help_text in _COUNTERS:
        yield _simple("counter", PREFIX + suffix, help_text, _or0(status.get(key)))
    yield _by_reason(status, "units_rejected", "Results rejected, by reason.")
    yield _by_reason(status, "updates_dropped", "Accepted results the aggregator dropped, by reason.")
    for suffix, key, help_text in _GAUGES:
        yield _simple("gauge", PREFIX + suffix, help_text, _or0(status.get(key)))
    yield _simple("gauge", PREFIX + "finished", "1 once the sample budget is reached.",
                  1.0 if status.get("finished") else 0.0)
    yield from _latest_eval(status)
    yield _staleness(status)
    cap = _num(status.get("staleness_cap"))
    if cap is not None:   # (none: no cap)
        yield _simple("gauge", PREFIX + "staleness_cap", "Versions a result's base may be behind the model now "
                      "(--max-staleness, or the cap --stale-median sets).", cap)
    yield from _aggregation(status)
    yield from _trust(status)
    yield from _runtimes(status)


class JobCollector(Collector):
    """The job's families, read from ``status()`` at each scrape (nothing when it returns None)."""

    def __init__(self, status: Callable[[], Mapping[str, Any] | None]):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        if status is not None:
            yield from families(status)


def render(status: Mapping[str, Any]) -> str:
    """The text exposition (format 0.0.4) of the job's families of a ``/api/status`` dict."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(lambda: status))
    return generate_latest(registry).decode("utf-8")
