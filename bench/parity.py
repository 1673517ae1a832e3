"""Accuracy parity: what donated samples buy, next to one process (issue 10, item 1).

Claim measured: at equal samples, on the same images and recipe, the distributed job's test
accuracy against one process's, and its wall time against one process's on the same cores.
Three setups, in one run, each trained to the recipe's full budget for those images:

* one process: ``crowdtrain train`` (a subprocess, all cores), evaluated after each epoch;
* real: ``crowdtrain coordinator`` and ``--workers`` ``crowdtrain worker`` processes (1 torch
  thread each) on 127.0.0.1, once per strategy, with the coordinator's units (its defaults:
  one 1,000-image shard per unit, the recipe's batch); evaluated every ``--eval-every`` s;
* simulated: ``crowdtrain sim`` on ``--scenarios`` (mild and heavy churn) with ``--sim-workers``
  (8 and 32) workers, the scenario's fleet and churn but the real setup's model, units and
  budget keys, evaluated at ``--sim-evals`` points plus the initial model.

Every setup evaluates on the same first ``--test-images`` test images (default: the whole
split; fewer go through a derived copy of the data, so ``crowdtrain train`` sees the same
split). ``--strategy NAME[:k=v,...]`` (repeatable) picks the strategies; default: the
coordinator's default (coordinator/config.py, read at run time) plus ``fedavg``, whose
round is one unit per worker of the setup unless ``clients_per_round`` is given. One run
(``--seed``) per cell. The wall-time comparison is one process against real workers, each
alone on the machine; a warm-up coordinator builds the browser step-graph cache first, so
no run pays the one-off export.

    python bench/parity.py --data ../shared/data                   # the full run
    python bench/parity.py --data ../shared/data --quick           # a smoke run (a couple of minutes)
    python bench/parity.py --data ../shared/data --strategy fedbuff:buffer_size=2 --setups single real

Writes bench/out/parity-<date>/ (config.json, results.json, parity.png, each setup's logs and
files), and its section of docs/results.md (not for --quick or --no-docs).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import checkout, hardware, shown, write_section  # noqa: E402
from tests.helpers.cluster import Cluster  # noqa: E402

SETUPS = ("single", "real", "sim")
QUICK = {"train_images": 2000, "epochs": 1, "test_images": 500, "sim_evals": 2, "eval_every": 5.0}
SIM_SCENARIOS = ("scenarios/mild_churn.toml", "scenarios/heavy_churn.toml")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ----------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class Spec:
    """One strategy as asked: ``name``, its parameters, whether it is the coordinator's default."""

    name: str
    params: dict = field(default_factory=dict)
    default: bool = False
    flags: tuple[str, ...] = ()     # more `crowdtrain coordinator` flags (real setups only)

    @property
    def label(self) -> str:
        text = self.name + (":" + ",".join(f"{k}={v}" for k, v in self.params.items()) if self.params else "")
        return text + (" (default)" if self.default else "") + "".join(f" {f}" for f in self.flags)

    def at(self, workers: int) -> dict:
        """The parameters for a setup of ``workers`` workers (a FedAvg round: one unit from each)."""
        if self.name == "fedavg" and "clients_per_round" not in self.params:
            return {**self.params, "clients_per_round": workers}
        return dict(self.params)


def parse_spec(text: str, model: str = "resnet_fast") -> Spec:
    """``NAME[:k=v,...][+FLAG...]``, checked against the strategy registry; ``default`` is the coordinator's
    default strategy; each ``+FLAG`` is one more coordinator flag (``default+--unit-lr=linear``)."""
    from coordinator.config import parse_param
    from coordinator.strategies import make_strategy

    text, *flags = text.split("+")
    if flags:
        return dataclasses.replace(parse_spec(text, model), flags=tuple(f.strip() for f in flags))
    if text.strip() == "default":
        return default_spec(model)
    name, _, rest = text.partition(":")
    params = dict(parse_param(kv) for kv in rest.split(",") if kv.strip()) if rest else {}
    make_strategy(name.strip(), **params)      # an unknown name or parameter fails here, before anything runs
    return Spec(name.strip(), params)


def default_spec(model: str) -> Spec:
    from coordinator.config import DEFAULT_STRATEGY, DEFAULT_STRATEGY_PARAMS
    from models.registry import get

    name = DEFAULT_STRATEGY[get(model).kind]
    return Spec(name, dict(DEFAULT_STRATEGY_PARAMS.get(name, {})), default=True)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_")


