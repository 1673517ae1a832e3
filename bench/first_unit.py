"""First unit of a browser tab on the default job: seconds from Start to the first accepted unit, and bytes.

Issue 13, item 5. A real coordinator with the README's defaults (``crowdtrain coordinator --data
DATA``: resnet_fast on CIFAR-10, no local workers, so the tab has the machine to itself, apart
from whatever else runs on it), started fresh for every run (a new state directory), and Debian's
headless Chromium (worker_web/drive.mjs, a fresh profile: a first visit) opening the donate page
at ``/?throttle=100`` with the default thread count and pressing Start. The coordinator builds
the step graph at start (cached on disk across runs); we wait for its manifest before opening the
page, so the export is not counted.

Measured per run:
- ``start_to_accepted_s``: the worker's own clock (worker.js marks) from the Start message to the
  answer of its first accepted result; ``open_to_accepted_s``: drive.mjs's clock from opening the
  page (page load included) to the page showing the accepted unit;
- bytes on the wire up to the first accepted unit, as the browser received them (drive.mjs, from
  Chromium's own count of each response: compressed when the server compressed it, headers
  included), up to and including the answer to its first result, per static file, API endpoint and
  blob (model version, shard, step graph). Until 2026-12-02 they were read from the coordinator's
  access log, which since then logs routes, not paths (coordinator/observe.py);
- the first unit as issued (steps, batch, samples, shards, the model version's codec and size).

    python bench/first_unit.py --data ../shared/data [--runs 3] [--label after] [--coordinator-arg=--unit-seconds=none]

Writes bench/out/first_unit-<date>[-label]/{config,results}.json and, unless --no-doc, its
section of docs/results.md (between <!-- first_unit:begin --> and <!-- first_unit:end -->; with
a label, the section of that label).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.browser_step import NODE, drive, wait_manifest  # noqa: E402
from bench.common import commit, hardware, shown, write_section  # noqa: E402

GOALS = {"start_to_accepted_s": 10.0, "bytes_mb": 6.0}


def http_json(url: str, timeout: float = 30) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def browser_bytes(counted: dict, kinds: dict[str, str]) -> dict[str, int]:
    """Bytes per item as the browser received them (drive.mjs: on the wire, headers included): static files and
    API endpoints by path, blobs by what they are (``kinds``: blob id -> model version, shard, graph)."""
    items = {k: n for k, n in counted["by_type"].items() if k != "/api/v1/blobs"}
    for blob, n in counted.get("by_blob", {}).items():
        items[f"blob: {kinds.get(blob, 'other')} {blob[:8]}"] = n
    return items


def blob_kind(cluster, manifest: dict) -> dict[str, str]:
    """blob id -> what it is (model version, shard, graph), from the state directory."""
    kinds = {manifest["graph"]: "step graph (wasm)", manifest["webgpu"]["graph"]: "step graph (webgpu)",
             manifest["check"]["state"]: "known-answer state"}
    with cluster.db() as db:
        for (wire,) in db.execute("SELECT wire FROM units"):
            unit = json.loads(wire)
            kinds.setdefault(unit["model_version"], "model version")
            for s in unit["shard_ids"]:
                kinds.setdefault(s, "data shard")
    kinds.setdefault(manifest["check"]["shard"], "data shard (known-answer)")
    return kinds


def first_unit(cluster, worker_id: str) -> dict | None:
    with cluster.db() as db:
        row = db.execute("SELECT wire FROM units WHERE worker_id = ? ORDER BY issued LIMIT 1", (worker_id,)).fetchone() \
            if _has_column(db, "units", "issued") else \
            db.execute("SELECT wire FROM units WHERE worker_id = ? ORDER BY rowid LIMIT 1", (worker_id,)).fetchone()
        if row is None:
            return None
        unit = json.loads(row[0])
        res = db.execute("SELECT num_samples, compute_seconds FROM results WHERE unit_id = ?",
                         (unit["unit_id"],)).fetchone()
    size = lambda b: (cluster.state / "blobs" / b).stat().st_size if (cluster.state / "blobs" / b).exists() else None  # noqa: E731
    version = (cluster.state / "blobs" / unit["model_version"])
    codec = None
    if version.exists():
        head = version.read_bytes()[:4096]
        try:
            n = int.from_bytes(head[4:8], "little")
            codec = json.loads(head[8:8 + n])["codec"]
        except (ValueError, KeyError):
            codec = None
    return {"unit_id": unit["unit_id"], "local_steps": unit["local_steps"], "batch_size": unit["batch_size"],
            "samples": unit["local_steps"] * unit["batch_size"], "shards": len(unit["shard_ids"]),
            "shard_bytes": [size(s) for s in unit["shard_ids"]], "model_version_bytes": size(unit["model_version"]),
            "model_version_codec": codec, "result_samples": res[0] if res else None,
            "result_compute_seconds": res[1] if res else None}


def _has_column(db, table: str, column: str) -> bool:
    return any(r[1] == column for r in db.execute(f"PRAGMA table_info({table})"))


def one_run(i: int, args, tmp: Path) -> dict:
    from tests.helpers.cluster import Cluster

    folder = tmp / f"run{i}"
    folder.mkdir(parents=True)
    cluster = Cluster(folder, "--data", str(args.data), "--browser-graph", "at-start", *args.coordinator_arg)   # as served
    try:
        t0 = time.time()
        cluster.start_coordinator()
        _, donate = http_json(cluster.url + "/api/v1/donate")
        model, batch = donate["model"], donate["per_unit"]["batch_size"]
        waited, manifest = wait_manifest(cluster.url, model, batch, timeout=900)
        print(f"run {i}: coordinator up and step graph ready after {time.time() - t0:.1f} s", flush=True)
        out = drive(f"{cluster.url}/?throttle={args.throttle}", "--click", "--units", "1", timeout=args.timeout)
        if not out.get("ok"):
            raise RuntimeError(f"run {i} failed: {out.get('error')} {out.get('console', [])[-8:]}")
        state = out["state"]
        marks = state.get("marks") or {}
        counted = out.get("bytes_at_first_result")
        if counted is None:
            raise RuntimeError(f"run {i}: drive.mjs saw no answer to a result: {out.get('console', [])[-8:]}")
        by_item = browser_bytes(counted, blob_kind(cluster, manifest))
        unit = first_unit(cluster, state["workerId"])
        start_to = (marks["submitted"] - marks["start"]) / 1000 if "submitted" in marks and "start" in marks else None
        run = {"start_to_accepted_s": start_to, "open_to_accepted_s": out["seconds_to_first_unit"],
               "marks_ms": {k: v - marks.get("start", 0) for k, v in marks.items()},
               "bytes_total": sum(by_item.values()),
               "bytes_by_item": dict(sorted(by_item.items(), key=lambda kv: -kv[1])),
               "backend": state.get("backend"),
               "backend_reason": state.get("backendReason"), "unit": unit, "manifest_wait_s": waited,
               "graph_bytes": manifest["graph_bytes"]}
        print(f"run {i}: Start -> accepted {start_to:.2f} s (page open -> accepted {run['open_to_accepted_s']:.2f} s), "
              f"{run['bytes_total'] / 1e6:.3f} MB; unit {unit['local_steps']} x {unit['batch_size']} "
              f"(model version {unit['model_version_codec']}, {unit['model_version_bytes']} B; shards "
              f"{unit['shard_bytes']}); backend {run['backend']}", flush=True)
        for item, n in run["bytes_by_item"].items():
            print(f"    {n:>10,d}  {item}", flush=True)
        return run
    finally:
        cluster.stop()


def report(cfg: dict, res: dict, out: Path) -> str:
    runs = res["runs"]
    med = res["median"]
    label = f" ({cfg['label']})" if cfg["label"] else ""
    for r in runs:
        r["bytes_by_kind"] = {}
        for k, n in r["bytes_by_item"].items():
            kind = k.rsplit(" ", 1)[0] if k.startswith("blob: ") else k
            r["bytes_by_kind"][kind] = r["bytes_by_kind"].get(kind, 0) + n
    items = sorted({k for r in runs for k in r["bytes_by_kind"]}, key=lambda k: -statistics.median(
        [r["bytes_by_kind"].get(k, 0) for r in runs]))
    u = runs[0]["unit"]
    lines = [f"### First unit of a browser tab on the default job{label} ({cfg['date']})", "",
             f"- Goal (issue 13, item 5): first accepted unit within {GOALS['start_to_accepted_s']:g} s of pressing "
             f"Start on a first visit, <= {GOALS['bytes_mb']:g} MB downloaded up to then. "
             f"**Time: {'met' if med['start_to_accepted_s'] <= GOALS['start_to_accepted_s'] else 'not met'} "
             f"(median {med['start_to_accepted_s']:.2f} s); bytes: "
             f"{'met' if med['bytes_total'] <= GOALS['bytes_mb'] * 1e6 else 'not met'} "
             f"(median {med['bytes_total'] / 1e6:.2f} MB).**",
             f"- Setup: `crowdtrain coordinator --data DATA{(' ' + ' '.join(cfg['coordinator_args'])) if cfg['coordinator_args'] else ''}` "
             f"(the default job: resnet_fast, CIFAR-10; no local workers), a fresh state directory per run; "
             f"Debian's headless Chromium {cfg['chromium']} driven by `worker_web/drive.mjs` with a fresh profile "
             f"(first visit), `/?throttle={cfg['throttle']}`, default threads, Start pressed; the step graph was "
             f"built before the page opened. Backend: {runs[0]['backend']} ({runs[0]['backend_reason']}).",
             f"- The first unit: {u['local_steps']} step(s) of {u['batch_size']} = {u['samples']} samples, "
             f"{u['shards']} shard(s) of {', '.join(f'{b:,d}' for b in u['shard_bytes'])} bytes, the model version as "
             f"{u['model_version_codec']} ({u['model_version_bytes']:,d} bytes).",
             f"- Hardware: {cfg['hardware']}; shared with other work (load average at start "
             f"{cfg['loadavg_start']}).",
             f"- Command: `{cfg['command']}`; raw results in `{shown(out)}`.", "",
             "| run | Start -> accepted (s) | page open -> accepted (s) | MB up to then | first unit |",
             "|---|---:|---:|---:|---|"]
    for i, r in enumerate(runs):
        lines.append(f"| {i + 1} | {r['start_to_accepted_s']:.2f} | {r['open_to_accepted_s']:.2f} | "
                     f"{r['bytes_total'] / 1e6:.3f} | {r['unit']['local_steps']} x {r['unit']['batch_size']} |")
    lines.append(f"| median | {med['start_to_accepted_s']:.2f} | {med['open_to_accepted_s']:.2f} | "
                 f"{med['bytes_total'] / 1e6:.3f} | |")
    lines += ["", "Bytes per item up to the answer to the first result (as the browser received them: on the wire, "
              "headers included; median of the runs):", "",
              "| item | bytes |", "|---|---:|"]
    for k in items:
        lines.append(f"| `{k}` | {statistics.median([r['bytes_by_kind'].get(k, 0) for r in runs]):,.0f} |")
    if "before" in res:
        b = res["before"]
        bu = b["runs"][0]["unit"]
        kinds = {}
        for r in b["runs"]:
            for k, n in r["bytes_by_item"].items():
                kind = k.rsplit(" ", 1)[0] if k.startswith("blob: ") else k
                kinds.setdefault(kind, []).append(n)
        times = ", ".join(f"{r['start_to_accepted_s']:.2f}" for r in b["runs"])
        lines += ["", f"Before (commit {b['config']['commit']}, the same command, {len(b['runs'])} runs, "
                  f"`{b['dir']}`): the first unit {bu['local_steps']} x {bu['batch_size']}, Start -> accepted "
                  f"{times} s (median "
                  f"{b['median']['start_to_accepted_s']:.2f}), {b['median']['bytes_total'] / 1e6:.3f} MB up to then:", "",
                  "| item | before (bytes) | after (bytes) |", "|---|---:|---:|"]
        for k in sorted(set(kinds) | set(items), key=lambda k: -max(statistics.median(kinds.get(k, [0])),
                                                                   statistics.median([r['bytes_by_kind'].get(k, 0) for r in runs]))):
            lines.append(f"| `{k}` | {statistics.median(kinds.get(k, [0])):,.0f} | "
                         f"{statistics.median([r['bytes_by_kind'].get(k, 0) for r in runs]):,.0f} |")
        lines.append(f"| total | {b['median']['bytes_total']:,.0f} | {med['bytes_total']:,.0f} |")
    m = runs[len(runs) // 2]["marks_ms"]
    lines += ["", "Timeline of run " f"{len(runs) // 2 + 1} (ms after Start, worker.js marks): " +
              ", ".join(f"{k} {v}" for k, v in sorted(m.items(), key=lambda kv: kv[1]))]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.environ.get("CROWDTRAIN_DATA"), help="CIFAR-10 (default $CROWDTRAIN_DATA)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--throttle", type=int, default=100)
    p.add_argument("--timeout", type=float, default=240, help="seconds a run may take to its first accepted unit")
    p.add_argument("--label", default="", help="names the output folder and the docs section (e.g. before)")
    p.add_argument("--coordinator-arg", action="append", default=[],
                   help="an extra coordinator argument (repeat; e.g. --coordinator-arg=--unit-seconds=none)")
    p.add_argument("--before", type=Path, default=None,
                   help="an earlier run's output folder (e.g. of the code before a change) to compare with")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-doc", action="store_true", help="do not write docs/results.md")
    args = p.parse_args()
    if not args.data:
        p.error("--data or $CROWDTRAIN_DATA is required")
    args.coordinator_arg = [a for x in args.coordinator_arg for a in x.split("=", 1)] if args.coordinator_arg else []
    today = date.today().isoformat()
    out = args.out or ROOT / "bench" / "out" / (f"first_unit-{today}" + (f"-{args.label}" if args.label else ""))
    out.mkdir(parents=True, exist_ok=True)
    chromium = subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True).stdout.strip()
    cfg = {"date": today, "label": args.label, "runs": args.runs, "throttle": args.throttle,
           "coordinator_args": args.coordinator_arg, "data": str(args.data), "hardware": hardware(),
           "chromium": chromium.replace("Chromium ", "").split()[0] if chromium else "?",
           "node": subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip(),
           "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()), "platform": platform.platform(),
           "command": "python bench/first_unit.py " + " ".join(sys.argv[1:]), "commit": commit()}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    runs = []
    with tempfile.TemporaryDirectory(prefix="first_unit-") as tmp:
        for i in range(args.runs):
            runs.append(one_run(i + 1, args, Path(tmp)))
    med = {k: statistics.median([r[k] for r in runs]) for k in ("start_to_accepted_s", "open_to_accepted_s",
                                                               "bytes_total")}
    res = {"runs": runs, "median": med, "goals": GOALS,
           "met": {"time": med["start_to_accepted_s"] <= GOALS["start_to_accepted_s"],
                   "bytes": med["bytes_total"] <= GOALS["bytes_mb"] * 1e6}}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    if args.before:
        res["before"] = {"dir": shown(args.before), "config": json.loads((args.before / "config.json").read_text()),
                         **json.loads((args.before / "results.json").read_text())}
        (out / "results.json").write_text(json.dumps(res, indent=1))
    text = report(cfg, res, out)
    print(text)
    if not args.no_doc:
        name = "first_unit" + (f"_{args.label}" if args.label else "")
        write_section(name, text, ROOT / "docs" / "results.md")


if __name__ == "__main__":
    main()
