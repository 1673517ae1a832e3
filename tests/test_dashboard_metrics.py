"""Prometheus exposition (``coordinator.metrics.render``, through prometheus_client) and the live dashboard page.

The metrics output is checked with a small strict parser of text format 0.0.4 written here.
The page is served by a tiny aiohttp app (static dashboard + a fake ``/api/status``) and
rendered with Debian's headless Chromium when it is installed; otherwise those tests skip.
"""
from __future__ import annotations

import asyncio
import copy
import math
import re
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from coordinator.metrics import render

DASHBOARD = Path(__file__).resolve().parents[1] / "coordinator" / "dashboard"
CHROMIUM = Path("/usr/bin/chromium")

SAMPLE_STATUS: dict[str, Any] = {
    "job": "cifar10", "model": "resnet_fast",
    "strategy": {"name": "fedbuff", "params": {"buffer_size": 4, "server_lr": 1.0}, "buffered": 3, "due": False},
    "strategy_settings": [{"name": "fedbuff", "about": "FedBuff: Nguyen et al., AISTATS 2022.",
                           "settings": [{"key": "buffer_size", "value": "4",
                                         "about": "updates gathered before one aggregation (FedBuff's K)"},
                                        {"key": "server_lr", "value": "1", "about": "server learning rate"}],
                           "state": [{"key": "buffered", "label": "waiting", "value": "3",
                                      "about": "updates in the buffer, not yet folded into the model"}]}],
    "model_version": 42, "model_blob": "ab" * 32, "samples": 123456, "budget_samples": 500000,
    "finished": False,
    "units_issued": 130, "units_accepted": 120, "units_failed": 2, "units_expired": 3, "units_leased": 4,
    "units_rejected": {"norm_bound": 1, "lease_invalid": 2},
    "updates_applied": 110, "updates_dropped": {"stale": 7}, "updates_pending": 3,
    "workers_online": 3,
    "workers": [
        {"worker_id": "ab12", "backend": "python", "units": 40, "samples_per_second": 812.5, "last_seen_s": 1.2,
         "runtime": "cpu", "webgpu_check": None, "runtime_note": None},
        {"worker_id": "cd34", "backend": "browser", "units": 35, "samples_per_second": 640.0, "last_seen_s": 0.4,
         "runtime": "wasm", "webgpu_check": "failed",
         "runtime_note": "WebGPU failed the known-answer check: loss 2.796 where 2.704 was expected"},
        {"worker_id": "ef56", "backend": "python", "units": 45, "samples_per_second": 947.5, "last_seen_s": 2.9},
    ],
    "samples_per_second": 2400.0, "units_per_second": 0.8, "rate_window_s": 60.0, "uptime_s": 3600.0,
    "staleness_histogram": {"0": 50, "1": 40, "2": 10},
    "aggregation_seconds": {"count": 100, "mean": 0.004, "max": 0.02},
    "accuracy_history": [
        {"version": 2, "samples": 10000, "seconds": 30.0, "test_acc": 0.18, "test_loss": 2.2},
        {"version": 5, "samples": 25000, "seconds": 61.0, "test_acc": 0.29, "test_loss": 1.95},
        {"version": 10, "samples": 50000, "seconds": 120.5, "test_acc": 0.41, "test_loss": 1.7},
        {"version": 20, "samples": 80000, "seconds": 190.0, "test_acc": 0.52, "test_loss": 1.35},
        {"version": 42, "samples": 120000, "seconds": 290.0, "test_acc": 0.613, "test_loss": 1.1},
    ],
    "best": {"version": 42, "samples": 120000, "test_acc": 0.613},
    "updates_held": 2,
    "staleness_cap": 26,
    "replication": {"policy": "adaptive", "held": 2, "replicas_waiting": 1, "quarantined": 1, "replicas_issued": 30,
                    "agreed": 25, "disagreed": 2, "recomputed": 3},
    "trust": [
        {"worker_id": "gh78", "backend": "python", "reputation": 0.0, "replication_rate": 0.0, "results": 6,
         "checked": 6, "valid": 0, "disagreements": 2, "consecutive_valid": 0, "quarantined": True, "credit": 0,
         "inconclusive": 4, "keyed": True},
        {"worker_id": "ab12", "backend": "python", "reputation": 0.9333, "replication_rate": 0.0667, "results": 40,
         "checked": 14, "valid": 15, "disagreements": 0, "consecutive_valid": 15, "quarantined": False,
         "credit": 40000, "inconclusive": 0, "keyed": True},
        {"worker_id": "ij90", "backend": "python", "reputation": 0.0, "replication_rate": 1.0, "results": 30,
         "checked": 30, "valid": 30, "disagreements": 0, "consecutive_valid": 30, "quarantined": False,
         "credit": 960, "inconclusive": 0, "keyed": False},
    ],
    "donate_url": "http://127.0.0.1:8080/",
    "request_latency": {"POST /api/v1/units/next": {"n": 900, "p50_ms": 4.8, "p95_ms": 21.0, "p99_ms": 37.25,
                                                    "statuses": {"2xx": 900}}},
}

