"""``crowdtrain coordinator``: parse the options once, check them all, then load and serve.

The flags come from ``CoordinatorConfig``'s fields (``coordinator.config``); ``--threads``
and ``--public-url`` are this process's own options. Start-up fails fast, in this order,
before any slow work (importing torch, loading and decoding the data): the values
(``config_from_args``), the data path, the listening socket (``listen``: bound here and
handed to the server, so a port in use is one line at once), the strategy and its
parameters. A failed start leaves no state folder behind (``open_job``).
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import shutil
import socket
import sys
import urllib.parse
from dataclasses import MISSING
from pathlib import Path
from typing import Any


from coordinator.config import CoordinatorConfig, add_config_arguments, config_from_args, parse_param
from coordinator.limits import load_tokens
from models.data import DataError

__all__ = ["Parser", "build_parser", "check_data", "cli", "config_from_args", "listen", "open_job", "parse_param",
           "urls"]

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
# How long a thread holding the GIL keeps it from the event loop's thread once that one asks (Python's default:
# 5 ms). The loop gives the GIL up at every SQLite statement and system call, and its helper threads (decoding
# results, folding, writing versions) take it meanwhile: each of those then cost the loop up to 5 ms, and under
# 1,000 clients the loop ran its timers 54-121 ms late at p99; with 0.5 ms 14-43 ms (docs/results.md).
SWITCH_INTERVAL_S = 0.0005


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: ``error: argument --port: ...``."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def _public_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"expected an http(s)://host[:port][/path] URL, got {text!r}")
    return text.rstrip("/")


def build_parser(prog: str, state_default: Any = MISSING, state_shown: str | None = None) -> argparse.ArgumentParser:
    """Every ``CoordinatorConfig`` field as a flag, plus ``--threads`` and ``--public-url``. ``crowdtrain run``
    changes ``--state``'s default (and how --help shows it)."""
    p = Parser(prog=prog, description="Run a coordinator that owns one CIFAR-10 training job. Every option but "
               "those under 'process' is a CoordinatorConfig field (coordinator/config.py). Strategies and their "
               "--param names: `crowdtrain strategies`.")
    add_config_arguments(p, defaults={} if state_default is MISSING else {"state": state_default},
                         shown={"state": state_shown} if state_shown else {})
    process = p.add_argument_group("process")
    process.add_argument("--threads", type=int, default=1, metavar="N",
                         help="torch threads for evaluation (default: 1)")
    process.add_argument("--public-url", type=_public_url, metavar="URL",
                         help="the address people and workers reach this coordinator at, printed instead of "
                              "http://HOST:PORT (behind a reverse proxy, or with --host 0.0.0.0) (default: none: "
                              "http://HOST:PORT, with this machine's address for a wildcard HOST)")
    return p


# ---------------------------------------------------------------------------- checks before slow work
def check_data(config: CoordinatorConfig) -> None:
    """The data path exists and holds a CIFAR-10 layout (a cheap look, no decoding); raises ``DataError``."""
    if not config.download:
        from models.data import resolve_data_path

        resolve_data_path(config.data)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, bound now (the server adopts it), so a port in use is
    refused before the data is loaded; raises ``ValueError`` naming --host or --port."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"argument --host: cannot listen on {host!r} ({e.strerror}); expected an address of "
                         "this machine, e.g. 127.0.0.1 or 0.0.0.0 (every interface)") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno in (98, 48, 10048):   # EADDRINUSE on Linux, macOS, Windows
            raise ValueError(f"argument --port: {host}:{port} is in use ({e.strerror}); stop what listens there "
                             f"or pick another port, e.g. --port {port + 1 if port else 8080} (--port 0: any free "
                             "port)") from None
        raise ValueError(f"argument --host/--port: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.setblocking(False)
    return sock


def _lan_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))   # TEST-NET-1: never routed anywhere, but picks the interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def urls(host: str, port: int, public_url: str | None = None) -> tuple[str, str]:
    """(the URL to print for people and remote workers, the URL local workers use). A wildcard host
    (0.0.0.0, ::) is not an address anyone can open: people get this machine's LAN address (its host
    name if it has none), local workers the loopback."""
    wildcard = host in WILDCARD_HOSTS
    local = f"http://{'[::1]' if host == '::' else '127.0.0.1' if wildcard else _url_host(host)}:{port}"
    if public_url:
        return public_url.rstrip("/"), local
    if wildcard:
        return f"http://{_url_host(_lan_address() or socket.gethostname())}:{port}", local
    return local, local


