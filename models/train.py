"""Single-process CIFAR-10 trainer: the baseline every distributed result is measured against.

Reads top to bottom: setup, optimisation pieces (shared with the workers), evaluation,
logging, the training loop, the command's ``run``. Hyperparameters live in ``models.recipe``;
the arguments are parsed in ``models.cli`` (torch-free, so ``--help`` answers at once).

    crowdtrain train --model resnet_fast --data ../shared/data --epochs 10 --out runs/r1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import registry
from models.augment import augment, mirror
from models.data import Cifar10, DataError, load_cifar10
from models.recipe import Recipe, lookahead_decay

DEFAULT_MODEL = "resnet_fast"   # (models.cli states it too, for --help without torch)


# ----------------------------------------------------------------------------- setup
def set_threads(threads: int | None) -> int:
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or None): the first CUDA GPU when this torch sees one, else the CPU; or ``cpu``, ``cuda``,
    ``cuda:N``. ValueError naming what is wrong (a GPU asked for where torch has none, a bad name)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


def describe_device(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H200)``: the device as a log line and a run's config give it."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


# ----------------------------------------------------------------------------- optimisation
def lr_at(progress: float, recipe: Recipe) -> float:
    """Learning rate at ``progress`` (0..1 through the run) under the recipe's schedule: a linear warmup from
    ``lr_start`` x the peak, then (onecycle, cosine) down to ``lr_end`` x the peak."""
    p, w = min(max(progress, 0.0), 1.0), recipe.warmup
    if w > 0 and p < w:
        return recipe.lr * (recipe.lr_start + (1 - recipe.lr_start) * p / w)
    rest, end = (p - w) / (1 - w), recipe.lr_end
    if recipe.schedule == "onecycle":
        return recipe.lr * (1 - (1 - end) * rest)
    if recipe.schedule == "cosine":
        return recipe.lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * rest)))
    return recipe.lr


NO_DECAY = ("forces",)  # parameter names (last part) that act like biases: never decayed


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum; weight decay on kernels, matrices and supermask scores only
    (not on biases, batch-norm parameters, or a PhysicsLayer's forces and strength), and on the 1-D
    parameters a model names in ``decayed_vectors``."""
    trainable = {id(p) for p in registry.trainable_parameters(model)}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in trainable]
    also = set(getattr(model, "decayed_vectors", ()))    # 1-D parameters a model asks to decay (airbench's shifts)
    decayed = {n for n, p in named if (p.ndim > 1 and n.rsplit(".", 1)[-1] not in NO_DECAY) or n in also}
    decay = [p for n, p in named if n in decayed]
    plain = [p for n, p in named if n not in decayed]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov and recipe.momentum > 0)


class Lookahead:
    """Weights averaged along the run (airbench94's lookahead): every ``EVERY`` steps the model's
    floating-point state moves to an average that trails it by a decay of 0.95^EVERY x progress^3
    (none at the start, most at the end), and the model continues from that average."""

    EVERY = 5

    def __init__(self, model: torch.nn.Module) -> None:
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, progress: float) -> None:
        decay = lookahead_decay(progress, self.EVERY)
        state = model.state_dict()
        for k, avg in self.avg.items():
            avg.lerp_(state[k], 1 - decay)
            state[k].copy_(avg)


def loss_fn(logits: torch.Tensor, y: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Cross-entropy with label smoothing, or the focal loss of Lin et al. (ICCV 2017)."""
    if recipe.loss == "focal":
        ce = F.cross_entropy(logits, y, reduction="none")
        return ((1 - torch.exp(-ce)) ** recipe.focal_gamma * ce).mean()
    return F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC memory layout: 1.1-2x faster convolutions on CPU (models are moved by ``registry.build``'s caller)."""
    return x.contiguous(memory_format=torch.channels_last)


def sgd_step(model, opt, x_u8, y, recipe: Recipe, lr: float, gen: torch.Generator) -> float:
    """One augmented SGD step on a uint8 batch; returns the batch loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    logits = model(channels_last(augment(x_u8, recipe.crop_pad, recipe.flip, gen, recipe.crop_reflect)))
    loss = loss_fn(logits, y, recipe)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def alternate_flips(x_u8: torch.Tensor, first: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's alternating flips: image i is mirrored in epoch 1 if ``first[i]`` (a coin drawn once per
    run), and in each later epoch the other way from the one before. ``first`` is indexed like the batch."""
    return mirror(x_u8, first ^ (epoch % 2 == 0))


# ----------------------------------------------------------------------------- evaluation
def tta_views(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain logits, logits with test-time augmentation) of float images ``x`` (0..255), ``run`` giving a
    batch's logits (a module, or a model file's predictor): level 0 none, 1 the mean over the image and its
    mirror, 2 half that plus half the same over the image shifted one pixel up-left and down-right (edges
    replicated; the views of whole-valued images stay whole-valued). The plain logits are the first view's,
    computed once."""
    plain = run(x)
    if level == 0:
        return plain, plain
    mirrored = 0.5 * (plain + run(x.flip(3)))
    if level == 1:
        return plain, mirrored
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[2:]
    shifted = [padded[:, :, :h, :w], padded[:, :, 2:, 2:]]
    return plain, 0.5 * mirrored + 0.25 * sum(tta_views(run, s, 1)[1] for s in shifted)


def model_views(model: torch.nn.Module, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain logits, logits with test-time augmentation ``level``) of float images ``x`` (0..255): ``tta_views``
    through ``model`` in channels-last layout."""
    return tta_views(lambda v: model(channels_last(v)), x, level)


