"""Load test: many concurrent protocol clients against one real coordinator process on 127.0.0.1.

Claim (issue 12): one coordinator serves 1,000 concurrent workers with no errors, a p99 of
``units/next`` under 50 ms and memory that stays flat after warm-up. Each simulated worker (an
asyncio client speaking the real protocol, all of them in one client process with aiohttp,
separate from the coordinator's) asks for a unit, holds it ``--hold`` seconds, then hands it back
(``error="returned: ..."``, as a worker that stops does) or, with probability 1 / ``--results-every``,
submits a precomputed delta (tiny values, in the unit's codec: pass ``--extra --codec topk`` for small
ones), and asks again. Clients start
spread over the first ``--hold`` seconds.

Reported: p50/p95/p99/max latency per route (request sent to answer read, in the client) and, from
the coordinators' own histogram at the end (``/metrics``: ``crowdtrain_http_request_duration_seconds``,
handler start to response, summed over the processes; p50/p95/p99 interpolated in its buckets), the
server-side latency of the routes the clients used, counts
by HTTP status, the client process's own event-loop lag and cores (its share of the latencies), errors (a 5xx, a refused connection, a timeout, or a 4xx the protocol does not
expect; a result refused as ``too_stale`` or ``lease_expired`` is counted apart), accepted/s, and the coordinator's RSS (``/proc/<pid>/status``) sampled every
``--sample-s`` seconds; "after warm-up" is from ``--warmup`` seconds on.

    python bench/load.py [--clients 1000] [--duration 120] [--hold 5] [--model cnn] [--out DIR]
                         [--redis N] [--caddy] [--held]

``--redis N``: N coordinator processes on one redis-server instead of one with SQLite; ``--caddy``: the
clients reach them through Caddy with the project's Caddyfile (TLS from Caddy's internal CA), as volunteers do.
``--held``: each client names the base of its last unit as held, as a warm worker or tab does, so that units carry
version deltas where the coordinator is not already making one (without it every unit names a whole fp16 version).

Writes bench/out/load-<date>/{config,results}.json and the ``load`` section of docs/results.md
(unless ``--no-docs``). ``run_load`` is what tests/test_load.py runs, smaller.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HAND_BACK = "returned: load test"
WINDOW_S = 10   # seconds per window of the latency timeline
REFUSALS = ("too_stale", "lease_expired")   # a result the protocol refuses by design: counted, not an error


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def at(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))]

    return {"n": len(v), "p50_ms": 1e3 * at(0.50), "p95_ms": 1e3 * at(0.95), "p99_ms": 1e3 * at(0.99),
            "max_ms": 1e3 * v[-1]}


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------- the client process
async def clients(url: str, n: int, duration: float, hold: float, results_every: int, warmup: float,
                  ca: Path | None = None, held: bool = False) -> dict:
    """``url``: one coordinator, or several comma-separated (client k uses the k-th, round robin); ``ca``: the
    certificate authority to trust for an https ``url`` (Caddy's internal CA); ``held``: each request names the
    base of the client's last unit as held (``UnitRequest.held``), as a warm worker does, so that units carry a
    version delta from it (made by the coordinator per held and new version) instead of the whole version."""
    import ssl

    import aiohttp
    import numpy as np

    from contract.codecs import decode_delta, encode_delta, get_codec
    from contract.units import UnitResult, WorkUnit, pack_result

    # "units/next" split in two besides: asked right after an accepted result (that request waits, by design, for
    # a version with the worker's own result folded in: ``Job.fresh_base``), and every other
    lat: dict[str, list[tuple[float, float]]] = {"units/next": [], "result": [], "hand_back": [],
                                                 "units/next after own result": [], "units/next other": []}
    statuses: dict[str, dict[str, int]] = {k: {} for k in lat}
    errors: list[str] = []
    refused: dict[str, int] = {}       # results the protocol refuses by design (too stale, lease ended)
    accepted = [0]
    with_delta = [0]                   # units whose base came as a version delta from a held version
    deltas: dict[str, bytes] = {}      # codec -> a precomputed delta for this job's model
    t0 = time.perf_counter()
    end = t0 + duration
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None,
                                     ssl=ssl.create_default_context(cafile=str(ca)) if ca else True)

    urls = url.split(",")

    async def delta_for(session, unit: WorkUnit, url: str) -> bytes:
        if unit.codec not in deltas:
            async with session.get(f"{url}/api/v1/blobs/{unit.model_version}") as r:
                model = decode_delta(await r.read())
            deltas[unit.codec] = encode_delta(get_codec(unit.codec),
                                              {k: np.full(v.shape, 1e-5, np.float32) for k, v in model.items()})
        return deltas[unit.codec]

    def record(route: str, started: float, status: int | str, also: str | None = None) -> None:
        for r in (route, also) if also else (route,):
            lat[r].append((started - t0, time.perf_counter() - started))
            statuses[r][str(status)] = statuses[r].get(str(status), 0) + 1

    async def worker(k: int, session) -> None:
        wid, url = f"load-{k:04d}", urls[k % len(urls)]
        rng = random.Random(k)
        await asyncio.sleep(rng.uniform(0, hold))
        units, own, last = 0, False, None   # own: this worker's last result was accepted; last: its last base
        while time.perf_counter() < end:
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/api/v1/units/next", json={
                        "protocol": 1, "worker_id": wid, "backend": "python",
                        **({"held": [last]} if held and last else {})}) as r:
                    body = await r.read()
                    record("units/next", started, r.status,
                           "units/next after own result" if own else "units/next other")
                    own = False
                    if r.status == 204:
                        await asyncio.sleep(min(hold, float(r.headers.get("Retry-After", "1"))))
                        continue
                    if r.status != 200:
                        errors.append(f"units/next {r.status}: {body[:200]!r}")
                        await asyncio.sleep(1.0)
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                record("units/next", started, type(e).__name__)
                errors.append(f"units/next {type(e).__name__}: {e}")
                await asyncio.sleep(1.0)
                continue
            unit = WorkUnit.from_json(json.loads(body))
            units, last = units + 1, unit.model_version
            with_delta[0] += unit.base_delta is not None
            await asyncio.sleep(hold)
            real = results_every > 0 and rng.random() < 1 / results_every
            if real:
                raw = await delta_for(session, unit, url)
                result = UnitResult(unit_id=unit.unit_id, lease=unit.lease, worker_id=wid,
                                    base_version=unit.model_version, delta=raw, loss_before=2.3, loss_after=2.2,
                                    num_samples=unit.local_steps * unit.batch_size, compute_seconds=hold)
            else:
                result = UnitResult(unit_id=unit.unit_id, lease=unit.lease, worker_id=wid,
                                    base_version=unit.model_version, delta=b"", loss_before=0.0, loss_after=0.0,
                                    num_samples=0, compute_seconds=hold, error=HAND_BACK)
            route = "result" if real else "hand_back"
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/api/v1/units/{unit.unit_id}/result", data=pack_result(result),
                                        headers={"Content-Type": "application/octet-stream"}) as r:
                    body = await r.read()
                    record(route, started, r.status)
                    code = json.loads(body)["error"]["code"] if r.status >= 400 and body.startswith(b"{") else ""
                    if r.status in (409, 410) and code in REFUSALS:
                        refused[code] = refused.get(code, 0) + 1
                    elif r.status != 200:
                        errors.append(f"{route} {r.status}: {body[:200]!r}")
                    elif real and json.loads(body).get("accepted"):
                        accepted[0] += 1
                        own = True
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                record(route, started, type(e).__name__)
                errors.append(f"{route} {type(e).__name__}: {e}")

    from coordinator.observe import LOOP_TICK_S   # the coordinator's timer, the same here

    lags: list[float] = []   # this process's own event loop: how late the timer ran (after the warm-up)

    async def watch_loop() -> None:
        loop = asyncio.get_running_loop()
        while time.perf_counter() < end:
            started = loop.time()
            await asyncio.sleep(LOOP_TICK_S)
            if started - t0 >= warmup:
                lags.append(max(0.0, loop.time() - started - LOOP_TICK_S))

    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(watch_loop(), *(worker(k, session) for k in range(n)))
    wall = time.perf_counter() - t0
    return {
        "routes": {route: {"all": percentiles([x for _, x in v]),
                           "after_warmup": percentiles([x for t, x in v if t >= warmup]),
                           "statuses": statuses[route]} for route, v in lat.items()},
        "timeline": {route: [percentiles([x for t, x in v if w <= t < w + WINDOW_S]) | {"from_s": w}
                             for w in range(0, int(duration) + 1, WINDOW_S)] for route, v in lat.items() if v},
        "errors": len(errors), "error_examples": errors[:10], "refused": refused, "accepted": accepted[0],
        "accepted_per_s": accepted[0] / wall, "wall_s": wall, "units_with_version_delta": with_delta[0],
        # the measuring process's share of the latencies: its own loop's lag, and the cores it used
        "client_loop_lag": percentiles(lags), "client_cores": (time.process_time() - cpu0) / wall,
    }


# ---------------------------------------------------------------------------- the run
def coordinator_command(state: Path, port: int, model: str, limit_train: int, extra: list[str]) -> list[str]:
    data = os.environ.get("CROWDTRAIN_DATA", str(ROOT.parent / "shared" / "data"))
    return [sys.executable, "-m", "crowdtrain", "coordinator", "--state", str(state), "--port", str(port),
            "--model", model, "--data", data, "--no-download", "--limit-train", str(limit_train),
            # a budget no run spends (5e8 samples): the load is the steady state's, not a job's tail (at
            # --epochs 1000, 1,000 clients committed the budget after about 200 s)
            "--eval-every", "100000", "--eval-images", "1000", "--epochs", "100000",
            *([] if "--replication" in extra else ["--replication", "off"]),   # the protocol's load, unchecked
            *extra]


def settle(url: str, pid: int, timeout: float = 300.0) -> dict:
    """Wait for the coordinator's start-up work (the evaluation of version 0, and the browser's step
    graph, built in the background, whose known-answer check loads onnxruntime sessions into the
    coordinator) to finish: version 0 evaluated and the step graph no longer ``building``
    (``/api/status`` ``browser_graph``), then RSS steady (within 2 MB over 3 s). A steady RSS alone is
    not enough on a busy machine: the graph's export can stall for seconds, then the check adds
    ~200 MB. Returns the RSS when it came up and when settled, and the seconds it took."""
    t0, first = time.time(), rss_mb(pid)
    while time.time() - t0 < timeout:
        with urllib.request.urlopen(url + "/api/status", timeout=30) as r:
            status = json.load(r)
        if status.get("accuracy_history") and status.get("browser_graph") != "building":
            break
        time.sleep(0.5)
    last: list[float] = []
    while time.time() - t0 < timeout:
        last = (last + [rss_mb(pid) or 0.0])[-4:]
        if len(last) == 4 and max(last) - min(last) < 2.0:
            break
        time.sleep(1.0)
    return {"rss_up_mb": first, "rss_settled_mb": last[-1] if last else None, "seconds": time.time() - t0}


def metrics_texts(urls: list[str]) -> list[str]:
    """``/metrics`` of each process."""
    texts = []
    for u in urls:
        with urllib.request.urlopen(u + "/metrics", timeout=30) as r:
            texts.append(r.read().decode())
    return texts


def process_view(url: str, text: str) -> dict:
    """One process of several: its own request histograms and loop lag, whether it leads (``/api/v1/cluster``), and
    for the leader its job service's histograms (the requests the others forward to it, as it times them)."""
    from coordinator.observe import loop_lag

    view = {"url": url, "leader": None, "server": server_latency([text]), "loop_lag": loop_lag([text])}
    try:
        with urllib.request.urlopen(url + "/api/v1/cluster", timeout=30) as r:
            cluster = json.load(r)
        view["leader"] = bool(cluster.get("leader"))
        if view["leader"] and cluster.get("leader_url"):
            view["job_service"] = server_latency(metrics_texts([cluster["leader_url"]]))
    except (OSError, ValueError):
        pass
    return view


