"""The one-host deployment of deploy/ (issue 12 item 3): a real coordinator behind a real Caddy
with the Caddyfile that deploy/caddyfile.py renders from deploy/Caddyfile.in, over HTTPS with
Caddy's internal CA, and a real `crowdtrain worker` through it.

Everything runs in a private network namespace (``unshare --net``: its own loopback, nothing
else), where two documentation addresses (198.51.100.7 and .8) sit on that loopback too, so
a test client can reach Caddy from an address that is not loopback: the coordinator exempts
loopback from its rate limits, so only such a client shows that the limits see the address
Caddy forwards. Caddy's certificates and CA live in a temporary HOME/XDG_DATA_HOME and it
never touches the system's trust store (``skip_install_trust``).
"""
from __future__ import annotations

import ctypes
import dataclasses
import difflib
import gzip
import http.client
import json
import math
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from contract.units import UnitRequest
from tests.helpers.caddy import caddy_env, caddy_root_ca
from tests.helpers.tiny_cifar import write_official_archive

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_KEY = "deploy-worker-key-" + "k" * 16   # the deploy test worker's secret ($CROWDTRAIN_WORKER_KEY)
CADDY = shutil.which("caddy")
RENDER = ROOT / "deploy" / "caddyfile.py"
CLIENT, OTHER = "198.51.100.7", "198.51.100.8"   # TEST-NET-2, only on the namespace's loopback
CLONE_NEWNET = 0x40000000
BROWSER_ENCODINGS = "gzip, deflate, br, zstd"      # what Chromium sends
# A tiny job: 256 images, units of 2 steps of 32 (the step-graph cache key of test_browser's jobs).
JOB = ("--model", "cnn", "--batch-size", "32", "--shard-size", "64", "--local-steps", "2", "--eval-every", "2",
       "--epochs", "1", "--unit-rate-address", "6")
RATE_BURST = 5   # coordinator/limits.py: bursts of max(5, per_minute / 6) requests

needs_caddy = pytest.mark.skipif(CADDY is None, reason="caddy is not installed (bash deploy/setup.sh --test installs "
                                                      "Debian's caddy package)")


