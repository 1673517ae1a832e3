"""Credit and the leaderboard (after BOINC's credit and stats): what each worker id has given.

Credit is the samples of a worker's results that were folded into a model version and never
dropped (``Store.credit_totals``), and none at all for a quarantined worker (its lies used unchecked
before it was found out were folded too): a distrusted worker's results, stale ones the
aggregator dropped, superseded tail copies and replicas earn nothing, and a held result earns
once its check passed and it is folded. The ranking is recomputed from the store at most every
``CACHE_S`` seconds, so a thousand tabs polling their rank cost one query per window.

A worker id is the worker's identity (a tab keeps it in localStorage; the name endpoint takes
it as the bearer of identity), so it is never published here: a worker shows as its display
name, if it set one, and always with an anonymous *tag*, ``anon-`` and 8 hex digits of an
HMAC of its id under a per-job random key, so that two donors with one name can be told apart
and a donor can find their own row. Display names (``contract.names``) are kept in their own
small SQLite file next to the job's state (``names.db``), with the tag key; at most
``NAMES_MAX`` ids may hold one.

    GET  /api/v1/credit[?worker=ID][&limit=N]   ranked list, totals, and that worker's own row
    POST /api/v1/workers/<worker_id>/name       {"protocol": 1, "name": "Ada" | null}
    GET  /leaderboard                           the public page (rendered here, names escaped)
"""
from __future__ import annotations

import hashlib
import hmac
import html
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from coordinator.factory import FIRST_STEPS
from coordinator.web import PAGE_FILES

CACHE_S = 5.0            # the ranking is at most this old
LIST_DEFAULT = 100       # rows of /api/v1/credit and of the page unless ?limit= says otherwise
LIST_MAX = 1000
NAMES_MAX = 100_000      # ids that may hold a display name (a bound on what minting ids can fill)
NAME_RATE_PER_MIN = 12   # name changes per minute per address (loopback is not limited)
TAG_CHARS = 8
TEMPLATE = Path(__file__).parent / "dashboard" / "leaderboard.html"
NAMES_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS names (worker_id TEXT PRIMARY KEY, name TEXT NOT NULL, updated REAL NOT NULL);
"""


class NamesFull(Exception):
    """No room for another id's display name (``NAMES_MAX``)."""


class Names:
    """Display names by worker id and the key of the anonymous tags, in ``<state>/names.db``."""

    def __init__(self, path: str | os.PathLike, clock=time.time, limit: int = NAMES_MAX) -> None:
        self.path, self.clock, self.limit = Path(path), clock, limit
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(NAMES_SCHEMA)
        self.lock = threading.Lock()
        row = self.db.execute("SELECT value FROM meta WHERE key = 'tag_key'").fetchone()
        if row is None:
            self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('tag_key', ?)", (secrets.token_hex(32),))
            row = self.db.execute("SELECT value FROM meta WHERE key = 'tag_key'").fetchone()
        self.key = bytes.fromhex(row[0])
        self.names: dict[str, str] = dict(self.db.execute("SELECT worker_id, name FROM names").fetchall())

    def tag(self, worker_id: str) -> str:
        """The anonymous tag of ``worker_id``: stable for this job, says nothing of the id."""
        return "anon-" + hmac.new(self.key, worker_id.encode("utf-8"), hashlib.sha256).hexdigest()[:TAG_CHARS]

    def get(self, worker_id: str) -> str | None:
        return self.names.get(worker_id)

    def set(self, worker_id: str, name: str | None) -> None:
        """Set (or with None clear) a display name; ``NamesFull`` when a new id finds no room."""
        with self.lock:
            if name is None:
                self.db.execute("DELETE FROM names WHERE worker_id = ?", (worker_id,))
                self.names.pop(worker_id, None)
                return
            if worker_id not in self.names and len(self.names) >= self.limit:
                raise NamesFull(f"this coordinator keeps at most {self.limit} display names")
            self.db.execute("INSERT INTO names (worker_id, name, updated) VALUES (?, ?, ?) ON CONFLICT(worker_id) "
                            "DO UPDATE SET name = excluded.name, updated = excluded.updated",
                            (worker_id, name, self.clock()))
            self.names[worker_id] = name

    def close(self) -> None:
        self.db.close()


def rank(rows: list[dict]) -> list[dict]:
    """Competition ranking ("1224") by samples, highest first: equal samples share a rank, and the
    next rank skips as many places. ``rows``: dicts with ``samples`` (other keys kept)."""
    ordered = sorted(rows, key=lambda r: -r["samples"])
    out, previous = [], None
    for place, row in enumerate(ordered, 1):
        if previous is None or row["samples"] != previous["samples"]:
            current = place
        out.append({**row, "rank": current})
        previous = row
    return out