# --------------------------------------------------------------------------- strict parser

NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
FLOAT_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]Inf|NaN")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def parse_labels(text: str) -> dict[str, str]:
    """``a="x",b="y\\n"`` (without braces) -> dict; only ``\\\\``, ``\\"`` and ``\\n`` escapes."""
    labels: dict[str, str] = {}
    i = 0
    while i < len(text):
        m = LABEL_NAME_RE.match(text, i)
        assert m, f"bad label name at {text[i:]!r}"
        name, i = m.group(), m.end()
        assert text[i:i + 2] == '="', f"expected =\" after {name!r}"
        i += 2
        value = []
        while text[i] != '"':
            if text[i] == "\\":
                esc = text[i + 1]
                assert esc in '\\"n', f"bad escape \\{esc}"
                value.append("\n" if esc == "n" else esc)
                i += 2
            else:
                assert text[i] != "\n"
                value.append(text[i])
                i += 1
        i += 1
        assert name not in labels, f"duplicate label {name}"
        labels[name] = "".join(value)
        if i < len(text):
            assert text[i] == ",", f"expected , at {text[i:]!r}"
            i += 1
    return labels


def parse_value(text: str) -> float:
    assert FLOAT_RE.fullmatch(text), f"bad value {text!r}"
    return float(text)


def parse_sample(line: str) -> tuple[str, dict[str, str], float]:
    m = NAME_RE.match(line)
    assert m, f"bad metric name in {line!r}"
    name, rest = m.group(), line[m.end():]
    labels: dict[str, str] = {}
    if rest.startswith("{"):
        close = _closing_brace(rest)
        labels, rest = parse_labels(rest[1:close]), rest[close + 1:]
    assert rest.startswith(" "), f"expected a space before the value in {line!r}"
    parts = rest[1:].split(" ")
    assert 1 <= len(parts) <= 2, f"trailing junk in {line!r}"
    if len(parts) == 2:
        assert re.fullmatch(r"-?\d+", parts[1]), f"bad timestamp in {line!r}"
    return name, labels, parse_value(parts[0])


def _closing_brace(text: str) -> int:
    """Index of the ``}`` closing the label set, skipping quoted values."""
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "}" and not quoted:
            return i
        i += 1
    raise AssertionError(f"unclosed label set in {text!r}")


def family_of(name: str, types: dict[str, str]) -> str:
    if name in types:
        return name
    for base, kind in types.items():
        if any(name == base + s for s in SUFFIXES.get(kind, ())):
            return base
    raise AssertionError(f"sample {name} has no TYPE")


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """Strictly parse text format 0.0.4 -> {family: {type, help, samples: [(name, labels, value)]}}."""
    assert text.endswith("\n"), "exposition must end with a newline"
    families: dict[str, dict[str, Any]] = {}
    types: dict[str, str] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        assert line and line == line.strip(), f"blank or padded line {line!r}"
        if line.startswith("#"):
            m = re.fullmatch(r"# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)", line)
            assert m, f"bad comment line {line!r}"
            kind, name, arg = m.groups()
            fam = families.setdefault(name, {"samples": []})
            assert not fam["samples"], f"{kind} for {name} after its samples"
            assert kind.lower() not in fam, f"second {kind} for {name}"
            if kind == "TYPE":
                assert arg in TYPES, f"bad type {arg}"
                types[name] = arg
            else:
                assert not re.search(r"\\[^\\n]", arg.replace("\\\\", "")), f"bad HELP escape {arg!r}"
            fam[kind.lower()] = arg
            current = name
            continue
        name, labels, value = parse_sample(line)
        fam_name = family_of(name, types)
        assert fam_name == current, f"samples of {fam_name} are not grouped together"
        families[fam_name]["samples"].append((name, labels, value))
    for name, fam in families.items():
        assert "help" in fam and "type" in fam, f"{name} lacks HELP or TYPE"
    return families


