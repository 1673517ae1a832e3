"""A simulator scenario: a TOML file read with ``tomllib`` and checked against one schema.

Every key has a checker and a default; a bad file gives one ``ScenarioError`` line naming
the key and the expected type (``workers.count: expected an integer >= 1, got "eight"
(a string)``). ``docs/simulator.md`` lists the keys; ``SCHEMA`` below is the reference.
The ``[coordinator]`` section and the checks of the ``[model]`` keys come from
``CoordinatorConfig``'s fields (coordinator/config.py): same names, defaults, bounds and help.

A scenario expands into runs: one per ``[[strategies]]`` entry at every point of the
optional ``[sweep]`` (dotted key -> list of values), e.g. K workers x M samples per unit.
A strategy entry may change ``[coordinator]`` keys for its runs alone (``coordinator =
{robust = "none"}``), so defences can be compared side by side. ``[liars]`` makes some
simulated workers lie with the faults of ``coordinator/sim/faults.py``.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator import config as coordinator_config
from coordinator.config import POLICY_PARAMS, CoordinatorConfig, OptionError
from coordinator.sim.faults import LIES
from coordinator.strategies import STRATEGIES, make_strategy

DISTS = {"constant": ("value",), "lognormal": ("median", "sigma"), "uniform": ("low", "high"),
         "pareto": ("scale", "alpha"), "exponential": ("mean",)}


class ScenarioError(ValueError):
    """A scenario that cannot run; ``str(e)`` is one line naming the key."""

    def __init__(self, key: str, expected: str, got: Any = None, *, raw: str | None = None):
        self.key = key
        message = raw if raw is not None else f"expected {expected}, got {_shown(got)}"
        super().__init__(f"{key}: {message}" if key else message)


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return _toml_type(value)
    text = f'"{value}"' if isinstance(value, str) else repr(value).lower() if isinstance(value, bool) else repr(value)
    return f"{text} ({_toml_type(value)})"


# ---------------------------------------------------------------------------- value checkers
Check = Callable[[str, Any], Any]


def integer(lo: int = 0) -> Check:
    def check(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ScenarioError(key, f"an integer >= {lo}", v)
        return v
    return check


def number(lo: float = 0.0, lo_open: bool = False, hi: float = math.inf) -> Check:
    def check(key: str, v: Any) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
        if not ok:
            span = f"in [{lo:g}, {hi:g}]" if hi != math.inf else f"{'>' if lo_open else '>='} {lo:g}"
            raise ScenarioError(key, f"a number {span}", v)
        return float(v)
    return check


def string(choices: tuple[str, ...] | None = None) -> Check:
    def check(key: str, v: Any) -> str:
        if not isinstance(v, str) or (choices and v not in choices):
            raise ScenarioError(key, f"a string, one of {', '.join(choices)}" if choices else "a string", v)
        return v
    return check


def boolean(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ScenarioError(key, "true or false", v)
    return v


@dataclass(frozen=True)
class Dist:
    """A positive random quantity: ``constant``, ``lognormal``, ``uniform``, ``pareto``, ``exponential``."""

    kind: str
    a: float
    b: float = 0.0

    def sample(self, rng: np.random.Generator) -> float:
        if self.kind == "constant":
            return self.a
        if self.kind == "lognormal":        # a = median, b = sigma of log
            return float(self.a * math.exp(self.b * rng.standard_normal()))
        if self.kind == "uniform":
            return float(rng.uniform(self.a, self.b))
        if self.kind == "pareto":           # a = scale (the minimum), b = tail index alpha
            return float(self.a * (1.0 + rng.pareto(self.b)))
        return float(rng.exponential(self.a))

    def to_toml(self) -> dict:
        names = DISTS[self.kind]
        return {"dist": self.kind, **{n: v for n, v in zip(names, (self.a, self.b))}}


def dist(positive: bool) -> Check:
    """A number (a constant) or a table ``{dist = "lognormal", median = 1.0, sigma = 0.5}``."""
    lo_check = number(0.0, lo_open=positive)

    def check(key: str, v: Any) -> Dist:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return Dist("constant", lo_check(key, v))
        if not isinstance(v, dict):
            raise ScenarioError(key, "a number or a table {dist = \"lognormal\", median = ..., sigma = ...}", v)
        kind = string(tuple(DISTS))(f"{key}.dist", v.get("dist", "(missing)"))
        names = DISTS[kind]
        for name in v:
            if name != "dist" and name not in names:
                raise ScenarioError(f"{key}.{name}", "", raw=f"unknown key for dist = \"{kind}\"; expected "
                                                           f"{', '.join(names)}")
        values = []
        for name in names:
            if name not in v:
                raise ScenarioError(f"{key}.{name}", "", raw=f"missing; expected a number (dist = \"{kind}\")")
            strict = name in ("median", "scale", "alpha", "mean", "value") and (positive or name == "alpha")
            values.append(number(0.0, lo_open=strict)(f"{key}.{name}", v[name]))
        if kind == "uniform" and values[1] < values[0]:
            raise ScenarioError(f"{key}.high", f"a number >= low ({values[0]:g})", v["high"])
        if kind == "uniform" and positive and values[0] <= 0:
            raise ScenarioError(f"{key}.low", "a number > 0", v["low"])
        return Dist(kind, *values)
    return check


def schedule(key: str, v: Any) -> tuple[tuple[float, int, int], ...]:
    """``[{at_s = 60, leave = 1}, {at_s = 120, join = 1}]`` -> ((at_s, leave, join), ...) in time order."""
    if not isinstance(v, list):
        raise ScenarioError(key, "an array of tables {at_s = ..., leave = N} or {at_s = ..., join = N}", v)
    out = []
    for i, entry in enumerate(v):
        k = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise ScenarioError(k, "a table {at_s = ..., leave = N} or {at_s = ..., join = N}", entry)
        for name in entry:
            if name not in ("at_s", "leave", "join"):
                raise ScenarioError(f"{k}.{name}", "", raw="unknown key; expected at_s, leave, join")
        if "at_s" not in entry:
            raise ScenarioError(f"{k}.at_s", "", raw="missing; expected a number >= 0 (simulated seconds)")
        out.append((number()(f"{k}.at_s", entry["at_s"]), integer()(f"{k}.leave", entry.get("leave", 0)),
                    integer()(f"{k}.join", entry.get("join", 0))))
    return tuple(sorted(out, key=lambda e: e[0]))


@dataclass(frozen=True)
class Field:
    check: Check
    default: Any
    help: str


def config_field(name: str, default: Any = MISSING, none: bool = False) -> Field:
    """A scenario key backed by ``CoordinatorConfig.<name>``: its check, help and (unless given) default.
    ``none``: the string "none" stands for None (TOML has no null), where the field allows it."""
    meta = coordinator_config.FIELDS[name].metadata
    none = none and meta["none"] is not None and meta["kind"] in (int, float)
    expected = coordinator_config.expected(name, '"none"' if none else None)

    def check(key: str, v: Any) -> Any:
        try:
            return coordinator_config.check_option(name, None if none and v == "none" else v)
        except OptionError:
            raise ScenarioError(key, expected, v) from None
    help_ = meta["help"] + (f" (\"none\": {meta['none']})" if none else "")
    return Field(check, coordinator_config.FIELDS[name].default if default is MISSING else default, help_)


# [model] key -> CoordinatorConfig field, and the simulator's own defaults where the config's is the
# model's recipe (a simulated unit is small: 4 SGD steps of 64 samples; shards of 500 images).
MODEL_KEYS = {"name": "model", "batch_size": "batch_size", "lr": "lr", "local_steps": "local_steps",
              "codec": "codec", "shard_size": "shard_size", "shards_per_unit": "shards_per_unit"}
MODEL_DEFAULTS = {"batch_size": 64, "lr": 0.1, "local_steps": 4, "shard_size": 500}
MODEL_NONE = ("batch_size", "lr", "local_steps")   # "none": the coordinator's own units (the recipe's, scaled)
# [coordinator] keys: every CoordinatorConfig field of these groups (the state directory is the simulator's),
# the robust aggregation around the strategy (the defence, with checks' ``replication``), the lookahead, and how model
# versions reach the workers (``version_download``: version deltas side by side with whole versions).
COORDINATOR_GROUPS = ("leases", "checks", "storage")
COORDINATOR_KEYS = tuple(name for name, f in coordinator_config.FIELDS.items()
                         if (f.metadata["group"] in COORDINATOR_GROUPS and name != "state")
                         or name in ("robust", "version_download", "unit_batch_scale", "unit_lr", "dynamic_steps",
                                     "flight_samples", "unit_momentum", "lookahead"))
FAULT_NAMES = tuple(f.value for f in LIES)


def faults(key: str, v: Any) -> tuple[str, ...]:
    """A fault name of ``coordinator/sim/faults.py``'s well-formed lies, or a non-empty array of them."""
    expected = f"a fault ({', '.join(FAULT_NAMES)}) or an array of them"
    values = v if isinstance(v, list) else [v]
    if not values:
        raise ScenarioError(key, expected, v)
    for i, name in enumerate(values):
        if not isinstance(name, str) or name not in FAULT_NAMES:
            raise ScenarioError(key if not isinstance(v, list) else f"{key}[{i}]", expected, name)
    return tuple(values)


