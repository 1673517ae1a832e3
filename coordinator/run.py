"""``crowdtrain run``: the main job. A coordinator on CIFAR-10 with the embedded defaults plus
local Python worker processes; prints the dashboard URL and the page a person opens to
donate compute, and a summary when the budget is spent. Ctrl-C stops everything cleanly
(the state directory keeps the job: run again with the same ``--state`` to resume).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import web

from coordinator.main import build_parser as coordinator_parser
from coordinator.main import open_job

POLL_S = 1.0


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The coordinator's flags plus the local workers'; ``--state`` defaults to None, then ``runs/job-<time>``."""
    p = coordinator_parser(prog, state_default=None, state_shown="runs/job-<time>")
    p.description = ("The main job: a coordinator on CIFAR-10 with the embedded defaults plus local workers. "
                     "Open the printed URL in a browser to watch (and donate compute).")
    workers = p.add_argument_group("local workers")
    workers.add_argument("--workers", type=int, default=2, help="local Python worker processes (default: 2)")
    workers.add_argument("--worker-threads", type=int, default=1, help="torch threads per local worker (default: 1)")
    return p


def spawn_workers(url: str, n: int, threads: int) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "crowdtrain", "worker", "--coordinator", url, "--threads", str(threads)]
    if not sys.stderr.isatty():
        cmd.append("--no-progress")
    root = Path(__file__).resolve().parents[1]
    return [subprocess.Popen(cmd + ["--worker-id", f"local-{i + 1}"], cwd=root) for i in range(n)]


def stop_workers(procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


async def serve(config, job, workers: int, worker_threads: int) -> int:
    from coordinator.app import create_app

    runner = web.AppRunner(create_app(config, job, warm=True), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    url = f"http://{config.host}:{config.port}"
    print(f"\ncrowdtrain: {config.model} on CIFAR-10 ({job.strategy_name}), budget {job.budget:,} samples\n"
          f"  dashboard:       {url}/dashboard\n"
          f"  donate compute:  {url}/   (open it in a browser tab)\n"
          f"  state:           {config.state}   (run again with --state {config.state} to resume)\n", flush=True)
    procs = spawn_workers(url, workers, worker_threads)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            history = job.store.evals()
            if job.finished and history and history[-1]["version"] == job.step:
                break
            try:
                await asyncio.wait_for(stop.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass
    finally:
        await asyncio.to_thread(stop_workers, procs)
        history = job.store.evals()
        await runner.cleanup()
    if stop.is_set():
        print(f"stopped; the job is saved in {config.state} (export the model so far: crowdtrain export "
              f"--state {config.state} --format onnx)", file=sys.stderr)
        return 130
    last = history[-1]
    print(f"finished: test accuracy {100 * last['test_acc']:.2f}% at version {last['version']} after "
          f"{last['samples']:,} samples in {last['seconds']:.0f} s")
    write_models(config.state)
    return 0


def write_models(state: Path) -> None:
    """The final model as files a person can take away: STATE/model.pt and STATE/model.onnx."""
    from coordinator.model_out import from_state

    for fmt in ("pt", "onnx"):
        try:
            path, _ = from_state(state, fmt, state / f"model.{fmt}", "final", recalibrate=True)
            print(f"model: {path}")
        except Exception as e:   # the job itself is saved; say why the file is missing
            print(f"model: could not write {state / f'model.{fmt}'} ({type(e).__name__}: {e}); "
                  f"try: crowdtrain export --state {state} --format {fmt}", file=sys.stderr)
    print(f"  (crowdtrain eval --model {state / 'model.onnx'} --data PATH; the best version: "
          f"crowdtrain export --state {state} --version best)")


def cli(argv: list[str], prog: str = "crowdtrain run", command: str = "run") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.state is None:
        args.state = Path("runs") / f"job-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.data is None and not os.environ.get("CROWDTRAIN_DATA") and not args.download:
        print("error: no data: pass --data PATH (CIFAR-10 archive or folder), set CROWDTRAIN_DATA, or add --download",
              file=sys.stderr)
        return 2
    opened = open_job(args)
    if opened is None:
        return 2
    config, job = opened
    try:
        return asyncio.run(serve(config, job, args.workers, args.worker_threads))
    except OSError as e:
        print(f"error: cannot listen on {config.host}:{config.port}: {e.strerror}", file=sys.stderr)
        return 2
