"""One work unit's computation: a few local SGD steps from a base model state.

Shared by the Python worker, the simulator and the coordinator's checks, so a unit with a
given seed computes the same delta wherever it runs. States and deltas are plain
``dict[str, np.ndarray]`` (float32), the currency of the wire contract and the strategies.

What travels: every floating-point entry of the state_dict (parameters and buffers such as
batch-norm running statistics, and a supermask model's fixed weights, which a worker needs
to compute). What a delta carries (``delta_names``): the trainable parameters plus the
floating-point buffers that training changes; a supermask model's fixed weights never change,
so its deltas hold only scores and running statistics.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from models import registry
from models.augment import augment, mirror
from models.flips import mirrors
from models.recipe import Recipe
from models.state_names import is_running_stat
from models.train import channels_last, loss_fn, make_optimizer


def state_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's floating-point state as float32 numpy copies (integer counters are dropped)."""
    return {k: v.detach().cpu().float().numpy().copy() for k, v in model.state_dict().items()
            if v.is_floating_point()}


def load_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the model's state; names and shapes must match exactly."""
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    missing, extra = sorted(set(state) - set(arrays)), sorted(set(arrays) - set(state))
    if missing or extra:
        raise ValueError(f"state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, target in state.items():
            value = torch.from_numpy(np.asarray(arrays[name], dtype=np.float32))
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"state '{name}': expected shape {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(value)


def delta_names(model: torch.nn.Module) -> list[str]:
    """Names of the state entries a delta carries, in state_dict order."""
    trainable = {id(p) for p in registry.trainable_parameters(model)}
    params = dict(model.named_parameters())
    names = []
    for name, value in model.state_dict(keep_vars=True).items():
        if name in params:
            if id(params[name]) in trainable:
                names.append(name)
        elif value.is_floating_point() and is_running_stat(name):
            names.append(name)
    return names


def rebase_running_stats(delta: dict[str, np.ndarray], base: dict[str, np.ndarray],
                         current: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Express a delta's batch-norm statistics relative to ``current`` instead of its ``base``.

    Weights are gradients' sums and add up, but running statistics are estimates: a stale
    delta added to statistics that moved meanwhile can push a variance below zero. Rebased,
    the statistics part is (worker's statistic - current statistic), so any strategy that
    scales a delta by a weight <= 1 mixes the statistics convexly; where a fold's weights sum
    above 1 (many updates at once), the fold divides the statistics' step by that sum
    (``coordinator.strategies.tensors.fused_step``'s ``convex``). Other entries are unchanged.
    """
    out = dict(delta)
    for name in delta:
        if is_running_stat(name):
            out[name] = (base[name] + delta[name] - current[name]).astype(np.float32)
    return out


def sanitize_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Last guard after aggregation: running variances stay >= 0 (a server step > 1 can overshoot)."""
    return {k: np.maximum(v, 0.0) if k.endswith("running_var") else v for k, v in state.items()}


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, x_u8: torch.Tensor, batch: int = 256, crop_pad: int = 0,
                   flip: bool = False, seed: int = 0, reflect: bool = False) -> bool:
    """Re-estimate batch-norm running statistics for the model's current weights.

    Averaged or asynchronously applied deltas give weights that no worker's running
    statistics were measured for; evaluating with those statistics can be far off. This runs
    the calibration images through the model with BN layers averaging over all batches
    (momentum None), everything else in eval mode. Pass the recipe's ``crop_pad``, ``flip`` and
    ``crop_reflect`` (``reflect``): the images are then augmented as in training (seeded by ``seed``),
    so the statistics describe what the later layers were trained on. Without it a fully trained
    resnet_fast lost 1.7 points (84.87% against 86.53% with its own statistics, 86.58% with augmented
    calibration; 1,024 images, docs/results.md); airbench, trained on reflected crops, lost 0.7 when
    its calibration crops were padded with zeros (89.00% against 89.70% with its own statistics,
    89.72% with reflected crops). Returns False when the model has no batch norm.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    was_training = model.training
    model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(x_u8), batch):
        x = x_u8[i:i + batch]
        model(channels_last(augment(x, crop_pad, flip, gen, reflect) if crop_pad or flip else x.float()))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)
    return True


def delta_spec(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Expected names, shapes and dtypes of a delta for this model (for validation at the boundary)."""
    state = model.state_dict()
    return {n: (tuple(state[n].shape), "float32") for n in delta_names(model)}


def cpu_keep_mask(like: torch.Tensor, p: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """A dropout keep-mask (uint8 0/1, on the CPU) for activation ``like``, drawn by ``gen`` (torch's default
    CPU generator when None) exactly as ``F.dropout`` draws its noise for ``like`` on the CPU: one
    ``bernoulli_(1 - p)`` over a tensor of ``like``'s shape and strides (the draws follow the memory order, so
    a channels-last activation gets other masks than a contiguous one; tests/test_local_device.py checks the
    two agree bit for bit)."""
    return torch.empty_strided(tuple(like.shape), like.stride(), dtype=torch.uint8).bernoulli_(1 - p, generator=gen)


class SeededDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose masks come from the unit's own CPU generator ``gen`` (``cpu_keep_mask``, moved to
    the activation's device), not from torch's process-wide one: a unit gets the same masks on every device
    and whatever else runs in the process meanwhile. CUDA's own generator draws other masks (on an H200,
    2026-12-04, an honest cnn unit trained there was at cosine 0.40 from the same unit on a CPU); and the
    process-wide generator is shared by every thread, so a coordinator recomputing a unit while another
    thread reseeded it (``torch.random.fork_rng`` restores the state on exit) got other masks: an honest
    result refuted at cosine 0.30 (CI, 2026-12-05). With ``gen`` None it is ``nn.Dropout``."""

    gen: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.gen is None:
            return super().forward(x)
        if self.p >= 1:
            return x * 0
        keep = cpu_keep_mask(x, self.p, self.gen).to(x.device, non_blocking=True)
        return x * keep.to(x.dtype).div_(1 - self.p)


def seeded_dropout(model: torch.nn.Module, gen: torch.Generator | None) -> None:
    """Every dropout layer of ``model`` becomes a ``SeededDropout`` of the same p drawing from ``gen`` (in
    place; a model reused for the next unit gets that unit's generator)."""
    for name, m in list(model.named_modules()):
        if type(m) is torch.nn.Dropout:
            parent, _, child = name.rpartition(".")
            m = SeededDropout(m.p, m.inplace)
            setattr(model.get_submodule(parent), child, m)
        if isinstance(m, SeededDropout):
            m.gen = gen


@dataclass
class LocalResult:
    delta: dict[str, np.ndarray]  # trained - base, for delta_names(model)
    loss_before: float            # loss of the first batch, before any update
    loss_after: float             # loss of the last batch, at its step
    mean_loss: float              # mean batch loss over the unit
    num_samples: int              # samples processed (steps * batch)
    seconds: float                # compute time


def batch_indices(n: int, steps: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``steps`` batches drawn without replacement from ``n`` samples, reshuffling at each pass."""
    order, out, pos = torch.randperm(n, generator=gen), [], 0
    for _ in range(steps):
        if pos + batch_size > n:
            take = order[pos:]
            order, pos = torch.randperm(n, generator=gen), batch_size - len(take)
            out.append(torch.cat([take, order[:pos]]))
        else:
            out.append(order[pos:pos + batch_size])
            pos += batch_size
    return out


def run_local(model_name: str, base: dict[str, np.ndarray], x_u8: np.ndarray, y: np.ndarray,
              recipe: Recipe, steps: int, lr: float, seed: int,
              model: torch.nn.Module | None = None, flip_parity: int | None = None,
              device: torch.device | str = "cpu") -> LocalResult:
    """Train ``steps`` SGD steps of ``recipe.batch_size`` from ``base`` on the shard (x_u8, y).

    Momentum starts from zero in every unit (units are independent). ``model`` may be a
    cached instance of ``model_name`` to avoid rebuilding it; its state is overwritten.
    ``flip_parity`` (a unit's ``hyper.flip_parity``, with ``recipe.flip``): alternating flips, image i
    mirrored when its coin xor the parity (``models.flips``), instead of a random mirror per step.
    ``device``: where the steps run (a CUDA GPU of a donor's); the draws (batches, crops, mirrors, dropout
    masks) stay on the CPU, so a unit's result is the same on every device up to rounding, and the delta
    comes back as CPU arrays.
    """
    t0 = time.perf_counter()
    model = model if model is not None else registry.build(model_name)
    gen = torch.Generator().manual_seed(seed)
    seeded_dropout(model, torch.Generator().manual_seed(seed))   # the masks torch.manual_seed(seed) gave nn.Dropout
    model.to(device=device, memory_format=torch.channels_last)
    load_arrays(model, base)
    model.train()
    opt = make_optimizer(model, recipe)
    for group in opt.param_groups:
        group["lr"] = lr
    x, labels = torch.from_numpy(np.ascontiguousarray(x_u8)), torch.from_numpy(np.asarray(y, dtype=np.int64))
    flip = recipe.flip
    if flip and flip_parity is not None:   # the unit's images mirrored once, as this epoch alternates them
        x, flip = mirror(x, torch.from_numpy(mirrors(x_u8, flip_parity))), False
    x, labels = x.to(device), labels.to(device)
    batch = min(recipe.batch_size, len(labels))
    losses = []
    for idx in batch_indices(len(labels), steps, batch, gen):
        idx = idx.to(device)
        x_aug = augment(x[idx], recipe.crop_pad, flip, gen, recipe.crop_reflect)
        loss = loss_fn(model(channels_last(x_aug)), labels[idx], recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    trained = model.state_dict()
    delta = {n: trained[n].detach().float().cpu().numpy() - base[n] for n in delta_names(model)}
    return LocalResult(delta, losses[0], losses[-1], float(np.mean(losses)), len(losses) * batch,
                       time.perf_counter() - t0)