def server_latency(texts: list[str]) -> dict:
    """The coordinators' request histograms (``/metrics`` texts of each process, summed) of the routes the clients
    use: ``METHOD route template`` -> requests, p50/p95/p99 ms, statuses (``coordinator.observe``). Empty
    when a coordinator has no such histogram (``--code`` older than it)."""
    from coordinator.observe import WORK_ROUTES, request_latency

    return {k: v for k, v in request_latency(texts).items() if k in WORK_ROUTES}


def server_lines(r: dict) -> list[str]:
    return [f"| {route} | {v['n']} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {v['p99_ms']:.1f} | "
            f"{', '.join(f'{k}: {n}' for k, n in v['statuses'].items())} |"
            for route, v in r.get("server", {}).items() if v["n"]]


def lag_line(r: dict) -> list[str]:
    lag = r.get("loop_lag")
    if not lag:
        return []
    return [f"The coordinators' event loops ran their timers late by p50 / p95 / p99 {lag['p50_ms']:.1f} / "
            f"{lag['p95_ms']:.1f} / {lag['p99_ms']:.1f} ms over the run ({lag['n']:,} ticks; "
            "`crowdtrain_event_loop_lag_seconds`)." + client_lag(r), ""]


def client_lag(r: dict) -> str:
    from coordinator.observe import LOOP_TICK_S

    lag = r.get("client_loop_lag")
    if not lag or not lag.get("n"):
        return ""
    return (f" The clients' own loop (one process, {r['client_cores']:.2f} cores) ran a {1e3 * LOOP_TICK_S:g}-ms "
            "timer late by p50 / p95 "
            f"/ p99 {lag['p50_ms']:.1f} / {lag['p95_ms']:.1f} / {lag['p99_ms']:.1f} ms after the warm-up: the "
            "latencies above include that wait.")