@dataclass
class Snapshot:
    """The ranking at one instant: ranked rows (worker ids inside, never published) and totals."""

    rows: list[dict]
    by_id: dict[str, dict]
    totals: dict
    at: float                    # unix seconds of the query
    taken: float = field(default=0.0)   # monotonic time of the query (for the cache)


class CreditBoard:
    """The ranking from ``store.credit_totals()``, cached ``cache_s`` seconds, with names and tags.

    ``store`` is a callable returning the job's store (the job opens it after the app is made);
    the names file opens at first use, next to the store's state."""

    def __init__(self, store, cache_s: float = CACHE_S, clock=time.time, monotonic=time.monotonic,
                 names_limit: int = NAMES_MAX) -> None:
        self.store, self.cache_s, self.clock, self.monotonic = store, cache_s, clock, monotonic
        self.names_limit = names_limit
        self._names: Names | None = None
        self._snapshot: Snapshot | None = None
        self.queries = 0             # how often the store was asked (tests, and the cache's worth)

    @property
    def names(self) -> Names:
        if self._names is None:
            self._names = Names(Path(self.store().root) / "names.db", self.clock, self.names_limit)
        return self._names

    def snapshot(self) -> Snapshot:
        now = self.monotonic()
        if self._snapshot is None or now - self._snapshot.taken >= self.cache_s:
            store = self.store()
            totals = store.credit_totals()
            # a quarantined worker (found lying twice) keeps none: its lies used before it was caught counted
            quarantined = {r["worker_id"] for r in store.trust_records() if r.get("quarantined")}
            self.queries += 1
            rows = rank([{"worker_id": r["worker_id"], "samples": int(r["samples"] or 0), "units": int(r["units"]),
                          "last": r["last"]} for r in totals if r["worker_id"] not in quarantined])
            self._snapshot = Snapshot(rows, {r["worker_id"]: r for r in rows},
                                      {"workers": len(rows), "samples": sum(r["samples"] for r in rows),
                                       "units": sum(r["units"] for r in rows)}, self.clock(), now)
        return self._snapshot

    def public(self, row: dict) -> dict:
        """A ranked row as published: name (or None) and tag instead of the worker id."""
        return {"rank": row["rank"], "name": self.names.get(row["worker_id"]), "tag": self.names.tag(row["worker_id"]),
                "samples": row["samples"], "units": row["units"], "last": row["last"]}

    def answer(self, worker: str | None = None, limit: int = LIST_DEFAULT) -> dict:
        """The body of ``GET /api/v1/credit``; with ``worker``, its own row as ``me`` (rank None
        and zeros before its first credited result)."""
        snap = self.snapshot()
        body = {"ranked": [self.public(r) for r in snap.rows[:limit]], "totals": snap.totals, "as_of": snap.at,
                "cache_s": self.cache_s}
        if worker is not None:
            row = snap.by_id.get(worker)
            me = self.public(row) if row else {"rank": None, "name": self.names.get(worker),
                                                "tag": self.names.tag(worker), "samples": 0, "units": 0, "last": None}
            body["me"] = {**me, "of": snap.totals["workers"]}
        return body

    def close(self) -> None:
        if self._names is not None:
            self._names.close()


BOARD = web.AppKey("credit_board", CreditBoard)


# ---------------------------------------------------------------------------- the page
def _when(seconds_ago: float) -> str:
    if seconds_ago < 90:
        return "just now"
    if seconds_ago < 90 * 60:
        return f"{seconds_ago / 60:.0f} min ago"
    if seconds_ago < 36 * 3600:
        return f"{seconds_ago / 3600:.0f} h ago"
    return f"{seconds_ago / 86400:.0f} days ago"


def render_page(body: dict, job: str, model: str, template: Path = TEMPLATE) -> str:
    """The leaderboard page from an ``answer()``; every value from outside is HTML-escaped."""
    esc = html.escape
    now = body["as_of"]
    rows = []
    for r in body["ranked"]:
        who = (f'<span class="name">{esc(r["name"])}</span> ' if r["name"] else '<span class="anon">anonymous</span> ')
        rows.append(f'<tr><td class="num">{r["rank"]}</td><td>{who}<code>{esc(r["tag"])}</code></td>'
                    f'<td class="num">{r["samples"]:,}</td><td class="num">{r["units"]:,}</td>'
                    f'<td>{esc(_when(now - r["last"])) if r["last"] else ""}</td></tr>')
    if not rows:
        rows.append('<tr><td colspan="5" class="empty">No credited work yet: be the first '
                    '(<a href="/">donate compute</a>).</td></tr>')
    t = body["totals"]
    shown = len(body["ranked"])
    more = f"the top {shown} of {t['workers']:,} are shown" if shown < t["workers"] else ""
    values = {"JOB": esc(job), "MODEL": esc(model), "ROWS": "\n".join(rows), "WORKERS": f"{t['workers']:,}",
              "SAMPLES": f"{t['samples']:,}", "UNITS": f"{t['units']:,}", "MORE": esc(more),
              "CACHE_S": f"{body['cache_s']:g}",
              "AS_OF": esc(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)))}
    # one pass, so that a name that reads "{{SAMPLES}}" stays as it is
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values.get(m.group(1), m.group(0)),
                  template.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- what a tab downloads
