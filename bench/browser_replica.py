"""How close the coordinator's recomputation of a browser tab's unit is to the tab's own result:
the tolerance of a replicated check of a tab (coordinator/trust.py, models/browser_unit.py).

Claim under test: a real tab (Debian's headless Chromium, onnxruntime-web's WebAssembly backend)
and the coordinator's Python twin of the tab's unit (the same seeded draws, worker_web/draw.js,
and the same step graph on onnxruntime's native CPU kernels) return deltas that agree within the
trust policy's tolerance for a tab (cosine >= 0.95, norms within 5%; units of at most
``check_max_steps`` steps), on every model asked for, with the
units the coordinator gives a tab on real data.

For each model: a coordinator with ``--replication adaptive --replica-wait 1`` on the first
``--images`` CIFAR-10 training images; one tab (``worker_web/drive.mjs``, ``--threads`` WASM
threads) computes ``--units`` units. With no second tab, each held result waits a second and is
recomputed by the coordinator, which logs the cosine and norm difference (``recomputed here``);
this script reads them from the coordinator's log, with each unit's steps x batch from the store.

    python bench/browser_replica.py --data ../shared/data [--models cnn resnet_fast] [--units 6] [--backend webgpu]

Writes bench/out/browser_replica-<date>/{config,results}.json and its section of docs/results.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.browser_step import drive  # noqa: E402
from bench.common import commit, hardware, shown, write_section  # noqa: E402
from models.registry import MODELS  # noqa: E402

LINE = re.compile(r"unit (\w+) \((\w+) worker\): recomputed here; (\S+) cosine ([0-9.eE+-]+), "
                  r"norm difference ([0-9.eE+-]+)")


def chromium_version() -> str:
    try:
        return subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def one_model(model: str, args, tmp: Path) -> dict:
    from coordinator.trust import Similarity, TrustPolicy, judge
    from tests.helpers.cluster import Cluster

    folder = tmp / model
    folder.mkdir(parents=True)
    cluster = Cluster(folder, "--data", str(args.data), "--model", model, "--limit-train", str(args.images),
                      "--replication", "adaptive", "--replica-wait", "1", "--eval-every", "600",
                      *(("--local-steps", str(args.local_steps)) if args.local_steps else ()))
    try:
        cluster.start_coordinator()
        t0 = time.time()
        gpu = ("--webgpu",) if args.backend == "webgpu" else ()
        out = drive(f"{cluster.url}/?throttle=100&threads={args.threads}&backend={args.backend}", "--click", "--units",
                    str(args.units), *gpu, timeout=args.timeout)
        if not out.get("ok") and not (out.get("state") or {}).get("workerId"):
            raise RuntimeError(f"{model}: the tab failed: {out.get('error')} {out.get('console', [])[-8:]}")
        if not out.get("ok"):   # (a slow backend past --timeout: the units it sent are still compared)
            print(f"{model}: the tab stopped early: {out.get('error')}", flush=True)
        if out["state"].get("backend") != args.backend:   # (its units are still compared, on the backend it ran)
            print(f"{model}: asked for {args.backend}, the tab ran {out['state'].get('backend')}: "
                  f"{out['state'].get('backendReason')}", flush=True)
        worker = out["state"]["workerId"]
        deadline, seen = time.time() + args.timeout, {}
        while time.time() < deadline:   # every result the tab sent is decided
            with cluster.db() as db:
                states = db.execute("SELECT check_state FROM results WHERE worker_id = ?", (worker,)).fetchall()
            if len(states) >= (args.units if out.get("ok") else 0) and all(s != "held" for (s,) in states):
                break
            time.sleep(1)
        text = (folder / "coordinator.log").read_text(errors="replace")
        for m in LINE.finditer(text):
            if m.group(3) == worker:
                seen[m.group(1)] = {"backend": m.group(2), "cosine": float(m.group(4)),
                                    "norm_diff": float(m.group(5))}
        rows = []
        with cluster.db() as db:
            for unit_id, wire, state in db.execute(
                    "SELECT u.unit_id, u.wire, r.check_state FROM results r JOIN units u ON u.unit_id = r.unit_id "
                    "WHERE r.worker_id = ? ORDER BY r.seq", (worker,)):
                u = json.loads(wire)
                s = seen.get(unit_id)
                verdict = judge(Similarity(s["cosine"], s["norm_diff"]), TrustPolicy().tolerance_for("browser", model)) \
                    if s else None
                rows.append({"unit_id": unit_id, "steps": u["local_steps"], "batch": u["batch_size"],
                             "check_state": state, **(s or {}), "verdict": verdict})
        print(f"{model}: {len(rows)} results in {time.time() - t0:.0f} s, backend {out['state'].get('backend')}",
              flush=True)
        for r in rows:
            print(f"    {r['steps']} x {r['batch']}: {r['check_state']}, cosine {r.get('cosine')}, "
                  f"norm difference {r.get('norm_diff')}", flush=True)
        return {"model": model, "backend": out["state"].get("backend"),
                "backend_reason": out["state"].get("backendReason"), "rows": rows,
                **({} if out.get("ok") else {"stopped": out.get("error")})}
    finally:
        cluster.stop()


def report(cfg: dict, results: list[dict], out: Path) -> str:
    from coordinator.trust import TrustPolicy

    policy = TrustPolicy()
    tol = policy.tolerance_for("browser")
    runtime = {"wasm": "onnxruntime-web's WebAssembly backend",
               "webgpu": "onnxruntime-web's WebGPU backend on Chromium's software adapter (SwiftShader: no GPU here)"}
    own = [f"`{m}` its own (agree at cosine >= {t.min_cosine} and norm difference <= {t.max_norm_diff}; refuted "
           f"below {t.refute_cosine} or above {t.refute_norm_diff})" for m in cfg["models"]
           for t in [policy.tolerance_for("browser", m)] if t != tol]
    lines = [f"### A browser tab's unit, recomputed by the coordinator ({cfg['date']}, {cfg.get('backend', 'wasm')})", "",
             f"- What: a real tab (Debian's headless {cfg['chromium']}, {runtime[cfg.get('backend', 'wasm')]}, "
             f"{cfg['threads']} thread(s), driven by `worker_web/drive.mjs`) computes {cfg['units']} units per model "
             f"on the first {cfg['images']:,} CIFAR-10 training images; the coordinator (`--replication adaptive "
             f"--replica-wait 1`, no second tab) recomputes each held result with `models/browser_unit.py` (the tab's "
             "seeded draws, the CPU formulation of the same step on onnxruntime's native CPU kernels) and compares, "
             "weights and batch-norm statistics each on their own, the worse counted.",
             f"- Tolerance of a tab's check (coordinator/trust.py): agree at cosine >= {tol.min_cosine} and norm difference <= "
             f"{tol.max_norm_diff}; refuted below cosine {tol.refute_cosine} or above {tol.refute_norm_diff}"
             + (f"; {'; '.join(own)}." if own else "."),
             f"- Hardware: {cfg['hardware']}. Commit `{cfg['commit']}`.",
             f"- Command: `{cfg['command']}`; raw results in `{shown(out)}`.", "",
             "| model | backend | unit (steps x batch) | 1 - cosine | norm difference | verdict | check state |",
             "|---|---|---|---:|---:|---|---|"]
    notes: list[str] = []
    for res in results:
        if res["backend"] != cfg.get("backend", "wasm") or res.get("stopped"):
            notes.append(f"- `{res['model']}`: " + "; ".join(
                ([f"asked for {cfg.get('backend', 'wasm')}, the tab ran {res['backend']}: {res['backend_reason']}"]
                 if res["backend"] != cfg.get("backend", "wasm") else [])
                + ([f"the tab stopped early ({res['stopped']}); the units it sent are compared"]
                   if res.get("stopped") else [])))
        for r in res["rows"]:
            one_minus = f"{1 - r['cosine']:.2e}" if "cosine" in r else "-"
            nd = f"{r['norm_diff']:.2e}" if "norm_diff" in r else "-"
            lines.append(f"| `{res['model']}` | {res['backend']} | {r['steps']} x {r['batch']} | {one_minus} | {nd} | "
                         f"{r['verdict'] or '-'} | {r['check_state']} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("CROWDTRAIN_DATA"), help="CIFAR-10 (default $CROWDTRAIN_DATA)")
    p.add_argument("--models", nargs="+", default=[m for m, spec in MODELS.items() if spec.browser is None],
                   help="default: every model a tab can train")
    p.add_argument("--units", type=int, default=6)
    p.add_argument("--images", type=int, default=5000, help="the first N training images")
    p.add_argument("--threads", type=int, default=1, help="the tab's WebAssembly threads")
    p.add_argument("--backend", choices=("wasm", "webgpu"), default="wasm",
                   help="the tab's backend (webgpu: Chromium with --enable-unsafe-webgpu; SwiftShader without a GPU)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--local-steps", type=int, default=None,
                   help="every unit this many steps (default: a tab's units sized to its speed, at most 8 with checks)")
    p.add_argument("--out", type=Path, default=None, help="default bench/out/browser_replica[_webgpu]-<date>")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    section = "browser_replica" if args.backend == "wasm" else f"browser_replica_{args.backend}"
    args.out = args.out or ROOT / "bench" / "out" / f"{section}-{datetime.date.today()}"
    if not args.data:
        p.error("--data (or $CROWDTRAIN_DATA) is needed: the CIFAR-10 archive or folder")
    cfg = {"date": str(datetime.date.today()), "models": args.models, "units": args.units, "images": args.images,
           "threads": args.threads, "backend": args.backend, "local_steps": args.local_steps, "hardware": hardware(), "chromium": chromium_version(),
           "commit": commit(),
           "command": "python bench/browser_replica.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=1))
    with tempfile.TemporaryDirectory(prefix="browser_replica-") as tmp:
        results = [one_model(m, args, Path(tmp)) for m in args.models]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = report(cfg, results, args.out)
    print(text)
    if not args.no_docs:
        write_section(section, text, ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