# ----------------------------------------------------------------------------- data
def derived_data(source: str, train_images: int, test_images: int, out: Path) -> Path:
    """The first ``train_images`` / ``test_images`` of ``source`` as an official-layout archive, written
    byte-for-byte the same for the same images (so the loader's cache, keyed by its sha256, is reused)."""
    import numpy as np

    from models.data import CLASSES, load_cifar10

    data = load_cifar10(source, progress=False)
    x, y = data.train_x[:train_images], data.train_y[:train_images]
    tx, ty = data.test_x[:test_images], data.test_y[:test_images]

    def batch(xs, ys, label: str) -> bytes:
        return pickle.dumps({b"batch_label": label.encode(), b"labels": [int(v) for v in ys],
                             b"data": xs.reshape(len(xs), 3072),
                             b"filenames": [f"{i:05d}.png".encode() for i in range(len(ys))]}, protocol=2)

    chunks = np.array_split(np.arange(len(y)), 5)       # the loader concatenates data_batch_1..5 in order
    files = {f"data_batch_{i + 1}": batch(x[c], y[c], f"training batch {i + 1} of 5") for i, c in enumerate(chunks)}
    files["test_batch"] = batch(tx, ty, "testing batch 1 of 1")
    files["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, protocol=2)
    path = out / "data" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size, info.mtime = len(payload), 0
            tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())
    return path


# ----------------------------------------------------------------------------- one process
def run_single(args, data: str, out: Path) -> dict:
    """``crowdtrain train`` in a subprocess; the curve from its metrics.jsonl, one point per epoch."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)     # an earlier run's, in the same --out
    cmd = [sys.executable, "-m", "crowdtrain", "train", "--model", args.model, "--data", data, "--out", str(out),
           "--epochs", str(args.epochs), "--limit-train", str(args.train_images), "--seed", str(args.seed),
           "--threads", str(args.threads), "--no-progress"]
    log(f"one process: {' '.join(cmd[2:])}")
    t0 = time.time()
    with open(out / "train.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            shown_rows = 0
            while proc.poll() is None:
                time.sleep(1.0)
                shown_rows = _show_epochs(out / "metrics.jsonl", shown_rows, t0)
                if time.time() - t0 > args.timeout:
                    raise TimeoutError(f"crowdtrain train did not finish in {args.timeout:.0f} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.time() - t0
    _show_epochs(out / "metrics.jsonl", shown_rows, t0)
    if proc.returncode != 0:
        raise RuntimeError(f"crowdtrain train exited with {proc.returncode}: {(out / 'train.log').read_text()[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((out / "config.json").read_text())
    batch = config["recipe"]["batch_size"]
    if config["test_size"] != args.test_images:
        raise RuntimeError(f"crowdtrain train evaluated on {config['test_size']} test images, not {args.test_images}")
    startup = wall - rows[-1]["elapsed"]     # interpreter, torch and data before the first step (and the save)
    # like for like: the coordinator evaluates without test-time augmentation, so a recipe's last evaluation
    # with it (airbench) counts here by its plain accuracy; the augmented one is kept as ``test_acc_tta``
    history = [{"samples": r["step"] * batch, "test_acc": r.get("test_acc_plain", r["test_acc"]),
                "seconds": r["elapsed"] + startup} | ({"test_acc_tta": r["test_acc"]} if "test_acc_plain" in r else {})
               for r in rows if "test_acc" in r]
    # the final model exists once the last epoch's steps are done, before its evaluation
    to_model = startup + (rows[-2]["elapsed"] if len(rows) > 1 else 0.0) + rows[-1]["seconds"]
    return {"setup": "single", "label": "one process", "history": history, "final_test_acc": history[-1]["test_acc"],
            "final_test_acc_tta": history[-1].get("test_acc_tta"),
            "best_test_acc": max(h["test_acc"] for h in history), "samples": history[-1]["samples"],
            "wall_s": wall, "seconds_to_model": to_model, "train_s": sum(r["seconds"] for r in rows),
            "evals": len(history),
            "steps": rows[-1]["step"], "recipe": config["recipe"], "test_images": config["test_size"],
            "train_images": config["train_size"], "threads": config["threads"]}


def _show_epochs(path: Path, shown_rows: int, t0: float) -> int:
    if not path.exists():
        return shown_rows
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows[shown_rows:]:
        acc = f", test {100 * r['test_acc']:.2f}%" if "test_acc" in r else ""
        log(f"  one process: epoch {r['epoch']} ({r['step']} steps){acc}, {time.time() - t0:.0f} s")
    return len(rows)


# ----------------------------------------------------------------------------- real processes
def coordinator_flags(args, data: str, spec: Spec | None) -> list[str]:
    flags = ["--data", data, "--model", args.model, "--limit-train", str(args.train_images), "--epochs",
             str(args.epochs), "--seed", str(args.seed), "--eval-images", str(args.test_images)]
    if spec is not None and not spec.default:       # the default: no flag, so the coordinator picks it
        flags += ["--strategy", spec.name]
        for k, v in spec.at(args.workers).items():
            flags += ["--param", f"{k}={v}"]
    return flags + list(spec.flags if spec is not None else ())


def warm_up(args, data: str, out: Path) -> float:
    """Start a coordinator on a small slice and wait for its browser step graph at the units' batch size
    (cached on disk across jobs), so that no measured run pays the one-off export."""
    batch = unit_keys(args)["model.batch_size"]
    tmp = out / "warmup"
    tmp.mkdir(parents=True, exist_ok=True)
    flags = ["--data", data, "--model", args.model, "--limit-train", str(min(args.train_images, 1000)),
             "--eval-images", str(min(args.test_images, 100)), "--eval-every", "3600"]
    cluster = Cluster(tmp, *flags)
    t0 = time.time()
    try:
        cluster.start_coordinator()
        url = f"{cluster.url}/api/v1/steps/{args.model}/{batch}"
        while time.time() - t0 < 600:
            try:
                with urllib.request.urlopen(url, timeout=10):
                    break
            except urllib.error.HTTPError as e:
                if e.code != 503:   # 501: the model has no browser step; nothing to wait for
                    break
            time.sleep(1.0)
    finally:
        cluster.stop()
        shutil.rmtree(tmp / "state", ignore_errors=True)
    return time.time() - t0


def keep_model(out: Path) -> Path | None:
    """The job's final model as ``crowdtrain export`` writes it (batch-norm statistics re-estimated), to
    ``out/model.pt`` before the state's blobs are deleted, so that it can be evaluated again later."""
    from coordinator.model_out import from_state

    try:
        path, _ = from_state(out / "state", "pt", out / "model.pt", "final", True)
        log(f"  the final model: {path}")
        return path
    except Exception as e:   # a run that never made a version: nothing to keep, and nothing to fail for
        log(f"  the final model was not kept: {type(e).__name__}: {e}")
        return None


