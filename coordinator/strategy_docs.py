"""What each aggregation strategy does and what its settings mean, in words, for people:
``crowdtrain strategies`` (every strategy, its paper, its rule and its ``--param`` names with
their defaults) and the dashboard's strategy panel (``settings``: the running strategy's
settings and state, named and explained, from its ``describe()``).

A strategy's own text is its module docstring (paper first, then the rule); the parameters
are read from its constructor's signature and explained here, in ``PARAMS``, one line each
(tests/test_cli.py checks that every registered strategy's parameters are explained).
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from typing import Any

# --param names -> one line each (a name means the same wherever it appears)
PARAMS: dict[str, str] = {
    "server_lr": "multiplies every aggregate step before it is added to the model (server learning rate)",
    "staleness": "weight s(t) of an update t versions old: constant (1), polynomial ((1 + t)^-a) or hinge "
                 "(1 up to b, then 1 / (a (t - b) + 1))",
    "staleness_a": "a of the staleness weight (default: 0.5 for polynomial, 10 for hinge; unused by constant)",
    "staleness_b": "b of the hinge staleness weight (default: 4; used by hinge only)",
    "buffer_size": "updates gathered before one aggregation (FedBuff's K)",
    "server_momentum": "server-side momentum coefficient beta (0: none)",
    "alpha": "each update is mixed in at alpha x s(staleness)",
    "clients_per_round": "updates based on the current version that make one synchronous round",
    "history": "score versions kept to rebuild a stale update's base (staler ones: see missing_base)",
    "missing_base": "an update whose base is no longer kept: drop it, or merge against the current scores "
                    "(current)",
    "compare": "value: keep the largest signed score; magnitude: keep the score with the largest |score|",
    "period": "updates between two momentum steps (the paper's N)",
    "c": "between momentum steps each delta is applied at once at server_lr x c (0 holds them back; at most "
         "1/period)",
    "nesterov": "Nesterov momentum (true) or heavy ball (false)",
    # the wrappers' parameters (coordinator options, shown on the dashboard)
    "max_staleness": "updates staler than this many versions are dropped",
    "max_norm": "deltas with a larger global L2 norm are scaled down to it",
    "multiplier": "clip bound = multiplier x the median of the recent accepted norms",
    "window": "how many recent norms (or distances) the median is taken over",
    "warmup": "clipping starts once this many are in",
    "radius": "clip radius = radius x the median recent distance to the reference",
    "beta": "reference <- beta x reference + (1 - beta) x mean of the clipped deltas",
    "trim": "fraction of the largest and of the smallest values dropped per coordinate",
    "total_samples": "the job's budget of samples (the lookahead's progress is folded samples over it)",
    "every_samples": "folded samples between two lookahead syncs (5 of one process's batches)",
    "after": "tensor -> folded samples after which each new version keeps it as it was (the model's train_epochs)",
}

# the state a strategy's describe() reports besides its parameters: key -> (label, explanation)
STATE: dict[str, tuple[str, str]] = {
    "buffered": ("waiting", "updates in the buffer, not yet folded into the model"),
    "buffer_size": ("folds after", "updates gathered before one aggregation"),
    "buffered_samples": ("samples waiting", "training samples of the buffered updates"),
    "buffered_staleness_max": ("stalest waiting", "versions the stalest buffered update is behind"),
    "dropped": ("dropped here", "updates this strategy refused (see Accepted updates for the reasons)"),
    "capped": ("dropped as stale", "updates dropped for being staler than max_staleness"),
    "clipped": ("clipped", "deltas scaled down to the norm bound"),
    "bound": ("clip bound now", "the current norm bound (none yet while warming up)"),
    "norms": ("norms seen", "recent norms in the window"),
    "tau": ("clip radius now", "the current clipping radius (none yet while warming up)"),
    "distances": ("distances seen", "recent distances in the window"),
    "syncs": ("lookahead syncs", "times the model was moved to the versions' running average"),
    "held": ("folds holding a tensor", "folds whose new version kept a frozen tensor as it was"),
}
HIDDEN = ("name", "params", "inner", "due")   # "due" is the aggregation loop's business, not a person's

# strategies and wrappers by their describe() name -> one line (a strategy's own comes from its docstring)
WRAPPERS: dict[str, str] = {
    "staleness_cap": "drops updates staler than max_staleness (--on-stale drop)",
    "norm_clip": "scales deltas above max_norm down to it (--on-large-norm clip)",
    "adaptive_clip": "clips deltas above multiplier x the median recent norm (--robust adaptive_clip)",
    "centered_clip": "clips each delta around the previous aggregate (--robust centered_clip)",
    "trimmed_mean": "replaces the buffer by its coordinate-wise trimmed mean (--robust trimmed_mean)",
    "median": "replaces the buffer by its coordinate-wise median (--robust median)",
    "lookahead": "moves the model to a running average of its versions, more so late in the run "
                 "(airbench94's lookahead; a recipe with lookahead, e.g. airbench's)",
    "freeze": "keeps a tensor the model trains for its first epochs only as it is once those epochs of samples "
              "are folded (airbench's whitening bias after 3)",
}


def _registry() -> dict[str, type]:
    from coordinator.strategies import STRATEGIES

    return STRATEGIES


def paragraphs(name: str) -> list[str]:
    """The paragraphs of strategy ``name``'s module docstring (the paper first, then the rule)."""
    cls = _registry()[name]
    doc = inspect.getdoc(sys.modules[cls.__module__]) or inspect.getdoc(cls) or ""
    return [p.strip() for p in doc.split("\n\n") if p.strip()]


