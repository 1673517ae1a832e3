"""Typed application keys (one place, as in aiohttp's own demos)."""
from __future__ import annotations

from aiohttp import web

from coordinator.config import CoordinatorConfig
from coordinator.job import Job

CONFIG = web.AppKey("config", CoordinatorConfig)
JOB = web.AppKey("job", Job)
EVALS = web.AppKey("evals", dict)   # background-task bookkeeping: last evaluated version, errors
