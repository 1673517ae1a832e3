"""Lease tokens: the coordinator signs each unit's lease so a worker can neither forge a unit
nor submit under another worker's lease.

A token is ``v1.<unit_id>.<hex HMAC-SHA256>`` over the job, unit, worker, base step and
deadline; the key is a random secret kept in the job's state directory (so tokens survive a
restart). Verification recomputes the MAC from the coordinator's own record of the unit.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

PREFIX = "v1"


def load_or_create_secret(path: Path) -> bytes:
    """The job's signing key: 32 random bytes, created once (atomically) and reused."""
    if path.exists():
        key = path.read_bytes()
        if len(key) == 32:
            return key
    key = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return key


def _mac(key: bytes, job: str, unit_id: str, worker_id: str, base_step: int, deadline: float) -> str:
    msg = f"{job}\n{unit_id}\n{worker_id}\n{base_step}\n{deadline!r}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def sign(key: bytes, job: str, unit_id: str, worker_id: str, base_step: int, deadline: float) -> str:
    return f"{PREFIX}.{unit_id}.{_mac(key, job, unit_id, worker_id, base_step, deadline)}"


def verify(key: bytes, token: str, job: str, unit_id: str, worker_id: str, base_step: int, deadline: float) -> bool:
    """True when ``token`` is exactly the lease issued for this unit to this worker."""
    expected = sign(key, job, unit_id, worker_id, base_step, deadline)
    return hmac.compare_digest(token.encode(), expected.encode())