def bucket_bounds() -> str:
    from coordinator.observe import BUCKETS

    return ", ".join(f"{1e3 * b:g}" for b in BUCKETS)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(clients_n: int, duration: float, hold: float, model: str = "cnn", limit_train: int = 5000,
             results_every: int = 0, warmup: float = 30.0, sample_s: float = 2.0, extra: list[str] = (),
             workdir: Path | None = None, python_path: Path = ROOT, settle_first: bool = True,
             redis: int = 0, caddy: bool = False, logs_to: Path | None = None, skip_leader: bool = False,
             held: bool = False) -> dict:
    """Start a coordinator (from ``python_path``'s code), let its start-up work finish (``settle``),
    run the clients in another process, return the measurements. ``redis``: instead, a redis-server
    (append-only file, fsync every second) and that many ``--redis`` coordinator processes sharing
    one blob directory, the clients spread over them; RSS is then the sum over the processes and Redis.
    ``caddy``: the clients reach the coordinators through Debian's Caddy on 127.0.0.1 with the project's own
    Caddyfile (deploy/caddyfile.py: TLS from Caddy's internal CA, compression, least-connections balancing over
    the processes, health checks with Redis), as a deployment's volunteers do; Caddy's RSS is in the sum.
    ``logs_to``: a folder the coordinators', Redis's and Caddy's logs are copied to at the end. ``skip_leader``
    (with ``redis`` >= 2, without ``caddy``): the clients speak only to the processes that do not lead, so the
    leader takes no request of its own (results are then all taken by the others). ``held``: the clients name
    the base of their last unit as held (``clients``)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        procs: list[subprocess.Popen] = []
        ports = [free_port() for _ in range(max(1, redis))]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        url = urls[0]
        extra = list(extra)
        if redis:
            from tests.helpers.redis_server import TUNING as REDIS_TUNING

            rport = free_port()
            (tmp / "redis").mkdir()
            procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                           "--appendonly", "yes", "--appendfsync", "everysec", *REDIS_TUNING,
                                           "--dir", str(tmp / "redis")], stdout=open(tmp / "redis.log", "w"),
                                          stderr=subprocess.STDOUT))
            extra += ["--redis", f"redis://127.0.0.1:{rport}/0"]
        for i, port in enumerate(ports):
            log = open(tmp / f"coordinator{i}.log", "w")
            procs.append(subprocess.Popen(coordinator_command(tmp / "state", port, model, limit_train, extra),
                                          cwd=python_path, stdout=log, stderr=subprocess.STDOUT))
        coordinator = procs[-len(ports)]

        def logs() -> str:
            return "\n".join(p.read_text()[-3000:] for p in sorted(tmp.glob("*.log")))

        try:
            for u in urls:
                deadline = time.time() + 300
                while True:
                    if any(p.poll() is not None for p in procs):
                        raise RuntimeError("a coordinator exited:\n" + logs())
                    try:
                        with urllib.request.urlopen(u + "/api/status", timeout=5):
                            break
                    except OSError:
                        if time.time() > deadline:
                            raise RuntimeError("coordinator did not come up") from None
                        time.sleep(0.3)
            started = settle(url, coordinator.pid) if settle_first else {}
            client_urls, ca = urls, None
            if skip_leader:
                client_urls = [u for u in urls if not json.loads(urllib.request.urlopen(
                    u + "/api/v1/cluster", timeout=30).read())["leader"]]
            if caddy:
                client_urls, ca = start_caddy(tmp, ports, procs, health=bool(redis)), caddy_ca(tmp)
            rss: list[tuple[float, float]] = []
            each: list[list[float]] = []   # [t, rss of each process in procs]
            stop = threading.Event()
            t0 = time.time()

            def sample() -> None:
                while not stop.is_set():
                    values = [rss_mb(p.pid) for p in procs]
                    if all(v is not None for v in values):
                        rss.append((time.time() - t0, sum(values)))
                        each.append([time.time() - t0, *values])
                    stop.wait(sample_s)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            out = tmp / "clients.json"
            client = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run-clients",
                                     ",".join(client_urls), "--clients", str(clients_n), "--duration", str(duration),
                                     "--hold", str(hold), "--results-every", str(results_every), "--warmup",
                                     str(warmup), "--client-out", str(out)] + (["--ca", str(ca)] if ca else [])
                                    + (["--held"] if held else []),
                                    cwd=ROOT, capture_output=True, text=True)
            stop.set()
            sampler.join()
            if client.returncode != 0:
                raise RuntimeError("client process failed:\n" + client.stderr[-3000:])
            result = json.loads(out.read_text())
            with urllib.request.urlopen(url + "/api/status", timeout=30) as r:
                status = json.load(r)
            from coordinator.observe import loop_lag

            texts = metrics_texts(urls)
            result["server"] = server_latency(texts)
            # how late the coordinators' event loops ran a timer over the run (None for a --code without it)
            result["loop_lag"] = loop_lag(texts)
            if len(urls) > 1:   # which hop the time goes to: each process's own histograms, the leader's named
                result["by_process"] = [process_view(u, t) for u, t in zip(urls, texts)]
            result["coordinator_log_errors"] = [line for f in sorted(tmp.glob("coordinator*.log"))
                                                for line in f.read_text().splitlines()
                                                if "Traceback" in line or "ERROR" in line][:10]
            result["coordinator_first_traceback"] = first_traceback(sorted(tmp.glob("coordinator*.log")))
        finally:
            for p in reversed(procs):   # the coordinators first, Redis last
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
            if logs_to is not None:
                logs_to.mkdir(parents=True, exist_ok=True)
                for f in tmp.glob("*.log"):
                    (logs_to / f.name).write_bytes(f.read_bytes())
    warm = [v for t, v in rss if t >= warmup]
    result["startup"] = started
    result["rss_mb"] = rss
    # per process (redis-server, each coordinator, caddy): which one grows
    names = [f"{'coordinator' if 'crowdtrain' in p.args else Path(str(p.args[0])).name}:{i}"
             for i, p in enumerate(procs)]
    warm_each = [row for row in each if row[0] >= warmup]
    result["rss_by_process"] = {
        "names": names, "samples": each,
        "growth_after_warmup": {n: warm_each[-1][1 + i] - warm_each[0][1 + i] for i, n in enumerate(names)}
        if warm_each else {}}
    result["rss_summary"] = {"start": rss[0][1] if rss else None, "end": rss[-1][1] if rss else None,
                             "at_warmup": warm[0] if warm else None, "max": max((v for _, v in rss), default=None),
                             "growth_after_warmup": (warm[-1] - warm[0]) if warm else None}
    result["units"] = {k: status.get(k) for k in ("units_issued", "units_accepted", "units_failed", "units_leased",
                                                  "units_expired", "units_rejected", "updates_applied",
                                                  "model_version", "staleness_histogram")}
    return result


def caddy_ca(tmp: Path) -> Path:
    from tests.helpers.caddy import caddy_root_ca

    return caddy_root_ca(tmp / "caddy-home")


def start_caddy(tmp: Path, ports: list[int], procs: list, health: bool) -> list[str]:
    """Caddy in front of the coordinators on ``ports`` (appended to ``procs``); returns its https URL once it
    answers through its internal CA."""
    import shutil
    import ssl

    from tests.helpers.caddy import caddy_env

    exe = shutil.which("caddy")
    if exe is None:
        raise RuntimeError("--caddy: caddy is not installed (bash deploy/setup.sh --test installs Debian's)")
    port, http_port = free_port(), free_port()
    caddyfile = tmp / "Caddyfile"
    subprocess.run([sys.executable, str(ROOT / "deploy" / "caddyfile.py"), "--site", f"https://127.0.0.1:{port}",
                    "--tls-internal", "--http-port", str(http_port), "--admin", "off", "--out", str(caddyfile),
                    *[a for p in ports for a in ("--upstream", f"127.0.0.1:{p}")],
                    *(["--health-uri", "/api/v1/cluster"] if health else [])], check=True, cwd=ROOT)
    home = tmp / "caddy-home"
    procs.append(subprocess.Popen([exe, "run", "--config", str(caddyfile), "--adapter", "caddyfile"], env=caddy_env(home),
                                  stdout=open(tmp / "caddy.log", "w"), stderr=subprocess.STDOUT))
    url, deadline = f"https://127.0.0.1:{port}", time.time() + 60
    while True:
        try:
            ctx = ssl.create_default_context(cafile=str(caddy_ca(tmp)))
            with urllib.request.urlopen(url + "/api/status", timeout=5, context=ctx):
                return [url]
        except (OSError, ssl.SSLError):
            if procs[-1].poll() is not None or time.time() > deadline:
                raise RuntimeError("caddy did not come up:\n" + (tmp / "caddy.log").read_text()[-3000:]) from None
            time.sleep(0.3)


def first_traceback(logs: list[Path]) -> list[str]:
    """The first traceback in the coordinators' logs, whole (at most 60 lines), or []."""
    for f in logs:
        lines = f.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                block = [line]
                for more in lines[i + 1:i + 60]:
                    block.append(more)
                    if more and not more.startswith((" ", "Traceback", "During handling", "The above")):
                        break   # the exception's own line ends it
                return block
    return []


