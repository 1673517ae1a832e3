"""A private ``redis-server`` (Debian's; ``deploy/setup.sh --test`` installs it) on a free loopback port."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

from tests.helpers.cluster import free_port

REDIS = shutil.which("redis-server")
MISSING = "redis-server is not installed (apt-get install redis-server, or bash deploy/setup.sh --test as root)"
# deploy/redis.conf's settings that change how Redis holds a job's state (its memory per unit), for the Redis
# servers the tests and the benches start
TUNING = ("--hash-max-listpack-value", "1024")


@contextlib.contextmanager
def redis_server(folder: Path):
    """Yields ``redis://127.0.0.1:PORT/0`` of a server with no persistence (its data lives as long as the
    block), killed at the end."""
    import redis

    port = free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             *TUNING, "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.time() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait(10)