def auto_or_number(key: str, v: Any) -> float | str:
    if v == "auto":
        return v
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    if not ok:
        raise ScenarioError(key, "\"auto\" or a number >= 0", v)
    return float(v)


# The reference of every key (docs/simulator.md mirrors it). Units in the help text.
SCHEMA: dict[str, Any] = {
    "name": Field(string(), "", "scenario name (default: the file's stem)"),
    "description": Field(string(), "", "one line for the report"),
    "seed": Field(integer(0), 0, "seeds the model, the shard order, the units and every simulated draw"),
    "baseline": Field(string(), "", "label of the run the others are compared with (default: the first)"),
    "max_hours": Field(number(0.0, lo_open=True), 1000.0, "stop a run that has not finished by this simulated time"),
    "model": {key: config_field(name, MODEL_DEFAULTS.get(key, MISSING), none=key in MODEL_NONE)
              for key, name in MODEL_KEYS.items()},
    "budget": {
        "train_images": Field(integer(0), 5000, "first N training images (0: the whole split)"),
        "epochs": Field(number(0.0, lo_open=True), 2.0, "passes over those images: the sample budget"),
        "eval_images": Field(integer(0), 1000, "test images per evaluation (0: the whole split)"),
        "evals": Field(integer(1), 8, "evaluations, evenly spaced in applied samples"),
    },
    "workers": {
        "count": Field(integer(1), 8, "workers at time 0"),
        "speed": Field(dist(True), Dist("lognormal", 1.0, 0.5), "samples per simulated second of each worker"),
        "jitter": Field(number(), 0.1, "per-unit speed noise: sigma of a lognormal factor (0: none)"),
        "stragglers": Field(number(0.0, hi=1.0), 0.0, "fraction of workers slowed down by straggler_slowdown"),
        "straggler_slowdown": Field(number(1.0), 10.0, "speed divisor of a straggler"),
        "prefetch": Field(boolean, False, "ask for the next unit before the current one ends, by worker_py's rule"),
    },
    "churn": {
        "leave_per_hour": Field(number(), 0.0, "fraction of online workers leaving per simulated hour (hazard)"),
        "join_per_hour": Field(number(), 0.0, "arrivals per simulated hour, as a fraction of workers.count"),
        "hand_back": Field(number(0.0, hi=1.0), 0.0, "chance a leaving worker hands its unit back (else lost)"),
        "die_in_unit": Field(number(0.0, hi=1.0), 0.0, "chance a worker crashes during a unit (the unit is lost)"),
        "restart_s": Field(dist(False), Dist("constant", 60.0), "a crashed worker returns (new id) after this"),
        "schedule": Field(schedule, (), "fixed events: [{at_s = 60, leave = 1}, {at_s = 90, join = 1}]"),
    },
    "network": {
        "latency_s": Field(dist(False), Dist("constant", 0.05), "one-way delay of each message, seconds"),
        "bandwidth_mbps": Field(number(0.0, lo_open=True), 20.0, "each worker's link, megabit/s (blobs, results)"),
    },
    "coordinator": {name: config_field(name, none=True) for name in COORDINATOR_KEYS},
    "liars": {
        "fraction": Field(number(0.0, hi=1.0), 0.0, "fraction of workers that lie: round(fraction x workers.count) "
                          "of those at time 0 (drawn from the seed), each later arrival with this chance; a crashed "
                          "liar comes back lying under its new id"),
        "fault": Field(faults, ("sign_flip",), "the lie (coordinator/sim/faults.py): sign_flip, scale, noise, "
                       "free_ride, label_flip, replay or a_little; an array: given to the liars in turn"),
        "collude": Field(boolean, True, "a_little liars share the honest deltas they compute (false: each uses "
                         "its own)"),
        "z": Field(auto_or_number, "auto", "a_little's shift in honest standard deviations (\"auto\": Baruch et "
                   "al.'s z for the liars among workers.count)"),
        "window": Field(integer(2), 8, "a_little: the newest honest deltas its mean and spread are taken over"),
        "honest_first": Field(integer(0), 0, "results each liar computes honestly before it starts lying (a "
                              "turncoat: it earns trust first; 0: it lies from its first result)"),
    },
}
SWEEPABLE = ("model", "budget", "workers", "churn", "network", "coordinator", "liars")


