"""Parity lab: asynchronous aggregation of short self-contained units vs one process, at equal samples.

Claim measured: the test accuracy a coordinator's model reaches after a budget of samples
computed as self-contained units by N asynchronous workers, next to one process that trains
the same recipe on the same images for the same samples. No HTTP server and no SQLite: the
coordinator's unit arithmetic (budget, shards, the unit's lr from progress, the unit's
hyper) is mirrored here, N workers run on a simulated clock, every unit is computed by
``models.local.run_local`` from the model version its worker took it at (prefetching: a
worker takes its next unit just before its result lands, as ``worker_py`` does), and results
are folded with a coordinator strategy (``make_strategy``, ``add``, ``aggregate`` only).
With N equal-speed workers a delta arrives N versions stale (N - 1 without prefetch).

Hardware: the project's 2-core machine (shared), 1 torch thread; one run per configuration
(seed 0) unless the file name says otherwise. Evaluation: the first ``--eval-images`` test
images (2,000, 200 per class) at six points of the budget, plus the whole 10,000-image test
split at the end; every point both with the model's own batch-norm statistics ("plain",
what ``crowdtrain train`` reports) and with statistics re-estimated on 1,024 training images,
augmented as the recipe trains ("recal", what the coordinator reports; until 2026-12-04 this lab
re-estimated without augmentation: the README's earlier "recal" numbers are that way).

    python bench/parity_lab.py baseline [--baseline-steps 60]  # one process, recipe batch
    python bench/parity_lab.py run --workers 2                 # coordinator defaults
    python bench/parity_lab.py run --workers 8 --no-prefetch --unit-batch 64 --local-lr-scale 0.125 \\
        --strategy async_sgd --param staleness=polynomial --param staleness_a=1
    python bench/parity_lab.py table                           # every result as a markdown table

Coordinator-side variants measured here: ``--no-prefetch`` (a unit's model includes the
worker's previous result), ``--unit-batch``/``--local-lr-scale`` (smaller units, lr scaled),
``--shards-per-unit``/``--shard-size``, ``--local-momentum``, ``--rebase-weights`` (stale
weights re-expressed against the current model, FedAsync mixing), ``--lookahead`` (units start
from an extrapolated model), ``--lr-progress``, ``--delay-comp`` (DC-ASGD, Zheng et al. ICML 2017,
on deltas: ``d - lambda d*d (current - base) / (unit lr x steps)``, weights only) and
``--dc-diagnose`` (each stale unit is also recomputed from the current model, not folded: how much
the delta changes and how well DC's direction predicts it), ``--lr-tail``/``--lr-tail-scale`` (the unit
lr's factor falls linearly over the budget's last share). Readings:
``bench/results/parity_lab/README.md``.

Results: ``bench/results/parity_lab/<tag>.json`` (config, unit hyper, accuracy curve, final
accuracy, staleness, and the baseline's accuracy at the same samples when it was run).
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import commit, hardware  # noqa: E402
from coordinator.strategies import Update, make_strategy  # noqa: E402
from models import registry  # noqa: E402
from models.data import load_cifar10  # noqa: E402
from models.local import (is_running_stat, load_arrays, rebase_running_stats, recalibrate_bn,  # noqa: E402
                          run_local, sanitize_state, state_arrays)
from models.recipe import Recipe  # noqa: E402
from models.train import evaluate, lr_at, make_optimizer, sgd_step  # noqa: E402

OUT = ROOT / "bench" / "results" / "parity_lab"
# mirrored from coordinator/job.py (not imported: the job is being refactored)
HYPER_KEYS = ("momentum", "nesterov", "weight_decay", "label_smoothing", "loss", "focal_gamma", "crop_pad", "flip")
CALIBRATION_IMAGES = 1024


# ----------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class Lab:
    """What the baseline and every distributed run share."""

    model: str = "resnet_fast"
    data: str = "/work/shared/data"
    train_images: int = 10_000   # the first N training images
    epochs: int = 3              # budget = epochs * train_images samples
    batch: int | None = None     # SGD batch (None: the recipe's)
    lr: float | None = None      # peak lr (None: the recipe's)
    momentum: float | None = None  # the recipe's momentum, for both sides (None: the recipe's)
    eval_images: int = 2000      # first N test images for the curve
    eval_points: int = 6         # curve points, evenly spaced over the budget
    seed: int = 0

    def recipe(self) -> Recipe:
        base = registry.get(self.model).recipe
        changes = {k: v for k, v in (("lr", self.lr), ("momentum", self.momentum)) if v is not None}
        return dataclasses.replace(base, epochs=self.epochs, batch_size=self.batch or base.batch_size, **changes)


@dataclass(frozen=True)
class Fleet:
    """The coordinator's choices and the simulated workers."""

    workers: int = 2
    prefetch: bool = True             # a worker takes its next unit just before its result lands
    speed_spread: float = 0.0         # worker speeds uniform in [1 - s, 1 + s] (0: equal, round robin)
    jitter: float = 0.0               # per-unit duration x lognormal(0, jitter)
    strategy: str = "async_sgd"
    params: dict = field(default_factory=lambda: {"staleness": "polynomial"})   # coordinator default
    local_momentum: float | None = None   # unit hyper "momentum" (None: the recipe's)
    nesterov: bool | None = None          # unit hyper "nesterov" (None: the recipe's)
    local_lr_scale: float = 1.0           # unit lr = scale * lr_at(progress)
    shard_size: int = 1000            # images per shard
    shards_per_unit: int = 1
    local_steps: int | None = None    # None: one pass over the unit's images, as the coordinator
    unit_batch: int | None = None     # the unit's batch (None: the recipe's)
    rebase_weights: float = 0.0       # k: a stale delta's weights become d - k (current - base) (1: FedAsync mixing)
    lookahead: float = 0.0            # L: a unit starts from v + L (v - (v-1)) (weights); its delta lands on v
    lr_progress: str = "committed"    # "committed" (coordinator: applied+received+leased) or "received"
    delay_comp: float = 0.0           # lambda: DC-ASGD on deltas, d - lambda d*d (current - base) / (lr steps)
    dc_diagnose: bool = False         # also recompute each stale unit at the current model (not folded): how
                                      # well DC's correction predicts the true change of the delta
    lr_tail: float = 0.0              # over the last this share of the budget the unit lr's factor falls linearly
    lr_tail_scale: float = 0.25       # ... from local_lr_scale to local_lr_scale x this (0.25: 128 / 512, the
                                      # recipe's lr / batch again at the end; the split rule keeps the lr and
                                      # quarters the batch, 2 in flight at 1/2 weight: twice the recipe's)
    average_models: bool = False      # the model is the mean of the workers' latest models (base + delta): a
                                      # result moves it by (its model - the worker's previous model) / workers;
                                      # with async_sgd staleness=constant (the strategy then adds that as is)
    reshuffle_shards: bool = False    # each pass over the shards draws their images anew (one process's
                                      # reshuffling); False: the coordinator's fixed shards of consecutive images


