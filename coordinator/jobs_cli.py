"""``crowdtrain jobs list|add|pause|resume|remove``: the operator's side of a coordinator's admin API.

Speaks ``/api/v1/admin/jobs`` (docs/protocol.md, the admin API) with the standard library (no torch,
no aiohttp), with ``Authorization: Bearer <token>`` from ``--token-file`` (the coordinator's
``--admin-token-file``; the first token in sorted order when it holds several). ``add`` takes the
same job options as ``crowdtrain coordinator`` (generated from ``CoordinatorConfig``,
``coordinator.config.JOB_FIELDS``); only the options given are sent, and the coordinator checks them
with the same ``CoordinatorConfig`` (an error names the option). An added job takes
``CoordinatorConfig``'s defaults for the rest, and the first job's data unless ``--data`` is given.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from coordinator.config import FIELDS, JOB_FIELDS, add_config_arguments, shown_default
from coordinator.limits import load_tokens
from coordinator.main import Parser

DEFAULT_URL = "http://127.0.0.1:8080"
ADD_TIMEOUT_S = 600.0   # adding a job loads its data and writes its first version
TIMEOUT_S = 30.0


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="List, add, pause, resume and remove the jobs of a running coordinator "
               "(its admin API: start it with --admin-token-file FILE). `crowdtrain jobs ACTION --help` lists "
               "an action's options.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--coordinator", default=DEFAULT_URL, metavar="URL",
                        help=f"the coordinator's URL (default: {DEFAULT_URL})")
    common.add_argument("--token-file", required=True, type=Path, metavar="FILE",
                        help="file holding an operator token of the coordinator's --admin-token-file (required)")
    actions = p.add_subparsers(dest="action", required=True, metavar="{list,add,pause,resume,remove}")
    actions.add_parser("list", parents=[common], help="the jobs, their state and progress")
    add = actions.add_parser("add", parents=[common], help="add a job and start handing out its units",
                             description="Add a job to a running coordinator. Options not given take "
                             "CoordinatorConfig's defaults (shown), the data options the first job's.")
    add.add_argument("name", help="the new job's name ([A-Za-z0-9][A-Za-z0-9_.-]{0,63})")
    add_config_arguments(add, defaults={n: argparse.SUPPRESS for n in JOB_FIELDS},
                         shown={n: shown_default(n) for n in JOB_FIELDS}, only=JOB_FIELDS)
    for action, what in (("pause", "stop handing out a job's units (results of units out are still folded)"),
                         ("resume", "hand out a paused job's units again")):
        sub = actions.add_parser(action, parents=[common], help=what)
        sub.add_argument("name", help="the job's name")
    remove = actions.add_parser("remove", parents=[common], help="stop a job and forget it (its state stays on disk)")
    remove.add_argument("name", help="the job's name")
    remove.add_argument("--delete-state", action="store_true",
                        help="also delete the job's state directory (default: off: it stays, and adding the job "
                             "again with the same options resumes it)")
    return p


def options_of(args: argparse.Namespace) -> dict:
    """The job options given on the command line, as the admin API's JSON."""
    options = {}
    for name in JOB_FIELDS:
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        kind = FIELDS[name].metadata["kind"]
        options[name] = dict(value) if kind is dict else str(value) if isinstance(value, Path) else value
    return options


def call(url: str, token: str, method: str, path: str, body: dict | None = None,
         timeout: float = TIMEOUT_S) -> dict:
    """The admin API's JSON answer; ``RuntimeError`` with the coordinator's error message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code} {e.reason}"
        raise RuntimeError(f"the coordinator refused it ({e.code}): {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RuntimeError(f"cannot reach the coordinator at {url} ({reason})") from None


def table(jobs: list[dict]) -> str:
    rows = [("JOB", "MODEL", "STATE", "VERSION", "SAMPLES", "DASHBOARD")]
    for j in jobs:
        state = "finished" if j["finished"] else j["state"]
        rows.append((j["job"] + (" (first)" if j["first"] else ""), j["model"], state, str(j["version"]),
                     f"{j['samples'] or 0:,} / {j['budget_samples'] or 0:,}", j["dashboard"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cli(argv: list[str], prog: str = "crowdtrain jobs", command: str = "jobs") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        token = min(load_tokens(args.token_file, "--token-file"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    url, name = args.coordinator, getattr(args, "name", None)
    quoted = urllib.parse.quote(name or "", safe="")
    try:
        if args.action == "list":
            print(table(call(url, token, "GET", "/api/v1/admin/jobs")["jobs"]))
        elif args.action == "add":
            job = call(url, token, "POST", "/api/v1/admin/jobs", {"job": name, "options": options_of(args)},
                       timeout=ADD_TIMEOUT_S)["job"]
            print(f"added job {job['job']!r} ({job['model']}), state in {job['state_dir']}; dashboard: "
                  f"{url.rstrip('/')}{job['dashboard']}")
        elif args.action in ("pause", "resume"):
            job = call(url, token, "POST", f"/api/v1/admin/jobs/{quoted}/{args.action}")["job"]
            print(f"job {job['job']!r}: {job['state']}")
        else:
            query = "?delete_state=true" if args.delete_state else ""
            done = call(url, token, "DELETE", f"/api/v1/admin/jobs/{quoted}{query}")
            kept = f"its state stays in {done['state_dir']}" if done["state_dir"] else "its state is deleted"
            print(f"removed job {done['removed']!r}; {kept}")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["build_parser", "cli", "options_of"]