def tta_logits(model: torch.nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """Logits of float images ``x`` (0..255) with test-time augmentation ``level`` (``tta_views``)."""
    return model_views(model, x, level)[1]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x_u8: torch.Tensor, y: torch.Tensor, batch: int = 1000,
             tta: int = 0, with_plain: bool = False) -> tuple[float, ...]:
    """(mean cross-entropy, accuracy in [0, 1]) on un-augmented images (``tta``: ``tta_views``), and with
    ``with_plain`` the accuracy without test-time augmentation too (from the same passes); restores train
    mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct, correct_plain = 0.0, 0, 0
    for i in range(0, len(y), batch):
        plain, logits = model_views(model, x_u8[i:i + batch].float(), tta)
        loss_sum += float(F.cross_entropy(logits, y[i:i + batch], reduction="sum"))
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
        correct_plain += int((plain.argmax(1) == y[i:i + batch]).sum())
    model.train(was_training)
    n = max(len(y), 1)
    return (loss_sum / n, correct / n, correct_plain / n) if with_plain else (loss_sum / n, correct / n)


# ----------------------------------------------------------------------------- logging
def write_curves(rows: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy per epoch as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train (augmented)")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [100 * r["test_acc"] for r in rows], "o-", color="C2", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model: torch.nn.Module, config: dict, last: dict | None) -> None:
    """``model.pt``: the state as CPU tensors (a model trained on a GPU loads anywhere), the config, the last row."""
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "config": config, "metrics": last}, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- training
@dataclass
class RunResult:
    rows: list[dict]
    interrupted: bool
    model: torch.nn.Module


def train(model_name: str, data: Cifar10, recipe: Recipe, out: Path | None, *, seed: int = 0,
          progress: bool = True, max_steps: int | None = None, eval_every_epoch: bool = True,
          device: torch.device | str = "cpu") -> RunResult:
    """Train ``model_name`` on ``data`` for ``recipe.epochs`` epochs (or ``max_steps`` steps) on ``device``
    (the images and the model live there; the batches' order, crops and flips are drawn on the CPU from
    ``seed``, so they are the same on every device).

    Writes ``out/metrics.jsonl`` (one line per epoch), ``out/model.pt`` and ``out/curves.png``
    when ``out`` is given. Ctrl-C stops after the current step and keeps what was written.
    ``progress``: a line per epoch on stderr, and a progress bar within the epoch when stderr is a
    terminal (a log file gets the epoch lines only).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    model = registry.build(model_name).to(memory_format=torch.channels_last)
    model.train()
    x_train, y_train = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    registry.init_from_data(model, x_train)    # on the CPU, from the same images on every device
    model.to(device)
    x_train, y_train = x_train.to(device), y_train.to(device)
    opt = make_optimizer(model, recipe)
    lookahead = Lookahead(model) if recipe.lookahead else None
    alternating = recipe.flip and recipe.alt_flip
    first_flips = torch.rand(len(y_train), generator=gen) < 0.5 if alternating else None
    # with alternating flips the batches come flipped (``alternate_flips``): the step draws no flip of its own
    step_recipe = dataclasses.replace(recipe, flip=False) if alternating else recipe
    x_test, y_test = torch.from_numpy(data.test_x).to(device), torch.from_numpy(data.test_y).to(device)
    steps_per_epoch = max(len(y_train) // recipe.batch_size, 1)
    total_steps = steps_per_epoch * recipe.epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    config = {"model": model_name, "recipe": recipe.to_dict(), "seed": seed, "data": data.source,
              "data_digest": data.digest, "train_size": len(y_train), "test_size": len(y_test),
              "threads": torch.get_num_threads(), "device": describe_device(device)}
    metrics_file = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        metrics_file = open(out / "metrics.jsonl", "w", buffering=1)

    rows: list[dict] = []
    step, interrupted, started = 0, False, time.perf_counter()
    try:
        for epoch in range(1, recipe.epochs + 1):
            if step >= total_steps:
                break
            if hasattr(model, "start_epoch"):
                model.start_epoch(epoch)    # e.g. airbench freezes its whitening bias after 3 epochs
            order = torch.randperm(len(y_train), generator=gen)
            n_steps = min(steps_per_epoch, total_steps - step)
            bar = tqdm(total=n_steps, desc=f"epoch {epoch}/{recipe.epochs}", unit="step",
                       disable=not (progress and sys.stderr.isatty()), leave=False, dynamic_ncols=True)
            t0, loss_sum, seen = time.perf_counter(), 0.0, 0
            for i in range(n_steps):
                idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
                lr = lr_at(step / total_steps, recipe)
                at = idx.to(device)
                x = alternate_flips(x_train[at], first_flips[idx], epoch) if alternating else x_train[at]
                loss = sgd_step(model, opt, x, y_train[at], step_recipe, lr, gen)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss} at step {step}; lower --lr")
                step, seen, loss_sum = step + 1, seen + len(idx), loss_sum + loss * len(idx)
                if lookahead is not None and (step % Lookahead.EVERY == 0 or step == total_steps):
                    lookahead.update(model, step / total_steps)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", samples_s=f"{seen / (time.perf_counter() - t0):.0f}")
                bar.update()
            bar.close()
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(seen, 1),
                   "samples_per_second": seen / seconds, "seconds": seconds, "lr": lr}
            last = epoch == recipe.epochs or step >= total_steps
            if eval_every_epoch or last:   # test-time augmentation (6 passes at level 2) on the last only
                tta = recipe.tta if last else 0
                row["test_loss"], row["test_acc"], plain = evaluate(model, x_test, y_test, tta=tta, with_plain=True)
                if tta:
                    row["test_acc_plain"] = plain
            row["elapsed"] = time.perf_counter() - started
            rows.append(row)
            if progress:
                acc = f"test_acc {100 * row['test_acc']:.2f}%" if "test_acc" in row else ""
                tqdm.write(f"epoch {epoch}: train_loss {row['train_loss']:.4f} {acc} "
                           f"({row['samples_per_second']:.0f} samples/s, {seconds:.1f} s)", file=sys.stderr)
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if metrics_file:
            metrics_file.close()
        if out is not None:
            save_checkpoint(out / "model.pt", model, config, rows[-1] if rows else None)
            if rows and all("test_acc" in r for r in rows):
                write_curves(rows, out / "curves.png", f"{model_name} (seed {seed})")
    return RunResult(rows, interrupted, model)