def load_data(lab: Lab):
    data = load_cifar10(lab.data, progress=False)
    x, y = data.train_x[:lab.train_images], data.train_y[:lab.train_images].astype(np.int64)
    test_x, test_y = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y.astype(np.int64))
    calib = torch.from_numpy(np.ascontiguousarray(x[:CALIBRATION_IMAGES]))
    return x, y, test_x, test_y, calib


class Evaluator:
    """Accuracy of a state, with its own batch-norm statistics and with re-estimated ones."""

    def __init__(self, lab: Lab, test_x, test_y, calib) -> None:
        self.model = registry.build(lab.model).to(memory_format=torch.channels_last)
        self.test_x, self.test_y, self.calib, self.n = test_x, test_y, calib, lab.eval_images
        self.recipe = lab.recipe()   # re-estimation augments as the recipe trains, as the coordinator's evaluator

    def __call__(self, state: dict, full: bool = False) -> dict:
        n = len(self.test_y) if full else self.n
        x, y = self.test_x[:n], self.test_y[:n]
        load_arrays(self.model, state)
        loss_plain, acc_plain = evaluate(self.model, x, y)
        recalibrate_bn(self.model, self.calib, crop_pad=self.recipe.crop_pad, flip=self.recipe.flip,
                       reflect=self.recipe.crop_reflect)
        loss, acc = evaluate(self.model, x, y)
        clean = lambda v: v if math.isfinite(v) else None  # noqa: E731
        return {"acc": acc, "loss": clean(loss), "acc_plain": acc_plain, "loss_plain": clean(loss_plain),
                "test_images": n}


