"""A lying browser tab among honest Python workers: is it found out, and what does it cost (issue 11)?

Claims under test (issue 11's targets, for the one kind of worker ``bench/byzantine.py`` and the
simulator do not drive): a donor whose tab lies (``--lie``: by default every delta sign-flipped and
scaled by 10; or scaled by 10, Gaussian noise, a zero delta claiming the samples, its first delta
replayed, or mean - z std of its own newest honest deltas (a_little): ``worker_web/drive.mjs --lie
KIND``, worker_web/lies.mjs; the page trains honestly, its results are rewritten on the wire; or
label_flip: the page's worker.js is served with its training labels moved to the next class, and the
tab sends what it computed) is quarantined within 20 of its units and none of its updates is
folded, and the job's final accuracy stays within 2 points of the clean run at equal applied samples.

Each run is a real ``crowdtrain coordinator`` on 127.0.0.1, a real Chromium tab (Debian's, driven by
playwright-core, WASM backend, 1 thread) and ``--workers`` real ``crowdtrain worker`` processes of one
torch thread, on the first ``--images`` CIFAR-10 training images for ``--epochs`` (the budget, the
same for every run). The tab starts first and the Python workers once it has delivered a unit, so
that the tab takes part from the start. Runs, one after the other in one invocation:
``clean`` (the tab honest) and ``lying`` (the tab lies), each with replication on (``--replication
adaptive``, the coordinator's default since 2026-12-04) and, with ``--undefended``, also off (adaptive
clipping only); with ``--no-tab``, also ``no-tab``: the
Python workers alone (replication on), the job a lying tab leaves them when none of its updates is
folded. One seed per invocation (``--seed``): read a point or two of accuracy as noise. With
``--trusted-workers`` the Python workers are the operator's own (a ``--trusted-tokens`` token, as
``crowdtrain run`` gives its local workers): only the tab is checked, as on the README's main job.

    python bench/byzantine_tab.py --data ../shared/data [--images 10000 --epochs 3] [--undefended] [--no-tab]
    python bench/byzantine_tab.py --data ../shared/data --runs no-tab --workers 3   # runs by name
    python bench/byzantine_tab.py --data ../shared/data --runs lying --lie free_ride  # another lie

Writes bench/out/byzantine_tab-<date>/{config,results}.json (and each run's logs) and prints a
table; the numbers go in docs/results.md by hand ("A lying browser tab among Python workers": the
defaults, seeds 0-2).
"""
from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import commit, hardware, shown  # noqa: E402
from coordinator.sim.faults import LIES  # noqa: E402
from tests.helpers.cluster import Cluster  # noqa: E402

DRIVER = ROOT / "worker_web" / "drive.mjs"
TAB = "?throttle=100&threads=1&backend=wasm"
RUNS = {   # name: does the tab lie (None: no tab), --replication
    "clean": (False, "adaptive"), "lying": (True, "adaptive"), "clean-undefended": (False, "off"),
    "lying-undefended": (True, "off"), "no-tab": (None, "adaptive")}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def step_graph_ready(cluster: Cluster, model: str, batch: int, timeout: float) -> None:
    """Ask for the tab's step graph and wait until the coordinator has built it."""
    import urllib.error
    import urllib.request
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{cluster.url}/api/v1/steps/{model}/{batch}", timeout=30):
                return
        except urllib.error.HTTPError as e:
            if e.code != 503:
                raise
        time.sleep(1)
    raise TimeoutError("the step graph was not built in time")


