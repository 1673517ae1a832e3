"""The coordinator's configuration: one dataclass that checks itself, and its flags.

Each field states its default, help, bounds or choices, group and flag once, in its
metadata (``option(...)``). ``__post_init__`` checks values against it;
``add_config_arguments`` / ``config_from_args`` make the ``crowdtrain coordinator`` (and
``crowdtrain run``) flags from it; the simulator's scenario schema takes its
``[coordinator]`` keys and the checks of its ``[model]`` keys from it. Unset model-dependent
fields (batch size, learning rate, epochs) come from the model's registered recipe.

One policy per concern: a result staler than ``max_staleness`` is refused or dropped
(``on_stale``); a delta above ``max_delta_norm`` is refused or clipped (``on_large_norm``).
The strategy wrappers' own ``max_staleness`` / ``max_norm`` parameters are therefore not
accepted in ``strategy_params``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

DEFAULT_STRATEGY = {"dense": "async_sgd", "supermask": "supermask_max"}
# Parameters used with the default strategy when none are given: Downpour-style async SGD,
# each delta damped by 1 / (1 + staleness) (staleness-aware async SGD, Zhang et al. 2016). Measured
# in bench/parity_lab.py (bench/results/parity_lab/README.md): with 8 workers the former
# (1 + staleness)^-0.5 stalls near 20% test accuracy where 1 / (1 + s) reaches 32% (30k samples) and
# 49% (100k); with 2 workers the two are within noise.
DEFAULT_STRATEGY_PARAMS = {"async_sgd": {"staleness": "polynomial", "staleness_a": 1.0}}
LATE_POLICIES = ("use", "drop")
STALE_POLICIES = ("refuse", "drop")
NORM_POLICIES = ("refuse", "clip")
REPLICATION_POLICIES = ("off", "adaptive")

# The help output's sections, in order.
GROUPS = {
    "job": "the job: model, aggregation, budget",
    "data": "data",
    "units": "work units",
    "leases": "leases (how long a worker may hold a unit)",
    "checks": "checks on results",
    "evaluation": "evaluation",
    "storage": "storage",
    "service": "HTTP service",
}

# Strategy parameters that restate a coordinator policy: parameter -> (policy field, value, bound field).
POLICY_PARAMS = {"max_staleness": ("on_stale", "drop", "max_staleness"),
                 "max_norm": ("on_large_norm", "clip", "max_delta_norm")}


class OptionError(ValueError):
    """A bad option value: ``coordinator option 'NAME': expected ..., got ...``."""

    def __init__(self, name: str, expected: str, got: Any):
        self.name, self.expected, self.got = name, expected, got
        super().__init__(f"coordinator option '{name}': expected {expected}, got {got!r}")


def _models() -> tuple[str, ...]:
    from models.registry import MODELS

    return tuple(MODELS)


def _strategies() -> tuple[str, ...]:
    from coordinator.strategies import STRATEGIES

    return tuple(STRATEGIES)


def _is_robust(spec: str) -> bool:
    from coordinator.strategies.robust import is_robust_spec

    return is_robust_spec(spec)


def _is_codec(name: str) -> bool:
    from contract.codecs import get_codec
    from contract.errors import ContractError

    try:
        get_codec(name)
    except ContractError:
        return False
    return True


def option(kind: type, default: Any, help: str, group: str, *, flag: str | None = None, lo: float | None = None,
           lo_open: bool = False, hi: float | None = None, choices: tuple[str, ...] | Callable[[], tuple] | None = None,
           none: str | None = None, valid: Callable[[Any], bool] | None = None, expected: str | None = None,
           at_least: str | None = None, cli_default: Any = MISSING, shown: str | None = None,
           metavar: str | None = None) -> Any:
    """A config field with everything the checks, the flags and the scenario schema need.

    ``kind``: int, float, str, bool, Path or dict. ``lo``/``hi``: bounds (``lo_open``: > lo).
    ``choices``: allowed strings, or a function returning them (a registry, read lazily).
    ``none``: what None means, when it is allowed (shown as the default in --help).
    ``valid``/``expected``: an extra check and its text. ``at_least``: another field this one
    must not be below. ``cli_default``: the flag's default for a field without one.
    ``shown``: the default as --help writes it.
    """
    assert group in GROUPS, group
    meta = {"kind": kind, "help": help, "group": group, "flag": flag, "lo": lo, "lo_open": lo_open, "hi": hi,
            "choices": choices, "none": none, "valid": valid, "expected": expected, "at_least": at_least,
            "cli_default": cli_default, "shown": shown, "metavar": metavar}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class CoordinatorConfig:
    # storage (state first: the one field without a default)
    state: Path = option(Path, MISSING, "state directory: state.db, blobs/ and the lease key; the same directory "
                         "resumes the job", "storage", cli_default=Path("state"), shown="./state", metavar="DIR")
    keep_versions: int = option(int, 8, "model versions kept besides those that leased units still need",
                                "storage", lo=1)
    persist_every_s: float = option(float, 10.0, "write the model and the strategy's state durably at most this "
                                    "often, seconds (a unit's base is written when the unit is cut; after a crash "
                                    "the result log replays what was folded since); 0: every version", "storage",
                                    lo=0, metavar="S")
    persist_every_versions: int = option(int, 100, "... or once this many versions were folded since the last "
                                         "write, whichever comes first", "storage", lo=1, metavar="N")
    # job
    model: str = option(str, "resnet_fast", "registered model (see `crowdtrain models`)", "job", choices=_models,
                        metavar="NAME")
    strategy: str | None = option(str, None, "aggregation strategy", "job", choices=_strategies,
                                  none="async_sgd, or supermask_max for supermask models")
    strategy_params: dict = option(dict, {}, "a strategy parameter, e.g. --param buffer_size=4; repeatable", "job",
                                   flag="--param", shown="none; the default async_sgd runs with staleness=polynomial",
                                   metavar="NAME=VALUE")
    robust: str = option(str, "adaptive_clip", "robust aggregation around the strategy: none, adaptive_clip[:M] "
                         "(clip above M x the median recent norm, M=4), centered_clip[:R], trimmed_mean[:F] or "
                         "median (coordinate-wise, for buffers of 3 or more)", "job", valid=_is_robust,
                         expected="none, adaptive_clip[:multiplier], centered_clip[:radius], trimmed_mean[:trim] "
                         "or median", metavar="SPEC")
    lookahead: str = option(
        str, "recipe", "a running average of the versions, synced every 5 of one process's batches of folded samples "
        "and kept more of as the job nears its budget (airbench94's lookahead, done by the coordinator; "
        "strategies.wrappers.Lookahead): recipe (when the model's recipe says lookahead, e.g. airbench), on or off",
        "job", choices=("recipe", "on", "off"))
    job: str = option(str, "cifar10", "job name", "job")
    seed: int = option(int, 0, "seeds the initial model, the shard order and the unit seeds", "job", lo=0)
    epochs: float | None = option(float, None, "sample budget, in passes over the training split", "job", lo=0,
                                  lo_open=True, none="the model's recipe")
    # data
    data: str | None = option(str, None, "CIFAR-10 path: archive, folder or image-folder layout", "data",
                              none="$CROWDTRAIN_DATA", metavar="PATH")
    download: bool = option(bool, False, "download the official archive if no data is found", "data", shown="off")
    limit_train: int | None = option(int, None, "use only the first N training images (tests, demos)", "data",
                                     lo=1, none="the whole split", metavar="N")
    shard_size: int = option(int, 1000, "images per data shard blob", "data", lo=1)
    # units
    shards_per_unit: int = option(int, 1, "data shards a unit trains on", "units", lo=1)
    local_steps: int | None = option(int, None, "SGD steps per unit (with replicated checks on, at most "
                                     "--check-max-steps for a worker that is not the operator's own)", "units", lo=1,
                                     none="one pass over the unit's shards")
    batch_size: int | None = option(int, None, "samples per SGD step", "units", lo=1, none="the model's recipe")
    lr: float | None = option(float, None, "peak learning rate of the schedule", "units", lo=0, lo_open=True,
                              none="the model's recipe")
    unit_batch_scale: float | None = option(
        float, None, "when --batch-size is not given, units train at this fraction of the recipe's batch size (at "
        "the recipe's learning rate, see --unit-lr): with 2 real workers at resnet_fast's full budget an eighth of "
        "the batch (64 x 16 steps a unit) ended 0.26 points behind one process on the mean of 8 seeds, a quarter "
        "(128 x 8) 0.71 on 6 (+0.32 for the eighth, 5 seeds of 6 ahead), a sixteenth (32 x 32) 1.0 on 1; at 30k "
        "samples a quarter beat half the batch by +5.6 on 3 seeds (docs/results.md, bench/parity.py, "
        "bench/parity_lab.py); a tab's step runs as many samples a second at 64 as at 128; airbench's quarter "
        "(4 x 256 a unit) ended 0.41 and 0.65 behind one process with 2 real workers (2 seeds) where its eighth "
        "ended 2.27 behind (1 seed); 1 = the recipe's batch",
        "units", lo=0, lo_open=True, hi=1.0,
        none="the model's: an eighth, airbench a quarter; crowdtrain models --recipes")
    unit_batch_workers: bool = option(
        bool, True, "when --batch-size is not given, with more than 2 Python workers in flight a dense model's unit "
        "batch is divided further by workers / 2 (a power of two, at least 32), its lr alike with --unit-lr split: "
        "N units trained at once from one model act like one step at N times the batch, so smaller steps keep the "
        "sequential depth (measured with 8 simulated workers, docs/results.md); tabs keep the step graph's batch",
        "units", shown="on")
    unit_lr: str = option(
        str, "split", "the learning rate of a unit whose batch is smaller than the recipe's: split (the schedule's "
        "lr at the unit batch scale, scaled down alike when the batch is split over the workers in flight), "
        "recipe (the schedule's lr whatever the batch) or linear (scaled with the batch, the linear scaling "
        "rule); each delta is also weighted by its staleness, so linear learns at about half the recipe's rate "
        "per sample with 2 workers (measured, docs/results.md: 2 workers, split and recipe +3.2 points over "
        "linear; 8 simulated workers under churn, split +1.8 to +6.0 over recipe and linear)", "units",
        choices=("recipe", "split", "linear"))
    dynamic_steps: bool = option(
        bool, False, "Python workers: a unit of a worker slower than the fastest one in flight gets fewer steps, "
        "so that it takes about as long as the fastest worker's whole unit (the dynamic local updates of Liu et "
        "al. 2024, 'Asynchronous Local-SGD Training for Language Modeling'); a worker whose speed is not known "
        "yet gets a whole unit. Measured without gain: 8 and 32 simulated workers under heavy churn, 100k samples, "
        "+0.6 and -1.1 points, and the job took longer (docs/results.md)", "units", shown="off")
    flight_samples: int | None = option(
        int, None, "Python workers: with more workers in flight than this many samples' worth of whole units, a "
        "unit trains about this / (workers in flight) samples (a random part of its shards, at least one step), so "
        "that the samples a unit's base lacks stay about this many whatever the fleet's size (measured: 32 simulated "
        "workers under heavy churn, 100k samples, 8000: +3.0 points, 8 workers within noise; docs/results.md)",
        "units", lo=1,
        none="a unit trains its whole shards", metavar="SAMPLES")
    unit_momentum: float | None = option(
        float, None, "SGD momentum of every unit (each unit starts its momentum from zero), instead of the model "
        "recipe's. Measured without gain: 0.5 with the peak lr raised 5x (the same lr / (1 - momentum)), 8 and 32 "
        "simulated workers under heavy churn, -3.2 and -3.8 points at 34k samples (docs/results.md)", "units", lo=0,
        hi=0.999, none="the model's recipe", metavar="BETA")
    unit_seconds: float | None = option(
        float, 30.0, "browser tabs: a tab's unit is sized from its measured speed (issue to result) to take about "
        "this long, in steps at the step graph's one batch size (at most 4x its previous unit; off when --local-steps "
        "is given); a tab whose speed is not known yet gets one step, on a slice of a shard and the model version as fp16, "
        "so a first visit sees its first unit accepted within seconds; Python workers' units are not sized", "units",
        lo=0, lo_open=True, none="tabs get the same units as Python workers", metavar="SECONDS")
    codec: str = option(str, "fp16", "delta codec asked of workers: fp32, fp16, int8, topk[:fraction]", "units",
                        valid=_is_codec, expected="a codec: fp32, fp16, int8 or topk:<fraction>")
    version_download: str = option(
        str, "delta", "how a unit's model version reaches a worker: delta (a compressed difference from a version the "
        "worker says it holds, else fp16), fp16 (the whole version as fp16), fp32 (the whole version; a tab's first "
        "unit still gets fp16); a replica gets the blob its original trained from", "units",
        choices=("delta", "fp16", "fp32"))
    # leases
    lease_min_s: float = option(float, 20.0, "shortest lease, seconds", "leases", flag="--lease-min", lo=0,
                                lo_open=True)
    lease_max_s: float = option(float, 1800.0, "longest lease, seconds", "leases", flag="--lease-max", lo=0,
                                lo_open=True, at_least="lease_min_s")
    lease_first_s: float = option(float, 120.0, "lease of a worker's first unit (cold caches), seconds", "leases",
                                  flag="--lease-first", lo=0, lo_open=True)
    lease_factor: float = option(float, 3.0, "lease = factor x the worker's expected seconds + 10 s, clamped to "
                                 "[lease-min, lease-max]", "leases", lo=0, lo_open=True)
    late_results: str = option(str, "use", "a result that arrives after its lease expired: use it, or drop it "
                               "(410 lease_expired)", "leases", choices=LATE_POLICIES)
    # checks
    max_staleness: int | None = option(int, 64, "versions a result's base may be behind the current model",
                                       "checks", lo=0, none="no cap", metavar="N")
    stale_median: float | None = option(
        float, None, "also refuse a result staler than this many times the median staleness of the last results "
        "to arrive, at least --stale-floor and at most --max-staleness: a cap that follows the fleet (a few workers "
        "see none; in a large or uneven fleet the slowest workers' results are refused, a browser tab's among "
        "faster Python workers too); with on-stale refuse. Measured (docs/results.md): 32 simulated workers under "
        "heavy churn, +2.5 points at equal applied samples for 18-28% more computing, +0.2 at equal computing",
        "checks", lo=0, lo_open=True, none="no such cap", metavar="FACTOR")
    stale_floor: int = option(int, 8, "the lowest cap --stale-median sets, in versions", "checks", lo=0)
    on_stale: str = option(str, "refuse", "a result staler than max-staleness: refuse it (409 too_stale), or "
                           "accept it and let the aggregator drop it (reason recorded)", "checks",
                           choices=STALE_POLICIES)
    max_delta_norm: float = option(float, 1e4, "largest global L2 norm of a delta", "checks", lo=0, lo_open=True,
                                   metavar="NORM")
    on_large_norm: str = option(str, "refuse", "a delta whose norm is above max-delta-norm: refuse it (422 "
                                "norm_bound), or clip it to that norm", "checks", choices=NORM_POLICIES)
    body_slack_bytes: int = option(int, 1 << 20, "request body cap = fp32 size of a delta + this many bytes",
                                   "checks", lo=1)
    replication: str = option(str, "adaptive", "replicated spot checks (coordinator/trust.py): adaptive: another "
                              "worker recomputes a result, which is held until the two agree; every result of a "
                              "worker without 10 agreeing results in a row is checked, then 1 in that run (at least "
                              "1 in 50); two lost checks quarantine a worker (its results are never folded); the "
                              "operator's own workers (--trusted-tokens) are not checked; off: every result is "
                              "folded unchecked (robust aggregation only)",
                              "checks", choices=REPLICATION_POLICIES)
    replica_wait_s: float = option(float, 120.0, "a held result whose replica has not come back after this many "
                                   "seconds is recomputed by the coordinator itself (at once when no other worker "
                                   "of its backend asked for work within as many seconds)", "checks",
                                   flag="--replica-wait",
                                   lo=0, lo_open=True)
    check_max_steps: int = option(int, 8, "with --replication adaptive, the most SGD steps of a unit of a worker "
                                  "that may be checked (not the operator's own, --trusted-tokens; units are cut "
                                  "to it): two honest computations of a longer unit drift apart past the check's "
                                  "tolerance (measured: a tab's resnet_fast unit against the coordinator's "
                                  "recomputation, 1 - cosine 2.3e-3 at 9 steps of 128, 0.03 to 0.06 at 12 and 13; "
                                  "docs/results.md)", "checks", lo=1, metavar="N")
    # evaluation
    eval_every_s: float = option(float, 30.0, "evaluate the current model at most this often, seconds, and "
                                 "evaluating at most a tenth of the time (after an evaluation that took t s, at "
                                 "least 9t s later); the final model as soon as the job finishes",
                                 "evaluation", flag="--eval-every", lo=0, lo_open=True)
    eval_images: int | None = option(int, None, "test images per evaluation", "evaluation", lo=1,
                                     none="the whole test split", metavar="N")
    # service
    host: str = option(str, "127.0.0.1", "address to listen on", "service")
    port: int = option(int, 8080, "TCP port to listen on", "service", lo=0, hi=65535)
    unit_rate_worker: float | None = option(float, 120.0, "unit requests a worker id may make per minute (bursts of "
                                            "a sixth of it); above it: 429 with Retry-After; not for loopback "
                                            "addresses", "service", lo=0, lo_open=True, none="no limit", metavar="N")
    unit_rate_address: float | None = option(float, 600.0, "unit requests one address may make per minute, all its "
                                             "worker ids together (bursts of a sixth of it); not for loopback "
                                             "addresses", "service", lo=0, lo_open=True, none="no limit", metavar="N")
    worker_tokens: Path | None = option(Path, None, "file of operator-issued worker tokens, one a line: unit "
                                        "requests and results must carry 'Authorization: Bearer <token>' (401 "
                                        "otherwise; closed deployments)", "service", none="anyone may work",
                                        metavar="FILE")
    trusted_tokens: Path | None = option(Path, None, "file of tokens of the operator's own workers, one a line: a "
                                         "worker whose unit requests and results carry one ('Authorization: Bearer "
                                         "<token>') is trusted from the start: its results are folded without a "
                                         "replicated check (it still checks others'), and it is let in under "
                                         "--worker-tokens too; `crowdtrain run` makes one for its local workers",
                                         "service", none="no worker is trusted unchecked", metavar="FILE")
    admin_token_file: Path | None = option(Path, None, "file of operator tokens, one a line: the admin API "
                                           "(/api/v1/admin/jobs: list, add, pause, resume and remove jobs of this "
                                           "process; `crowdtrain jobs`) takes requests carrying 'Authorization: "
                                           "Bearer <token>' (401 otherwise); the embedded SQLite store only",
                                           "service", none="the admin API is off (404)", metavar="FILE")
    access_log: str = option(str, "off", "json: one JSON line per request on stderr (logger crowdtrain.access: time, "
                             "method, route template, status, duration_ms, bytes, client address); off: no access "
                             "log (a proxy in front, e.g. Caddy, can keep its own)", "service", choices=("off", "json"))
    browser_graph: str = option(str, "at-start", "when to build the browser's training step graph of a job's model "
                                "and batch size (an ONNX export: a minute or more of one core the first time, then "
                                "read from the cache): at-start, so that the first tab does not wait for it; "
                                "on-demand, when the first tab asks (a coordinator for headless workers only never "
                                "spends it)", "service", choices=("at-start", "on-demand"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_option(f.name, getattr(self, f.name)))
        for f in dataclasses.fields(self):
            other = f.metadata["at_least"]
            if other and getattr(self, other) is not None and getattr(self, f.name) < getattr(self, other):
                kind = "an integer" if f.metadata["kind"] is int else "a number"
                raise OptionError(f.name, f"{kind} >= {other} ({getattr(self, other):g})", getattr(self, f.name))
        for name in self.strategy_params:
            if name in POLICY_PARAMS:
                raise OptionError("strategy_params", policy_param_text(name), self.strategy_params)
            if name == "robust":
                raise OptionError("strategy_params", "no 'robust' (a coordinator option: --robust SPEC)",
                                  self.strategy_params)

    def replace(self, **changes) -> CoordinatorConfig:
        return dataclasses.replace(self, **changes)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(CoordinatorConfig)}
# What a job added to a running coordinator may set (coordinator.jobs, `crowdtrain jobs add`): every field but
# this process's (the service group), its name (given apart) and its state directory (STATE/jobs/<name>).
JOB_FIELDS = tuple(name for name, f in FIELDS.items()
                   if f.metadata["group"] != "service" and name not in ("state", "job"))


# ---------------------------------------------------------------------------- checks from the metadata
def choices_of(name: str) -> tuple[str, ...] | None:
    choices = FIELDS[name].metadata["choices"]
    return choices() if callable(choices) else choices


def expected(name: str, none_word: str | None = "none") -> str:
    """What field ``name`` accepts, in words: ``an integer >= 1``, ``a number > 0``, ``a string, one of ...``."""
    m = FIELDS[name].metadata
    kind = m["kind"]
    if m["expected"]:
        text = m["expected"]
    elif m["choices"]:
        text = f"a string, one of {', '.join(choices_of(name))}"
    elif kind in (int, float):
        text = "an integer" if kind is int else "a number"
        if m["lo"] is not None and m["hi"] is not None:
            text += f" in [{m['lo']:g}, {m['hi']:g}]"
        elif m["lo"] is not None:
            text += f" {'>' if m['lo_open'] else '>='} {m['lo']:g}"
    else:
        text = {str: "a string", bool: "true or false", Path: "a path", dict: "a mapping of name -> value"}[kind]
    return f"{text} or {none_word}" if none_word and m["none"] is not None and kind in (int, float) else text


def check_option(name: str, value: Any) -> Any:
    """``value`` checked against field ``name``'s metadata (ints as floats for float fields, strings as paths
    for path fields); raises ``OptionError``."""
    m = FIELDS[name].metadata
    kind = m["kind"]
    if value is None:
        if m["none"] is None:
            raise OptionError(name, expected(name), value)
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is float:
        ok = number and math.isfinite(value)
        value = float(value) if ok else value
    elif kind is int:
        ok = number and isinstance(value, int)
    elif kind is Path:
        ok = isinstance(value, (str, os.PathLike))
        value = Path(value) if ok else value
    elif kind is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    else:
        ok = isinstance(value, kind)
    if ok and kind in (int, float):
        lo, hi = m["lo"], m["hi"]
        ok = (lo is None or (value > lo if m["lo_open"] else value >= lo)) and (hi is None or value <= hi)
    if ok and m["choices"]:
        ok = value in choices_of(name)
    if ok and m["valid"]:
        ok = m["valid"](value)
    if not ok:
        raise OptionError(name, expected(name), value)
    return value


def flag_of(name: str) -> str:
    """The field's command-line flag: ``--lease-min`` for ``lease_min_s``, ``--batch-size`` for ``batch_size``."""
    return FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")


