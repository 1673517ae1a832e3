"""``crowdtrain run``: the main job. A coordinator on CIFAR-10 with the embedded defaults plus
local Python worker processes.

Start-up checks every option before the data is loaded (``coordinator.main``); the banner
says whether the job is new or resumed (from which version), and prints the dashboard URL
and the page a person opens to donate compute. While it trains, a progress line (samples of
the budget, test accuracy, samples/s, workers, ETA) is redrawn on a terminal, or printed
every ``--progress-every`` seconds otherwise; the local workers' messages appear above it.

Stopping: the workers run in their own process group, so a Ctrl-C in the terminal reaches
only this process, which passes it on once. The first Ctrl-C (or SIGTERM) is a graceful
stop: the workers take no new units and finish the current one if it completes within the
grace period (``worker_py.stop.GRACE``), else hand it back; a second one makes them hand back
at once; a third kills them. Then a summary (accuracy, samples, time, where the state is and
how to take the model out), exit status 130. The state folder keeps the job: run again with
the same ``--state`` to resume.

The local workers are the operator's own: unless ``--trusted-tokens`` names a file, a token is made in
STATE/operator-token (``operator_token``) and given to them, so replicated checks (on by default) check
only the other workers that join (a tab, a stranger's ``crowdtrain worker``).

When the budget is spent and the final version is evaluated: the final model is written to
STATE/model.pt and STATE/model.onnx, a summary is printed, and the dashboard stays up
showing the result until Ctrl-C (exit status 0), unless ``--exit-when-done``.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


from coordinator.console import PLAIN_EVERY_S, Console, duration, last_eval, progress_text
from coordinator.main import build_parser as coordinator_parser
from coordinator.limits import load_tokens
from coordinator.main import checked, checks_line, start_job, start_line, urls
from worker_py.stop import GRACE

POLL_S = 1.0
HAND_BACK_S = 5.0                          # a stopping worker's time to hand a unit back (worker_py.loop)
STOP_WAIT_S = GRACE + HAND_BACK_S + 15.0   # then the local workers are killed
DONE_WAIT_S = 15.0                         # after the job finished: the workers' time to notice and exit
OPERATOR_TOKEN = "operator-token"          # STATE/operator-token: the local workers' --trusted-tokens token


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The coordinator's flags plus the local workers'; ``--state`` defaults to None, then ``runs/job-<time>``."""
    p = coordinator_parser(prog, state_default=None, state_shown="runs/job-<time>")
    p.description = ("The main job: a coordinator on CIFAR-10 with the embedded defaults plus local workers. "
                     "Open the printed URL in a browser to watch (and donate compute). Ctrl-C: the workers finish "
                     f"their unit within {GRACE:g} s or hand it back, then a summary (run again with the same "
                     "--state to resume); Ctrl-C twice: hand back at once. Strategies and their --param names: "
                     "`crowdtrain strategies`.")
    workers = p.add_argument_group("local workers and this command")
    workers.add_argument("--workers", type=int, default=2, metavar="N",
                         help="local Python worker processes (default: 2)")
    workers.add_argument("--worker-threads", type=int, default=1, metavar="N",
                         help="torch threads per local worker (default: 1)")
    workers.add_argument("--exit-when-done", action="store_true",
                         help="exit once the budget is spent and the model written (default: off: the dashboard "
                              "stays up showing the final result until Ctrl-C)")
    workers.add_argument("--progress-every", type=float, default=PLAIN_EVERY_S, metavar="SECONDS",
                         help="seconds between progress lines when stderr is not a terminal (on a terminal one "
                              f"line is redrawn in place) (default: {PLAIN_EVERY_S:g})")
    return p