def value(families: dict[str, dict[str, Any]], name: str, **labels: str) -> float:
    for fam in families.values():
        for n, lab, v in fam["samples"]:
            if n == name and lab == labels:
                return v
    raise KeyError((name, labels))


def check_histogram(fam: dict[str, Any], name: str) -> list[tuple[float, float]]:
    """Buckets are cumulative, sorted by ``le``, end with ``+Inf`` equal to ``_count``."""
    assert fam["type"] == "histogram"
    buckets = [(parse_value(lab["le"]), v) for n, lab, v in fam["samples"] if n == name + "_bucket"]
    assert buckets and math.isinf(buckets[-1][0]), "histogram must end with le=+Inf"
    bounds = [b for b, _ in buckets]
    counts = [c for _, c in buckets]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
    assert counts == sorted(counts), "buckets must be cumulative"
    count = [v for n, _, v in fam["samples"] if n == name + "_count"]
    assert len(count) == 1 and count[0] == counts[-1], "+Inf bucket must equal _count"
    assert len([v for n, _, v in fam["samples"] if n == name + "_sum"]) == 1
    return buckets


# --------------------------------------------------------------------------- metrics tests


def test_render_sample_status_parses_strictly() -> None:
    before = copy.deepcopy(SAMPLE_STATUS)
    fams = parse_exposition(render(SAMPLE_STATUS))
    assert SAMPLE_STATUS == before, "render must not mutate its input"
    expected_types = {
        "crowdtrain_units_issued_total": "counter", "crowdtrain_units_accepted_total": "counter",
        "crowdtrain_units_failed_total": "counter", "crowdtrain_units_expired_total": "counter",
        "crowdtrain_units_rejected_total": "counter", "crowdtrain_samples_total": "counter",
        "crowdtrain_model_version": "gauge", "crowdtrain_workers_online": "gauge",
        "crowdtrain_samples_per_second": "gauge", "crowdtrain_units_leased": "gauge",
        "crowdtrain_test_accuracy": "gauge", "crowdtrain_budget_samples": "gauge",
        "crowdtrain_uptime_seconds": "gauge", "crowdtrain_staleness": "histogram", "crowdtrain_staleness_cap": "gauge",
        "crowdtrain_aggregation_seconds": "summary", "crowdtrain_aggregation_seconds_max": "gauge",
    }
    for name, kind in expected_types.items():
        assert fams[name]["type"] == kind, name
        assert fams[name]["help"], name
    assert value(fams, "crowdtrain_units_issued_total") == 130
    assert value(fams, "crowdtrain_units_accepted_total") == 120
    assert value(fams, "crowdtrain_units_failed_total") == 2
    assert value(fams, "crowdtrain_units_expired_total") == 3
    assert value(fams, "crowdtrain_samples_total") == 123456
    assert value(fams, "crowdtrain_units_rejected_total", reason="norm_bound") == 1
    assert value(fams, "crowdtrain_units_rejected_total", reason="lease_invalid") == 2
    assert value(fams, "crowdtrain_model_version") == 42
    assert value(fams, "crowdtrain_workers_online") == 3
    assert value(fams, "crowdtrain_samples_per_second") == 2400
    assert value(fams, "crowdtrain_units_leased") == 4
    assert value(fams, "crowdtrain_test_accuracy") == pytest.approx(0.613)
    assert value(fams, "crowdtrain_budget_samples") == 500000
    assert value(fams, "crowdtrain_uptime_seconds") == 3600
    assert value(fams, "crowdtrain_aggregation_seconds_sum") == pytest.approx(0.4)
    assert value(fams, "crowdtrain_aggregation_seconds_count") == 100
    assert value(fams, "crowdtrain_aggregation_seconds_max") == pytest.approx(0.02)
    buckets = check_histogram(fams["crowdtrain_staleness"], "crowdtrain_staleness")
    assert buckets == [(0, 50), (1, 90), (2, 100), (math.inf, 100)]
    assert value(fams, "crowdtrain_staleness_sum") == 60
    assert value(fams, "crowdtrain_staleness_cap") == 26
    info = fams["crowdtrain_info"]["samples"][0][1]
    assert info == {"job": "cifar10", "model": "resnet_fast", "strategy": "fedbuff"}