@dataclass(frozen=True)
class StrategySpec:
    name: str
    label: str
    params: dict
    coordinator: dict = dataclasses.field(default_factory=dict)   # [coordinator] keys changed for its runs


@dataclass
class Scenario:
    """A checked scenario: ``values[section][key]`` plus the strategies and the sweep."""

    name: str
    description: str
    seed: int
    baseline: str
    max_hours: float
    values: dict[str, dict[str, Any]]
    strategies: list[StrategySpec]
    sweep: dict[str, list[Any]]
    source: str = ""

    def __getitem__(self, dotted: str) -> Any:
        section, key = dotted.split(".")
        return self.values[section][key]

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the sweep's values ({} once when there is no sweep)."""
        keys = list(self.sweep)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.sweep[k] for k in keys))]

    def at(self, point: dict[str, Any]) -> Scenario:
        """This scenario with the sweep point's values set."""
        out = copy.deepcopy(self)
        for dotted, value in point.items():
            section, key = dotted.split(".")
            out.values[section][key] = value
        out.sweep = {}
        return out

    def scaled(self, factor: float, train_size: int) -> Scenario:
        """``factor`` times the samples: more distinct images first (up to ``train_size``), then epochs."""
        out = copy.deepcopy(self)
        budget = out.values["budget"]
        images = budget["train_images"] or train_size
        samples = images * budget["epochs"] * factor
        budget["train_images"] = min(train_size, max(1, round(images * factor)))
        budget["epochs"] = samples / budget["train_images"]
        return out

    def to_dict(self) -> dict:
        def plain(v: Any) -> Any:
            if isinstance(v, Dist):
                return v.to_toml()
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            return v
        return {"name": self.name, "description": self.description, "seed": self.seed, "baseline": self.baseline,
                "max_hours": self.max_hours,
                **{s: {k: plain(v) for k, v in vals.items()} for s, vals in self.values.items()},
                "strategies": [{"name": s.name, "label": s.label, "params": s.params,
                                **({"coordinator": s.coordinator} if s.coordinator else {})} for s in self.strategies],
                "sweep": {k: [plain(x) for x in v] for k, v in self.sweep.items()}}


