"""Prometheus text exposition (format 0.0.4) of the coordinator's ``/api/status`` dict.

``render(status)`` is a pure function: no I/O, no global state. Missing or malformed keys are
tolerated: counters and gauges read them as 0, the latest test accuracy/loss are omitted when
there is no evaluation yet, and an empty staleness histogram still has its ``+Inf`` bucket.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]
Sample = tuple[str, Labels, float]

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
    ("worker_quarantined", "quarantined", "gauge", "1 when the worker is quarantined (its results are not used)."),
    ("worker_credit_samples_total", "credit", "counter", "Samples of the worker's results that passed a check or "
     "were used unchecked."),
)

PREFIX = "crowdtrain_"


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


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, ``+Inf``/``-Inf``/``NaN`` spelt out."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def escape_label(value: str) -> str:
    """Label value escaping: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text escaping: backslash and newline."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _sample_line(name: str, labels: Labels, value: float) -> str:
    if labels:
        inner = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {format_value(value)}"
    return f"{name} {format_value(value)}"


def _family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    lines = [f"# HELP {name} {escape_help(help_text)}", f"# TYPE {name} {kind}"]
    lines.extend(_sample_line(n, labels, v) for n, labels, v in samples)
    return lines


def _simple(name: str, kind: str, help_text: str, value: float) -> list[str]:
    return _family(name, kind, help_text, [(name, {}, value)])


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _by_reason(status: Mapping[str, Any], key: str, help_text: str) -> list[str]:
    name = PREFIX + key + "_total"
    reasons = _dict(status.get(key))
    samples = [(name, {"reason": str(r)}, _or0(n)) for r, n in sorted(reasons.items(), key=str)]
    return _family(name, "counter", help_text, samples)


def _staleness(status: Mapping[str, Any]) -> list[str]:
    """The staleness histogram ``{"0": n0, "1": n1, ...}`` as cumulative Prometheus buckets."""
    name = PREFIX + "staleness"
    buckets: dict[float, float] = {}
    for key, count in _dict(status.get("staleness_histogram")).items():
        bound, num = _num_key(key), _or0(count)
        if bound is not None and math.isfinite(bound):
            buckets[bound] = buckets.get(bound, 0.0) + num
    samples: list[Sample] = []
    cumulative = total = 0.0
    for bound in sorted(buckets):
        cumulative += buckets[bound]
        total += bound * buckets[bound]
        samples.append((name + "_bucket", {"le": format_value(bound)}, cumulative))
    samples.append((name + "_bucket", {"le": "+Inf"}, cumulative))
    samples.append((name + "_sum", {}, total))
    samples.append((name + "_count", {}, cumulative))
    help_text = "Staleness (model versions behind) of accepted results."
    return _family(name, "histogram", help_text, samples)


def _num_key(key: Any) -> float | None:
    try:
        return float(key)
    except (TypeError, ValueError):
        return None


def _aggregation(status: Mapping[str, Any]) -> list[str]:
    name = PREFIX + "aggregation_seconds"
    agg = _dict(status.get("aggregation_seconds"))
    count = _or0(agg.get("count"))
    samples = [(name + "_sum", {}, _or0(agg.get("mean")) * count), (name + "_count", {}, count)]
    lines = _family(name, "summary", "Time spent folding results into the model.", samples)
    lines += _simple(name + "_max", "gauge", "Longest aggregation so far, in seconds.", _or0(agg.get("max")))
    return lines


def _latest_eval(status: Mapping[str, Any]) -> list[str]:
    history = status.get("accuracy_history")
    if not isinstance(history, list) or not history:
        return []
    last = _dict(history[-1])
    lines: list[str] = []
    acc, loss = _num(last.get("test_acc")), _num(last.get("test_loss"))
    if acc is not None:
        lines += _simple(PREFIX + "test_accuracy", "gauge", "Latest test accuracy (fraction).", acc)
    if loss is not None:
        lines += _simple(PREFIX + "test_loss", "gauge", "Latest test loss.", loss)
    return lines


def _info(status: Mapping[str, Any]) -> list[str]:
    strategy, level = "", _dict(status.get("strategy"))
    for _ in range(8):      # past the wrappers (robust, clip, cap) to the strategy itself
        strategy = level.get("name", "")
        if not _dict(level.get("inner")):
            break
        level = _dict(level.get("inner"))
    labels = {"job": str(status.get("job", "")), "model": str(status.get("model", "")),
              "strategy": str(strategy)}
    name = PREFIX + "info"
    return _family(name, "gauge", "Job, model and strategy of this coordinator.", [(name, labels, 1.0)])


def _trust(status: Mapping[str, Any]) -> list[str]:
    rows = [r for r in status.get("trust") or [] if isinstance(r, Mapping)]
    lines: list[str] = []
    for suffix, key, kind, help_text in _TRUST:
        name = PREFIX + suffix
        lines += _family(name, kind, help_text, [(name, {"worker": str(r.get("worker_id", ""))}, _or0(r.get(key)))
                                                 for r in rows])
    replication = _dict(status.get("replication"))
    lines += _simple(PREFIX + "replicas_issued_total", "counter", "Replicas of held results handed out.",
                     _or0(replication.get("replicas_issued")))
    name = PREFIX + "checks_total"
    lines += _family(name, "counter", "Replicated checks decided: agreed, disagreed (then recomputed), and units "
                     "the coordinator recomputed itself.",
                     [(name, {"outcome": k}, _or0(replication.get(k))) for k in ("agreed", "disagreed", "recomputed")])
    lines += _simple(PREFIX + "workers_quarantined", "gauge", "Workers quarantined.",
                     _or0(replication.get("quarantined")))
    return lines


def render(status: Mapping[str, Any]) -> str:
    """The Prometheus text exposition (0.0.4) of a ``/api/status`` dict; ends with a newline."""
    lines = _info(status)
    for suffix, key, help_text in _COUNTERS:
        lines += _simple(PREFIX + suffix, "counter", help_text, _or0(status.get(key)))
    lines += _by_reason(status, "units_rejected", "Results rejected, by reason.")
    lines += _by_reason(status, "updates_dropped", "Accepted results the aggregator dropped, by reason.")
    for suffix, key, help_text in _GAUGES:
        lines += _simple(PREFIX + suffix, "gauge", help_text, _or0(status.get(key)))
    finished = 1.0 if status.get("finished") else 0.0
    lines += _simple(PREFIX + "finished", "gauge", "1 once the sample budget is reached.", finished)
    lines += _latest_eval(status)
    lines += _staleness(status)
    lines += _aggregation(status)
    lines += _trust(status)
    return "\n".join(lines) + "\n"
