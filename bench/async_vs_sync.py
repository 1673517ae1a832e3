"""Async vs sync aggregation at equal samples, with real workers.

Claim under test (the DCP research note): asynchronous updates (Downpour SGD and its
staleness-aware descendants) reach the accuracy of synchronous rounds at equal samples,
without waiting for stragglers. Each strategy trains the same model on the same slice of
CIFAR-10 for the same sample budget, with K real ``crowdtrain worker`` processes and a real
``crowdtrain coordinator`` on 127.0.0.1, one strategy after another in one run; the final
model is evaluated on the test split by the coordinator (batch-norm statistics re-estimated
on 1,024 training images, as for every coordinator evaluation).

    python bench/async_vs_sync.py --data ../shared/data [--model resnet_fast] [--workers 2]

Writes bench/out/async_vs_sync-<date>/{config,results}.json and its section of docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import hardware, shown, write_section  # noqa: E402
from tests.helpers.cluster import Cluster  # noqa: E402


def strategies(k: int) -> dict[str, list[str]]:
    """Name shown -> coordinator flags; buffers and rounds sized to the K workers."""
    return {
        "fedavg (sync rounds of K)": ["--strategy", "fedavg", "--param", f"clients_per_round={k}"],
        "async_sgd (Downpour, constant)": ["--strategy", "async_sgd"],
        "async_sgd (staleness-damped, default)": ["--strategy", "async_sgd", "--param", "staleness=polynomial"],
        "fedasync (alpha 0.6, poly 0.5)": ["--strategy", "fedasync"],
        "fedbuff (K buffered)": ["--strategy", "fedbuff", "--param", f"buffer_size={k}"],
    }


def run_one(flags: list[str], common: list[str], workers: int, tmp: Path, timeout: float) -> dict:
    cluster = Cluster(tmp, *common, *flags, worker_threads=1)
    t0 = time.time()
    try:
        cluster.start_coordinator()
        for i in range(workers):
            cluster.start_worker(f"w{i + 1}")
        final = cluster.wait(lambda s: s["finished"] and s["accuracy_history"]
                             and s["accuracy_history"][-1]["version"] == s["model_version"], timeout, "the job")
        with sqlite3.connect(cluster.state / "state.db") as db:
            staleness = db.execute("SELECT AVG(staleness), MAX(staleness) FROM results").fetchone()
    finally:
        cluster.stop()
    history = final["accuracy_history"]
    return {"test_acc": history[-1]["test_acc"], "test_loss": history[-1]["test_loss"], "samples": final["samples"],
            "versions": final["model_version"], "seconds": time.time() - t0, "staleness_mean": staleness[0],
            "staleness_max": staleness[1], "history": history}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="resnet_fast")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--eval-images", type=int, default=5000)
    p.add_argument("--only", nargs="+", help="substrings of the strategies to run")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"async_vs_sync-{date}"
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data", args.data, "--model", args.model, "--limit-train", str(args.limit_train), "--epochs",
              str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--local-steps",
              str(args.local_steps), "--shard-size", "500", "--eval-images", str(args.eval_images),
              "--eval-every", "30", "--max-staleness", "1000"]
    cfg = {"date": date, "common_flags": common, "workers": args.workers, "hardware": hardware(),
           "command": "python " + " ".join(sys.argv)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    rows = []
    for name, flags in strategies(args.workers).items():
        if args.only and not any(s in name for s in args.only):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row = {"strategy": name, "flags": flags, **run_one(flags, common, args.workers, Path(tmp), 1800)}
        rows.append(row)
        print(f"{name}: test acc {100 * row['test_acc']:.2f}% after {row['samples']:,} samples, "
              f"{row['versions']} versions, mean staleness {row['staleness_mean']:.2f}, {row['seconds']:.0f} s",
              flush=True)
        (out / "results.json").write_text(json.dumps({"config": cfg, "rows": rows}, indent=2) + "\n")
    lines = [f"### Async vs sync at equal samples ({date})", "",
             f"- {args.model} on the first {args.limit_train:,} training images of the JPEG copy of CIFAR-10, "
             f"{args.epochs:g} epochs (equal samples for every strategy), batch {args.batch_size}, peak lr "
             f"{args.lr}, {args.local_steps} SGD steps per unit; {args.workers} real workers (1 thread each) and a "
             f"real coordinator on 127.0.0.1; test accuracy on {args.eval_images:,} test images.",
             f"- Hardware: {cfg['hardware']}. One run per strategy (no seeds repeated: read differences of "
             "a point or two as noise).",
             f"- Command: `{cfg['command']}`; raw results in `{shown(out)}`.", "",
             "| strategy | test acc. (%) | model versions | mean staleness | wall s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {100 * r['test_acc']:.2f} | {r['versions']} | "
                     f"{r['staleness_mean']:.2f} | {r['seconds']:.0f} |")
    write_section("async_vs_sync", "\n".join(lines), ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