def _unknown(key: str, allowed) -> ScenarioError:
    return ScenarioError(key, "", raw=f"unknown key; expected one of {', '.join(allowed)}")


def _strategies(raw: Any) -> list[StrategySpec]:
    if not isinstance(raw, list) or not raw or not all(isinstance(e, dict) for e in raw):
        raise ScenarioError("strategies", "a non-empty array of tables [[strategies]] with name = \"...\"", raw)
    out, labels = [], set()
    for i, entry in enumerate(raw):
        key = f"strategies[{i}]"
        for name in entry:
            if name not in ("name", "label", "params", "coordinator"):
                raise _unknown(f"{key}.{name}", ("name", "label", "params", "coordinator"))
        if "name" not in entry:
            raise ScenarioError(f"{key}.name", "", raw=f"missing; expected one of {', '.join(STRATEGIES)}")
        name = string(tuple(STRATEGIES))(f"{key}.name", entry["name"])
        label = string()(f"{key}.label", entry.get("label", name))
        params = entry.get("params", {})
        if not isinstance(params, dict):
            raise ScenarioError(f"{key}.params", "a table of strategy parameters", params)
        for param in params:
            if param in POLICY_PARAMS:
                policy, value, bound = POLICY_PARAMS[param]
                raise ScenarioError(f"{key}.params.{param}", "", raw=f"a coordinator policy, not a strategy "
                                    f"parameter: set coordinator.{policy} = \"{value}\" and coordinator.{bound}")
        try:
            make_strategy(name, **params)
        except (ValueError, TypeError) as e:
            raise ScenarioError(f"{key}.params", "", raw=str(e)) from None
        if label in labels:
            raise ScenarioError(f"{key}.label", "a label no other strategy has", label)
        labels.add(label)
        changes = entry.get("coordinator", {})
        if not isinstance(changes, dict):
            raise ScenarioError(f"{key}.coordinator", "a table of [coordinator] keys", changes)
        checked = {}
        for sub, value in changes.items():
            if sub not in SCHEMA["coordinator"]:
                raise _unknown(f"{key}.coordinator.{sub}", SCHEMA["coordinator"])
            checked[sub] = SCHEMA["coordinator"][sub].check(f"{key}.coordinator.{sub}", value)
        out.append(StrategySpec(name, label, dict(params), checked))
    return out