def _new_dirs(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet (deepest first): what a failed start removes."""
    made = []
    for p in (path, *path.parents):
        if p.exists():
            break
        made.append(p)
    return made


def _remove_new(dirs: list[Path]) -> None:
    if dirs and dirs[0].exists():
        shutil.rmtree(dirs[0], ignore_errors=True)
    for d in dirs[1:]:
        try:
            d.rmdir()
        except OSError:
            break


def open_job(args: argparse.Namespace, config: CoordinatorConfig | None = None):
    """The config (from ``args`` unless given) and the opened job; None after one ``error:`` line when the
    user can fix something. The strategy is built before the data is loaded; a start that fails leaves no
    state folder behind. Returns ``(config, job, resumed)``: ``resumed`` says the state folder held the job."""
    from coordinator.job import Job, build_strategy
    from models import registry

    new_dirs: list[Path] = []
    try:
        config = config or config_from_args(args)
        try:
            build_strategy(config, registry.get(config.model).kind)
        except ValueError as e:
            flag = "--param" if config.strategy_params else "--strategy"
            raise ValueError(f"argument {flag}: {e} (see `crowdtrain strategies`)") from None
        resumed = (config.state / "state.db").exists()
        new_dirs = _new_dirs(config.state)
        job = Job(config)
        job.open()
        return config, job, resumed
    except (ValueError, DataError) as e:
        _remove_new(new_dirs)
        print(f"error: {e}", file=sys.stderr)
        return None
    except BaseException:   # Ctrl-C while the data loads, or a bug: keep nothing half made either
        _remove_new(new_dirs)
        raise


def start_line(config: CoordinatorConfig, job, resumed: bool) -> str:
    """What this start does with the state folder: a new job, or resuming one (from which version)."""
    if not resumed:
        return f"new job {config.job!r} in {config.state}"
    if job.finished:
        return (f"job {config.job!r} in {config.state} is already finished: version {job.step}, "
                f"{job.samples:,} of {job.budget:,} samples")
    return (f"resuming job {config.job!r} from version {job.step} ({job.samples:,} of {job.budget:,} samples) "
            f"in {config.state}")


def checks_line(config: CoordinatorConfig) -> str:
    """Who may send work and how far their results are trusted: what an operator must know before opening
    the page to strangers (docs/results.md, "Lying workers ...": clipping alone does not stop a liar)."""
    who = "workers with a token from --worker-tokens" if config.worker_tokens else "anyone who reaches this URL"
    if config.replication == "off":
        guard = "no robust aggregation" if config.robust == "none" else f"{config.robust} only"
        return (f"checks: {who} may send results, folded unchecked ({guard}); for a job open to strangers run "
                "with --replication adaptive")
    own = "; the operator's own workers (--trusted-tokens) are not checked" if config.trusted_tokens else ""
    return (f"checks: {who} may send results; --replication {config.replication}: another computation of the "
            "same unit must agree before a result counts, for every result of a new worker, then less often as its "
            f"record grows (at least 1 in 50){own}")


def checked(args: argparse.Namespace) -> tuple[CoordinatorConfig, socket.socket] | None:
    """Everything that can be checked before slow work: the values, the data path, the port.
    None after one ``error:`` line."""
    try:
        config = config_from_args(args)
        if config.worker_tokens:
            load_tokens(config.worker_tokens)
        if config.admin_token_file:
            load_tokens(config.admin_token_file, "--admin-token-file")
        if config.trusted_tokens:
            load_tokens(config.trusted_tokens, "--trusted-tokens")
        check_data(config)
        return config, listen(config.host, config.port)
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def start_job(args: argparse.Namespace, config: CoordinatorConfig, sock) -> tuple | int:
    """Load torch with ``--threads`` and open the job (data, state, replay): ``(config, job, resumed)``,
    or the exit status after one line saying why not (``sock``, the bound port, is closed then)."""
    try:
        import torch

        torch.set_num_threads(max(1, args.threads))
        opened = open_job(args, config)
    except KeyboardInterrupt:
        sock.close()
        print("interrupted before the job started", file=sys.stderr)
        return 130
    if opened is None:
        sock.close()
        return 2
    return opened


def cli(argv: list[str], prog: str = "crowdtrain coordinator", command: str = "coordinator") -> int:
    from coordinator.cluster import add_cluster_arguments

    parser = build_parser(prog)
    add_cluster_arguments(parser)
    args = parser.parse_args(argv)
    ready = checked(args)     # before the slow imports: a bad value or a busy port is one line, at once
    if ready is None:
        return 2
    config, sock = ready
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if config.access_log == "json":
        from coordinator.observe import log_access_to

        log_access_to(sys.stderr)
    if args.redis:   # several processes, the job's state in Redis (coordinator.cluster)
        from coordinator.cluster import serve

        return serve(args, config, sock)
    opened = start_job(args, config, sock)
    if isinstance(opened, int):
        return opened
    config, job, resumed = opened
    from aiohttp import web

    from coordinator.app import SERVER_ARGS, create_app

    url, _ = urls(config.host, sock.getsockname()[1], args.public_url)
    print(f"coordinator for {config.model} ({job.strategy_name}) on {url}  dashboard: {url}/dashboard\n"
          f"  {start_line(config, job, resumed)}\n  {checks_line(config)}", flush=True)
    try:
        web.run_app(create_app(config, job, warm=True), sock=sock, print=None, handle_signals=True,
                    shutdown_timeout=5, access_log=None, **SERVER_ARGS)   # --access-log: coordinator.observe
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0
