"""``crowdtrain coordinator``: parse the options once, build the config, run the app."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from aiohttp import web

from coordinator.config import LATE_POLICIES, CoordinatorConfig
from coordinator.job import Job
from coordinator.strategies import STRATEGIES
from models.data import DataError


def parse_param(text: str) -> tuple[str, object]:
    """``name=value`` with value read as int, float, bool or string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    name, raw = text.split("=", 1)
    for cast in (int, float):
        try:
            return name, cast(raw)
        except ValueError:
            pass
    return name, {"true": True, "false": False, "none": None}.get(raw.lower(), raw)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run a coordinator that owns one CIFAR-10 training job.")
    p.add_argument("--data", help="CIFAR-10 path (default $CROWDTRAIN_DATA)")
    p.add_argument("--download", action="store_true", help="download the official archive if no data is found")
    p.add_argument("--model", default="resnet_fast", help="registered model (see `crowdtrain models`)")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), help="aggregation (default: async_sgd, or supermask_max "
                   "for supermask models)")
    p.add_argument("--param", action="append", type=parse_param, default=[], metavar="NAME=VALUE",
                   help="a strategy parameter, e.g. --param buffer_size=4 (repeatable)")
    p.add_argument("--state", type=Path, default=Path("state"), help="state directory (default ./state)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--job", default="cifar10", help="job name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, help="budget in passes over the training split (default: model recipe)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate of the schedule")
    p.add_argument("--local-steps", type=int, help="SGD steps per unit (default: one pass over its shards)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per data shard")
    p.add_argument("--shards-per-unit", type=int, default=1)
    p.add_argument("--codec", default="fp16", help="delta codec asked of workers: fp32, fp16, int8, topk[:fraction]")
    p.add_argument("--max-staleness", type=int, default=64)
    p.add_argument("--max-delta-norm", type=float, default=1e4)
    p.add_argument("--late-results", choices=LATE_POLICIES, default="use")
    p.add_argument("--lease-min", type=float, default=20.0, help="shortest lease, seconds")
    p.add_argument("--lease-first", type=float, default=120.0, help="lease of a worker's first unit, seconds")
    p.add_argument("--eval-every", type=float, default=30.0, help="seconds between evaluations")
    p.add_argument("--eval-images", type=int, help="test images per evaluation (default all)")
    p.add_argument("--limit-train", type=int, help="use only the first N training images")
    p.add_argument("--threads", type=int, default=1, help="torch threads for evaluation (default 1)")
    return p


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    return CoordinatorConfig(
        state=args.state, data=args.data, download=args.download, model=args.model, strategy=args.strategy,
        strategy_params=dict(args.param), job=args.job, seed=args.seed, host=args.host, port=args.port,
        shard_size=args.shard_size, shards_per_unit=args.shards_per_unit, local_steps=args.local_steps,
        batch_size=args.batch_size, lr=args.lr, epochs=args.epochs, codec=args.codec,
        max_staleness=args.max_staleness, max_delta_norm=args.max_delta_norm, late_results=args.late_results,
        lease_min_s=args.lease_min, lease_first_s=args.lease_first, eval_every_s=args.eval_every,
        eval_images=args.eval_images, limit_train=args.limit_train)


def open_job(args: argparse.Namespace) -> tuple[CoordinatorConfig, Job] | None:
    """The config and the opened job; None after one ``error:`` line when the user can fix something."""
    try:
        config = config_from_args(args)
        job = Job(config)
        job.open()
        return config, job
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def cli(argv: list[str], prog: str = "crowdtrain coordinator", command: str = "coordinator") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(max(1, args.threads))
    from coordinator.app import create_app

    opened = open_job(args)
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