# ---------------------------------------------------------------------------- a private network
class Net:
    """A network namespace with loopback up and ``CLIENT``/``OTHER`` on it: ``popen`` starts a process
    in it, ``call`` runs a function in a thread that has joined it (sockets belong to the namespace
    of the thread that makes them)."""

    def __init__(self, tmp: Path):
        script = (f"ip link set lo up && ip addr add {CLIENT}/32 dev lo && ip addr add {OTHER}/32 dev lo "
                  "&& echo ready && exec sleep 600")
        with open(tmp / "netns.log", "w") as log:
            self.holder = subprocess.Popen(["unshare", "--net", "sh", "-c", script], stdout=subprocess.PIPE,
                                           stderr=log, text=True)
        ready = self.holder.stdout.readline().strip()
        if ready != "ready":
            self.holder.kill()
            raise OSError(f"cannot make a network namespace: {(tmp / 'netns.log').read_text().strip()}")
        self.path = f"/proc/{self.holder.pid}/ns/net"
        self.fd = os.open(self.path, os.O_RDONLY)
        self.pool = ThreadPoolExecutor(1, initializer=self._join)
        self.procs: list[subprocess.Popen] = []

    def _join(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(self.fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    def call(self, fn, *args, **kwargs):
        return self.pool.submit(fn, *args, **kwargs).result()

    def popen(self, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        with open(log, "a") as out:
            proc = subprocess.Popen(["nsenter", f"--net={self.path}", "--", *argv], cwd=ROOT, env=env or os.environ,
                                    stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in [*self.procs, self.holder]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.pool.shutdown()
        os.close(self.fd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- HTTP(S) as a client does
def request(port: int, method: str, path: str, *, ctx: ssl.SSLContext | None = None, headers: dict | None = None,
            body: bytes | None = None, source: str | None = None, send_body: bool = True):
    """(status, http.client.HTTPMessage, raw body) of one request to 127.0.0.1:port, from ``source``;
    ``send_body=False`` sends the headers (Content-Length included) and waits for the answer."""
    args = {"timeout": 30, "source_address": (source, 0) if source else None}
    conn = (http.client.HTTPSConnection("127.0.0.1", port, context=ctx, **args) if ctx
            else http.client.HTTPConnection("127.0.0.1", port, **args))
    try:
        conn.putrequest(method, path, skip_accept_encoding=bool(headers and "Accept-Encoding" in headers))
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None and "Content-Length" not in (headers or {}):
            conn.putheader("Content-Length", str(len(body)))
        try:
            conn.endheaders(body if body is not None and send_body else None)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError) as sent:
            # the server answered (413) and closed before the whole body was sent: its answer is read below,
            # and if there is none the send's error stands
            try:
                resp = conn.getresponse()
                return resp.status, resp.headers, resp.read()
            except (OSError, http.client.HTTPException):
                raise sent from None
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def render(out: Path, *args: str) -> str:
    subprocess.run([sys.executable, str(RENDER), *args, "--out", str(out)], check=True, cwd=ROOT)
    return out.read_text()


def adapt(caddyfile: Path, home: Path) -> dict:
    out = subprocess.run([CADDY, "adapt", "--config", str(caddyfile), "--adapter", "caddyfile"], env=caddy_env(home),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def handlers(config: dict, name: str) -> list[dict]:
    """Every handler called ``name`` in an adapted config, however deeply nested."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("handler") == name:
                found.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(config)
    return found


def result_cap(model: str) -> int:
    """The coordinator's result cap for ``model`` (coordinator/job.py: 4 bytes a float of the delta +
    --body-slack-bytes); checked against a live coordinator's 413 in test_through_caddy."""
    import torch

    from coordinator.config import CoordinatorConfig
    from models import registry
    from models.local import delta_spec
    with torch.random.fork_rng():
        spec = delta_spec(registry.build(model))
    slack, = (f.default for f in dataclasses.fields(CoordinatorConfig) if f.name == "body_slack_bytes")
    return 4 * sum(math.prod(s) for s, _ in spec.values()) + slack


# ---------------------------------------------------------------------------- the config itself
@needs_caddy
def test_caddyfile_validates_and_one_line_adds_a_coordinator(tmp_path):
    """The production rendering adapts and validates; a second coordinator is one more `to` line; TLS is
    automatic for the public name; no proxy is trusted (so client X-Forwarded-For is never kept)."""
    one = render(tmp_path / "one.caddy", "--site", "volunteer.example.org", "--email", "ops@example.org")
    two = render(tmp_path / "two.caddy", "--site", "volunteer.example.org", "--email", "ops@example.org",
                 "--upstream", "127.0.0.1:8080", "--upstream", "127.0.0.1:8081")
    changed = [line for line in difflib.ndiff(one.splitlines(), two.splitlines()) if line[:2] in ("+ ", "- ")]
    assert changed == ["+ \t\tto 127.0.0.1:8081"], changed
    assert "@@" not in two

    config = adapt(tmp_path / "two.caddy", tmp_path)
    proxy, = handlers(config, "reverse_proxy")
    assert [u["dial"] for u in proxy["upstreams"]] == ["127.0.0.1:8080", "127.0.0.1:8081"]
    assert "trusted_proxies" not in json.dumps(config)
    server, = config["apps"]["http"]["servers"].values()
    assert server["listen"] == [":443"]
    policy, = config["apps"]["tls"]["automation"]["policies"]
    assert policy["subjects"] == ["volunteer.example.org"]
    assert {i["module"] for i in policy["issuers"]} >= {"acme"}          # a public certificate, not `internal`
    assert handlers(config, "encode") and handlers(config, "request_body")

    check = subprocess.run([CADDY, "validate", "--config", str(tmp_path / "two.caddy"), "--adapter", "caddyfile"],
                           env=caddy_env(tmp_path), capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0 and "Valid configuration" in check.stdout + check.stderr, check.stderr

    # the default body limit is at least the coordinator's result cap for every registered model
    from models.registry import MODELS
    limit, = (h["max_size"] for h in handlers(config, "request_body"))
    caps = {name: result_cap(name) for name in MODELS}
    assert all(cap <= limit for cap in caps.values()), (limit, caps)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian's "
                                                                   "systemd package)")
def test_systemd_units_verify(tmp_path):
    """The units parse, use only keys systemd knows, and every command they run exists (checked on
    instances of copies that point at this checkout and at the example env files)."""
    subs = {"/opt/crowdtrain": str(ROOT), "/etc/crowdtrain/coordinator.env": str(ROOT / "deploy/coordinator.env.example"),
            "/etc/crowdtrain/worker.env": str(ROOT / "deploy/worker.env.example")}
    units = []
    for template, instance in (("crowdtrain-coordinator@.service", "crowdtrain-coordinator@8080.service"),
                               ("crowdtrain-worker@.service", "crowdtrain-worker@1.service"),
                               ("crowdtrain-cluster@.service", "crowdtrain-cluster@8080.service"),
                               ("crowdtrain-redis.service", "crowdtrain-redis.service")):
        text = (ROOT / "deploy" / "systemd" / template).read_text()
        for old, new in subs.items():
            text = text.replace(old, new)
        (tmp_path / instance).write_text(text)
        units.append(str(tmp_path / instance))
    out = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


# ---------------------------------------------------------------------------- a deployment
@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    try:
        net = Net(tmp)
    except OSError as e:
        pytest.skip(f"needs a private network namespace (unshare --net, as root) for its non-loopback client: {e}")
    try:
        data = tmp / "data"
        write_official_archive(data, n_train=256, n_test=50)
        cport, hport, http_port, admin = (net.call(free_port) for _ in range(4))
        env = {**os.environ, "CROWDTRAIN_CACHE": os.environ.get("CROWDTRAIN_CACHE",
                                                                  str(Path.home() / ".cache" / "crowdtrain"))}
        coordinator = net.popen([sys.executable, "-m", "crowdtrain", "coordinator", "--state", str(tmp / "state"),
                                 "--port", str(cport), "--data", str(data), *JOB], tmp / "coordinator.log", env)

        caddyfile = tmp / "Caddyfile"
        render(caddyfile, "--site", f"https://127.0.0.1:{hport}", "--upstream", f"127.0.0.1:{cport}",
               "--tls-internal", "--http-port", str(http_port), "--admin", f"127.0.0.1:{admin}")
        home = tmp / "caddy-home"
        caddy = net.popen([CADDY, "run", "--config", str(caddyfile), "--adapter", "caddyfile"], tmp / "caddy.log",
                          caddy_env(home))
        root_ca = caddy_root_ca(home)

        deadline = time.time() + 120
        up = set()
        while time.time() < deadline and len(up) < 2:
            assert coordinator.poll() is None, (tmp / "coordinator.log").read_text()
            assert caddy.poll() is None, (tmp / "caddy.log").read_text()
            try:
                if "coordinator" not in up and net.call(request, cport, "GET", "/api/status")[0] == 200:
                    up.add("coordinator")
                if "caddy" not in up and root_ca.is_file():
                    ctx = ssl.create_default_context(cafile=str(root_ca))
                    net.call(request, hport, "GET", "/leaderboard", ctx=ctx)
                    up.add("caddy")
            except (OSError, ssl.SSLError, http.client.HTTPException):
                pass
            time.sleep(0.3)
        assert len(up) == 2, f"up: {up}; caddy log: {(tmp / 'caddy.log').read_text()[-2000:]}"
        yield {"net": net, "tmp": tmp, "cport": cport, "hport": hport, "ctx": ctx, "root_ca": root_ca, "env": env,
               "caddyfile": caddyfile, "caddy_home": home}
    finally:
        net.close()


@needs_caddy
def test_through_caddy(deployed):
    """Over HTTPS through Caddy: the page with its isolation headers, assets compressed once and
    byte-identical, /api/status, /metrics kept off the public side, a real worker finishing the job,
    and an oversize result refused."""
    d = deployed
    net, hport, cport, ctx, tmp = d["net"], d["hport"], d["cport"], d["ctx"], d["tmp"]
    start = time.time()

    def get(path, **kw):
        return net.call(request, hport, "GET", path, ctx=ctx, **kw)

    # the donate page: cross-origin isolated, compressed by Caddy (the coordinator sends it plain)
    status, head, raw = get("/", headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert head["Cross-Origin-Opener-Policy"] == "same-origin"
    assert head["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert head["Cross-Origin-Resource-Policy"] == "same-origin"
    assert head.get_all("Content-Encoding") == ["gzip"]
    page = gzip.decompress(raw).decode()
    prefix = re.search(r"/static/[0-9a-f]{16}/", page).group(0)

    # assets: the coordinator's own gzip copy passes through as it is (one Content-Encoding), also
    # for a browser that would take zstd; without gzip in Accept-Encoding, the file itself
    assets = {"main.js": ROOT / "worker_web" / "main.js"}
    wasm = ROOT / "worker_web" / "node_modules" / "onnxruntime-web" / "dist" / "ort-wasm-simd-threaded.wasm"
    if wasm.is_file():
        assets["ort/ort-wasm-simd-threaded.wasm"] = wasm
    for rel, source in assets.items():
        want = source.read_bytes()
        for accept in (BROWSER_ENCODINGS, "gzip"):
            status, head, raw = get(prefix + rel, headers={"Accept-Encoding": accept})
            assert status == 200, (rel, status)
            assert head.get_all("Content-Encoding") == ["gzip"], (rel, accept, head.get_all("Content-Encoding"))
            assert gzip.decompress(raw) == want, (rel, accept)
            assert head["Cross-Origin-Embedder-Policy"] == "require-corp"
        status, head, raw = get(prefix + rel)
        assert status == 200 and head.get("Content-Encoding") is None and raw == want, rel

    status, head, raw = get("/api/status")
    assert status == 200
    job = json.loads(raw)
    assert job["model"] == "cnn" and not job["finished"]

    assert get("/metrics")[0] == 403                                           # public side
    assert net.call(request, cport, "GET", "/metrics")[0] == 200               # the coordinator's own port

    # a real worker through Caddy; it trusts Caddy's CA through SSL_CERT_FILE
    worker = net.popen([sys.executable, "-m", "crowdtrain", "worker", "--coordinator", f"https://127.0.0.1:{hport}",
                        "--threads", "1", "--worker-id", "deploy-worker", "--no-progress", "--cache",
                        str(tmp / "worker-cache"), "--max-retry-time", "30"], tmp / "worker.log",
                       {**d["env"], "SSL_CERT_FILE": str(d["root_ca"]), "CROWDTRAIN_WORKER_KEY": DEPLOY_KEY})
    try:
        rc = worker.wait(120)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 0, (tmp / "worker.log").read_text()[-3000:]
    deadline = time.time() + 30
    while time.time() < deadline:
        job = json.loads(get("/api/status")[2])
        if job["finished"]:
            break
        time.sleep(0.5)
    assert job["finished"] and job["samples"] >= job["budget_samples"], job
    row, = (w for w in job["workers"] if w["worker_id"] == "deploy-worker")
    assert row["units"] >= 4, row                                             # 256 images, units of 64
    # ... and every one of its results went through Caddy (its access log)
    log = [json.loads(line) for line in (tmp / "caddy.log").read_text().splitlines() if line.startswith("{")]
    posted = [e for e in log if e.get("msg") == "handled request" and e["request"]["method"] == "POST"
              and re.fullmatch(r"/api/v1/units/[^/]+/result", e["request"]["uri"])]
    assert sum(e["status"] == 200 for e in posted) >= 4, posted
    # its unit requests carried its key, which the access log leaves out (it logs the other headers)
    asked = [e for e in log if e.get("msg") == "handled request" and e["request"]["uri"] == "/api/v1/units/next"]
    assert asked and all("User-Agent" in e["request"]["headers"] for e in asked), asked[:2]
    assert DEPLOY_KEY not in (tmp / "caddy.log").read_text()
    assert DEPLOY_KEY not in json.dumps(job) and job["units_rejected"].get("worker_key") is None

    # an oversize result is refused (413 too_large) through Caddy: on its Content-Length alone when the
    # client waits for 100 Continue (no byte of the body sent), and after its body otherwise; the cap
    # the coordinator states is the one result_cap computes (the default Caddy body limit's check)
    status, head, raw = net.call(request, hport, "POST", "/api/v1/units/no-such-unit/result", ctx=ctx,
                                 send_body=False, headers={"Content-Length": str(1 << 30), "Expect": "100-continue",
                                                           "Content-Type": "application/octet-stream"})
    assert status == 413, raw
    err = json.loads(raw)["error"]
    assert err["code"] == "too_large" and err["field"] == "body"
    cap = int(re.search(r"at most (\d+) bytes", err["message"]).group(1))
    assert cap == result_cap("cnn")
    status, head, raw = net.call(request, hport, "POST", "/api/v1/units/no-such-unit/result", ctx=ctx,
                                 body=bytes(cap + 1), headers={"Content-Type": "application/octet-stream"})
    assert status == 413 and json.loads(raw)["error"]["code"] == "too_large", raw
    limit, = (h["max_size"] for h in handlers(adapt(d["caddyfile"], d["caddy_home"]), "request_body"))
    assert limit >= result_cap("cnn")
    print(f"through Caddy: {time.time() - start:.1f} s")


@needs_caddy
def test_rate_limits_see_the_client_caddy_forwards(deployed):
    """A client at a non-loopback address is limited per address through Caddy, whatever
    X-Forwarded-For it sends (127.0.0.1, which the coordinator exempts, or any other); another
    address has its own bucket; and the coordinator ignores X-Forwarded-For from a peer that is
    not loopback."""
    d = deployed
    net, hport, cport, ctx = d["net"], d["hport"], d["cport"], d["ctx"]

    def ask(i: int, source: str, spoof: str | None, port: int = hport, tls: bool = True) -> int:
        body = json.dumps(UnitRequest(worker_id=f"rate-{source}-{i}", backend="python").to_json()).encode()
        headers = {"Content-Type": "application/json"}
        if spoof:
            headers["X-Forwarded-For"] = spoof
        return net.call(request, port, "POST", "/api/v1/units/next", ctx=ctx if tls else None, headers=headers,
                        body=body, source=source)[0]

    # new worker ids each time (the per-id limit never bites), a spoofed X-Forwarded-For each time
    spoofs = ["127.0.0.1", "203.0.113.1", "::1", "203.0.113.2", "127.0.0.1", "203.0.113.3", "127.0.0.1"]
    statuses = [ask(i, CLIENT, spoof) for i, spoof in enumerate(spoofs)]
    assert all(s != 429 for s in statuses[:RATE_BURST]), statuses
    assert all(s == 429 for s in statuses[RATE_BURST:]), statuses
    assert ask(0, OTHER, "127.0.0.1") != 429                          # another client: its own bucket
    # straight to the coordinator from CLIENT: X-Forwarded-For of a non-loopback peer is not believed
    assert ask(99, CLIENT, "127.0.0.1", port=cport, tls=False) == 429
    # and loopback through Caddy stays unlimited (the operator's own workers, the tests)
    assert all(ask(100 + i, None, None) != 429 for i in range(RATE_BURST + 2))
