"""``crowdtrain coordinator``: parse the options once, build the config, run the app.

The flags come from ``CoordinatorConfig``'s fields (``coordinator.config``); ``--threads``
is this process's own option.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import MISSING
from typing import Any

from aiohttp import web

from coordinator.config import CoordinatorConfig, add_config_arguments, config_from_args, parse_param
from models.data import DataError

__all__ = ["Parser", "build_parser", "cli", "config_from_args", "open_job", "parse_param"]


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: ``error: argument --port: ...``."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def build_parser(prog: str, state_default: Any = MISSING, state_shown: str | None = None) -> argparse.ArgumentParser:
    """Every ``CoordinatorConfig`` field as a flag, plus ``--threads``. ``crowdtrain run`` changes
    ``--state``'s default (and how --help shows it)."""
    p = Parser(prog=prog, description="Run a coordinator that owns one CIFAR-10 training job. Every option but "
               "--threads is a CoordinatorConfig field (coordinator/config.py).")
    add_config_arguments(p, defaults={} if state_default is MISSING else {"state": state_default},
                         shown={"state": state_shown} if state_shown else {})
    p.add_argument_group("process").add_argument(
        "--threads", type=int, default=1, help="torch threads for evaluation (default: 1)")
    return p


def open_job(args: argparse.Namespace, config: CoordinatorConfig | None = None):
    """The config (from ``args`` unless given) and the opened job; None after one ``error:`` line when the
    user can fix something."""
    from coordinator.job import Job

    try:
        config = config or config_from_args(args)
        job = Job(config)
        job.open()
        return config, job
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def cli(argv: list[str], prog: str = "crowdtrain coordinator", command: str = "coordinator") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        config = config_from_args(args)     # before the slow imports: a bad value is one line, at once
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(max(1, args.threads))
    from coordinator.app import create_app

    opened = open_job(args, config)
    if opened is None:
        return 2
    config, job = opened
    url = f"http://{config.host}:{config.port}"
    print(f"coordinator for {config.model} ({job.strategy_name}) on {url}  dashboard: {url}/dashboard", flush=True)
    try:
        web.run_app(create_app(config, job, warm=True), host=config.host, port=config.port, print=None,
                    handle_signals=True, shutdown_timeout=5)
    except OSError as e:
        print(f"error: cannot listen on {config.host}:{config.port}: {e.strerror}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0