def test_label_escaping_round_trips() -> None:
    reason = 'bad "quote"\nsecond line \\ backslash'
    text = render({"units_rejected": {reason: 5, "ok": 1}})
    prefix = "crowdtrain_units_rejected_total{"
    line = next(ln for ln in text.splitlines() if ln.startswith(prefix) and "bad" in ln)
    assert line == 'crowdtrain_units_rejected_total{reason="bad \\"quote\\"\\nsecond line \\\\ backslash"} 5.0'   # values as prometheus_client writes them
    fams = parse_exposition(text)
    assert value(fams, "crowdtrain_units_rejected_total", reason=reason) == 5


def test_empty_status_is_tolerated() -> None:
    fams = parse_exposition(render({}))
    assert "crowdtrain_test_accuracy" not in fams and "crowdtrain_staleness_cap" not in fams   # (none: no cap)
    assert value(fams, "crowdtrain_units_issued_total") == 0
    assert value(fams, "crowdtrain_model_version") == 0
    assert fams["crowdtrain_units_rejected_total"]["samples"] == []
    assert check_histogram(fams["crowdtrain_staleness"], "crowdtrain_staleness") == [(math.inf, 0)]
    assert value(fams, "crowdtrain_aggregation_seconds_count") == 0


def test_odd_values_and_bucket_order() -> None:
    status = {
        "accuracy_history": [], "samples": None, "model_version": "x", "units_rejected": None,
        "staleness_histogram": {"10": 1, "2": 3, "junk": 9, "0": 2},
        "aggregation_seconds": {"count": 4}, "samples_per_second": float("nan"),
    }
    fams = parse_exposition(render(status))
    assert "crowdtrain_test_accuracy" not in fams
    assert value(fams, "crowdtrain_samples_total") == 0
    assert value(fams, "crowdtrain_model_version") == 0
    assert math.isnan(value(fams, "crowdtrain_samples_per_second"))
    buckets = check_histogram(fams["crowdtrain_staleness"], "crowdtrain_staleness")
    assert buckets == [(0, 2), (2, 5), (10, 6), (math.inf, 6)]
    assert value(fams, "crowdtrain_staleness_sum") == 16


def test_parser_rejects_bad_lines() -> None:
    for bad in ('m{a="x} 1', "m 1 2 3", "1m 1", 'm{a="\\t"} 1', "m one", 'm{a="x",,} 1'):
        with pytest.raises(AssertionError):
            parse_exposition(f"# HELP m h\n# TYPE m gauge\n{bad}\n")
    with pytest.raises(AssertionError):
        parse_exposition("m 1\n")


# --------------------------------------------------------------------------- dashboard page


def test_page_loads_nothing_from_other_hosts() -> None:
    html = (DASHBOARD / "index.html").read_text()
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), "no third-party URLs"
    assert "fetch(" in html and "/api/status" in html
    for extra in DASHBOARD.glob("*.[jc]s*"):
        assert not re.search(r"https?://", extra.read_text()), extra.name