def thresholds(budget: int, points: int) -> list[int]:
    return [math.ceil(budget * k / points) for k in range(1, points + 1)]


# ----------------------------------------------------------------------------- one process
def run_baseline(lab: Lab, x, y, evaluator: Evaluator, steps: int | None = None) -> dict:
    """``models.train.train``'s loop (same optimizer, schedule, steps), evaluated at the curve points.

    ``steps`` replaces its ``epochs * (images // batch)`` steps (e.g. to match a distributed run's
    samples exactly); the schedule then spans those steps and epochs are reshuffled as needed.
    """
    recipe = lab.recipe()
    torch.manual_seed(lab.seed)
    gen = torch.Generator().manual_seed(lab.seed)
    model = registry.build(lab.model).to(memory_format=torch.channels_last)
    model.train()
    opt = make_optimizer(model, recipe)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps_per_epoch = max(len(yt) // recipe.batch_size, 1)
    total = steps or steps_per_epoch * recipe.epochs
    marks, curve, step, samples = thresholds(total * recipe.batch_size, lab.eval_points), [], 0, 0
    for _ in range(math.ceil(total / steps_per_epoch)):
        order = torch.randperm(len(yt), generator=gen)
        for i in range(min(steps_per_epoch, total - step)):
            idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            loss = sgd_step(model, opt, xt[idx], yt[idx], recipe, lr_at(step / total, recipe), gen)
            if not math.isfinite(loss):
                raise FloatingPointError(f"baseline diverged at step {step}")
            step, samples = step + 1, samples + len(idx)
            while marks and samples >= marks[0]:
                marks.pop(0)
                curve.append({"samples": samples, "step": step, **evaluator(state_arrays(model))})
    return {"curve": curve, "steps": step, "samples": samples, "final_full": evaluator(state_arrays(model), full=True)}


# ----------------------------------------------------------------------------- N asynchronous workers
@dataclass
class Unit:
    worker: int
    base_version: int
    shards: list[int]
    steps: int
    batch: int
    lr: float
    seed: int
    start: dict | None = None   # the model the worker trains from (None: the base version)
    epoch: int = 0              # the pass over the shards it was cut in (--reshuffle-shards)

    @property
    def samples(self) -> int:
        return self.steps * self.batch


class FleetSim:
    """The coordinator's job in miniature: units out, results in, strategy folds, versions up."""

    def __init__(self, lab: Lab, fleet: Fleet, x, y, evaluator: Evaluator) -> None:
        self.lab, self.fleet, self.x, self.y, self.evaluator = lab, fleet, x, y, evaluator
        self.recipe = lab.recipe()
        self.rng = random.Random(lab.seed)
        torch.manual_seed(lab.seed)
        self.state = state_arrays(registry.build(lab.model))
        self.version, self.versions, self.previous = 0, {0: self.state}, None
        self.strategy = make_strategy(fleet.strategy, **fleet.params)
        self.shards = [(i, min(i + fleet.shard_size, len(y))) for i in range(0, len(y), fleet.shard_size)]
        self.shard_epoch, self.shard_order = -1, []
        self.budget = lab.epochs * len(y)
        self.applied = self.received = self.leased = 0
        self.buffered = 0
        self.in_flight: list[Unit] = []
        self.staleness: list[int] = []
        self.dc_ratio: list[float] = []   # |correction| / |delta| per compensated delta (--delay-comp)
        self.diag: list[dict] = []        # --dc-diagnose, per stale unit
        self.models: dict[int, dict] = {}  # --average-models: each worker's latest model
        if fleet.average_models and (fleet.strategy, fleet.params.get("staleness")) != ("async_sgd", "constant"):
            raise SystemExit("--average-models needs --strategy async_sgd --param staleness=constant")
        self.metrics: list[dict] = []
        self.worker_model = registry.build(lab.model)
        speeds = [1.0 + fleet.speed_spread * (2 * self.rng.random() - 1) for _ in range(fleet.workers)]
        self.speeds = speeds if fleet.speed_spread else [1.0] * fleet.workers
        over = {"momentum": fleet.local_momentum, "nesterov": fleet.nesterov}
        self.hyper = {k: over[k] if over.get(k) is not None else getattr(self.recipe, k) for k in HYPER_KEYS}

    # --- the unit factory (coordinator/job.py next_unit)
    def _take_shards(self) -> list[int]:
        picked = []
        while len(picked) < self.fleet.shards_per_unit:
            if not self.shard_order:
                self.shard_epoch += 1
                order = list(range(len(self.shards)))
                random.Random(self.lab.seed * 1_000_003 + self.shard_epoch).shuffle(order)
                self.shard_order = order
            picked.append(self.shard_order.pop(0))
        return picked

    def tail_factor(self, done: int) -> float:
        """``lr_tail``: 1 until the last ``lr_tail`` share of the budget, then linearly down to ``lr_tail_scale``."""
        tail = self.fleet.lr_tail
        if tail <= 0:
            return 1.0
        into = min(1.0, max(0.0, (done / self.budget - (1 - tail)) / tail))
        return 1.0 - (1.0 - self.fleet.lr_tail_scale) * into

    def issue(self, worker: int) -> Unit | None:
        committed = self.applied + self.received + self.leased
        if committed >= self.budget:
            return None
        shards = self._take_shards()
        n = sum(b - a for a, b in (self.shards[s] for s in shards))
        batch = min(self.fleet.unit_batch or self.recipe.batch_size, n)
        steps = self.fleet.local_steps or max(1, math.ceil(n / batch))
        done = committed if self.fleet.lr_progress == "committed" else self.applied + self.received
        lr = lr_at(done / self.budget, self.recipe)
        lr = (lr if lr > 0 else self.recipe.lr * 1e-3) * self.fleet.local_lr_scale * self.tail_factor(done)
        unit = Unit(worker, self.version, shards, steps, batch, lr, self.rng.randrange(2**31), epoch=self.shard_epoch)
        if self.fleet.lookahead and self.previous is not None:
            L = self.fleet.lookahead
            unit.start = {k: v if is_running_stat(k) else (v + L * (v - self.previous[k])).astype(np.float32)
                          for k, v in self.state.items()}
        self.leased += unit.samples
        return unit

    # --- a result comes back (coordinator/job.py _submit, _offer, _aggregate)
    def deliver(self, unit: Unit) -> None:
        self.leased -= unit.samples
        rows = np.concatenate([np.arange(*self.shards[s]) for s in unit.shards])
        if self.fleet.reshuffle_shards:
            rows = np.random.RandomState(self.lab.seed * 1_000_003 + unit.epoch).permutation(len(self.y))[rows]
        recipe = Recipe(batch_size=unit.batch, **self.hyper)     # as worker_py/runner.py builds it
        base = self.versions[unit.base_version]
        start = unit.start if unit.start is not None else base
        res = run_local(self.lab.model, start, self.x[rows], self.y[rows], recipe, unit.steps, unit.lr, unit.seed,
                        model=self.worker_model)
        delta = res.delta
        if self.fleet.average_models:
            mine = {n: (base[n] + d).astype(np.float32) for n, d in delta.items()}
            before = self.models.get(unit.worker, base)
            delta = {n: ((mine[n] - before[n]) / self.fleet.workers).astype(np.float32) for n in delta}
            self.models[unit.worker] = mine
        elif unit.base_version != self.version and any(is_running_stat(n) for n in delta):
            delta = rebase_running_stats(delta, base, self.state)
        if unit.base_version != self.version and self.fleet.rebase_weights:
            k = self.fleet.rebase_weights
            delta = {n: d if is_running_stat(n) else (d - k * (self.state[n] - base[n])).astype(np.float32)
                     for n, d in delta.items()}
        if unit.base_version != self.version and self.fleet.dc_diagnose:
            self.diagnose(delta, base, unit, rows, recipe)
        if unit.base_version != self.version and self.fleet.delay_comp:
            delta = self.delay_compensate(delta, base, unit)
        self.staleness.append(self.version - unit.base_version)
        self.received += res.num_samples
        if self.strategy.add(Update(delta, unit.base_version, res.num_samples, f"w{unit.worker}", res.loss_after),
                             self.version):
            self.aggregate()

    def delay_compensate(self, delta: dict, base: dict, unit: Unit) -> dict:
        """DC-ASGD (Zheng et al., ICML 2017) on a unit's delta: with g ~ -d / (lr k), the first-order
        change of d from the base model w_b to the current w_t, with the Hessian approximated by
        lambda g * g (elementwise), is -lr k lambda g*g (w_t - w_b) = -lambda d*d (w_t - w_b) / (lr k).
        Weights only (running statistics are rebased, not compensated)."""
        lam, scale = self.fleet.delay_comp, 1.0 / (unit.lr * unit.steps)
        out, corr_sq, d_sq = {}, 0.0, 0.0
        for n, d in delta.items():
            if is_running_stat(n) or not np.issubdtype(d.dtype, np.floating):
                out[n] = d
                continue
            c = (lam * scale) * d * d * (self.state[n] - base[n])
            out[n] = (d - c).astype(np.float32)
            corr_sq += float(np.dot(c.ravel(), c.ravel()))
            d_sq += float(np.dot(d.ravel().astype(np.float64), d.ravel()))
        self.dc_ratio.append(math.sqrt(corr_sq / d_sq) if d_sq else 0.0)
        return out

    def diagnose(self, delta: dict, base: dict, unit: Unit, rows, recipe: Recipe) -> None:
        """The same unit (images, seed, lr) recomputed from the current model: the true change of
        the delta t = d(w_t) - d(w_b) against DC's direction -d*d (w_t - w_b) / (lr k) (weights only).
        Records |t| / |d|, the cosine, and the least-squares lambda (t ~ lambda x direction)."""
        fresh = run_local(self.lab.model, self.state, self.x[rows], self.y[rows], recipe, unit.steps, unit.lr,
                          unit.seed, model=self.worker_model).delta
        tt = tc = cc = dd = 0.0
        for n, d in delta.items():
            if is_running_stat(n) or not np.issubdtype(d.dtype, np.floating):
                continue
            d64 = d.astype(np.float64).ravel()
            t = fresh[n].astype(np.float64).ravel() - d64
            c = -(d64 * d64 * (self.state[n] - base[n]).astype(np.float64).ravel()) / (unit.lr * unit.steps)
            tt, tc, cc, dd = tt + t @ t, tc + t @ c, cc + c @ c, dd + d64 @ d64
        self.diag.append({"true_rel": math.sqrt(tt / dd), "cos": tc / math.sqrt(tt * cc) if tt and cc else 0.0,
                          "lambda_fit": tc / cc if cc else 0.0,
                          "drift_rel": math.sqrt(sum(float(np.sum((self.state[n] - base[n]).astype(np.float64) ** 2))
                                                     for n in delta if not is_running_stat(n)) / dd)})

    def aggregate(self) -> None:
        new, metrics = self.strategy.aggregate(self.state, self.version)
        if metrics["updates"]:
            self.previous = self.state
            self.state = sanitize_state(new)
            self.version += 1
            self.versions[self.version] = self.state
            self.metrics.append({k: metrics[k] for k in ("updates", "staleness_mean", "step_norm",
                                                         "update_norm_mean") if k in metrics})
        self.applied += self.received
        self.received = 0
        keep = {u.base_version for u in self.in_flight} | {self.version}
        self.versions = {v: s for v, s in self.versions.items() if v in keep}

    def run(self) -> dict:
        fleet, heap, seq = self.fleet, [], 0
        marks, curve = thresholds(self.budget, self.lab.eval_points), []

        def start(worker: int, now: float) -> None:
            nonlocal seq
            unit = self.issue(worker)
            if unit is None:
                return
            self.in_flight.append(unit)
            duration = unit.samples / self.speeds[worker]
            if fleet.jitter:
                duration *= math.exp(self.rng.gauss(0.0, fleet.jitter))
            heapq.heappush(heap, (now + duration, seq, unit))
            seq += 1

        for w in range(fleet.workers):
            start(w, 0.0)
        while heap:
            now, _, unit = heapq.heappop(heap)
            self.in_flight.remove(unit)
            if fleet.prefetch:
                start(unit.worker, now)
            self.deliver(unit)
            if not fleet.prefetch:
                start(unit.worker, now)
            if not heap and self.received:
                self.aggregate()               # budget reached: fold what is buffered (Job._finish)
            if not heap:
                marks = marks[-1:]             # the end: one last point
            while marks and (self.applied >= marks[0] or not heap):
                marks.pop(0)
                curve.append({"samples": self.applied, "version": self.version, **self.evaluator(self.state)})
        if self.received:
            self.aggregate()
        s = self.staleness
        return {"curve": curve, "samples": self.applied, "versions": self.version, "units": len(s),
                "staleness": {"mean": float(np.mean(s)), "max": int(max(s)), "min": int(min(s))},
                "aggregations": self.metrics, "final_full": self.evaluator(self.state, full=True),
                **({"dc_ratio": {"mean": float(np.mean(self.dc_ratio)), "max": float(max(self.dc_ratio)),
                                 "per_unit": [round(r, 5) for r in self.dc_ratio]}} if self.dc_ratio else {}),
                **({"dc_diagnose": self.diag} if self.diag else {})}


# ----------------------------------------------------------------------------- logging
def baseline_path(lab: Lab, steps: int | None = None) -> Path:
    r = lab.recipe()
    extra = "".join(f"-{k}{v}" for k, v in (("lr", lab.lr), ("m", lab.momentum), ("steps", steps)) if v is not None)
    return OUT / f"baseline-b{r.batch_size}-n{lab.train_images}-e{lab.epochs}{extra}-s{lab.seed}.json"


def at_samples(curve: list[dict], samples: int, key: str = "acc") -> float | None:
    """The baseline's accuracy at ``samples`` (linear between its curve points)."""
    pts = [(0, None)] + [(r["samples"], r[key]) for r in curve]
    for (s0, a0), (s1, a1) in zip(pts, pts[1:]):
        if samples <= s1:
            return a1 if a0 is None or s1 == s0 else a0 + (a1 - a0) * (samples - s0) / (s1 - s0)
    return pts[-1][1]


def auto_tag(lab: Lab, fleet: Fleet, hyper: dict) -> str:
    """A file name from what differs from the defaults."""
    default = Fleet()
    parts = [f"n{fleet.workers}", fleet.strategy, *(f"{k}{v}" for k, v in fleet.params.items()),
             f"lm{hyper['momentum']}", f"b{lab.recipe().batch_size}"]
    for f in dataclasses.fields(Fleet):
        if f.name not in ("workers", "strategy", "params", "local_momentum") and \
                getattr(fleet, f.name) != getattr(default, f.name):
            parts.append(f"{f.name.replace('_', '')}{getattr(fleet, f.name)}")
    parts += [f"{k}{v}" for k, v in (("lr", lab.lr), ("m", lab.momentum)) if v is not None]
    if (lab.train_images, lab.epochs) != (Lab.train_images, Lab.epochs):
        parts.append(f"data{lab.train_images}x{lab.epochs}")
    return "-".join(parts + [f"s{lab.seed}"])


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def table(out: Path = OUT) -> str:
    """Every result in ``out`` as one markdown table (distributed runs next to their baselines)."""
    records = {f.stem: json.loads(f.read_text()) for f in sorted(out.glob("*.json"))}
    base = {k: r for k, r in records.items() if r["kind"] == "baseline"}
    lines = ["| N | strategy (params) | prefetch | local momentum | unit batch x steps (lr scale) | staleness mean "
             "| acc 2k (%) | acc 10k (%) | one process, same seed: 2k / 10k (%) | data | file |",
             "|---:|---|---|---:|---|---:|---:|---:|---|---|---|"]
    for name, r in records.items():
        lab, acc, full = r["lab"], 100 * r["curve"][-1]["acc"], 100 * r["final_full"]["acc"]
        data = f"{lab['train_images']}x{lab['epochs']}, seed {lab['seed']}"
        if r["kind"] == "baseline":
            rec = r["recipe"]
            lines.append(f"| 1 | one process (b{rec['batch_size']}, lr {rec['lr']}, momentum {rec['momentum']}, "
                         f"{r['steps']} steps) | - | - | - | - | {acc:.2f} | {full:.2f} | - | {data} | {name} |")
            continue
        f, h = {**dataclasses.asdict(Fleet()), **r["fleet"]}, r["hyper"]   # older records lack newer fields
        params = ", ".join(f"{k}={v}" for k, v in f["params"].items())
        unit_batch = f["unit_batch"] or r["recipe"]["batch_size"]
        steps = f["local_steps"] or math.ceil(f["shard_size"] * f["shards_per_unit"] / unit_batch)
        extras = [f"{k}={f[k]}" for k in ("rebase_weights", "lookahead", "lr_progress", "jitter", "speed_spread",
                                          "delay_comp", "dc_diagnose")
                  if f[k] != getattr(Fleet(), k)]
        if f.get("momentum_tail"):    # a variant tried once and removed (README, "Second round")
            extras.append(f"momentum_tail={f['momentum_tail']}")
        same = [x for x in base.values() if {**Lab().__dict__, **x["lab"]} == {**Lab().__dict__, **lab}]
        b = min(same, key=lambda x: abs(x["samples"] - r["samples"]), default=None)   # closest in samples
        bt = "-"
        if b:
            bt = f"{100 * b['curve'][-1]['acc']:.2f} / {100 * b['final_full']['acc']:.2f} ({b['steps']} steps)"
        lines.append(f"| {f['workers']} | {f['strategy']} ({params}{'; ' if extras and params else ''}"
                     f"{', '.join(extras)}) | {'yes' if f['prefetch'] else 'no'} | {h['momentum']} | "
                     f"{unit_batch} x {steps} ({f['local_lr_scale']:g}) | {r['staleness']['mean']:.2f} | {acc:.2f} | "
                     f"{full:.2f} | {bt} | {data} | {name} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("baseline", "run", "table"))
    p.add_argument("--tag", help="result file name (default: built from the config)")
    p.add_argument("--note", default="", help="free text saved with the result")
    for f in dataclasses.fields(Lab):
        kind = type(f.default) if f.default is not None else float if f.name in ("lr", "momentum") else int
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    p.add_argument("--baseline-steps", type=int, help="baseline: this many steps instead of epochs' worth")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--speed-spread", type=float, default=0.0)
    p.add_argument("--jitter", type=float, default=0.0)
    p.add_argument("--strategy", default="async_sgd")
    p.add_argument("--param", action="append", default=[], help="NAME=VALUE strategy parameter")
    p.add_argument("--local-momentum", type=float)
    p.add_argument("--nesterov", type=parse_value)
    p.add_argument("--local-lr-scale", type=float, default=1.0)
    p.add_argument("--shards-per-unit", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--local-steps", type=int)
    p.add_argument("--unit-batch", type=int)
    p.add_argument("--rebase-weights", type=float, default=0.0)
    p.add_argument("--lookahead", type=float, default=0.0)
    p.add_argument("--lr-progress", choices=("committed", "received"), default="committed")
    p.add_argument("--lr-tail", type=float, default=0.0,
                   help="over the last this share of the budget, the unit lr's factor falls linearly to --lr-tail-scale")
    p.add_argument("--lr-tail-scale", type=float, default=0.25)
    p.add_argument("--average-models", action="store_true",
                   help="the model is the mean of the workers' latest models (needs --param staleness=constant)")
    p.add_argument("--reshuffle-shards", action="store_true",
                   help="each pass over the shards draws their images anew (the coordinator's shards are fixed)")
    p.add_argument("--dc-diagnose", action="store_true",
                   help="recompute each stale unit from the current model (not folded) and compare with DC")
    p.add_argument("--delay-comp", type=float, default=0.0,
                   help="lambda of DC-ASGD on deltas: d - lambda d*d (current - base) / (unit lr x steps)")
    args = p.parse_args(argv)
    if args.mode == "table":
        print(table())
        return 0
    torch.set_num_threads(1)
    lab = Lab(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Lab)})
    x, y, test_x, test_y, calib = load_data(lab)
    evaluator = Evaluator(lab, test_x, test_y, calib)
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "hardware": hardware(), "commit": commit(),
              "threads": torch.get_num_threads(), "lab": dataclasses.asdict(lab), "recipe": lab.recipe().to_dict(),
              "note": args.note}
    t0 = time.perf_counter()
    if args.mode == "baseline":
        record.update(kind="baseline", **run_baseline(lab, x, y, evaluator, args.baseline_steps))
        path = OUT / f"{args.tag}.json" if args.tag else baseline_path(lab, args.baseline_steps)
    else:
        params = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.param)}
        if args.strategy == "async_sgd" and not args.param:
            params = Fleet().params               # the coordinator's default (config.DEFAULT_STRATEGY_PARAMS)
        fleet = Fleet(workers=args.workers, prefetch=not args.no_prefetch, speed_spread=args.speed_spread,
                      jitter=args.jitter, strategy=args.strategy, params=params,
                      local_momentum=args.local_momentum, nesterov=args.nesterov, local_lr_scale=args.local_lr_scale,
                      shard_size=args.shard_size, shards_per_unit=args.shards_per_unit, local_steps=args.local_steps,
                      unit_batch=args.unit_batch, rebase_weights=args.rebase_weights,
                      lookahead=args.lookahead,
                      lr_progress=args.lr_progress, delay_comp=args.delay_comp,
                      dc_diagnose=args.dc_diagnose, lr_tail=args.lr_tail, lr_tail_scale=args.lr_tail_scale,
                      average_models=args.average_models, reshuffle_shards=args.reshuffle_shards)
        sim = FleetSim(lab, fleet, x, y, evaluator)
        record.update(kind="fleet", fleet=dataclasses.asdict(fleet), hyper=sim.hyper, **sim.run())
        matched = baseline_path(lab, math.ceil(record["samples"] / lab.recipe().batch_size))
        for key, base in (("baseline", baseline_path(lab)), ("baseline_matched", matched)):
            if not base.exists():
                continue
            b = json.loads(base.read_text())
            record[key] = {"file": base.name, "samples": b["samples"], "acc_final": b["curve"][-1]["acc"],
                           "acc_plain_final": b["curve"][-1]["acc_plain"],
                           "acc_at_same_samples": at_samples(b["curve"], record["samples"]),
                           "acc_full_final": b["final_full"]["acc"]}
        tag = args.tag or auto_tag(lab, fleet, sim.hyper)
        path = OUT / f"{tag}.json"
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    write(path, record)
    last = record["curve"][-1]
    extra = ""
    for key in ("baseline", "baseline_matched"):
        if key in record:
            extra += f"; {key} {100 * record[key]['acc_final']:.2f}% (full {100 * record[key]['acc_full_final']:.2f}%)"
    print(f"{path.name}: {100 * last['acc']:.2f}% (plain {100 * last['acc_plain']:.2f}%, full test "
          f"{100 * record['final_full']['acc']:.2f}%) at {record['samples']} samples{extra}; "
          f"curve {[round(100 * r['acc'], 1) for r in record['curve']]}; {record['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
