"""Staleness functions s(t): how much an update computed t versions ago still counts.

The three families of FedAsync (Xie, Koyejo, Gupta 2019, "Asynchronous Federated
Optimization", arXiv:1903.03934, section 5.2), also used by FedBuff (Nguyen et al.,
AISTATS 2022) with the polynomial s(t) = 1 / sqrt(1 + t):

- ``constant``:   s(t) = 1
- ``polynomial``: s(t) = (1 + t) ** -a                              (default a = 0.5)
- ``hinge``:      s(t) = 1 if t <= b else 1 / (a * (t - b) + 1)     (default a = 10, b = 4)

All are 1 at t = 0, in (0, 1] and non-increasing in t. Staleness t is
``current_version - update.base_version`` (an integer >= 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def constant(t: float) -> float:
    """s(t) = 1: staleness is ignored."""
    return 1.0


def polynomial(t: float, a: float = 0.5) -> float:
    """s(t) = (1 + t) ** -a."""
    return float((1.0 + t) ** -a)


def hinge(t: float, a: float = 10.0, b: float = 4.0) -> float:
    """s(t) = 1 for t <= b, then 1 / (a * (t - b) + 1)."""
    return 1.0 if t <= b else 1.0 / (a * (t - b) + 1.0)


# kind -> (function, default parameters); a parameter not listed here is not accepted.
KINDS: dict[str, tuple] = {
    "constant": (constant, {}),
    "polynomial": (polynomial, {"a": 0.5}),
    "hinge": (hinge, {"a": 10.0, "b": 4.0}),
}


@dataclass(frozen=True)
class StalenessFn:
    """A validated staleness function; ``None`` parameters take the kind's default.

    Error messages name the strategy keyword arguments (``staleness``, ``staleness_a``,
    ``staleness_b``) because that is where these values come from.
    """

    kind: str = "constant"
    a: float | None = None
    b: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"staleness: unknown kind {self.kind!r}; choices: {', '.join(KINDS)}")
        defaults = KINDS[self.kind][1]
        for field in ("a", "b"):
            value = getattr(self, field)
            if field not in defaults:
                if value is not None:
                    raise ValueError(f"staleness_{field}: not a parameter of {self.kind} staleness")
                continue
            if value is None:
                value = defaults[field]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"staleness_{field}: expected a finite number >= 0, got {value!r}")
            object.__setattr__(self, field, float(value))

    def __call__(self, t: float) -> float:
        if t < 0:
            raise ValueError(f"staleness must be >= 0, got {t}")
        fn, defaults = KINDS[self.kind]
        return fn(t, **{k: getattr(self, k) for k in defaults})


def staleness_weight(t: float, kind: str = "polynomial", a: float | None = None, b: float | None = None) -> float:
    """s(t) for one staleness value; e.g. ``staleness_weight(3, "polynomial", a=0.5) == 0.5``."""
    return StalenessFn(kind, a, b)(t)