def summary_lines(r: dict) -> list[str]:
    lines = []
    for route, v in r["routes"].items():
        a, w = v["all"], v["after_warmup"]
        if a.get("n"):
            lines.append(f"| {route} | {a['n']} | {a['p50_ms']:.1f} | {a['p95_ms']:.1f} | {a['p99_ms']:.1f} | "
                         f"{a['max_ms']:.0f} | {w.get('p99_ms', float('nan')):.1f} | "
                         f"{', '.join(f'{k}: {n}' for k, n in sorted(v['statuses'].items()))} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--duration", type=float, default=120.0, help="seconds the clients run")
    p.add_argument("--hold", type=float, default=5.0, help="seconds a client holds each unit")
    p.add_argument("--results-every", type=int, default=0,
                   help="a unit gets a real result with probability 1/N (0: never)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--limit-train", type=int, default=5000)
    p.add_argument("--warmup", type=float, default=30.0)
    p.add_argument("--sample-s", type=float, default=2.0)
    p.add_argument("--no-settle", action="store_true", help="start the clients as soon as the coordinator answers")
    p.add_argument("--code", type=Path, default=ROOT, help="repository whose coordinator to run (old vs new)")
    p.add_argument("--label", default="")
    p.add_argument("--out", type=Path)
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--run-clients", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--client-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--redis", type=int, default=0, metavar="N",
                   help="N coordinator processes on one redis-server (crowdtrain coordinator --redis), the clients "
                        "spread over them (default: 0: one process with SQLite)")
    p.add_argument("--caddy", action="store_true",
                   help="the clients reach the coordinator(s) through Caddy with the project's Caddyfile (TLS from "
                        "Caddy's internal CA, balancing over the processes), as a deployment's volunteers do")
    p.add_argument("--skip-leader", action="store_true",
                   help="with --redis N >= 2 and no --caddy: the clients speak only to the processes that do not lead")
    p.add_argument("--held", action="store_true",
                   help="each client names the base of its last unit as held, as a warm worker does: units then "
                        "carry a version delta from it, made by the coordinator per pair of versions")
    p.add_argument("--ca", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more coordinator flags: everything after it goes to the coordinator, so put it last")
    args = p.parse_args()
    if args.run_clients:
        result = asyncio.run(clients(args.run_clients, args.clients, args.duration, args.hold, args.results_every,
                                     args.warmup, args.ca, args.held))
        args.client_out.write_text(json.dumps(result))
        return 0
    if args.skip_leader and (args.redis < 2 or args.caddy):
        p.error("--skip-leader needs --redis 2 or more, and no --caddy")
    from bench.common import hardware, shown, write_section
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"load-{date}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"date": date, "clients": args.clients, "duration_s": args.duration, "hold_s": args.hold,
           "results_every": args.results_every, "redis_processes": args.redis, "caddy": args.caddy, "skip_leader": args.skip_leader, "held": args.held, "model": args.model, "limit_train": args.limit_train,
           "warmup_s": args.warmup, "code": str(args.code), "label": args.label, "extra": args.extra,
           "hardware": hardware(), "load_before": os.getloadavg(), "command": "python " + " ".join(sys.argv)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    r = run_load(args.clients, args.duration, args.hold, args.model, args.limit_train, args.results_every,
                 args.warmup, args.sample_s, args.extra, python_path=args.code, settle_first=not args.no_settle,
                 redis=args.redis, caddy=args.caddy, logs_to=out / "logs", skip_leader=args.skip_leader,
                 held=args.held)
    cfg["load_after"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps({"config": cfg, "result": r}, indent=2) + "\n")
    s = r["rss_summary"]
    print(json.dumps({k: r[k] for k in ("errors", "error_examples", "accepted_per_s", "units")}, indent=1))
    print(json.dumps({route: v["all"] | {"after_warmup_p99_ms": v["after_warmup"].get("p99_ms")}
                      for route, v in r["routes"].items()}, indent=1))
    print("server-side (the coordinators' histograms):", json.dumps(r["server"], indent=1))
    print("event loop lag:", json.dumps(r.get("loop_lag")))
    print("the clients' own loop lag:", json.dumps(r.get("client_loop_lag")), "cores:", r.get("client_cores"))
    print("rss", s)
    if not args.no_docs:
        lines = [f"### Load: {args.clients} clients, one coordinator ({date})", "",
                 f"- Hardware: {cfg['hardware']}; load average {cfg['load_before'][0]:.1f} before the run.",
                 f"- Command: `{cfg['command']}`; raw results in `{shown(out)}`.",
                 "", "| route | requests | p50 ms | p95 ms | p99 ms | max ms | p99 after warm-up | statuses |",
                 "|---|---:|---:|---:|---:|---:|---:|---|", *summary_lines(r), "",
                 "Server-side, from the coordinators' `crowdtrain_http_request_duration_seconds` at the end (handler "
                 "start to response, so without the network and the client's own wait; p50/p95/p99 interpolated inside "
                 f"its buckets (bounds {bucket_bounds()} ms), so no finer than they are; results and hand-backs share "
                 "one route):", "",
                 "| route | requests | p50 ms | p95 ms | p99 ms | statuses |", "|---|---:|---:|---:|---:|---|",
                 *server_lines(r), "", *lag_line(r),
                 f"Errors: {r['errors']}. Coordinator RSS: {r['startup'].get('rss_up_mb') or 0:.0f} MB when it "
                 f"answered, {r['startup'].get('rss_settled_mb') or 0:.0f} MB once its start-up work was done "
                 f"({r['startup'].get('seconds', 0):.0f} s; the clients start then), {s['at_warmup']:.0f} MB "
                 f"at {args.warmup:.0f} s of load, {s['end']:.0f} MB at the end (max {s['max']:.0f} MB)."]
        write_section("load", "\n".join(lines), ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