# ---------------------------------------------------------------------------- local workers
class LocalWorkers:
    """``crowdtrain worker`` processes in their own process group (a terminal's Ctrl-C does not reach
    them; this process passes signals on), their output shown through the console."""

    def __init__(self, url: str, n: int, threads: int, console: Console, token: str | None = None,
                 key_dir: Path | None = None) -> None:
        """``token``: the operator's own token (--trusted-tokens; else a --worker-tokens token), given in
        $CROWDTRAIN_TOKEN; ``key_dir``: where each worker's key is kept (``--key-file``; the job's state, so
        that the ids ``local-N``, bound to their keys in the job's trust records, keep them for a resume)."""
        self.console = console
        env = {**os.environ, "CROWDTRAIN_TOKEN": token} if token else None
        cmd = [sys.executable, "-m", "crowdtrain", "worker", "--coordinator", url, "--threads", str(threads),
               "--no-progress"]
        root = Path(__file__).resolve().parents[1]
        self.procs: dict[str, subprocess.Popen] = {}
        self._reported: set[str] = set()
        for i in range(n):
            name = f"local-{i + 1}"
            keys = ["--key-file", str(key_dir / f"{name}.key")] if key_dir is not None else []
            proc = subprocess.Popen(cmd + ["--worker-id", name, *keys], cwd=root, stdout=subprocess.PIPE, env=env,
                                    stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
            self.procs[name] = proc
            threading.Thread(target=self._relay, args=(name, proc), daemon=True).start()

    def _relay(self, name: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line:
                self.console.say(line.replace("crowdtrain worker: ", f"worker {name}: ", 1))

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.procs.values() if p.poll() is None]

    def check(self) -> None:
        """Say once when a worker exits on its own with an error."""
        for name, p in self.procs.items():
            code = p.poll()
            if code not in (None, 0) and name not in self._reported:
                self._reported.add(name)
                self.console.say(f"crowdtrain: worker {name} exited with status {code}")

    def signal(self, sig: int) -> None:
        for p in self.alive():
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        """Wait (blocking) until every worker exited or ``timeout`` passed; True if all exited."""
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True


# ---------------------------------------------------------------------------- the session
class Session:
    """One ``crowdtrain run``: serves the job, shows progress, reacts to signals, sums up."""

    def __init__(self, config, job, sock: socket.socket, args: argparse.Namespace, resumed: bool) -> None:
        self.config, self.job, self.sock, self.args, self.resumed = config, job, sock, args, resumed
        self.console = Console(every=args.progress_every)
        self.stop = asyncio.Event()    # stop training (a signal)
        self.leave = asyncio.Event()   # leave the finished job's dashboard (a signal)
        self.signals = 0
        self.workers: LocalWorkers | None = None
        self.started = time.monotonic()
        self.phase = "training"   # then "finishing" once the budget is spent (a signal: leave)

    def on_signal(self, name: str) -> None:
        self.signals += 1
        say = self.console.say
        if self.phase == "finishing":
            self.leave.set()
        elif self.signals == 1:
            say(f"crowdtrain: stopping ({name}): the local workers take no new units and finish the current one "
                f"if it completes within {GRACE:g} s, else hand it back (Ctrl-C again: hand back now)")
            self.stop.set()
        elif self.signals == 2:
            say(f"crowdtrain: stopping now ({name} again): the local workers hand their units back "
                "(Ctrl-C again: kill them)")
            if self.workers:
                self.workers.signal(signal.SIGTERM)
        else:
            say("crowdtrain: killing the local workers (their leases expire and the units are reissued)")
            if self.workers:
                self.workers.signal(signal.SIGKILL)

    async def run(self) -> int:
        from aiohttp import web

        from coordinator.app import SERVER_ARGS, create_app

        runner = web.AppRunner(create_app(self.config, self.job, warm=True), handle_signals=False, access_log=None,
                               **SERVER_ARGS)
        await runner.setup()
        await web.SockSite(runner, self.sock).start()
        url, local_url = urls(self.config.host, self.sock.getsockname()[1], self.args.public_url)
        self.banner(url)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal, signal.Signals(sig).name)
        try:
            if not self.job.finished:
                tokens = self.config.trusted_tokens or self.config.worker_tokens   # the operator's own first
                token = min(load_tokens(tokens)) if tokens else None
                self.workers = LocalWorkers(local_url, self.args.workers, self.args.worker_threads, self.console,
                                            token, Path(self.config.state).resolve() / "worker-keys")
            finished = await self.train()
            if finished:
                self.phase = "finishing"
            await self.stop_workers(finished)
            try:
                await self.job.settle()   # fold what the workers delivered last, if the strategy says so
            except Exception as e:       # the updates stay in the state and are replayed on resume
                self.console.say(f"crowdtrain: could not fold the last updates now ({type(e).__name__}: {e})")
            self.console.clear()
            print(self.summary(finished), flush=True)
            if not finished:
                return 130
            await self.write_models()
            if not (self.args.exit_when_done or self.leave.is_set()):
                print(f"the dashboard stays up with the final result: {url}/dashboard (Ctrl-C to exit)", flush=True)
                await self.leave.wait()
            return 0
        finally:
            self.console.clear()
            if self.workers and self.workers.alive():   # an error above: leave no worker behind
                self.workers.signal(signal.SIGKILL)
            await runner.cleanup()

    def banner(self, url: str) -> None:
        cfg, job = self.config, self.job
        print(f"\ncrowdtrain: {cfg.model} on CIFAR-10 ({job.strategy_name}), budget {job.budget:,} samples\n"
              f"  {start_line(cfg, job, self.resumed)}\n"
              f"  dashboard:       {url}/dashboard\n"
              f"  donate compute:  {url}/   (open it in a browser tab)\n"
              f"  {checks_line(cfg)}\n"
              f"  state:           {cfg.state}   (Ctrl-C stops; run again with --state {cfg.state} to resume)\n",
              flush=True)

    async def train(self) -> bool:
        """Show progress until the final version is evaluated (True) or a stop is asked for (False)."""
        job = self.job
        while not self.stop.is_set():
            status = job.status().to_json()
            ev = last_eval(status)
            if job.finished and ev is not None and ev["version"] == job.step:
                self.console.progress(progress_text(status), force=True)
                return True
            self.console.progress(progress_text(status))
            if self.workers:
                self.workers.check()
            try:
                await asyncio.wait_for(self.stop.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass
        return False

    async def stop_workers(self, finished: bool) -> None:
        """Finished: give the workers time to see it and exit. Stopped: one SIGTERM (a graceful stop), then
        wait; the server keeps serving meanwhile, so units are handed back."""
        if not self.workers:
            return
        if finished and await asyncio.to_thread(self.workers.wait, DONE_WAIT_S):
            return
        self.workers.signal(signal.SIGTERM)
        if not await asyncio.to_thread(self.workers.wait, STOP_WAIT_S):
            self.console.say(f"crowdtrain: local workers still running after {STOP_WAIT_S:g} s; killed")
            self.workers.signal(signal.SIGKILL)
            await asyncio.to_thread(self.workers.wait, 10.0)

    async def write_models(self) -> None:
        state = self.config.state
        if all((state / f"model.{fmt}").is_file() for fmt in ("pt", "onnx")) and self.resumed:
            print(f"model: {state / 'model.pt'}\nmodel: {state / 'model.onnx'}", flush=True)
            return
        await asyncio.to_thread(write_models, state)   # the dashboard keeps serving meanwhile

    def summary(self, finished: bool) -> str:
        """What happened: accuracy, samples, time, where the state and the model are."""
        cfg, job = self.config, self.job
        status = job.status().to_json()
        ev = last_eval(status)
        samples, budget = status["samples"], status["budget_samples"]
        if ev is None:
            acc = "no evaluation yet"
        else:
            stale = "" if ev["version"] == job.step else f"; the model is at version {job.step} now"
            acc = f"test accuracy {100 * ev['test_acc']:.2f}% (version {ev['version']}{stale})"
        seconds = time.monotonic() - self.started
        head = "finished" if finished else "stopped"
        lines = [f"{head}: {acc}, {samples:,} of {budget:,} samples ({100 * samples / max(budget, 1):.1f}%), "
                 f"{status['updates_applied']:,} updates applied; this run {duration(seconds)}",
                 f"  state: {cfg.state} ({_size(cfg.state)})"
                 + ("" if finished else f"; resume: crowdtrain run --state {cfg.state} (same options)")]
        if status["updates_pending"]:
            lines.append(f"  {status['updates_pending']} accepted updates wait in the strategy's buffer (kept in the "
                         "state; folded after a resume)")
        if not finished:
            lines.append(f"  model so far: crowdtrain export --state {cfg.state} --format onnx (or --version best)")
        return "\n".join(lines)


def _size(path: Path) -> str:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return f"{total / 1e6:,.0f} MB" if total >= 1e6 else f"{total / 1e3:,.0f} kB"


def write_models(state: Path) -> None:
    """The final model as files a person can take away: STATE/model.pt and STATE/model.onnx."""
    from coordinator.model_out import from_state

    for fmt in ("pt", "onnx"):
        try:
            path, _ = from_state(state, fmt, state / f"model.{fmt}", "final", recalibrate=True)
            print(f"model: {path}", flush=True)
        except Exception as e:   # the job itself is saved; say why the file is missing
            print(f"model: could not write {state / f'model.{fmt}'} ({type(e).__name__}: {e}); "
                  f"try: crowdtrain export --state {state} --format {fmt}", file=sys.stderr)
    print(f"  (crowdtrain eval --model {state / 'model.onnx'} --data PATH; the best version: "
          f"crowdtrain export --state {state} --version best)", flush=True)


def operator_token(state: Path) -> Path:
    """STATE/operator-token: a token of the operator's own workers (``--trusted-tokens``) for this command's
    local workers, made once (mode 0600) and kept for a resume. They are trusted from the start: their
    results are folded without a replicated check, and they check the results of every other worker."""
    path = state / OPERATOR_TOKEN
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("# the token of this job's local workers (crowdtrain run): --trusted-tokens\n"
                f"{secrets.token_urlsafe(32)}\n")
    return path


def cli(argv: list[str], prog: str = "crowdtrain run", command: str = "run") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.state is None:
        args.state = Path("runs") / f"job-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.data is None and not os.environ.get("CROWDTRAIN_DATA") and not args.download:
        print("error: no data: pass --data PATH (CIFAR-10 archive or folder), set CROWDTRAIN_DATA, or add --download",
              file=sys.stderr)
        return 2
    if args.workers < 0 or args.worker_threads < 1 or not args.progress_every > 0:
        bad = ("--workers", "an integer >= 0", args.workers) if args.workers < 0 else \
              ("--worker-threads", "an integer >= 1", args.worker_threads) if args.worker_threads < 1 else \
              ("--progress-every", "a number > 0", args.progress_every)
        print(f"error: argument {bad[0]}: expected {bad[1]}, got {bad[2]!r}", file=sys.stderr)
        return 2
    ready = checked(args)   # values, data path, port: before the slow imports and the data
    if ready is None:
        return 2
    config, sock = ready
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if config.access_log == "json":
        from coordinator.observe import log_access_to

        log_access_to(sys.stderr)
    opened = start_job(args, config, sock)
    if isinstance(opened, int):
        return opened
    config, job, resumed = opened
    if config.trusted_tokens is None and args.workers > 0:
        config = dataclasses.replace(config, trusted_tokens=operator_token(config.state))
    try:
        return asyncio.run(Session(config, job, sock, args, resumed).run())
    except KeyboardInterrupt:
        return 130