def policy_param_text(param: str) -> str:
    policy, value, bound = POLICY_PARAMS[param]
    return (f"no '{param}' (a coordinator policy: {flag_of(policy)} {value} with {flag_of(bound)} N; "
            f"in a config {policy}='{value}')")


def shown_default(name: str, default: Any = MISSING) -> str:
    """The default as --help writes it."""
    f = FIELDS[name]
    m = f.metadata
    if m["shown"] is not None:
        return m["shown"]
    if default is MISSING:
        default = f.default if f.default is not MISSING else m["cli_default"]
    numeric = m["kind"] in (int, float)
    if default is None:
        return f"none, {m['none']}" if numeric else m["none"]
    text = f"{default:g}" if isinstance(default, float) else str(default)
    return f"{text}; none: {m['none']}" if numeric and m["none"] is not None else text


# ---------------------------------------------------------------------------- flags
def parse_param(text: str) -> tuple[str, object]:
    """``name=value`` with value read as int, float, bool or string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    name, raw = text.split("=", 1)
    for cast in (int, float):
        try:
            return name, cast(raw)
        except ValueError:
            pass
    return name, {"true": True, "false": False, "none": None}.get(raw.lower(), raw)


def _parser_type(name: str) -> Callable[[str], Any]:
    m = FIELDS[name].metadata
    kind = m["kind"]

    def convert(text: str) -> Any:
        if m["none"] is not None and kind in (int, float) and text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected(name)}, got {text!r}") from None
    convert.__name__ = kind.__name__      # argparse names the type in its messages
    return convert


def add_config_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                         shown: dict[str, str] | None = None, only: tuple[str, ...] | None = None) -> None:
    """One flag per ``CoordinatorConfig`` field (``only``: these fields), in one argument group per config group;
    help with the default.

    ``defaults`` changes a flag's default value, ``shown`` how --help writes it (``crowdtrain run``'s
    ``--state`` is None until it picks ``runs/job-<time>``)."""
    defaults, shown = defaults or {}, shown or {}
    fields = [f for f in dataclasses.fields(CoordinatorConfig) if only is None or f.name in only]
    used = {f.metadata["group"] for f in fields}
    groups = {g: parser.add_argument_group(title) for g, title in GROUPS.items() if g in used}
    for f in fields:
        m = f.metadata
        if f.name in defaults:
            default = defaults[f.name]
        else:
            default = m["cli_default"] if f.default is MISSING and f.default_factory is MISSING else f.default
        text = shown.get(f.name) or shown_default(f.name, default if f.name in defaults else MISSING)
        help_ = f"{m['help']} (default: {text})".replace("%", "%%")
        group = groups[m["group"]]
        if m["kind"] is bool:
            group.add_argument(flag_of(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_)
        elif m["kind"] is dict:
            group.add_argument(flag_of(f.name), dest=f.name, action="append", type=parse_param, default=[],
                               metavar=m["metavar"], help=help_)
        else:
            metavar = m["metavar"]
            if metavar is None and m["choices"]:
                metavar = "{" + ",".join(choices_of(f.name)) + "}"
            elif metavar is None and m["kind"] in (int, float):
                metavar = "N" if m["kind"] is int else "SECONDS" if f.name.endswith("_s") else "X"
            group.add_argument(flag_of(f.name), dest=f.name, type=_parser_type(f.name), default=default,
                               metavar=metavar, help=help_)


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    """The config from parsed flags; a bad value raises ``ValueError`` naming its flag:
    ``argument --max-staleness: expected an integer >= 0 or none, got -1``."""
    values = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    values["strategy_params"] = dict(values.get("strategy_params") or [])
    try:
        return CoordinatorConfig(**values)
    except OptionError as e:
        got = " ".join(f"{k}={v}" for k, v in e.got.items()) if isinstance(e.got, dict) else e.got
        raise ValueError(f"argument {flag_of(e.name)}: expected {e.expected}, got {got!r}") from None