def tta_accuracy(args, data: str, path: Path | None) -> float | None:
    """The kept final model's test accuracy with its recipe's test-time augmentation (as one process's last
    evaluation has it, ``final_test_acc_tta``); None for a recipe without it or no model kept."""
    from models.data import load_cifar10
    from models.export import evaluate, load_predictor, recipe_tta

    level = recipe_tta(args.model)
    if not level or path is None:
        return None
    test = load_cifar10(data, progress=False)
    n = args.test_images or len(test.test_y)
    return evaluate(load_predictor(path, threads=args.threads), test.test_x[:n], test.test_y[:n], level)[1]


def tta_note(r: dict) -> str:
    tta = r.get("final_test_acc_tta")
    return "" if tta is None else f" ({100 * tta:.2f}% with the recipe's test-time augmentation)"


def run_real(args, data: str, spec: Spec, out: Path) -> dict:
    """A coordinator and ``args.workers`` worker processes until the budget is folded and evaluated."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "state", ignore_errors=True)   # a new job: an earlier run's state (its blobs deleted) is not resumed
    flags = coordinator_flags(args, data, spec) + ["--eval-every", str(args.eval_every)]
    log(f"real, {spec.label}: crowdtrain coordinator {' '.join(flags)} + {args.workers} workers")
    cluster = Cluster(out, *flags, worker_threads=1)
    t0 = time.time()
    t_budget = None
    last_line = 0.0
    try:
        cluster.start_coordinator()
        t_up = time.time() - t0
        for i in range(args.workers):
            cluster.start_worker(f"w{i + 1}")
        while True:
            if time.time() - t0 > args.timeout:
                raise TimeoutError(f"the real job ({spec.label}) did not finish in {args.timeout:.0f} s")
            s = cluster.status()
            hist = s["accuracy_history"]
            if s["finished"] and t_budget is None:
                t_budget = time.time() - t0
            if s["finished"] and hist and hist[-1]["version"] == s["model_version"]:
                break
            if time.time() - last_line >= args.progress_every:
                last_line = time.time()
                acc = f", test {100 * hist[-1]['test_acc']:.2f}% at v{hist[-1]['version']}" if hist else ""
                log(f"  real, {spec.label}: {s['samples']:,}/{s['budget_samples']:,} samples, "
                    f"v{s['model_version']}{acc}, {time.time() - t0:.0f} s")
            time.sleep(0.5)
        wall = time.time() - t0
        with cluster.db() as db:
            rows = db.execute("SELECT staleness, applied_step, dropped FROM results").fetchall()
            evals = db.execute("SELECT step, samples, seconds, test_acc FROM evals ORDER BY at, rowid").fetchall()
            started = json.loads(db.execute("SELECT value FROM meta WHERE key = 'started'").fetchone()[0])
            first = json.loads(db.execute("SELECT wire FROM units ORDER BY issued LIMIT 1").fetchone()[0])
    finally:
        cluster.stop()
        kept = keep_model(out)
        for blobs in [out / "state" / "blobs", *out.glob("cache-*")]:     # model versions, shards: 100+ MB
            shutil.rmtree(blobs, ignore_errors=True)
    unit = {"batch_size": first["batch_size"], "local_steps": first["local_steps"]}
    u = unit_keys(args)
    if (unit["batch_size"], unit["local_steps"]) != (u["model.batch_size"], u["model.local_steps"]):
        log(f"  warning: the coordinator's units ({unit}) are not those given to the simulator ({u})")
    offset = started - t0      # the coordinator's clock starts at job open; ours at launch
    history = [{"samples": n, "test_acc": acc, "seconds": sec + offset, "version": v} for v, n, sec, acc in evals]
    applied = [r[0] for r in rows if r[1] is not None]
    return {"setup": "real", "label": spec.label, "strategy": s["strategy"], "params": spec.at(args.workers),
            "workers": args.workers, "unit": unit, "history": history, "final_test_acc": history[-1]["test_acc"],
            "final_test_acc_tta": tta_accuracy(args, data, kept),
            "best_test_acc": max(h["test_acc"] for h in history), "samples": s["samples"],
            "budget_samples": s["budget_samples"], "versions": s["model_version"], "wall_s": wall,
            "seconds_to_model": t_budget, "startup_s": t_up, "evals": len(history),
            "updates_applied": s["updates_applied"], "updates_dropped": s["updates_dropped"],
            "staleness_mean": sum(applied) / len(applied) if applied else 0.0}


# ----------------------------------------------------------------------------- simulator
def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return '"none"'
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def scenario_toml(doc: dict) -> str:
    """A ``Scenario.to_dict()`` as a scenario file (``load`` reads it back to the same scenario)."""
    lines = [f"{k} = {toml_value(doc[k])}" for k in ("name", "description", "seed", "baseline", "max_hours")]
    for section in ("model", "budget", "workers", "churn", "network", "coordinator"):
        lines += ["", f"[{section}]"]
        for k, v in doc[section].items():
            if section == "churn" and k == "schedule":
                v = [{"at_s": at, "leave": leave, "join": join} for at, leave, join in v]
            lines.append(f"{k} = {toml_value(v)}")
    for s in doc["strategies"]:
        lines += ["", "[[strategies]]", f"name = {toml_value(s['name'])}", f"label = {toml_value(s['label'])}",
                  f"params = {toml_value(s['params'])}"]
    return "\n".join(lines) + "\n"


def unit_keys(args) -> dict:
    """The real coordinator's units and budget as scenario keys (the simulator's own defaults are smaller
    units): its default config and the recipe its units train with (``coordinator.job.unit_recipe``), given to
    the simulator explicitly."""
    from coordinator.config import CoordinatorConfig
    from coordinator.job import unit_recipe
    from models.registry import get

    cfg = CoordinatorConfig(state=Path("."), model=args.model)
    spec = get(args.model)
    recipe = unit_recipe(spec.recipe, cfg, spec.kind)
    n = cfg.shard_size * cfg.shards_per_unit
    batch = min(recipe.batch_size, n)
    return {"model.name": args.model, "model.batch_size": batch, "model.lr": recipe.lr,
            "model.local_steps": cfg.local_steps or max(1, math.ceil(n / batch)), "model.codec": cfg.codec,
            "model.shard_size": cfg.shard_size, "model.shards_per_unit": cfg.shards_per_unit,
            "budget.train_images": args.train_images, "budget.epochs": float(args.epochs),
            "budget.eval_images": args.test_images, "budget.evals": args.sim_evals}


def sim_scenario(args, base: Path, workers: int, specs: list[Spec]):
    from coordinator.sim.scenario import StrategySpec, load, override

    sc = load(base)
    for key, value in {**unit_keys(args), "workers.count": workers}.items():
        sc = override(sc, f"{key}={toml_value(value)}")
    for assignment in args.sim_set:
        sc = override(sc, assignment)
    sc.seed = args.seed
    sc.strategies = [StrategySpec(s.name, s.label, s.at(workers)) for s in specs]
    sc.baseline = sc.strategies[0].label
    return sc


def run_sims(args, data: str, specs: list[Spec], out: Path) -> list[dict]:
    """One ``crowdtrain sim`` per (scenario, workers), all strategies in it, ``--jobs`` at once."""
    from coordinator.sim.scenario import load

    jobs = []
    for base in args.scenarios:
        for workers in args.sim_workers:
            sc = sim_scenario(args, ROOT / base, workers, specs)
            folder = out / f"{sc.name}-w{workers}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "scenario.toml"
            path.write_text(scenario_toml(sc.to_dict()))
            assert load(path).to_dict() == sc.to_dict(), f"{path}: does not read back as the scenario"
            jobs.append((sc.name, workers, path, folder))

    def one(job) -> tuple:
        name, workers, path, folder = job
        cmd = [sys.executable, "-m", "crowdtrain", "sim", str(path), "--data", data, "--out", str(folder),
               "--threads", "1", "--no-progress"]
        log(f"sim {name}, {workers} workers: started")
        t0 = time.time()
        with open(folder / "sim.log", "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            procs.append(proc)
            rc = None
            while rc is None:
                try:
                    rc = proc.wait(timeout=args.progress_every * 4)
                except subprocess.TimeoutExpired:
                    if time.time() - t0 > args.timeout:
                        proc.kill()
                        proc.wait()
                        rc = "timeout"
                    else:
                        log(f"  sim {name}, {workers} workers: running, {time.time() - t0:.0f} s")
        log(f"sim {name}, {workers} workers: done in {time.time() - t0:.0f} s (exit {rc})")
        return job, rc, time.time() - t0

    procs: list[subprocess.Popen] = []
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(pool.map(one, jobs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for (name, workers, path, folder), rc, wall in done:
        if rc != 0:
            raise RuntimeError(f"crowdtrain sim {path} exited with {rc}: {(folder / 'sim.log').read_text()[-2000:]}")
        doc = json.loads((folder / "results.json").read_text())
        for run in doc["runs"]:
            s = run["summary"]
            history = [{"samples": e["samples_applied"], "test_acc": e["test_acc"], "seconds": e["sim_time_s"],
                        "version": e["version"]} for e in run["evals"]]
            results.append({"setup": f"sim {name}, {workers} workers", "scenario": name, "workers": workers,
                            "label": run["label"], "strategy": run["strategy"], "params": run["params"],
                            "history": history, "final_test_acc": s["final_test_acc"],
                            "best_test_acc": max(h["test_acc"] for h in history), "samples": s["samples_applied"],
                            "samples_computed": s["samples_computed"], "sim_time_s": s["sim_time_s"],
                            "versions": s["versions"], "staleness_mean": s["staleness_mean"],
                            "units_lost": s["units_lost"], "units_dropped": s["units_dropped_by_strategy"],
                            "stalled": s["stalled"], "process_wall_s": wall, "folder": shown(folder)})
    return results


# ----------------------------------------------------------------------------- report
def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in results if r["setup"] != "single"))
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    setups = list(dict.fromkeys(r["setup"] for r in results if r["setup"] not in ("single", "real")))
    styles = {"real": ("-", "o")} | {s: (("--", ":", "-.", (0, (3, 1, 1, 1, 1, 1)))[i % 4], "x.+^"[i % 4])
                                      for i, s in enumerate(setups)}
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(14, 5 + 0.2 * len(results)), gridspec_kw={"width_ratios": [2, 1]})
    for r in results:
        xs, ys = [h["samples"] for h in r["history"]], [100 * h["test_acc"] for h in r["history"]]
        if r["setup"] == "single":
            kw = {"color": "black", "linewidth": 2.5, "marker": "s", "label": "one process"}
        else:
            ls, marker = styles[r["setup"]]
            kw = {"color": colours[r["label"]], "linestyle": ls, "marker": marker, "linewidth": 1.3,
                  "label": f"{r['setup']}: {r['label']}"}
        ax.plot(xs, ys, **kw)
        if r["setup"] in ("single", "real"):
            ax_t.plot([h["seconds"] for h in r["history"]], ys, **kw)
    ax.set(xlabel="samples applied", ylabel="test accuracy (%)", title="accuracy vs samples")
    ax_t.set(xlabel="wall seconds since launch", ylabel="test accuracy (%)",
             title="one process vs real workers, same cores")
    for a in (ax, ax_t):
        a.grid(alpha=0.3)
    ax_t.legend(fontsize=7, loc="lower right")
    rows = math.ceil(len(results) / 2)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7)
    fig.tight_layout(rect=(0, 0.035 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict]) -> list[str]:
    single = next((r for r in results if r["setup"] == "single"), None)
    rows = ["| setup | strategy | final test acc. (%) | best (%) | samples | time | vs one process, final "
            "(points) | vs one process, best (points) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        gap = best = "-"
        if single is not None and r is not single:
            gap = f"{100 * (r['final_test_acc'] - single['final_test_acc']):+.2f}"
            best = f"{100 * (r['best_test_acc'] - single['best_test_acc']):+.2f}"
        when = f"{r['sim_time_s'] / 3600:.2f} sim. h" if "sim_time_s" in r else f"{r['seconds_to_model']:.0f} s"
        setup = {"real": f"real, {r.get('workers')} workers", "single": "one process"}.get(r["setup"], r["setup"])
        rows.append(f"| {setup} | {'-' if r['setup'] == 'single' else r['label']} | {100 * r['final_test_acc']:.2f} "
                    f"| {100 * r['best_test_acc']:.2f} | {r['samples']:,} | {when} | {gap} | {best} |")
    return rows


def measured(cfg: dict, results: list[dict]) -> str:
    """Which commit each setup ran at (``+changes``: with uncommitted changes in the tree)."""
    changes = f" (uncommitted changes in {', '.join(cfg['dirty'])})" if cfg["dirty"] else ""
    parts: dict[tuple, list[str]] = {}
    for r in results:
        m = r.get("measured", {})
        key = (m.get("at", cfg["date"]), m.get("commit", cfg["commit"]), m.get("command", cfg["command"]))
        name = r["setup"].split(",")[0].replace("single", "one process")
        if name not in parts.setdefault(key, []):
            parts[key].append(name)
    if len(parts) <= 1:
        return f"Commit: `{cfg['commit']}`{changes}. Command: `{cfg['command']}`."
    each = [f"{', '.join(names)} at {at}, commit `{commit}`, `{command}`"
            for (at, commit, command), names in parts.items()]
    return f"Measured in parts (`--keep`): {'; '.join(each)}{changes}."


def sim_prefetch(sims: list[dict]) -> str:
    """``workers.prefetch`` of the simulated runs (real workers prefetch), from the scenarios they ran."""
    import tomllib

    if not sims:
        return ""
    seen = {tomllib.loads((ROOT / r["folder"] / "scenario.toml").read_text())["workers"]["prefetch"] for r in sims}
    return " / ".join("on" if v else "off (the real worker's prefetch is not modelled)" for v in sorted(seen))


def section(cfg: dict, results: list[dict], out: Path) -> str:
    single = next((r for r in results if r["setup"] == "single"), None)
    real = [r for r in results if r["setup"] == "real"]
    sims = [r for r in results if r["setup"].startswith("sim")]
    u, recipe = cfg["units"], cfg["recipe"]
    lines = [f"### Accuracy parity: one process vs the coordinator ({cfg['date']})", "",
             f"- The same images and budget for every setup, and `{cfg['model']}`'s registered recipe (batch "
             f"{recipe['batch_size']}, peak lr {recipe['lr']:g}, {recipe['schedule']}; one process trains with it as "
             "is, the coordinator's units as its defaults say, below): the first "
             f"{cfg['train_images']:,} training images for {cfg['epochs']} epochs "
             f"({cfg['train_images'] * cfg['epochs']:,} samples; one process drops each epoch's last partial batch, "
             "a unit is whole SGD steps, so the counts differ a little: see the samples column), seed "
             f"{cfg['seed']}, test accuracy on the first {cfg['test_images']:,} test images. One run per cell.",
             f"- Data: `{cfg['data']}`. Hardware: {cfg['hardware']}; the machine was shared with other "
             f"work, so seconds are indicative. {measured(cfg, results)}",
             f"- One process: `crowdtrain train`, {cfg['threads']} torch threads, evaluated after each epoch; time: "
             "launch to the end of the last epoch's steps.",
             f"- Real: `crowdtrain coordinator` and {cfg['workers']} `crowdtrain worker` processes of 1 torch thread "
             f"on 127.0.0.1 (the coordinator's default units: {u['model.shard_size']:,}-image shards, "
             f"{u['model.local_steps']} SGD steps of {u['model.batch_size']} at peak lr {u['model.lr']:g}, "
             f"{u['model.codec']} deltas), evaluated "
             f"every {cfg['eval_every']:g} s (batch-norm statistics re-estimated, as in every coordinator "
             "evaluation); time: launch to the final model.",
             f"- Simulated: `crowdtrain sim` on {', '.join(f'`{s}`' for s in cfg['scenarios'])} with "
             f"{' and '.join(str(w) for w in cfg['sim_workers'])} workers: the scenario's speeds, churn and crashes, "
             f"the real setup's units and budget, evaluated at {cfg['sim_evals']} points plus the initial model; "
             f"workers prefetch: {sim_prefetch(sims)}; time: simulated hours to the budget."
             + (f" Extra keys: {', '.join(f'`{s}`' for s in cfg['sim_set'])}." if cfg["sim_set"] else ""),
             "- FedAvg without `clients_per_round` waits for one unit per worker of the setup "
             f"({', '.join(str(n) for n in sorted({cfg['workers'], *cfg['sim_workers']}))}) and drops results "
             "computed from an older round.",
             f"- Raw results, config and every setup's logs and files in `{shown(out)}`; plot: "
             f"`{shown(out / 'parity.png')}`.", "", *table(results)]
    ran = {"- One process": single, "- Real": real, "- Simulated": sims,
           "- FedAvg": [r for r in results if r.get("strategy") == "fedavg"]}
    lines = [line for line in lines if all(ran[k] for k in ran if line.startswith(k))]
    if single is not None and real:
        lines += ["", "Wall time on the same cores, from launch to the final model (the budget spent; evaluations "
                  "during the run included, the final one not): one process "
                  f"{single['seconds_to_model']:.0f} s ({single['evals']} evaluations in all); "
                  + "; ".join(f"{r['label']} {r['seconds_to_model']:.0f} s "
                              f"({r['seconds_to_model'] / single['seconds_to_model']:.2f}x one process; "
                              f"{r['evals']} evaluations, coordinator up after {r['startup_s']:.0f} s, "
                              f"{r['versions']} versions, mean staleness {r['staleness_mean']:.2f}, "
                              f"{sum(r['updates_dropped'].values())} updates dropped)" for r in real)
                  + ". To the final model evaluated: one process " f"{single['wall_s']:.0f} s, "
                  + ", ".join(f"{r['label']} {r['wall_s']:.0f} s" for r in real) + ". Load average (1 min) just "
                  "before each timed run: "
                  + ", ".join(f"{r['load_before']:.2f}" if "load_before" in r else "n/a" for r in [single, *real])
                  + " (one process first)."]
    if sims:
        stalled = [f"{r['setup']} {r['label']}" for r in sims if r["stalled"]]
        if stalled:
            lines += ["", f"Stalled (did not spend the budget): {', '.join(stalled)}."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
SAME = ("model", "data_digest", "train_images", "epochs", "test_images", "seed", "strategies", "units", "threads",
        "workers", "eval_every", "scenarios", "sim_workers", "sim_evals", "sim_set")


def kept(cfg: dict, path: Path) -> list[dict]:
    """The results of setups not run now from an earlier ``results.json``, if measured the same way."""
    if not path.exists():
        return []
    before = json.loads(path.read_text())
    differ = [k for k in SAME if before["config"].get(k) != cfg[k]]
    if differ:
        raise SystemExit(f"error: --keep: {path} was measured with other {', '.join(differ)}")
    old = {"at": before["config"]["date"], "commit": before["config"]["commit"]
           + ("+changes" if before["config"]["dirty"] else ""), "command": before["config"]["command"]}
    setups = set(cfg["setups"])
    out = [{**r, "measured": {**old, **r.get("measured", {})}} for r in before["results"]
           if r["setup"].split()[0] not in setups]
    log(f"kept {len(out)} earlier results ({'; '.join(sorted({r['setup'] for r in out}))}) from {shown(path)}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=os.environ.get("CROWDTRAIN_DATA"), help="CIFAR-10 path (default: "
                   "$CROWDTRAIN_DATA)")
    p.add_argument("--model", default="resnet_fast")
    p.add_argument("--train-images", type=int, default=10_000, help="the first N training images")
    p.add_argument("--epochs", type=int, default=3, help="passes over them: the sample budget")
    p.add_argument("--test-images", type=int, default=None, help="the first N test images (default: the whole split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", action="append", default=[], metavar="NAME[:k=v,...][+FLAG]",
                   help="a strategy for the real and simulated setups; repeatable (default: the coordinator's "
                   "default, then fedavg); 'default' names the coordinator's default; '+FLAG' adds a coordinator "
                   "flag, real setups only (e.g. default+--unit-lr=linear)")
    p.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="one process: torch threads")
    p.add_argument("--workers", type=int, default=2, help="real: worker processes (1 torch thread each)")
    p.add_argument("--eval-every", type=float, default=30.0, help="real: seconds between evaluations")
    p.add_argument("--scenarios", nargs="+", default=list(SIM_SCENARIOS))
    p.add_argument("--sim-workers", type=int, nargs="+", default=[8, 32])
    p.add_argument("--sim-evals", type=int, default=6, help="sim: evaluations, evenly spaced in applied samples")
    p.add_argument("--sim-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="sim: one more scenario key, as crowdtrain sim --set; repeatable")
    p.add_argument("--jobs", type=int, default=2, help="sim: simulator processes at once (1 torch thread each)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up coordinator")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds, per run")
    p.add_argument("--progress-every", type=float, default=15.0, help="seconds between progress lines")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK} (no docs section)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    p.add_argument("--report-only", action="store_true", help="measure nothing: the plot and the section again "
                   "from OUT/results.json")
    p.add_argument("--keep", action="store_true", help="keep the results of the setups not run now from "
                   "OUT/results.json (for instance, rerun the timed setups on a quieter machine), when they were "
                   "measured on the same images, budget, recipe, units, seed and strategies")
    p.add_argument("--out", type=Path, help="output folder (default: bench/out/parity-<date>[-quick])")
    args = p.parse_args(argv)
    if not args.data:
        p.error("--data (or $CROWDTRAIN_DATA) is required")
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    return args


def report(cfg: dict, results: list[dict], out: Path, docs: bool) -> None:
    plot(results, out / "parity.png")
    body = section(cfg, results, out)
    if docs:
        write_section("parity", body, ROOT / "docs" / "results.md")
    print(body)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)    # kill: stop the processes started, as Ctrl-C
    from models.data import load_cifar10
    from models.registry import get as get_model

    date = time.strftime("%Y-%m-%d")
    out = (args.out or ROOT / "bench" / "out" / f"parity-{date}{'-quick' if args.quick else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        report(saved["config"], saved["results"], out, not (args.quick or args.no_docs))
        return 0
    specs = [parse_spec(s, args.model) for s in args.strategy] or [default_spec(args.model), parse_spec("fedavg")]
    if "sim" in args.setups and any(s.flags for s in specs):
        raise SystemExit("parity.py: coordinator flags (+FLAG) apply to the real setups only; for the simulator "
                         "use --sim-set coordinator.KEY=VALUE")
    full = load_cifar10(args.data, progress=False)
    args.train_images = min(args.train_images, len(full.train_y))
    args.test_images = min(args.test_images or len(full.test_y), len(full.test_y))
    data = args.data
    if args.test_images < len(full.test_y):
        data = str(derived_data(args.data, args.train_images, args.test_images, out))
        log(f"data: the first {args.train_images:,} training and {args.test_images:,} test images of {args.data} "
            f"-> {shown(Path(data))}")
    head, dirty = checkout()
    cfg = {"date": date, "model": args.model, "data": args.data, "data_used": data, "data_digest": full.digest,
           "train_images": args.train_images, "epochs": args.epochs, "test_images": args.test_images,
           "seed": args.seed, "strategies": [{"label": s.label, "name": s.name, "params": s.params} for s in specs],
           "setups": args.setups, "threads": args.threads, "workers": args.workers, "eval_every": args.eval_every,
           "scenarios": args.scenarios, "sim_workers": args.sim_workers, "sim_evals": args.sim_evals,
           "sim_set": args.sim_set, "recipe": get_model(args.model).recipe.to_dict(), "units": unit_keys(args),
           "quick": args.quick, "hardware": hardware(),
           "commit": head, "dirty": dirty,
           "command": "python " + " ".join([shown(Path(sys.argv[0])), *sys.argv[1:]])}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    log(f"parity: {args.model}, {args.train_images:,} images x {args.epochs} epochs, {args.test_images:,} test "
        f"images; setups {', '.join(args.setups)}; strategies {', '.join(s.label for s in specs)}; -> {shown(out)}")
    t0 = time.time()
    results: list[dict] = kept(cfg, out / "results.json") if args.keep else []
    stamp = {"at": time.strftime("%Y-%m-%d %H:%M"), "commit": cfg["commit"] + ("+changes" if dirty else ""),
             "command": cfg["command"]}

    def save() -> None:
        (out / "results.json").write_text(json.dumps({"config": cfg, "results": results}, indent=2) + "\n")

    if "real" in args.setups and not args.no_warmup:
        log(f"warm-up coordinator (browser step-graph cache): {warm_up(args, data, out):.0f} s")
    if "single" in args.setups:
        load = os.getloadavg()[0]
        r = run_single(args, data, out / "single") | {"load_before": load, "measured": stamp}
        results.append(r)
        save()
        log(f"one process: {100 * r['final_test_acc']:.2f}%{tta_note(r)} after {r['samples']:,} samples, "
            f"{r['wall_s']:.0f} s")
    if "real" in args.setups:
        for spec in specs:
            load = os.getloadavg()[0]
            r = run_real(args, data, spec, out / "real" / slug(spec.label)) | {"load_before": load, "measured": stamp}
            results.append(r)
            save()
            log(f"real, {spec.label}: {100 * r['final_test_acc']:.2f}%{tta_note(r)} after {r['samples']:,} samples, "
                f"{r['wall_s']:.0f} s")
    if "sim" in args.setups:
        for r in run_sims(args, data, specs, out / "sim"):
            r["measured"] = stamp
            results.append(r)
            log(f"{r['setup']}, {r['label']}: {100 * r['final_test_acc']:.2f}% after {r['samples']:,} samples, "
                f"{r['sim_time_s'] / 3600:.2f} sim. h")
        save()
    results.sort(key=lambda r: SETUPS.index(r["setup"].split()[0]))     # kept ones too: one process, real, sim
    cfg["total_wall_s"] = round(time.time() - t0, 1)
    save()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    report(cfg, results, out, not (args.quick or args.no_docs))
    log(f"done in {cfg['total_wall_s']:.0f} s: {shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
