"""Who may ask for work, and how often: per-id and per-address rate limits on unit requests, and
operator-issued worker tokens for closed deployments. Pure: a clock is injected, nothing here
knows HTTP (``coordinator.app`` turns a refusal into 429 or 401).

Rate limits are token buckets: ``rate`` requests per minute, bursts of a sixth of that (ten
seconds' worth, at least 5); an IPv6 client is limited per /64. An honest worker asks once per unit (and every few seconds while
there is no work), far below the defaults; a worker that asks faster hoards leases or floods
the coordinator, and so does one address minting worker ids. Loopback addresses (workers the
operator runs on this machine, the tests, the benchmarks) are not limited; behind a reverse
proxy on this machine, the client is the last address of ``X-Forwarded-For``.
"""
from __future__ import annotations

import hmac
import ipaddress
import math
from collections import OrderedDict
from pathlib import Path

MAX_KEYS = 10_000   # buckets kept per limiter; the least recently used go first (a full bucket is a new one)


class RateLimiter:
    """Token buckets per key: ``wait(key)`` is 0 when a request may go now (and takes a token), else
    the seconds until it may."""

    def __init__(self, per_minute: float, clock, max_keys: int = MAX_KEYS):
        self.rate = per_minute / 60.0
        self.burst = max(5.0, per_minute / 6.0)
        self.clock, self.max_keys = clock, max_keys
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # key -> (tokens, at)

    def wait(self, key: str) -> float:
        now = self.clock()
        tokens, at = self.buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        self.buckets[key] = (tokens, now)
        while len(self.buckets) > self.max_keys:
            self.buckets.popitem(last=False)
        return wait


class UnitLimits:
    """The two limits of unit requests (either may be None: no limit)."""

    def __init__(self, per_worker: float | None, per_address: float | None, clock):
        self.worker = RateLimiter(per_worker, clock) if per_worker else None
        self.address = RateLimiter(per_address, clock) if per_address else None

    def wait(self, address: str, worker_id: str) -> float:
        """Seconds to wait before this request (0: serve it). Loopback is never limited. The address
        is charged first, so minting worker ids does not get around it."""
        if not address or is_loopback(address):
            return 0.0
        wait = self.address.wait(address_key(address)) if self.address else 0.0
        if wait == 0.0 and self.worker:
            wait = self.worker.wait(worker_id)
        return wait


def address_key(address: str) -> str:
    """The rate-limit key of an address: an IPv4 address itself, an IPv6 address its /64 (one
    subscriber usually holds a whole /64, so per-address limits on single IPv6 addresses would be
    64 bits of free ids)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(seconds)))


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def client_address(peer: str | None, forwarded_for: str | None) -> str:
    """The client's address: the peer's, or, when the peer is this machine (a local reverse proxy),
    the last address the proxy appended to ``X-Forwarded-For``."""
    peer = peer or ""
    if forwarded_for and is_loopback(peer):
        last = forwarded_for.split(",")[-1].strip()
        try:
            return str(ipaddress.ip_address(last))
        except ValueError:
            return peer
    return peer


def load_tokens(path: str | Path, flag: str = "--worker-tokens") -> frozenset[str]:
    """The worker tokens in ``path``: one a line, blank lines and lines starting with ``#`` ignored; a token is
    8..256 printable ASCII characters without spaces. Raises ``ValueError`` naming the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"argument {flag}: cannot read {path}: {e}") from None
    tokens = set()
    for n, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not (8 <= len(token) <= 256 and all(0x21 <= ord(c) <= 0x7e for c in token)):
            raise ValueError(f"argument {flag}: {path} line {n}: expected a token of 8..256 printable "
                             "ASCII characters without spaces")
        tokens.add(token)
    if not tokens:
        raise ValueError(f"argument {flag}: {path} holds no token")
    return frozenset(tokens)


def gate_tokens(config, trusted: frozenset[str] | None = None) -> frozenset[str]:
    """The tokens that let a worker in (``--worker-tokens``, and the operator's own ``--trusted-tokens``
    with it: ``trusted`` when already read); empty: anyone may work."""
    if not config.worker_tokens:
        return frozenset()
    return load_tokens(config.worker_tokens) | (trusted_tokens(config) if trusted is None else trusted)


def trusted_tokens(config) -> frozenset[str]:
    """The tokens of the operator's own workers (``--trusted-tokens``): their results are not checked."""
    return load_tokens(config.trusted_tokens, "--trusted-tokens") if config.trusted_tokens else frozenset()


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def carries(header: str | None, tokens: frozenset[str]) -> bool:
    """Whether an ``Authorization`` header carries one of ``tokens``: every token compared, each in constant
    time, so the answer's timing tells nothing of how close a guess came."""
    given = (bearer(header) or "").encode("utf-8", "replace")
    known = False
    for token in tokens:
        known |= hmac.compare_digest(given, token.encode())
    return known