RUNTIME_FILES = {"wasm": ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"),
                 "webgpu": ("ort.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")}


def _asset_bytes(assets, rel: str) -> tuple[int, bool]:
    """(bytes a browser downloads for one page asset, whether that is the gzip copy's size)."""
    gz = assets.gz_dir / (rel + ".gz")
    try:
        return gz.stat().st_size, True
    except OSError:
        path = assets.files.get(rel)
        return (path.stat().st_size if path is not None else 0), False


def donate_info(job, assets, steps) -> dict:
    """``GET /api/v1/donate``: what a tab downloads and computes, from the running job (read-only;
    it never starts a step-graph build). Sizes are bytes on the wire: the page's assets gzipped
    once the coordinator has compressed them, the model version as stored (the job's codec),
    data shards as stored."""
    store, recipe, cfg = job.store, job.recipe, job.config
    version = store.latest_written_version()   # versions are written on a policy: the newest written one
    version_path = store.blob_path(version.blob) if version else None
    shard_sizes = job.factory.shard_sizes
    first = next(iter(shard_sizes), None)
    shard_path = store.blob_path(first) if first else None
    images = sum(sorted(shard_sizes.values(), reverse=True)[:cfg.shards_per_unit]) if shard_sizes else 0
    batch = min(recipe.batch_size, images) if images else recipe.batch_size
    local_steps = cfg.local_steps or (max(1, -(-images // batch)) if images else 0)
    entry = steps.entries.get(recipe.batch_size) if steps is not None else None
    if entry is None or (entry.manifest is None and entry.error is None):
        graph = {"state": "building" if entry is not None else "not built yet", "wasm_bytes": None, "webgpu_bytes": None}
    elif entry.error is not None:
        graph = {"state": "unavailable", "reason": entry.error, "wasm_bytes": None, "webgpu_bytes": None}
    else:
        m = entry.manifest
        graph = {"state": "ready", "wasm_bytes": m["graph_bytes"], "webgpu_bytes": m.get("webgpu", {}).get("graph_bytes")}
    page = [_asset_bytes(assets, rel) for rel in PAGE_FILES if rel in assets.files]
    runtime = {}
    for backend, names in RUNTIME_FILES.items():
        sizes = [_asset_bytes(assets, f"ort/{n}") for n in names if f"ort/{n}" in assets.files]
        runtime[backend] = sum(s for s, _ in sizes) if sizes else None
    return {
        "model": cfg.model,
        "once": {"page_bytes": sum(s for s, _ in page), "runtime_bytes": runtime,
                 "compressed": bool(page) and all(gz for _, gz in page), "step_graph": graph},
        "per_unit": {"model_version_bytes": version_path.stat().st_size if version_path else None,
                     "model_version": version.step if version else None,
                     "shard_bytes": shard_path.stat().st_size if shard_path else None,
                     "shards": cfg.shards_per_unit, "samples": local_steps * batch, "batch_size": batch,
                     "local_steps": local_steps},
        "tab_units": tab_units(job, version_path, shard_path, first),
    }


def tab_units(job, version_path, shard_path, shard: str | None) -> dict | None:
    """How a tab's units differ from the job's default unit when they are sized to it (``--unit-seconds``,
    ``coordinator.factory``): the first is ``FIRST_STEPS`` steps on a slice of a shard with the model
    version as fp16 (bytes estimated from the fp32 version and the shard, as the slice is cut on demand);
    the later ones take about ``seconds`` each on the tab. None when tabs get the default unit."""
    cfg, batch = job.config, job.recipe.batch_size
    if cfg.unit_seconds is None or cfg.local_steps:
        return None
    samples = FIRST_STEPS * batch
    images = job.factory.shard_sizes.get(shard) if shard else None
    shard_bytes = shard_path.stat().st_size if shard_path else None
    return {"seconds": cfg.unit_seconds,
            "first": {"samples": samples, "local_steps": FIRST_STEPS, "batch_size": batch,
                      "model_version_bytes": version_path.stat().st_size // 2 if version_path else None,
                      "shard_bytes": (shard_bytes * min(samples, images) // images) if shard_bytes and images else None,
                      "estimated": True}}
