"""The coordinator's configuration: one dataclass that checks itself.

Defaults are the embedded defaults of the main job; every field has a ``crowdtrain
coordinator`` flag of the same name. Unset model-dependent fields (batch size, learning
rate, epochs) come from the model's registered recipe.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_STRATEGY = {"dense": "async_sgd", "supermask": "supermask_max"}
# Parameters used with the default strategy when none are given: Downpour-style async SGD,
# each delta damped by (1 + staleness)^-0.5 (after staleness-aware async SGD, Zhang et al. 2016).
DEFAULT_STRATEGY_PARAMS = {"async_sgd": {"staleness": "polynomial"}}
LATE_POLICIES = ("use", "drop")


@dataclass(frozen=True)
class CoordinatorConfig:
    state: Path                          # directory for state.db, blobs/ and the lease key
    data: str | None = None              # CIFAR-10 path (default $CROWDTRAIN_DATA)
    download: bool = False               # fetch the official archive when no data is found
    model: str = "resnet_fast"           # registered model name
    strategy: str | None = None          # aggregation strategy (default by model kind)
    strategy_params: dict = field(default_factory=dict)
    job: str = "cifar10"
    seed: int = 0                        # initial model, shard order, unit seeds
    host: str = "127.0.0.1"
    port: int = 8080
    shard_size: int = 1000               # images per data shard blob
    shards_per_unit: int = 1
    local_steps: int | None = None       # SGD steps per unit (default: one pass over its shards)
    batch_size: int | None = None        # samples per step (default: the model's recipe)
    lr: float | None = None              # peak learning rate (default: the model's recipe)
    epochs: float | None = None          # budget in passes over the training split (default: recipe)
    codec: str = "fp16"                  # delta codec asked of workers
    max_staleness: int | None = 64       # refuse results staler than this (None: no cap)
    max_delta_norm: float = 1e4          # refuse deltas whose global L2 norm is above this
    late_results: str = "use"            # a result after its lease expired: "use" or "drop"
    lease_min_s: float = 20.0
    lease_max_s: float = 1800.0
    lease_first_s: float = 120.0
    lease_factor: float = 3.0
    eval_every_s: float = 30.0           # evaluate the current model at most this often
    eval_images: int | None = None       # test images per evaluation (default: the whole split)
    limit_train: int | None = None       # use only the first N training images (tests, demos)
    keep_versions: int = 8               # model blobs kept besides those leased units still need
    body_slack_bytes: int = 1 << 20      # body cap = fp32 size of a delta + this

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"coordinator option '{name}': expected {expected}, got {getattr(self, name)!r}")

        positive_ints = ("shard_size", "shards_per_unit", "keep_versions", "body_slack_bytes")
        for name in positive_ints:
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("local_steps", "batch_size", "eval_images", "limit_train", "max_staleness"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= (0 if name == "max_staleness" else 1)),
                 name, "a positive integer")
        for name in ("lr", "epochs"):
            need(getattr(self, name) is None or getattr(self, name) > 0, name, "a number > 0")
        for name in ("max_delta_norm", "lease_min_s", "lease_max_s", "lease_first_s", "lease_factor", "eval_every_s"):
            need(getattr(self, name) > 0, name, "a number > 0")
        need(self.lease_min_s <= self.lease_max_s, "lease_max_s", f"at least lease_min_s ({self.lease_min_s})")
        need(self.late_results in LATE_POLICIES, "late_results", f"one of {', '.join(LATE_POLICIES)}")
        need(0 <= self.port <= 65535, "port", "a TCP port 0..65535")
        need(isinstance(self.strategy_params, dict), "strategy_params", "a mapping of name -> value")

    def replace(self, **changes) -> "CoordinatorConfig":
        return dataclasses.replace(self, **changes)
