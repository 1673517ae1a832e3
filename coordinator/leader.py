"""The leader lock: exactly one coordinator process of a job aggregates at a time.

A lease in Redis (``SET key token NX PX ttl``): the process that set it leads until it stops
renewing it; another takes it over once it has expired (``ttl_s`` after the leader's last
renewal, e.g. after ``kill -9``). The token is ``<fence number>:<random>``, the fence number
drawn from a counter (``INCR``) at each acquisition, so tokens never repeat. Every write of
the leader's ``RedisStore`` checks, in the same Lua script that applies it, that the lock
still holds this token (fencing): a leader that was paused past its lease cannot write once
it has lost the lock, whatever it believes.

Renewal runs in its own thread (an event loop busy with a fold must not lose the lease);
``on_lost`` is called there when a renewal finds the lock gone or another's.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time

import redis

log = logging.getLogger("crowdtrain.coordinator")

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderLock:
    """``key``'s lease; ``ttl_s``: how long a silent leader keeps it; renewed every ``ttl_s / 6``."""

    def __init__(self, url: str, key: str, ttl_s: float = 5.0):
        self.url, self.key, self.ttl_ms = url, key, int(ttl_s * 1000)
        self.r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=max(1.0, ttl_s / 4))
        self._renew, self._release = self.r.register_script(RENEW), self.r.register_script(RELEASE)
        self.token = ""            # this process's token while it leads (fenced writes check it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return bool(self.token)

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True when this process now leads."""
        if self.token:
            return True
        token = f"{self.r.incr(self.key + ':fence')}:{secrets.token_hex(8)}"
        if self.r.set(self.key, token, nx=True, px=self.ttl_ms):
            self.token = token
            return True
        return False

    def holder(self) -> str | None:
        return self.r.get(self.key)

    def renew(self) -> bool:
        """Extend the lease; False when the lock is gone or another's."""
        return bool(self.token) and bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def keep(self, on_lost) -> None:
        """Renew in a thread every ``ttl / 6``; ``on_lost()`` (in that thread) once the lock is lost, or
        once renewals failed (Redis unreachable) for longer than the lease lasts. A process starved of CPU
        for longer than the lease (a host far busier than its cores) loses it too: a longer ``ttl`` then."""
        def run():
            last_ok = time.monotonic()
            while not self._stop.wait(self.ttl_ms / 6000):
                try:
                    if self.renew():
                        last_ok = time.monotonic()
                        continue
                    log.error("leader lock %s lost (held by %s now)", self.key, self.holder())
                except redis.RedisError as e:
                    if time.monotonic() - last_ok < self.ttl_ms / 1000:
                        log.warning("renewing the leader lock failed: %s", e)
                        continue
                    log.error("leader lock %s not renewed for %.1f s: %s", self.key, time.monotonic() - last_ok, e)
                self.token = ""
                on_lost()
                return

        self._thread = threading.Thread(target=run, name="leader-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and let go (a clean stop: another process takes over at once)."""
        self._stop.set()
        if self.token:
            try:
                self._release(keys=[self.key], args=[self.token])
            except redis.RedisError:
                pass
            self.token = ""