@contextmanager
def serve(status: dict[str, Any] | None) -> Iterator[int]:
    """Serve the dashboard and a fake ``/api/status`` (HTTP 503 when ``status`` is None)."""
    from aiohttp import web

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(DASHBOARD / "index.html")

    async def api(_: web.Request) -> web.Response:
        if status is None:
            return web.json_response({"error": "down"}, status=503)
        return web.json_response(status)

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/dashboard", index)
    app.router.add_static("/dashboard/", DASHBOARD)
    app.router.add_get("/api/status", api)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed (apt-get install chromium)")
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    """Console messages Chromium logged (the page logs none unless something throws)."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


def render_page(status: dict[str, Any] | None, tmp: Path) -> str:
    with serve(status) as port:
        proc = chromium(f"http://127.0.0.1:{port}/dashboard", tmp, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not console_lines(proc.stderr), console_lines(proc.stderr)
    return proc.stdout


def text_of(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert m, f"#{element_id} not in the DOM"
    return m.group(1)


def test_page_renders_status(tmp_path: Path) -> None:
    dom = render_page(SAMPLE_STATUS, tmp_path)
    assert text_of(dom, "k-acc") == "61.3%"
    assert text_of(dom, "k-workers") == "3"
    assert text_of(dom, "k-version") == "42"
    assert text_of(dom, "k-lat") == "4.8 / 37 ms", "units/next p50 / p99"
    assert text_of(dom, "stale-cap") == "refused above 26", "the staleness cap in force"
    assert "norm_bound" in dom and "lease_invalid" in dom
    assert "ab12" in dom and "cd34" in dom
    assert "fedbuff" in dom and "buffer_size" in dom
    assert "updates gathered before one aggregation (FedBuff's K)" in dom, "settings are explained"
    assert re.search(r'<dt class="stat"[^>]*>waiting</dt><dd class="stat">3</dd>', dom), "state, named"
    assert ">due<" not in dom and "false" not in dom, "no raw internals"
    assert text_of(dom, "k-sps-l") == "samples / s (last 60 s)" and text_of(dom, "w-sps") == "samples/s (last 60 s)"
    assert re.search(r"<td>dropped: stale</td><td[^>]*>7</td>", dom), "dropped updates by reason"
    assert re.search(r'id="bar" style="width: 24\.69', dom), "progress bar width"
    assert re.search(r'id="acc-note" style="display: none', dom), "the waiting note is hidden"
    assert 'class="show"' not in dom, "no unreachable banner"
    assert re.search(r'<td>gh78</td>(<td[^>]*>[^<]*</td>){4}<td[^>]*>2</td><td[^>]*>4</td>'
                     r'<td class="quarantined">quarantined</td>', dom), "trust: disagreements, inconclusive, state"
    assert re.search(r"<td>ab12</td><td[^>]*>93\.3%</td>", dom) and "25 agreed, 2 disagreed" in dom
    assert re.search(r"<td>ab12</td>(<td[^>]*>[^<]*</td>){6}<td>trusted</td>", dom)
    assert re.search(r"<td>ij90</td>(<td[^>]*>[^<]*</td>){6}<td>no key</td>", dom), "its run earns an unbound id nothing"
    assert re.search(r"<td>of which held for a check</td><td[^>]*>2</td>", dom)
    # what each worker's units train on; a tab whose WebGPU failed its check says so, its own words as a tooltip
    assert re.search(r'>cd34</td><td>browser</td><td title="WebGPU failed the known-answer check: loss 2\.796 '
                     r'where 2\.704 was expected">wasm \(WebGPU failed its check\)</td>', dom)
    assert re.search(r">ab12</td><td>python</td><td>cpu</td>", dom)
    assert re.search(r">ef56</td><td>python</td><td>–</td>", dom), "not said (yet)"


def real_status(tmp_path: Path) -> dict[str, Any]:
    """The status of a real job (tiny data) after two results from two workers and one evaluation."""
    from contract.units import UnitRequest
    from coordinator.config import CoordinatorConfig
    from coordinator.job import Job
    from tests.helpers.fault_worker import body, compute
    from tests.helpers.tiny_cifar import tiny_cifar10

    job = Job(CoordinatorConfig(state=tmp_path / "state", model="cnn", shard_size=64, epochs=4.0, codec="fp32",
                                strategy="async_sgd", replication="off"))
    job.open(tiny_cifar10(n_train=256, n_test=64))

    async def work() -> None:
        units = [(w, job.next_unit(UnitRequest(worker_id=w, backend="python"))) for w in ("ab12", "cd34")]
        for worker, unit in units:
            result = compute(unit, job.store.get_blob, worker)
            await job.submit(unit.unit_id, body(result))
        await job.settle()

    try:
        asyncio.run(work())
        job.record_eval(job.evaluate_current())
        return {**job.status().to_json(), "donate_url": "http://127.0.0.1:8080/",   # added by coordinator.app
                "request_latency": {}}
    finally:
        job.close()


def test_sample_status_has_the_real_status_fields(tmp_path: Path) -> None:
    real = real_status(tmp_path)
    assert set(SAMPLE_STATUS) == set(real), set(SAMPLE_STATUS) ^ set(real)
    for key, value in real.items():
        assert isinstance(SAMPLE_STATUS[key], type(value)) or value is None, key
    assert real["updates_applied"] == 2 and real["updates_dropped"] == {} and real["samples"] == 128


def test_samples_per_second_is_smooth_and_the_sum_of_the_workers_rows(tmp_path: Path) -> None:
    """Two workers finishing units of 512 and 256 samples every 4 s, then one leaves: the headline rate is
    the sum of the rows and moves smoothly (no 0 -> 34 -> 512 jumps, no cliff when a worker leaves)."""
    from coordinator.config import CoordinatorConfig
    from coordinator.job import RATE_WINDOW_S, Job
    from tests.helpers.tiny_cifar import tiny_cifar10

    now = [1000.0]
    job = Job(CoordinatorConfig(state=tmp_path / "state", model="cnn", shard_size=64, replication="off"),
              clock=lambda: now[0])
    job.open(tiny_cifar10(n_train=128, n_test=16))
    try:
        series = []
        for second in range(1, 301):   # b leaves after 180 s
            now[0] = 1000.0 + second
            for worker, samples, phase in (("a", 512, 0), ("b", 256, 2)):
                if worker == "b" and second > 180:
                    continue
                job._seen(worker, "python", now[0])
                if second > phase and (second - phase) % 4 == 0:
                    job._credit(worker, samples, 3.5, now[0], 4.0)
            status = job.status().to_json()
            rows = {w["worker_id"]: w["samples_per_second"] for w in status["workers"]}
            assert status["samples_per_second"] == pytest.approx(sum(rows.values())), status
            assert status["rate_window_s"] == RATE_WINDOW_S
            series.append(status["samples_per_second"])
        assert series[179] == 192 and series[3] == 128, "128 + 64 samples/s, from the first unit on"
        assert rows == {"a": 128}, "b left: its rate faded out, then it went offline"
        for before, after in zip(series[5:], series[6:]):   # once both have delivered a unit
            assert abs(after - before) <= 0.1 * before, series
    finally:
        job.close()


def test_page_renders_a_real_jobs_status(tmp_path: Path) -> None:
    status = real_status(tmp_path)
    dom = render_page(status, tmp_path)
    assert text_of(dom, "k-version") == str(status["model_version"])
    assert text_of(dom, "k-acc") == f"{100 * status['accuracy_history'][-1]['test_acc']:.1f}%"
    assert re.search(r"<td>applied</td><td[^>]*>2</td>", dom), "the applied updates row"
    assert text_of(dom, "k-lat") == "–", "no unit requests timed by this process"
    assert "ab12" in dom and "cd34" in dom and "async_sgd" in dom


def test_page_with_empty_history(tmp_path: Path) -> None:
    status = {**SAMPLE_STATUS, "accuracy_history": [], "staleness_histogram": {}, "units_rejected": {}}
    dom = render_page(status, tmp_path)
    assert re.search(r'id="acc-note" style="display: flex', dom)
    assert "Waiting for the first evaluation" in dom
    assert text_of(dom, "k-acc") == "–"
    assert text_of(dom, "k-workers") == "3"


def test_page_shows_unreachable_banner(tmp_path: Path) -> None:
    with serve(None) as port:
        proc = chromium(f"http://127.0.0.1:{port}/dashboard", tmp_path, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r'id="banner" role="alert" class="show"[^>]*>Coordinator unreachable, retrying', proc.stdout)
    assert "HTTP 503" in proc.stdout


def test_info_names_the_strategy_under_its_wrappers() -> None:
    status = {"job": "j", "model": "cnn", "strategy": {"name": "staleness_cap", "inner": {
        "name": "adaptive_clip", "inner": {"name": "fedbuff", "params": {}}}}}
    assert 'crowdtrain_info{job="j",model="cnn",strategy="fedbuff"} 1' in render(status)