def run(args, name: str, lie: bool | None, replication: str, out: Path) -> dict:
    """One job to its budget; ``lie`` None: no tab at all."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "state", ignore_errors=True)
    flags = ["--data", args.data, "--model", args.model, "--limit-train", str(args.images), "--epochs",
             str(args.epochs), "--batch-size", str(args.batch_size), "--local-steps", str(args.local_steps),
             "--shard-size", str(args.shard_size), "--eval-every", "60", "--seed", str(args.seed),
             "--replication", replication, "--browser-graph", "at-start"]
    token = None
    if args.trusted_workers:   # the operator's own Python workers, as crowdtrain run's (STATE/operator-token)
        token = f"bench-{secrets.token_hex(16)}"
        (out / "trusted-tokens").write_text(token + "\n")
        flags += ["--trusted-tokens", str(out / "trusted-tokens")]
    who = "no tab" if lie is None else f"a {'lying' if lie else 'honest'} tab"
    log(f"{name}: crowdtrain coordinator {' '.join(flags)}; {who} + {args.workers} Python workers")
    cluster = Cluster(out, *flags)
    t0 = time.time()
    tab = None
    try:
        cluster.start_coordinator()
        if lie is not None:
            step_graph_ready(cluster, args.model, args.batch_size, 600)
            command = ["node", str(DRIVER), cluster.url + "/" + TAB, "--click", "--units", "100000", "--timeout",
                       str(args.timeout)] + (["--lie", args.lie] if lie else [])
            tab = subprocess.Popen(command, cwd=ROOT, stdout=open(out / "tab.json", "w"),
                                   stderr=open(out / "tab.log", "w"))
            cluster.wait(lambda s: any(r["backend"] == "browser" and r["results"] >= 1 for r in s["trust"]), 300,
                         "the tab's first result")
        if token is not None:
            cluster.env["CROWDTRAIN_TOKEN"] = token   # the workers' environment (the coordinator is running)
        for i in range(args.workers):
            cluster.start_worker(f"py-{i + 1}")
        last = 0.0
        while True:
            if time.time() - t0 > args.timeout:
                raise TimeoutError(f"{name} did not finish in {args.timeout} s")
            s = cluster.status()
            hist = s["accuracy_history"]
            if s["finished"] and hist and hist[-1]["version"] == s["model_version"]:
                break
            if time.time() - last >= 30:
                last = time.time()
                log(f"  {name}: {s['samples']:,}/{s['budget_samples']:,} samples, v{s['model_version']}")
            time.sleep(1)
        wall = time.time() - t0
        trust = {r["worker_id"]: r for r in s["trust"]}
        tab_id = next((w for w, r in trust.items() if r["backend"] == "browser"), None)
        with cluster.db() as db:
            rows = db.execute("SELECT worker_id, num_samples, applied_step, dropped, check_state, staleness "
                              "FROM results ORDER BY seq").fetchall()
    finally:
        if tab is not None and tab.poll() is None:
            tab.kill()
            tab.wait(30)
        cluster.stop()
        for blobs in [out / "state" / "blobs", *out.glob("cache-*")]:
            shutil.rmtree(blobs, ignore_errors=True)
    mine = [r for r in rows if r[0] == tab_id]
    honest = [r for r in rows if r[0] != tab_id]
    before = [r for r in mine if r[3] != "quarantined"]   # its results until it was quarantined
    quarantined = tab_id is not None and trust[tab_id]["quarantined"]

    def staleness(of):   # mean, over folded results, of versions between base and the model when it arrived
        folded = [r[5] for r in of if r[2] is not None]
        return sum(folded) / len(folded) if folded else None

    result = {
        "run": name, "lie": lie, "lie_kind": args.lie if lie else None, "replication": replication, "wall_s": wall,
        "trusted_workers": token is not None,
        "final_test_acc": hist[-1]["test_acc"], "samples": s["samples"], "budget_samples": s["budget_samples"],
        "versions": s["model_version"], "updates_dropped": s["updates_dropped"],
        "tab": None if tab_id is None else {
                "worker_id": tab_id, "results": len(mine), "folded": sum(r[2] is not None for r in mine),
                "samples_folded": sum(r[1] for r in mine if r[2] is not None),
                "checked": sum(r[4] is not None for r in mine), "quarantined": quarantined,
                "results_until_quarantined": len(before) if quarantined else None,
                "fates": {str(k): sum(1 for r in mine if r[3] == k) for k in {r[3] for r in mine}},
                "disagreements": trust[tab_id]["disagreements"], "credit": trust[tab_id]["credit"],
                "mean_staleness": staleness(mine)},
        "honest": {"results": len(honest), "folded": sum(r[2] is not None for r in honest),
                   "samples_folded": sum(r[1] for r in honest if r[2] is not None),
                   "replicas": sum(r[3] == "replica" for r in honest),   # a replica's row is dropped as such
                   # rows with a check state: held results and, settled with them, the replicas themselves
                   "checked": sum(r[4] is not None for r in honest), "mean_staleness": staleness(honest), "quarantined":
                   sorted(w for w, r in trust.items() if w != tab_id and r["quarantined"])},
    }
    log(f"{name}: {100 * result['final_test_acc']:.2f}% after {s['samples']:,} samples, {wall:.0f} s; tab: "
        f"{json.dumps(result['tab'])}")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-10 (archive or folder)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--images", type=int, default=10_000, help="the first N training images")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="honest Python workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--undefended", action="store_true", help="also run both with replication off")
    p.add_argument("--no-tab", action="store_true", help="also run the Python workers alone (replication on)")
    p.add_argument("--runs", nargs="+", choices=sorted(RUNS), help="these runs only (instead of the flags above)")
    p.add_argument("--lie", default="sign_flip", choices=[f.value for f in LIES],
                   help="what the lying tab sends (worker_web/lies.mjs; default: sign_flip)")
    p.add_argument("--trusted-workers", action="store_true",
                   help="the Python workers carry a --trusted-tokens token (as crowdtrain run's): only the tab is "
                        "checked")
    p.add_argument("--timeout", type=int, default=1800, help="seconds a run may take")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if shutil.which("node") is None or not Path("/usr/bin/chromium").exists():
        p.error("needs node and /usr/bin/chromium (bash deploy/setup.sh --test installs them)")
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"byzantine_tab-{date}"
    out.mkdir(parents=True, exist_ok=True)
    config = {"date": date, "commit": commit(), "hardware": hardware(), "command": "python " + " ".join(sys.argv),
              **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    names = args.runs or (["clean", "lying"] + (["clean-undefended", "lying-undefended"] if args.undefended else [])
                          + (["no-tab"] if args.no_tab else []))
    plan = [(name, *RUNS[name]) for name in names]
    results = []
    for name, lie, replication in plan:
        results.append(run(args, name, lie, replication, out / name))
        (out / "results.json").write_text(json.dumps({"config": config, "runs": results}, indent=2) + "\n")
    print("\n| run | replication | final test acc. (%) | samples | tab results | tab folded | tab quarantined "
          "after | honest samples folded | replicas |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        t, h = r["tab"], r["honest"]
        tab = "- | - | -" if t is None else (f"{t['results']} | {t['folded']} | "
                                           f"{t['results_until_quarantined'] if t['quarantined'] else 'not'}")
        print(f"| {r['run']} | {r['replication']} | {100 * r['final_test_acc']:.2f} | {r['samples']:,} | "
              f"{tab} | {h['samples_folded']:,} | {h['replicas']} |")
    print(f"\nraw results: {shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
