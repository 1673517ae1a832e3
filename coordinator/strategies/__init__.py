"""Aggregation strategies, one per file, and the name -> class registry used by the config.

``make_strategy("fedbuff", buffer_size=8, max_staleness=20, max_norm=5.0)`` builds
``StalenessCap(NormClip(FedBuff(buffer_size=8), 5.0), 20)``: the wrapper parameters
``max_staleness``, ``max_norm`` and ``robust`` (a robust wrapper's spec, innermost:
``robust="trimmed_mean:0.2"``; see ``robust``) are accepted for every strategy. See
``base`` for the interface and the state format.
"""
from __future__ import annotations

import inspect
from typing import Any

from .async_sgd import AsyncSGD
from .base import Admission, BufferedStrategy, Drop, Folded, Pending, Strategy, StrategyState, Update
from .delayed_nesterov import DelayedNesterov
from .fedasync import FedAsync
from .fedavg import FedAvg
from .fedbuff import FedBuff
from .ordered_momentum import OrderedMomentum
from .robust import ROBUST, AdaptiveClip, CenteredClip, Median, TrimmedMean, wrap_robust
from .supermask_max import SupermaskMax
from .supermask_mean import SupermaskMean
from .wrappers import Freeze, Lookahead, NormClip, StalenessCap, Wrapper

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, AsyncSGD, FedAsync, FedBuff, SupermaskMean, SupermaskMax, DelayedNesterov,
                              OrderedMomentum)
}
WRAPPER_PARAMS = ("max_staleness", "max_norm", "robust")  # applied innermost-last: cap(clip(robust(strategy)))


def strategy_params(name: str) -> list[str]:
    """The keyword arguments ``make_strategy(name, ...)`` accepts."""
    cls = STRATEGIES[name]
    own = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    return own + list(WRAPPER_PARAMS)


def make_strategy(name: str, **params: Any) -> Strategy:
    """A strategy from its registry name and keyword parameters (wrappers included)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choices: {', '.join(STRATEGIES)}")
    choices = strategy_params(name)
    unknown = [p for p in params if p not in choices]
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} for strategy {name!r}; choices: {', '.join(choices)}")
    max_staleness = params.pop("max_staleness", None)
    max_norm = params.pop("max_norm", None)
    robust = params.pop("robust", None)
    strategy: Strategy = wrap_robust(STRATEGIES[name](**params), robust)
    if max_norm is not None:
        strategy = NormClip(strategy, max_norm)
    if max_staleness is not None:
        strategy = StalenessCap(strategy, max_staleness)
    return strategy


__all__ = [
    "STRATEGIES", "WRAPPER_PARAMS", "make_strategy", "strategy_params",
    "Strategy", "BufferedStrategy", "Wrapper", "Update", "Pending", "StrategyState", "Admission", "Drop", "Folded",
    "FedAvg", "AsyncSGD", "FedAsync", "FedBuff", "SupermaskMean", "SupermaskMax",
    "StalenessCap", "NormClip", "Lookahead", "Freeze",
    "ROBUST", "AdaptiveClip", "CenteredClip", "TrimmedMean", "Median",
]