# ----------------------------------------------------------------------------- command line
def recipe_from_args(args: argparse.Namespace, base: Recipe) -> Recipe:
    fields = {f.name for f in dataclasses.fields(Recipe)}
    changes = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return dataclasses.replace(base, **changes)


def subset(data: Cifar10, n: int | None) -> Cifar10:
    if n is None:
        return data
    return dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])


def run(args: argparse.Namespace) -> int:
    """``crowdtrain train`` once its arguments are parsed (``models.cli``)."""
    try:
        spec = registry.get(args.model)
        recipe = recipe_from_args(args, spec.recipe)
        threads = set_threads(args.threads)
        device = resolve_device(args.device)
        data = subset(load_cifar10(args.data, download=args.download, progress=not args.no_progress),
                      args.limit_train)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"training {args.model} on {len(data.train_y)} images ({data.source}), {recipe.epochs} epochs, "
          f"batch {recipe.batch_size}, lr {recipe.lr}, on {describe_device(device)}, {threads} threads -> {out}",
          file=sys.stderr)
    try:
        result = train(args.model, data, recipe, out, seed=args.seed, progress=not args.no_progress, device=device)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    last = result.rows[-1] if result.rows else None
    if last and "test_acc" in last:
        tta = f" (test-time augmentation {recipe.tta}; without: {100 * last['test_acc_plain']:.2f}%)" \
            if "test_acc_plain" in last else ""
        print(f"{args.model}: test accuracy {100 * last['test_acc']:.2f}%{tta} after {last['epoch']} epoch(s); "
              f"wrote {out}/metrics.jsonl, model.pt, curves.png")
    model_pt = out / "model.pt"
    data = f" --data {args.data}" if args.data else ""
    print(f"model: {model_pt} (crowdtrain eval --model {model_pt}{data} / "
          f"crowdtrain export --model {model_pt} --format onnx)")
    if result.interrupted:
        print(f"interrupted: kept {len(result.rows)} finished epoch(s) in {out}", file=sys.stderr)
        return 130
    return 0