def title(name: str) -> str:
    """One line: the paper (or what the wrapper does)."""
    if name in WRAPPERS:
        return WRAPPERS[name]
    try:
        first = paragraphs(name)[0]
    except (KeyError, IndexError):
        return ""
    return _one_line(first)


def parameters(name: str) -> list[tuple[str, Any, str]]:
    """(name, default, explanation) of each ``--param`` strategy ``name`` takes."""
    signature = inspect.signature(_registry()[name].__init__)
    return [(p, signature.parameters[p].default, PARAMS.get(p, "")) for p in signature.parameters
            if p not in ("self", "inner")]


def _value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _one_line(paragraph: str) -> str:
    return " ".join(re.sub(r"(\w)-\n\s*", r"\1-", paragraph).split())


def text(names: list[str] | None = None, full: bool = False, width: int = 100) -> str:
    """``crowdtrain strategies``: each strategy's paper and its parameters with defaults and meaning;
    ``full``: its whole description too."""
    from coordinator.config import DEFAULT_STRATEGY, DEFAULT_STRATEGY_PARAMS, FIELDS

    out = []
    if names is None:
        defaults = ", ".join(f"{strategy} for {kind} models" + "".join(
            f" with {k}={v}" for k, v in DEFAULT_STRATEGY_PARAMS.get(strategy, {}).items())
            for kind, strategy in DEFAULT_STRATEGY.items())
        out.append(textwrap.fill(
            f"Aggregation strategies: --strategy NAME, its parameters as --param NAME=VALUE (repeatable). Default: "
            f"{defaults}. `crowdtrain strategies NAME` prints a strategy's whole description.", width))
    for name in names or list(_registry()):
        paras = paragraphs(name)
        out.append("")
        out.append(textwrap.fill(f"{name}: {_one_line(paras[0]) if paras else ''}", width, subsequent_indent="    "))
        if full:
            out += ["", *(textwrap.indent(p, "    ") + "\n" for p in paras[1:])]
        rows = parameters(name)
        out.append("    parameters:" if rows else "    parameters: none")
        if rows:
            col = max(len(f"--param {p}={_value(d)}") for p, d, _ in rows) + 8
            for p, default, about in rows:
                head = f"      --param {p}={_value(default)}"
                out.append(textwrap.fill(about, width, initial_indent=f"{head:<{col}}",
                                         subsequent_indent=" " * col))
    if names is None:
        out += ["", "Around every strategy (coordinator options, not --param; `crowdtrain coordinator --help`):"]
        rows = [("--on-stale drop --max-staleness N", "drop updates staler than N versions (default: refused at "
                 "the boundary, 409 too_stale)"),
                ("--on-large-norm clip --max-delta-norm X", "clip deltas to norm X (default: refused, 422 "
                 "norm_bound)")]
        for name, flag in (("robust", "--robust SPEC"), ("lookahead", "--lookahead {recipe,on,off}")):
            if name in FIELDS:
                rows.append((flag, FIELDS[name].metadata["help"]))
        col = max(len(flag) for flag, _ in rows) + 4
        for flag, about in rows:
            out.append(textwrap.fill(about, width, initial_indent=f"  {flag:<{col - 2}}", subsequent_indent=" " * col))
    return "\n".join(out)


def settings(describe: dict) -> list[dict]:
    """The dashboard's strategy panel from a strategy's ``describe()``: one entry per level, outermost
    first, ``{"name", "about", "settings": [{"key", "value", "about"}], "state": [{"key", "label", "value",
    "about"}]}``. Parameters that do not apply (None) are left out; internals (``due``) are hidden."""
    levels = []
    level, depth = describe, 0
    while isinstance(level, dict) and depth < 8:
        name = str(level.get("name", "?"))
        params = level.get("params") or {}
        rows = [{"key": k, "value": _value(v), "about": PARAMS.get(k, "")}
                for k, v in params.items() if v is not None]
        state = []
        for k, v in level.items():
            if k in HIDDEN or k in params:
                continue
            label, about = STATE.get(k, (k.replace("_", " "), ""))
            state.append({"key": k, "label": label, "value": _value(v), "about": about})
        levels.append({"name": name, "about": title(name) if name in WRAPPERS or name in _registry() else "",
                       "settings": rows, "state": state})
        level, depth = level.get("inner"), depth + 1
    return levels


def cli(argv: list[str], prog: str = "crowdtrain strategies", command: str = "strategies") -> int:
    names = list(_registry())
    p = argparse.ArgumentParser(prog=prog, description="The aggregation strategies: paper, rule, and the "
                                "--param names each takes with their defaults.")
    p.add_argument("name", nargs="*", metavar="NAME",
                   help=f"only these strategies, described in full: {', '.join(names)} (default: all, in short)")
    args = p.parse_args(argv)
    unknown = [n for n in args.name if n not in names]
    if unknown:
        p.error(f"unknown strategy {unknown[0]!r}; expected one of {', '.join(names)}")
    print(text(args.name or None, full=bool(args.name)))
    return 0
