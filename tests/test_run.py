"""``crowdtrain run`` and ``crowdtrain coordinator`` as an operator meets them: every option checked
before the data is loaded (nothing left on disk by a failed start), the banner of a resumed
job, the summary on Ctrl-C, the double Ctrl-C, the end of a job.

The real runs use tiny CIFAR look-alikes (tests/helpers/tiny_cifar.py), one local worker
with one thread and short units.
"""
from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import crowdtrain
from coordinator.main import urls
from tests.helpers.cluster import free_port
from tests.helpers.tiny_cifar import write_official_archive

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_official_archive(tmp_path_factory.mktemp("data"), n_train=2000, n_test=200)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """An empty data cache: still empty afterwards means the data was never decoded."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CROWDTRAIN_CACHE", str(cache))
    return cache


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


# ----------------------------------------------------------------------------- refused before the data
@pytest.mark.parametrize("command", ["run", "coordinator"])
def test_a_bad_codec_is_refused_before_the_data_is_loaded(command, data, fresh_cache, tmp_path, capsys):
    state = tmp_path / "runs" / "s"
    assert crowdtrain.main([command, "--data", str(data), "--state", str(state), "--codec", "int4"]) == 2
    err = one_error_line(capsys)
    assert "argument --codec: expected a codec: fp32, fp16, int8 or topk:<fraction>, got 'int4'" in err
    assert not (tmp_path / "runs").exists() and not fresh_cache.exists()


@pytest.mark.parametrize("command", ["run", "coordinator"])
def test_a_port_in_use_is_refused_before_the_data_is_loaded(command, data, fresh_cache, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        assert crowdtrain.main([command, "--data", str(data), "--state", str(tmp_path / "s"), "--port", str(port)]) == 2
    err = one_error_line(capsys)
    assert f"argument --port: 127.0.0.1:{port} is in use" in err and f"--port {port + 1}" in err, err
    assert time.monotonic() - t0 < 5, "refused at once"
    assert not (tmp_path / "s").exists() and not fresh_cache.exists()


def test_a_bad_strategy_parameter_is_refused_before_the_data_is_loaded(data, fresh_cache, tmp_path, capsys):
    argv = ["run", "--data", str(data), "--state", str(tmp_path / "s"), "--port", "0", "--strategy", "fedbuff",
            "--param", "bufer_size=3"]
    assert crowdtrain.main(argv) == 2
    err = one_error_line(capsys)
    assert "argument --param: unknown parameter 'bufer_size' for strategy 'fedbuff'; choices: buffer_size" in err
    assert "crowdtrain strategies" in err
    assert not (tmp_path / "s").exists() and not fresh_cache.exists()


def test_missing_data_is_refused_at_once_and_leaves_nothing(fresh_cache, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert crowdtrain.main(["run", "--data", str(empty), "--state", str(tmp_path / "runs" / "s"), "--port", "0"]) == 2
    assert "no CIFAR-10 data found" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_the_printed_urls_are_reachable_addresses():
    assert urls("127.0.0.1", 8080) == ("http://127.0.0.1:8080", "http://127.0.0.1:8080")
    people, local = urls("0.0.0.0", 8080)
    assert local == "http://127.0.0.1:8080" and "0.0.0.0" not in people and people.endswith(":8080")
    assert urls("::", 9000)[1] == "http://[::1]:9000"
    assert urls("0.0.0.0", 8080, "https://train.example.org/") == ("https://train.example.org",
                                                                     "http://127.0.0.1:8080")


def test_the_progress_line():
    from coordinator.console import progress_text

    status = {"samples": 123456, "budget_samples": 500000, "samples_per_second": 802.0, "finished": False,
              "workers_online": 2, "accuracy_history": [{"version": 42, "test_acc": 0.613}]}
    assert progress_text(status) == ("123,456/500,000 samples (25%), ETA 7m 50s, test acc 61.3% (v42), "
                                     "802 samples/s, 2 workers")
    start = {**status, "samples": 0, "samples_per_second": 0.0, "workers_online": 1, "accuracy_history": []}
    assert progress_text(start) == "0/500,000 samples (0%), ETA -, test acc -, 0 samples/s, 1 worker"


# ----------------------------------------------------------------------------- real runs
class Run:
    """``crowdtrain run`` as a subprocess; its stdout and stderr together, read as they come."""

    def __init__(self, data: Path, state: Path, *extra: str) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "crowdtrain", "run", "--data", str(data), "--state", str(state),
               "--port", str(self.port), "--model", "cnn", "--shard-size", "250", "--batch-size", "32",
               "--eval-every", "1", "--eval-images", "200", "--workers", "1", "--progress-every", "1", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log)
            if m:
                return m
            assert self.proc.poll() is None or self._reader.is_alive(), self.log
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.log}")

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"crowdtrain run did not exit:\n{self.log}") from None
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def latest_version(state: Path) -> tuple[int, int]:
    with sqlite3.connect(state / "state.db") as db:
        return db.execute("SELECT step, samples FROM versions ORDER BY step DESC LIMIT 1").fetchone()


def test_ctrl_c_gives_a_summary_and_a_restart_resumes_the_job(data, tmp_path):
    state = tmp_path / "state"
    # checks on: the local workers are the operator's own (STATE/operator-token), so theirs are not checked,
    # and their units are not cut to --check-max-steps (8)
    run = Run(data, state, "--epochs", "3", "--local-steps", "10", "--replication", "adaptive")
    try:
        run.wait_for(r"new job 'cifar10' in ")
        run.wait_for(r"checks: anyone who reaches this URL may send results; --replication adaptive: .*; the "
                     r"operator's own workers \(--trusted-tokens\) are not checked\n")
        run.wait_for(r"crowdtrain: [1-9][\d,]*/6,000 samples \(\d+%\), ETA \S+.*, test acc .*samples/s, 1 worker\n")
        run.proc.send_signal(signal.SIGINT)
        assert run.finish() == 130, run.log
    finally:
        run.kill()
    log = run.log
    assert log.count("crowdtrain: stopping (SIGINT)") == 1, log
    assert log.count("worker local-1: stopping (SIGTERM)") == 1 and "stopping now" not in log, log
    m = re.search(r"stopped: test accuracy [\d.]+% \(version \d+[^)]*\), ([\d,]+) of 6,000 samples", log)
    assert m, log
    assert f"state: {state} (" in log and f"resume: crowdtrain run --state {state}" in log
    assert f"crowdtrain export --state {state} --format onnx" in log and "Traceback" not in log
    version, samples = latest_version(state)
    assert int(m.group(1).replace(",", "")) == samples > 0
    token = state / "operator-token"   # the local workers' --trusted-tokens token: theirs alone, kept for a resume
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text().split()[-1]) >= 32
    with sqlite3.connect(state / "state.db") as db:
        records = [json.loads(r) for (r,) in db.execute("SELECT record FROM trust")]
    assert [(r["worker_id"], r["operator"], r["replicated"]) for r in records] == [("local-1", True, 0)], records
    # the local worker's id is bound to a key kept in the job's state (not a guessable id anyone may claim), and
    # the resume below reuses it: a new key would be refused (403 worker_key) and the job would not finish
    key = state / "worker-keys" / "local-1.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert records[0]["key_digest"] == hashlib.sha256(key.read_text().strip().encode()).hexdigest(), records
    with sqlite3.connect(state / "state.db") as db:
        checked = db.execute("SELECT COUNT(*) FROM results WHERE check_state IS NOT NULL").fetchone()[0]
        steps = {json.loads(w)["local_steps"] for (w,) in db.execute("SELECT wire FROM units WHERE wire IS NOT NULL")}
    assert checked == 0 and steps == {10}, (checked, steps)

    first_token = token.read_text()
    again = Run(data, state, "--epochs", "3", "--local-steps", "10", "--replication", "adaptive")
    try:
        again.wait_for("resuming job")
        assert f"resuming job 'cifar10' from version {version} ({samples:,} of 6,000 samples) in {state}" \
            in again.log, again.log
        assert token.read_text() == first_token, "the same token after a resume"
        again.wait_for(r"the dashboard stays up with the final result: http://127\.0\.0\.1:\d+/dashboard", 300)
        with urllib.request.urlopen(f"http://127.0.0.1:{again.port}/api/status", timeout=10) as r:
            assert json.load(r)["finished"] is True
        again.proc.send_signal(signal.SIGINT)
        assert again.finish() == 0, again.log
    finally:
        again.kill()
    log = again.log
    assert re.search(r"finished: test accuracy [\d.]+% \(version \d+\), [\d,]+ of 6,000 samples", log), log
    assert f"model: {state / 'model.onnx'}" in log and (state / "model.onnx").is_file()
    assert "the coordinator says the job is finished" in log and "Traceback" not in log


def test_a_second_ctrl_c_hands_the_unit_back_at_once(data, tmp_path):
    # one unit of 5,000 steps: far longer than the grace period
    run = Run(data, tmp_path / "state", "--epochs", "100", "--local-steps", "5000")
    try:
        run.wait_for(r"new job")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:   # the worker holds a unit and trains it
            with sqlite3.connect(tmp_path / "state" / "state.db") as db:
                if db.execute("SELECT 1 FROM units WHERE status = 'leased'").fetchone():
                    break
            time.sleep(0.2)
        time.sleep(3)
        run.proc.send_signal(signal.SIGINT)
        run.wait_for(r"worker local-1: stopping \(SIGTERM\)")
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGINT)
        assert run.finish() == 130, run.log
        assert time.monotonic() - t0 < 30, run.log
    finally:
        run.kill()
    log = run.log
    assert "crowdtrain: stopping now (SIGINT again): the local workers hand their units back" in log, log
    assert "worker local-1: stopping now (SIGTERM again)" in log, log
    assert re.search(r"worker local-1: handed back unit \w+ \(stopping now\)", log), log
    assert "grace period)" not in log and "Traceback" not in log
    assert "stopped: " in log and "0 of 200,000 samples" in log, log
    with sqlite3.connect(tmp_path / "state" / "state.db") as db:
        assert db.execute("SELECT status FROM units").fetchall() == [("returned",)]
