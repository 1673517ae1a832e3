"""Training hyperparameters: one dataclass, one place, units in the comments.

The single-process trainer, the Python worker and (later) a work unit all carry exactly
these keys. Each registered model has its own defaults (see ``models.registry``); the CLI
overrides single fields with ``dataclasses.replace``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

LOSSES = ("ce", "focal")
SCHEDULES = ("onecycle", "cosine", "constant")


@dataclass(frozen=True)
class Recipe:
    batch_size: int = 256          # samples per SGD step
    lr: float = 0.1                # peak learning rate (SGD, per step)
    momentum: float = 0.9          # heavy-ball / Nesterov momentum coefficient
    nesterov: bool = True
    weight_decay: float = 5e-4     # L2 coefficient on weight matrices and kernels (not on 1-D params)
    label_smoothing: float = 0.0   # cross-entropy target smoothing, 0..1
    loss: str = "ce"               # "ce" (cross-entropy) or "focal" (Lin et al. 2017)
    focal_gamma: float = 2.0       # focusing exponent of the focal loss
    schedule: str = "onecycle"     # lr schedule over the whole run, per step
    warmup: float = 0.2            # fraction of the run spent warming up (onecycle / cosine)
    lr_start: float = 0.0          # lr where the warmup starts, as a fraction of the peak (airbench: 0.2)
    lr_end: float = 0.0            # lr at the end of the run (onecycle / cosine), as a fraction of the peak (airbench: 0.07)
    crop_pad: int = 4              # random-crop padding in pixels (0 = no crop)
    crop_reflect: bool = False     # crops pad by mirroring the edges (airbench), not with zeros (units: hyper.crop_reflect)
    flip: bool = True              # random horizontal flip
    alt_flip: bool = False         # with flip, each image's flip alternates epoch to epoch (airbench; units: hyper.flip_parity)
    epochs: int = 10               # passes over the training split
    lookahead: bool = False        # average the weights along the run (``models.train.Lookahead``; a job: the coordinator's)
    tta: int = 0                   # test-time augmentation of evaluations: 0 none, 1 flip, 2 flip and shift

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"recipe field '{field}': expected {expected}, got {getattr(self, field)!r}")

        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.lr > 0, "lr", "a number > 0")
        need(0 <= self.momentum < 1, "momentum", "a number in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "a number in [0, 1)")
        need(self.loss in LOSSES, "loss", f"one of {', '.join(LOSSES)}")
        need(self.focal_gamma >= 0, "focal_gamma", "a number >= 0")
        need(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}")
        need(0 <= self.warmup < 1, "warmup", "a fraction in [0, 1)")
        need(0 <= self.lr_start <= 1, "lr_start", "a fraction of the peak lr in [0, 1]")
        need(0 <= self.lr_end <= 1, "lr_end", "a fraction of the peak lr in [0, 1]")
        need(isinstance(self.crop_pad, int) and 0 <= self.crop_pad <= 16, "crop_pad", "an integer in [0, 16]")
        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "an integer >= 1")
        need(self.tta in (0, 1, 2), "tta", "0, 1 or 2")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"recipe: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
        return cls(**d)


def lookahead_decay(progress: float, steps: float) -> float:
    """airbench94's lookahead: the share of the weights' running average kept at a sync ``steps`` SGD steps
    after the previous one, ``progress`` (0..1) into the run: 0.95^steps x progress^3 (none at the start, most
    at the end). One process syncs every 5 steps (``models.train.Lookahead``); the coordinator after the
    folds of as many samples (``coordinator.strategies.wrappers.Lookahead``)."""
    return 0.95 ** steps * min(max(progress, 0.0), 1.0) ** 3
