"""Typed application keys (one place, as in aiohttp's own demos)."""
from __future__ import annotations

from aiohttp import web

from coordinator.config import CoordinatorConfig
from coordinator.job import Job
from coordinator.jobs import JobRegistry
from coordinator.limits import UnitLimits
from coordinator.steps import StepGraphs
from coordinator.web import Assets

CONFIG = web.AppKey("config", CoordinatorConfig)
JOB = web.AppKey("job", Job)
EVALS = web.AppKey("evals", dict)   # background-task bookkeeping: last evaluated version, errors
STEPS = web.AppKey("steps", StepGraphs)    # browser step graphs of the job's model
ASSETS = web.AppKey("assets", Assets)      # the donate page and its static files
WARM = web.AppKey("warm", bool)             # prepare browser assets at start
LIMITS = web.AppKey("limits", UnitLimits)   # rate limits of unit requests
TOKENS = web.AppKey("tokens", frozenset)    # operator-issued worker tokens (empty: anyone may work)
TRUSTED = web.AppKey("trusted", frozenset)  # tokens of the operator's own workers (--trusted-tokens)
JOBS = web.AppKey("jobs", JobRegistry)      # the jobs of this process (coordinator.jobs); JOB is its first
ADMIN = web.AppKey("admin", frozenset)      # operator tokens of the admin API (empty: the admin API is off)
