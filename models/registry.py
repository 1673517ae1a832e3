"""Model registry: name -> how to build it, its default recipe, its kind; ``crowdtrain models``.

Every model takes float32 [N, 3, 32, 32] with raw pixel values 0..255 and returns [N, 10]
logits. ``build`` does not seed: the caller seeds torch first.

Importing the registry does not import torch: a spec names its builder as
``"module:callable"``, imported on the first ``build``, and states its parameter counts
(checked against the built model by tests/test_cli.py), so ``crowdtrain models``, the
config's checks and every ``--help`` start in well under a second.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from models.recipe import Recipe

if TYPE_CHECKING:
    from torch import nn

KINDS = ("dense", "supermask")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: str | Callable[..., nn.Module]  # "module:callable" (imported on first use) or the callable;
                                             # builder(num_classes=10) -> a fresh module
    recipe: Recipe                   # this model's default hyperparameters
    kind: str                        # "dense" or "supermask"
    description: str                 # one line, with provenance
    params: tuple[int, int] = (0, 0)  # (all parameters, trainable ones), as count_parameters gives them
    browser: str | None = None       # why a browser tab cannot train it (its step graph), or None: it can
    unit_batch_scale: float = 0.125  # a distributed job's units train at this fraction of recipe.batch_size (dense
                                     # models; the coordinator's --unit-batch-scale overrides it; docs/results.md)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model '{self.name}': kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0 < self.unit_batch_scale <= 1:
            raise ValueError(f"model '{self.name}': unit_batch_scale must be in (0, 1], got {self.unit_batch_scale!r}")

    def build(self, num_classes: int = 10) -> nn.Module:
        builder = self.builder
        if isinstance(builder, str):
            module, _, attr = builder.partition(":")
            builder = getattr(importlib.import_module(module), attr)
        return builder(num_classes=num_classes)


# Nets without BatchNorm (cnn, alexnet) get a lower peak lr (checked only on short runs);
# edge-popup follows the paper (SGD 0.1, momentum 0.9, wd 5e-4, cosine, batch 128); resnet_fast
# follows Page's ResNet-9 (lr 0.4 on the mean loss, batch 512, label smoothing 0.2).
_EDGE_POPUP = Recipe(batch_size=128, lr=0.1, nesterov=False, schedule="cosine", warmup=0.0)
_ALEXNET = Recipe(batch_size=256, lr=0.02)

MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("cnn", "models.cnn:SimpleCNN", Recipe(batch_size=256, lr=0.05), "dense",
              "baseline CNN of the Physics-Driven AlexNet comparison (Keras cifar10_cnn layout)",
              (2_168_362, 2_168_362)),
    ModelSpec("alexnet", "models.alexnet:alexnet", _ALEXNET, "dense",
              "AlexNet (Krizhevsky 2012) for 32x32: 5 stride-1 convs, 3 pools, 3 linears, width x3/8",
              (5_262_106, 5_262_106)),
    ModelSpec("physics_alexnet", "models.alexnet:physics_alexnet", _ALEXNET, "dense",
              "Physics-Driven AlexNet: alexnet with every conv a PhysicsLayer (conv + strength * forces)",
              (5_262_627, 5_262_627)),
    ModelSpec("supermask_fc", "models.supermask:SupermaskFC", _EDGE_POPUP, "supermask",
              "edge-popup (Ramanujan 2020) FC 3072-200-200-200-200-10, k=0.5, last layer k=1",
              (1_472_800, 736_400)),
    ModelSpec("supermask_conv", "models.supermask:SupermaskConvNet", _EDGE_POPUP, "supermask",
              "edge-popup (Ramanujan 2020) conv net with residual blocks, non-affine BN, k=0.5",
              (2_013_888, 1_006_944)),
    ModelSpec("airbench", "models.airbench:AirbenchNet",
              Recipe(batch_size=1024, lr=1.5, momentum=0.85, weight_decay=1.33e-3, label_smoothing=0.2, crop_pad=2,
                     warmup=0.23, lr_start=0.2, lr_end=0.07, crop_reflect=True, alt_flip=True, epochs=10,
                     lookahead=True, tta=2), "dense",
              "best one-process recipe: airbench94's net (whitened 2x2 stem, widths 64-256-256); Python workers only",
              (1_971_640, 1_971_352),
              browser="its 2x2 max-pooling of 31x31 maps is not among the step graph's ops (models.onnx_step)",
              # 2 real workers, seed 0, side by side with one process: 4 x 256 a unit -0.41 point, 8 x 128 -2.27
              unit_batch_scale=0.25),
    ModelSpec("resnet_fast", "models.resnet_fast:ResNetFast",
              Recipe(batch_size=512, lr=0.4, label_smoothing=0.2, weight_decay=5e-4, epochs=10), "dense",
              "default: small ResNet after Page's DAWNBench ResNet-9 / airbench, for 2 CPU cores",
              (657_144, 657_144)),
)}


def get(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; expected one of: {', '.join(MODELS)}") from None


def build(name: str, num_classes: int = 10) -> nn.Module:
    return get(name).build(num_classes=num_classes)


def init_from_data(model: nn.Module, x_u8) -> None:
    """A model that sets part of itself from training images (``init_from_data(x_u8)``, e.g. airbench's
    whitening filters) does it here; deterministic given the images. Others are left as built."""
    init = getattr(model, "init_from_data", None)
    if init is not None:
        init(x_u8)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser should step (for a supermask model: only the scores)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, fixed supermask weights included; trainable ones). Buffers are not counted."""
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable_parameters(model))


def table() -> str:
    rows = [("name", "kind", "params", "trainable", "description")]
    for spec in MODELS.values():
        total, trainable = spec.params
        rows.append((spec.name, spec.kind, f"{total:,}", f"{trainable:,}", spec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    fmt = "{:<%d}  {:<%d}  {:>%d}  {:>%d}  {}" % tuple(widths)
    return "\n".join(fmt.format(*r) for r in rows)


def recipes() -> str:
    """Each model's default hyperparameters (what ``crowdtrain train`` and the coordinator use unset)."""
    import dataclasses

    lines = []
    for spec in MODELS.values():
        values = ", ".join(f"{f.name}={getattr(spec.recipe, f.name)}" for f in dataclasses.fields(Recipe))
        units = f"; a job's units: unit_batch_scale={spec.unit_batch_scale}" if spec.kind == "dense" else ""
        lines.append(f"{spec.name}: {values}{units}")
    return "\n".join(lines)


def cli(argv: list[str], prog: str = "crowdtrain models", command: str = "models") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="List the registered models with parameter counts.")
    parser.add_argument("--recipes", action="store_true",
                        help="list each model's default hyperparameters instead (default: off)")
    args = parser.parse_args(argv)
    print(recipes() if args.recipes else table())
    return 0
