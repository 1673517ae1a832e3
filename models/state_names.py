"""Which tensors of a model's state are batch-norm running statistics (``*.running_mean``,
``*.running_var``): estimates of the data, not parameters trained by a gradient. The coordinator
mixes them convexly instead of pushing them through momentum (coordinator/strategies), rebases a
stale delta's statistics on the current model (coordinator/aggregator.py), compares them apart
from the weights in a replicated check (coordinator/trust.py), and the browser step graph carries
them as their own inputs (models/onnx_step.py). Kept free of torch, so the strategies' maths can
import it."""
from __future__ import annotations

STAT_SUFFIXES = ("running_mean", "running_var")


def is_running_stat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in STAT_SUFFIXES
