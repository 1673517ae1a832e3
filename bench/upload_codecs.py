"""Upload codecs with and without error feedback, against fp16 (issue 13, item 1, uploads).

Claim measured: at equal samples, on the same images, recipe and seed, the bytes a unit uploads and
the final test accuracy for each result codec (``--codec`` of the coordinator), with the workers'
error feedback on (``+ef``: each worker adds what the codec dropped from its earlier units,
worker_py/feedback.py) or off (``crowdtrain worker --no-error-feedback``: today's plain upload).

Each variant is one real job: ``crowdtrain coordinator`` and ``--workers`` ``crowdtrain worker``
processes (1 torch thread each) on 127.0.0.1, the coordinator's default units and strategy, run until
the budget is folded and the final version evaluated; the workers run the real encode path. Bytes
per unit: the ``CTD1`` container of the model's delta under the codec, which depends only on the
model's tensor shapes (the same with or without error feedback; tests/test_feedback.py checks that a
worker process sends exactly ``encode_delta``'s bytes), checked against any result blob still on the
coordinator's disk at the end of the run (folded results' blobs are deleted, so usually none).

    python bench/upload_codecs.py --data ../shared/data                        # resnet_fast, seed 0
    python bench/upload_codecs.py --data ../shared/data --seeds 0 1 --variants fp16 int8+ef

Writes bench/out/upload_codecs-<date>/ (config.json, results.json, each run's logs) and, unless
``--no-docs``, its section of docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import commit, hardware, shown, write_section  # noqa: E402
from bench.parity import derived_data  # noqa: E402
from tests.helpers.cluster import Cluster  # noqa: E402

VARIANTS = ("fp16", "fp16+ef", "int8", "int8+ef", "topk:0.05", "topk:0.05+ef", "topk:0.01", "topk:0.01+ef")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def parse_variant(text: str) -> tuple[str, bool]:
    """``CODEC[+ef]`` -> (codec string, error feedback on); the codec is checked here, before anything runs."""
    from contract.codecs import get_codec
    from contract.errors import ContractError

    codec, plus, flag = text.partition("+")
    if plus and flag != "ef":
        raise SystemExit(f"--variants: expected CODEC or CODEC+ef, got {text!r}")
    try:
        get_codec(codec)
    except ContractError as e:
        raise SystemExit(f"--variants: {text!r}: {e}") from None
    return codec, bool(plus)


def container_bytes(model: str, codec: str) -> int:
    """Bytes of the ``CTD1`` container of one delta of ``model`` under ``codec`` (shapes only matter)."""
    from contract.codecs import encode_delta, get_codec
    from models import registry
    from models.local import delta_spec

    rng = np.random.default_rng(0)
    delta = {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in delta_spec(registry.build(model)).items()}
    return len(encode_delta(get_codec(codec), delta))


def run_dir(out: Path, seed: int, codec: str, ef: bool) -> Path:
    return out / f"s{seed}-{codec.replace(':', '')}{'-ef' if ef else ''}"


def staleness_mean(run: Path) -> float | None:
    """Mean staleness of the applied results of a finished run (its state.db), or None without one."""
    import sqlite3

    if not (run / "state" / "state.db").is_file():
        return None
    with sqlite3.connect(run / "state" / "state.db") as db:
        applied = [st for st, step in db.execute("SELECT staleness, applied_step FROM results") if step is not None]
    return sum(applied) / len(applied) if applied else 0.0


def run_variant(args, data: str, seed: int, codec: str, ef: bool, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    flags = ["--data", data, "--model", args.model, "--limit-train", str(args.train_images), "--epochs",
             str(args.epochs), "--seed", str(seed), "--eval-images", str(args.test_images), "--codec", codec,
             "--eval-every", str(args.eval_every)]
    label = f"{codec}{' + error feedback' if ef else ''}"
    worker_flags = () if ef else ("--no-error-feedback",)
    log(f"{label}, seed {seed}: crowdtrain coordinator {' '.join(flags)} + {args.workers} workers {' '.join(worker_flags)}")
    cluster = Cluster(out, *flags, worker_threads=1)
    t0 = time.time()
    last = 0.0
    try:
        cluster.start_coordinator()
        for i in range(args.workers):
            cluster.start_worker(f"w{i + 1}", None, *worker_flags)
        while True:
            if time.time() - t0 > args.timeout:
                raise TimeoutError(f"{label} did not finish in {args.timeout:.0f} s")
            s = cluster.status()
            hist = s["accuracy_history"]
            if s["finished"] and hist and hist[-1]["version"] == s["model_version"]:
                break
            if time.time() - last >= args.progress_every:
                last = time.time()
                log(f"  {label}: {s['samples']:,}/{s['budget_samples']:,} samples, v{s['model_version']}, "
                    f"{time.time() - t0:.0f} s")
            time.sleep(0.5)
        wall = time.time() - t0
        with cluster.db() as db:
            rows = db.execute("SELECT delta_blob, dropped, worker_id FROM results").fetchall()
            units = [json.loads(w) for (w,) in db.execute("SELECT wire FROM units").fetchall()]
            logged = dict(db.execute("SELECT blob, length FROM result_deltas").fetchall())   # the delta log's
        sizes = [p.stat().st_size for blob, _, _ in rows if blob and (p := out / "state" / "blobs" / blob).is_file()]
        sizes += [logged[blob] for blob, _, _ in rows if blob in logged]
    finally:
        cluster.stop()
        for blobs in [out / "state" / "blobs", *out.glob("cache-*")]:     # model versions, shards
            shutil.rmtree(blobs, ignore_errors=True)
    expected = container_bytes(args.model, codec)
    if sizes and set(sizes) != {expected}:
        raise AssertionError(f"{label}: result blobs of {sorted(set(sizes))} bytes, expected {expected}")
    flagged = sum(bool(u.get("error_feedback")) for u in units)
    if ef and flagged != len(units) or not ef and flagged:
        log(f"  note: {flagged} of {len(units)} units allowed error feedback")
    return {"codec": codec, "error_feedback": ef, "label": label, "seed": seed, "final_test_acc": hist[-1]["test_acc"],
            "samples": s["samples"], "versions": s["model_version"], "wall_s": wall, "results": len(rows),
            "dropped": sum(d is not None for _, d, _ in rows), "units": len(units), "units_with_feedback": flagged,
            "staleness_mean": staleness_mean(out),
            "bytes_per_unit": expected, "blobs_checked": len(sizes),
            "fp32_bytes": container_bytes(args.model, "fp32")}


def section(cfg: dict, results: list[dict], out: Path) -> str:
    base = {r["seed"]: r["final_test_acc"] for r in results if r["codec"] == "fp16" and not r["error_feedback"]}
    seeds = sorted({r["seed"] for r in results})
    lines = [f"### Upload codecs with error feedback, against fp16: {cfg['model']} ({cfg['date']})", "",
             f"- What: the bytes a unit uploads (its result delta) and the final test accuracy at equal samples, "
             f"for each result codec (`--codec`) with the workers' error feedback off (`crowdtrain worker "
             f"--no-error-feedback`: the upload as before) or on (`+ EF`: C(d + r), the residual r of earlier "
             f"units kept in the worker, worker_py/feedback.py).",
             f"- Setup: `crowdtrain coordinator` and {cfg['workers']} `crowdtrain worker` processes (1 torch thread "
             f"each) on 127.0.0.1, `{cfg['model']}`, the coordinator's default units and strategy, the first "
             f"{cfg['train_images']:,} training images x {cfg['epochs']} epochs, test accuracy on "
             f"{cfg['test_images']:,} test images; seeds {', '.join(map(str, seeds))}; one run per cell.",
             f"- Data: `{cfg['data_source']}`. Hardware: {cfg['hardware']}; the machine was shared with other work "
             f"(load average {cfg['load']}), so seconds are indicative.",
             f"- Command: `{cfg['command']}` at commit `{cfg['commit']}`; config, results and every run's logs in "
             f"`{shown(out)}`.", "",
             "| codec | error feedback | seed | bytes per unit | vs fp32 | vs fp16 | final test acc. (%) | vs fp16 (points) | mean staleness | wall (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fp16 = next((r["bytes_per_unit"] for r in results if r["codec"] == "fp16"), None)
    for r in results:
        vs = f"{100 * (r['final_test_acc'] - base[r['seed']]):+.2f}" if r["seed"] in base else "-"
        rel16 = f"{100 * r['bytes_per_unit'] / fp16:.1f}%" if fp16 else "-"
        lines.append(f"| {r['codec']} | {'on' if r['error_feedback'] else 'off'} | {r['seed']} | "
                     f"{r['bytes_per_unit']:,} | {100 * r['bytes_per_unit'] / r['fp32_bytes']:.1f}% | {rel16} | "
                     f"{100 * r['final_test_acc']:.2f} | {vs} | {r.get('staleness_mean') or 0:.2f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("CROWDTRAIN_DATA"), help="CIFAR-10 path (default: $CROWDTRAIN_DATA)")
    p.add_argument("--model", default="resnet_fast")
    p.add_argument("--train-images", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--test-images", type=int, default=10_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="CODEC[+ef]")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--eval-every", type=float, default=30.0,
                   help="seconds between the coordinator's evaluations (it sleeps this long between them, so the "
                        "final version waits up to this long: keep it short)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds, per run")
    p.add_argument("--progress-every", type=float, default=30.0)
    p.add_argument("--append", action="store_true",
                   help="keep the results already in --out's results.json and run only the (seed, variant) cells "
                        "not there (more seeds later)")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not args.data:
        p.error("--data (or $CROWDTRAIN_DATA) is required")
    variants = [parse_variant(v) for v in args.variants]
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"upload_codecs-{date}"
    out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if args.test_images < 10_000:
        data = str(derived_data(args.data, args.train_images, args.test_images, out / "data"))
    cfg = {"date": date, "model": args.model, "train_images": args.train_images, "epochs": args.epochs,
           "test_images": args.test_images, "seeds": args.seeds, "variants": args.variants, "workers": args.workers,
           "eval_every": args.eval_every, "data_source": args.data, "hardware": hardware(),
           "commit": commit(),
           "command": "python bench/upload_codecs.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "load": f"{os.getloadavg()[0]:.1f}"}
    results: list[dict] = []
    loads = []
    if args.append and (out / "results.json").is_file():
        results = json.loads((out / "results.json").read_text())
        old = json.loads((out / "config.json").read_text())
        for key in ("model", "train_images", "epochs", "test_images", "workers"):
            if old[key] != cfg[key]:
                raise SystemExit(f"--append: {out} was run with {key}={old[key]!r}, not {cfg[key]!r}")
        done = {(r["seed"], r["codec"], r["error_feedback"]) for r in results}
        todo = [(seed, c, ef) for seed in args.seeds for c, ef in variants if (seed, c, ef) not in done]
        if old["date"] != cfg["date"] and todo:
            cfg["date"] = f"{old['date'].split(' to ')[0]} to {cfg['date']}"
        elif not todo:
            cfg["date"] = old["date"]
        cfg["seeds"] = sorted(set(old["seeds"]) | {seed for seed, _, _ in todo})
        cfg["variants"] = list(dict.fromkeys(old["variants"] + [f"{c}{'+ef' if ef else ''}" for _, c, ef in todo]))
        if todo:    # a run that measures nothing (the section again) leaves the record as it was
            cfg["command"] = old["command"] + "; then " + cfg["command"]
            if old["commit"] != cfg["commit"]:
                cfg["commit"] = f"{old['commit']}, then {cfg['commit']}"
        else:
            cfg["command"], cfg["commit"] = old["command"], old["commit"]
        loads = [float(x) for x in old["load"].split("-")]
        for r in results:   # runs before this number was recorded
            if "staleness_mean" not in r:
                r["staleness_mean"] = staleness_mean(run_dir(out, r["seed"], r["codec"], r["error_feedback"]))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for seed in args.seeds:
        for codec, ef in variants:
            if any(r["seed"] == seed and r["codec"] == codec and r["error_feedback"] == ef for r in results):
                continue
            loads.append(os.getloadavg()[0])
            results.append(run_variant(args, data, seed, codec, ef, run_dir(out, seed, codec, ef)))
            r = results[-1]
            log(f"  {r['label']}, seed {seed}: {100 * r['final_test_acc']:.2f}%, {r['bytes_per_unit']:,} bytes per unit, "
                f"{r['wall_s']:.0f} s")
            (out / "results.json").write_text(json.dumps(results, indent=2))
    cfg["load"] = f"{min(loads):.1f}-{max(loads):.1f}"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    def order(r: dict) -> tuple:
        key = f"{r['codec']}{'+ef' if r['error_feedback'] else ''}"
        return (VARIANTS.index(key) if key in VARIANTS else len(VARIANTS), r["seed"])

    text = section(cfg, sorted(results, key=order), out)
    print(text)
    if not args.no_docs:
        write_section(f"upload_codecs_{args.model}", text, ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