def _sweep(raw: Any) -> dict[str, list[Any]]:
    if not isinstance(raw, dict):
        raise ScenarioError("sweep", "a table of \"section.key\" = [values]", raw)
    out = {}
    for dotted, values in raw.items():
        parts = dotted.split(".")
        if len(parts) != 2 or parts[0] not in SWEEPABLE or parts[1] not in SCHEMA[parts[0]]:
            raise ScenarioError(f"sweep.{dotted}", "", raw="unknown key; expected \"section.key\" of "
                                f"{', '.join(SWEEPABLE)} (e.g. \"workers.count\")")
        if not isinstance(values, list) or not values:
            raise ScenarioError(f"sweep.{dotted}", "a non-empty array of values", values)
        field = SCHEMA[parts[0]][parts[1]]
        out[dotted] = [field.check(f"sweep.{dotted}[{i}]", v) for i, v in enumerate(values)]
    return out


def parse(doc: dict, name: str = "scenario") -> Scenario:
    """Check a parsed TOML document against ``SCHEMA``; raises ``ScenarioError``."""
    allowed = [*SCHEMA, "strategies", "sweep"]
    for key in doc:
        if key not in allowed:
            raise _unknown(key, allowed)
    top: dict[str, Any] = {}
    values: dict[str, dict[str, Any]] = {}
    for key, spec in SCHEMA.items():
        if isinstance(spec, Field):
            top[key] = spec.check(key, doc[key]) if key in doc else spec.default
            continue
        table = doc.get(key, {})
        if not isinstance(table, dict):
            raise ScenarioError(key, f"a table [{key}]", table)
        for sub in table:
            if sub not in spec:
                raise _unknown(f"{key}.{sub}", spec)
        values[key] = {sub: f.check(f"{key}.{sub}", table[sub]) if sub in table else f.default
                       for sub, f in spec.items()}
    if "strategies" not in doc:
        raise ScenarioError("strategies", "", raw="missing; expected at least one [[strategies]] table")
    strategies = _strategies(doc["strategies"])
    _check_config(values)
    for i, spec in enumerate(strategies):
        if spec.coordinator:
            _check_config({**values, "coordinator": {**values["coordinator"], **spec.coordinator}},
                          f"strategies[{i}].coordinator")
    baseline = top["baseline"] or strategies[0].label
    if baseline not in {s.label for s in strategies}:
        raise ScenarioError("baseline", f"a strategy label ({', '.join(s.label for s in strategies)})", baseline)
    return Scenario(name=top["name"] or name, description=top["description"], seed=top["seed"], baseline=baseline,
                    max_hours=top["max_hours"], values=values, strategies=strategies,
                    sweep=_sweep(doc.get("sweep", {})))


def _check_config(values: dict[str, dict[str, Any]], where: str = "coordinator") -> None:
    """What the config checks across fields (lease_max_s >= lease_min_s), named as the scenario's key
    (``where``: the [coordinator] table, or a strategy's own changes to it)."""
    keys = {**{name: ("model", key) for key, name in MODEL_KEYS.items()},
            **{name: (where, name) for name in COORDINATOR_KEYS}}
    try:
        CoordinatorConfig(state=Path("."), **{name: values["coordinator" if section == where else section][key]
                                              for name, (section, key) in keys.items()})
    except OptionError as e:
        raise ScenarioError(".".join(keys.get(e.name, (where, e.name))), e.expected, e.got) from None


def override(scenario: Scenario, assignment: str) -> Scenario:
    """``section.key=value`` (a TOML value) set on a checked scenario, checked like the file's."""
    dotted, sep, raw = assignment.partition("=")
    dotted = dotted.strip()
    parts = dotted.split(".")
    if not sep or len(parts) != 2 or parts[0] not in SCHEMA or not isinstance(SCHEMA[parts[0]], dict) \
            or parts[1] not in SCHEMA[parts[0]]:
        raise ScenarioError(f"--set {dotted}", "", raw="expected section.key=value with a scenario key "
                            "(e.g. budget.eval_images=2000)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()            # a bare word: a string
    out = copy.deepcopy(scenario)
    out.values[parts[0]][parts[1]] = SCHEMA[parts[0]][parts[1]].check(dotted, value)
    return out


def load(path: str | Path) -> Scenario:
    """Read and check a scenario file; every problem is one ``ScenarioError`` line naming the file."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ScenarioError("", "", raw=f"{path}: cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ScenarioError("", "", raw=f"{path}: not valid TOML: {e}") from None
    try:
        scenario = parse(doc, path.stem)
    except ScenarioError as e:
        raise ScenarioError("", "", raw=f"{path}: {e}") from None
    scenario.source = str(path)
    return scenario
