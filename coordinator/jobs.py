"""Several jobs in one coordinator process (the embedded SQLite store): the job registry.

The job the coordinator was started with (``crowdtrain coordinator`` / ``crowdtrain run``) is the
registry's first job: its state is ``--state`` itself, as in a one-job deployment, and it cannot be
removed (pause it instead). An operator adds more through the admin API (``/api/v1/admin/jobs``,
``crowdtrain jobs``); each added job is a ``Job`` with its own ``CoordinatorConfig`` (the same
checks as the flags: ``coordinator.config``) and its own state directory ``STATE/jobs/<name>/``,
laid out as a one-job state (``crowdtrain export --state STATE/jobs/<name>`` reads it). The
registry (names, the options each job was added with, paused or not) is ``STATE/jobs.json``,
written atomically on every change: a restart brings back the same jobs in the same states.

A job is *active* (hands out units) or *paused* (no new units; results of units already out are
still checked, logged and folded; its background tasks keep running). Removing a job stops its
tasks and closes it; its state stays on disk unless the operator asks to delete it (adding a job
of the same name and options later resumes it).

Which job serves a unit request (``candidates``): the active jobs, least recently served first
(the order they were added breaks ties); the app asks each in turn and the first that cuts a unit
for this worker serves it (a job whose model the worker does not take, whose codecs it cannot
encode, whose budget is spent or whose shards are all out gives none). Every other route finds the
job from what the worker sends anyway: a result from its unit id (``entry_of_unit``), a blob from its
id (``blob_path``), a step graph from its model name.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.config import FIELDS, JOB_FIELDS, CoordinatorConfig, OptionError
from coordinator.job import Job, build_strategy

log = logging.getLogger("crowdtrain.coordinator")

REGISTRY_FILE = "jobs.json"
JOBS_DIR = "jobs"
REMOVE_WAIT_S = 30.0   # how long a removal waits for the requests using the job
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")   # an id (docs/protocol.md) that is also a folder name
JOB_OPTIONS = JOB_FIELDS   # what an added job may set
INHERITED = ("data", "download")   # unless given, an added job's are the first job's (the deployment's data)


class JobError(Exception):
    """A refused admin request: ``status``, ``code`` and the ``field`` it names (docs/protocol.md's error body)."""

    def __init__(self, code: str, status: int, message: str, field: str = ""):
        super().__init__(message)
        self.code, self.status, self.field = code, status, field


@dataclass
class Entry:
    """One job of the registry and what runs for it in this process."""

    name: str
    job: Job
    options: dict          # as added (JSON values); {} for the first job
    paused: bool = False
    first: bool = False
    steps: Any = None      # coordinator.steps.StepGraphs of the job's model, once serving
    evals: dict = field(default_factory=dict)   # the evaluation task's bookkeeping
    tasks: list = field(default_factory=list)   # its background tasks
    served: float = 0.0    # monotonic time it last handed out a unit (least recently served goes first)
    removed: bool = False  # set when its removal starts: no request starts using it after that
    inflight: int = 0      # requests using it now (unit requests, results): its removal waits for them

    @contextlib.contextmanager
    def using(self):
        self.inflight += 1
        try:
            yield self.job
        finally:
            self.inflight -= 1

    @property
    def state(self) -> str:
        return "paused" if self.paused else "active"

    def describe(self, public: bool = False) -> dict:
        """The job in the admin API's list; ``public`` (``/api/status``'s ``jobs``) without its options and
        state directory."""
        job = self.job
        opened = job.store is not None
        row = {"job": self.name, "model": job.config.model, "state": self.state, "first": self.first,
               "finished": job.finished, "version": job.step if opened else None,
               "samples": job.samples if opened else None, "budget_samples": getattr(job, "budget", None),
               "dashboard": f"/jobs/{self.name}/dashboard"}
        return row if public else {**row, "state_dir": str(job.config.state), "options": self.options}


def option_values(options: object) -> dict:
    """An added job's options as ``CoordinatorConfig`` fields; ``JobError`` naming ``options.<name>``."""
    if not isinstance(options, dict):
        raise JobError("invalid", 400, f"options: expected an object of job options, got {type(options).__name__}",
                       "options")
    for name in options:
        if name not in FIELDS:
            raise JobError("invalid", 400, f"options.{name[:40]}: expected one of the job options "
                           f"({', '.join(JOB_OPTIONS)}), got an unknown name", f"options.{name[:40]}")
        if name not in JOB_OPTIONS:
            whose = "the job's name (given apart)" if name == "job" else ("set by the registry" if name == "state"
                                                                         else "this process's (a coordinator flag)")
            raise JobError("invalid", 400, f"options.{name}: expected a job option, got {name!r}, which is "
                           f"{whose}", f"options.{name}")
    return dict(options)


class JobRegistry:
    """The jobs of this process, in the order they were added; the first is the coordinator's own."""

    def __init__(self, config: CoordinatorConfig, first: Job, several: bool = True):
        """``several``: False where the state is not this process's alone (``--redis``): only the first job,
        and the admin API answers that it is off."""
        self.config, self.several = config, several
        self.entries: dict[str, Entry] = {first.config.job: Entry(first.config.job, first, {}, first=True)}
        self.path = config.state / REGISTRY_FILE
        self._busy: set[str] = set()   # names being added or removed
        self._unrestored: list[dict] = []   # saved jobs that could not start: kept in the file
        self._data: dict[tuple, Any] = {}   # (data, download, limit) -> loaded CIFAR-10 (shared between jobs)
        self.load_data: Callable[[CoordinatorConfig], Any] = self._load_data   # tests give tiny data
        self.start: Callable[[Entry], None] = lambda entry: None   # the app's: start an entry's tasks
        self.stop: Callable[[Entry], Any] = None                   # the app's: stop them (a coroutine)

    @property
    def first(self) -> Entry:
        return next(iter(self.entries.values()))

    # ------------------------------------------------------------------ lookups
    def get(self, name: str) -> Entry:
        entry = self.entries.get(name) if isinstance(name, str) else None
        if entry is None:
            shown = name[:64] if isinstance(name, str) else name
            raise JobError("unknown_job", 404, f"job: expected one of this coordinator's jobs "
                           f"({', '.join(self.entries)}), got {shown!r}", "job")
        return entry

    def candidates(self) -> list[Entry]:
        """The active jobs, least recently served first."""
        active = [e for e in self.entries.values() if not e.paused and e.job.store is not None]
        return sorted(active, key=lambda e: e.served)   # stable: the order added breaks ties

    def finished(self) -> bool:
        """Every job's budget is spent (workers may stop): a paused job that is not finished keeps them."""
        return all(e.job.finished for e in self.entries.values())

    def entry_of_unit(self, unit_id: str) -> Entry:
        """The job that issued ``unit_id`` (the first job when none did: it answers ``unknown_unit``)."""
        if len(self.entries) > 1:
            for entry in self.entries.values():
                if entry.job.store is not None and entry.job.store.unit(unit_id) is not None:
                    return entry
        return self.first

    def blob_path(self, blob_id: str) -> Path | None:
        for entry in self.entries.values():
            if entry.job.store is not None:
                path = entry.job.store.blob_path(blob_id)
                if path is not None:
                    return path
        return None

    def listing(self) -> list[dict]:
        return [e.describe() for e in self.entries.values()]

    # ------------------------------------------------------------------ changes
    def job_config(self, name: str, options: dict) -> CoordinatorConfig:
        """An added job's config: ``CoordinatorConfig``'s defaults, the options given, this process's service
        settings, the deployment's data unless given, and ``STATE/jobs/<name>``; ``JobError`` naming the option."""
        values = option_values(options)
        base = {n: getattr(self.config, n) for n, f in FIELDS.items() if f.metadata["group"] == "service"}
        base.update({n: getattr(self.first.job.config, n) for n in INHERITED})
        try:
            return CoordinatorConfig(**{**base, **values, "job": name,
                                        "state": self.config.state / JOBS_DIR / name})
        except OptionError as e:
            raise JobError("invalid", 400, f"options.{e.name}: expected {e.expected}, got {e.got!r}"[:400],
                           f"options.{e.name}") from None

    async def add(self, name: object, options: object) -> Entry:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            shown = name[:64] if isinstance(name, str) else name
            raise JobError("invalid", 400, f"job: expected a name matching {NAME_RE.pattern}, got {shown!r}", "job")
        if name in self.entries or name in self._busy or any(s["job"] == name for s in self._unrestored):
            raise JobError("job_exists", 409, f"job: expected a new name, got {name!r}, which this coordinator "
                           "already has (remove it first)", "job")
        config = self.job_config(name, options if options is not None else {})
        try:
            from models import registry

            build_strategy(config, registry.get(config.model).kind)
        except Exception as e:   # the strategy's parameters are free-form: any failure is the request's
            raise JobError("invalid", 400, f"options.strategy_params: {e}"[:400], "options.strategy_params") from None
        self._busy.add(name)
        made = not config.state.exists()
        try:
            job = await asyncio.to_thread(self._open, config)
        except Exception as e:
            if made:
                shutil.rmtree(config.state, ignore_errors=True)
            log.warning("job %r not added: %s", name, e)
            raise JobError("cannot_start", 400, f"options: the job cannot start: {e}"[:600], "options") from None
        finally:
            self._busy.discard(name)
        entry = self.entries[name] = Entry(name, job, dict(options or {}))
        self.start(entry)
        self.save()
        log.info("job %r added (%s) in %s", name, config.model, config.state)
        return entry

    def _open(self, config: CoordinatorConfig) -> Job:
        job = Job(config)
        try:
            job.open(self.load_data(config))
        except BaseException:
            job.close()
            raise
        return job

    def _load_data(self, config: CoordinatorConfig):
        """CIFAR-10 for a job (``Job.open`` cuts ``limit_train`` itself), loaded once per path."""
        from models.data import load_cifar10

        key = (config.data, config.download)
        if key not in self._data:
            self._data[key] = load_cifar10(config.data, download=config.download, progress=False)
        return self._data[key]

    def pause(self, name: str) -> Entry:
        entry = self.get(name)
        entry.paused = True
        self.save()
        return entry

    def resume(self, name: str) -> Entry:
        entry = self.get(name)
        entry.paused = False
        self.save()
        return entry

    async def remove(self, name: str, delete_state: bool = False) -> dict:
        entry = self.get(name)
        if entry.first:
            raise JobError("first_job", 409, f"job: {name!r} is the job this coordinator was started with; "
                           "pause it instead", "job")
        if name in self._busy:
            raise JobError("job_busy", 409, f"job: {name!r} is being removed", "job")
        self._busy.add(name)
        try:
            entry.removed = True
            del self.entries[name]
            self.save()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + REMOVE_WAIT_S
            while entry.inflight and loop.time() < deadline:   # requests already using it finish first
                await asyncio.sleep(0.05)
            if self.stop is not None:
                await self.stop(entry)
            state = entry.job.config.state
            if delete_state:
                await asyncio.to_thread(shutil.rmtree, state, True)
        finally:
            self._busy.discard(name)
        log.info("job %r removed; state %s", name, "deleted" if delete_state else f"kept in {state}")
        return {"removed": name, "state_dir": None if delete_state else str(state)}

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        """``STATE/jobs.json``, replaced atomically (a crash leaves the old or the new file)."""
        body = {"jobs": [{"job": e.name, "options": e.options, "paused": e.paused, "first": e.first}
                         for e in self.entries.values()] + self._unrestored}
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def saved(self) -> list[dict]:
        """The registry file's entries ([] when there is none: a one-job state)."""
        if not self.path.is_file():
            return []
        return json.loads(self.path.read_text(encoding="utf-8"))["jobs"]

    async def restore(self) -> None:
        """Bring back the jobs of ``STATE/jobs.json`` (on start, before serving): the first job's paused flag,
        and every added job with its options. A job that cannot start is logged and left out (its state stays)."""
        if not self.several:
            return
        for saved in self.saved():
            if saved.get("first"):
                self.first.paused = bool(saved.get("paused"))
                continue
            name = saved["job"]
            try:
                config = self.job_config(name, saved.get("options") or {})
                job = await asyncio.to_thread(self._open, config)
            except Exception as e:
                log.error("job %r of %s not restored: %s", name, self.path, e)
                self._unrestored.append(saved)
                continue
            entry = self.entries[name] = Entry(name, job, saved.get("options") or {}, paused=bool(saved.get("paused")))
            self.start(entry)
            log.info("job %r restored (%s, %s) from %s", name, job.config.model, entry.state, job.config.state)


__all__ = ["Entry", "JobError", "JobRegistry", "JOB_OPTIONS", "NAME_RE"]
