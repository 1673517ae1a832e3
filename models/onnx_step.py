"""One whole SGD training step of a registered model as a plain ONNX inference graph.

onnxruntime-web has no usable training API, so a browser worker runs a graph that computes
forward, backward and the optimiser update in one go, feeding each step's outputs back in as
the next step's inputs (the route of the onnx-train-step prototype). The step is traced with
``make_fx`` from the registry's model (the one definition of every layer) through
``torch.func.functional_call``, with the decompositions below for the ops the ONNX exporter
cannot translate, then exported with ``torch.onnx.export(dynamo=True)``. ``make_fx`` traces
concrete shapes: one graph per batch size. The file holds no weights: everything the step
reads or changes is a graph input or output (``StepSpec`` lists them for the browser).

Inputs, in this order (names after the state_dict entry they carry):
  ``p:<name>``  trainable parameters (a supermask model's scores)
  ``f:<name>``  fixed parameters (a supermask model's random weights; read, never output)
  ``s:<name>``  batch-norm running statistics (``running_mean`` / ``running_var``)
  ``m:<name>``  SGD momentum buffer of ``p:<name>`` (zeros at the start of a unit; absent
                when exported with ``momentum=False``)
  ``x``         float32 [B, 3, 32, 32] pixel values 0..255, already augmented by the caller
  ``y``         int64 [B] labels
  ``d:<module>`` dropout keep-mask (float32 0/1, shape of the dropped activation, drawn by
                the caller with P(1) = 1 - p); the graph scales by 1 / (1 - p) as torch does
  ``lr``, ``momentum``, ``weight_decay``, ``label_smoothing``  float32 scalars (recipe keys;
                ``momentum`` absent with ``momentum=False``)
Outputs: ``loss`` (float32 scalar, the batch loss before the update), then ``new_p:*``,
``new_m:*``, ``new_s:*`` in the order of their inputs.

The update is ``torch.optim.SGD`` as ``models.train.make_optimizer`` configures it (weight
decay only on the parameters it decays; Nesterov as the recipe says, fixed at export); the
loss is ``models.train.loss_fn``'s cross-entropy with label smoothing (focal: not exported).
Batch norm: train-mode statistics, running estimates with the module's momentum and the
unbiased batch variance, as torch. Dropout masks are inputs, not random ops in the graph, so
a unit computes the same result wherever it runs from the caller's seed.

Two traps found on the way (both silent: the graph runs, the numbers are wrong): without
torch's batch-norm decompositions the exporter's own train-mode batch norm is off (loss by
~1e-2, running variances by ~1e-1 on resnet_fast); and a max-pool backward that sends the
gradient to every tied maximum differs from torch's first-maximum rule on flat image regions.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch._decomp import core_aten_decompositions, get_decompositions
from torch.func import functional_call, grad_and_value
from torch.fx.experimental.proxy_tensor import make_fx

from models import registry
from models.state_names import is_running_stat
from models.recipe import Recipe
from models.train import make_optimizer

OPSET = 18
NUM_CLASSES = 10
HYPERPARAMETERS = ("lr", "momentum", "weight_decay", "label_smoothing")  # recipe keys fed as scalars
MODELS_DIR = Path(__file__).resolve().parent

aten = torch.ops.aten


class ExportError(ValueError):
    """The model or recipe uses something the step export does not handle."""


# ----------------------------------------------------------------------------- decompositions
def _conv_backward_by(input_grad, weight_grad):
    """A decomposition of convolution_backward that computes the input gradient with
    ``input_grad(go, w, padding)`` and the weight gradient with ``weight_grad(go, inp, w, padding)``;
    stride 1, dilation 1, one group only (all the registry's convs)."""
    def convolution_backward(go, inp, w, bias_sizes, stride, padding, dilation, transposed, output_padding,
                             groups, mask):
        if list(stride) != [1, 1] or list(dilation) != [1, 1] or groups != 1 or transposed:
            raise ExportError(f"step export: only stride-1, dilation-1, ungrouped 2-d convs are supported "
                              f"(got stride {list(stride)}, dilation {list(dilation)}, groups {groups})")
        gi = input_grad(go, w, list(padding)) if mask[0] else None
        gw = weight_grad(go, inp, w, list(padding)) if mask[1] else None
        return gi, gw, (go.sum((0, 2, 3)) if mask[2] else None)
    return convolution_backward


def _conv_transposed_input_grad(go, w, padding):
    """The input gradient as ConvTranspose (the WebGPU formulation)."""
    return F.conv_transpose2d(go, w, padding=padding)


def _conv_weight_grad_batch_as_channels(go, inp, w, padding):
    """The weight gradient as a conv with the batch as channels (the WebGPU formulation)."""
    return F.conv2d(inp.transpose(0, 1), go.transpose(0, 1), padding=padding).transpose(0, 1)


def _conv_input_grad(go, w, padding):
    """The input gradient of a stride-1 conv. For a "same" conv (padding (k - 1) / 2) it is a plain
    conv with the flipped, transposed kernel and the same padding: onnxruntime's Conv is faster than
    its ConvTranspose (resnet_fast's step 327 -> 280 ms). Other paddings keep ConvTranspose: as a
    conv they need padding k - 1 - p, which onnxruntime-web's WebGPU Conv failed to run (cnn's
    unpadded convs: "Failed to generate kernel's output" on SwiftShader)."""
    kh, kw = w.shape[2], w.shape[3]
    if [kh - 1 - padding[0], kw - 1 - padding[1]] == padding:
        return F.conv2d(go, w.flip(2, 3).transpose(0, 1), padding=padding)
    return _conv_transposed_input_grad(go, w, padding)


def _conv_weight_grad(go, inp, w, padding):
    """dW[o, c, dy, dx] = sum over n, i, j of go[n, o, i, j] * x_pad[n, c, i + dy, j + dx].

    As kh * kw MatMuls of go [O, N*H*W] by the shifted input [N*H*W, C]: GEMM is the best-tuned
    kernel of onnxruntime's CPU and WASM builds. The earlier form, a conv with the batch as
    channels, is a conv whose "kernel" is the whole image; it took 40% of the cnn's step.
    """
    n, c, _, _ = inp.shape
    o, _, kh, kw = w.shape
    ph, pw = padding
    ho, wo = go.shape[2], go.shape[3]
    x = F.pad(inp, (pw, pw, ph, ph)).permute(0, 2, 3, 1)          # [N, Hp, Wp, C], one transpose
    g = go.permute(1, 0, 2, 3).reshape(o, n * ho * wo)             # [O, N*H*W]
    cols = [g @ x[:, dy:dy + ho, dx:dx + wo, :].reshape(n * ho * wo, c) for dy in range(kh) for dx in range(kw)]
    return torch.stack(cols, -1).reshape(o, c, kh, kw)


def _check_pool(x, kernel_size, stride, padding, dilation, ceil_mode) -> None:
    h, w = x.shape[-2:]
    if (list(kernel_size) != [2, 2] or list(stride) not in ([], [2, 2]) or any(padding) or ceil_mode
            or any(d != 1 for d in dilation) or h % 2 or w % 2):
        raise ExportError(f"step export: only 2x2 max-pooling with stride 2 on even sizes is supported "
                          f"(got kernel {list(kernel_size)}, stride {list(stride)}, input {h}x{w})")


def _max_pool(x, kernel_size, stride=(), padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    """2x2 window max as reshape + amax: MaxPool's Indices output breaks onnxruntime-web's WebGPU."""
    _check_pool(x, kernel_size, stride, padding, dilation, ceil_mode)
    n, c, h, w = x.shape
    out = x.reshape(n, c, h // 2, 2, w // 2, 2).amax((3, 5))
    return out, torch.zeros(out.shape, dtype=torch.int64)


def _max_pool_backward_by(route):
    """A decomposition of the 2x2 max-pool backward: each window's gradient goes to its first
    maximum in row-major order, as torch's kernel (ArgMax picks the first on ties; ties are common:
    flat image regions, crop padding, ReLU zeros). ``route(windows [n, c, h/2, w/2, 4], go)`` gives
    the gradient per window position, [n, c, h/2, w/2, 4]."""
    def max_pool2d_with_indices_backward(go, x, kernel_size, stride, padding, dilation, ceil_mode, indices):
        n, c, h, w = x.shape
        windows = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
        g = route(windows, go)
        return g.reshape(n, c, h // 2, w // 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)
    return max_pool2d_with_indices_backward


def _route_by_where(windows, go):
    """One Where per window position (the CPU formulation)."""
    first = windows.argmax(-1)
    zero = torch.zeros((), dtype=go.dtype)
    return torch.stack([torch.where(first == k, go, zero) for k in range(4)], -1)


def _route_by_one_hot(windows, go):
    """The first maximum as a one-hot (ArgMax == arange(4)) times the gradient (the WebGPU formulation)."""
    first = windows.argmax(-1, keepdim=True) == torch.arange(4, device=windows.device)
    return first.to(go.dtype) * go.unsqueeze(-1)


def _sign_by_compare(x):
    """sign(x) as (x > 0) - (x < 0) (the WebGPU formulation): onnxruntime-web has no WebGPU Sign, and
    the CPU fallback it takes instead writes its output over a graph input that a later node still
    reads (seen on SwiftShader: a supermask's updated scores were the sign of another layer's)."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


# Without torch's own batch-norm decompositions the exported graph runs but is wrong (the
# exporter's train-mode batch norm: resnet_fast's loss off by 9e-3, running variances by 8e-2);
# with them it matches torch to ~1e-6.
_COMMON: dict = {
    **core_aten_decompositions(),
    **get_decompositions([aten.native_batch_norm, aten.native_batch_norm_backward,
                          aten._native_batch_norm_legit, aten._native_batch_norm_legit_functional]),
    aten.max_pool2d_with_indices.default: _max_pool,
}
# Two formulations of the same step, one per kind of kernel that runs it:
#   "cpu"    for onnxruntime's CPU kernels (Python, and onnxruntime-web's WebAssembly): weight
#            gradients as MatMuls, input gradients of "same" convs as Conv, pooling backward as
#            Where. About 2x faster than "webgpu" there (cnn at batch 64: 223 -> 110 ms).
#   "webgpu" for onnxruntime-web's WebGPU kernels, which compute the "cpu" graph wrong (seen in
#            headless Chromium's SwiftShader: the cnn's first weight gradient 50x too small with
#            the MatMul form, its loss wrong with the Where form; a padded-2 Conv fails to run).
# Both match torch (tests/test_onnx_step.py); a tab runs a graph on WebGPU only after its
# known-answer check passes (coordinator/steps.py).
TARGETS = ("cpu", "webgpu")
DECOMPOSITIONS: dict[str, dict] = {
    "cpu": {**_COMMON,
            aten.convolution_backward.default: _conv_backward_by(_conv_input_grad, _conv_weight_grad),
            aten.max_pool2d_with_indices_backward.default: _max_pool_backward_by(_route_by_where)},
    "webgpu": {**_COMMON,
               aten.convolution_backward.default: _conv_backward_by(_conv_transposed_input_grad,
                                                                    _conv_weight_grad_batch_as_channels),
               aten.max_pool2d_with_indices_backward.default: _max_pool_backward_by(_route_by_one_hot),
               aten.sign.default: _sign_by_compare, aten.sgn.default: _sign_by_compare},
}
RANDOM_OPS = ("bernoulli", "rand", "native_dropout", "normal", "multinomial")  # must not be in a step graph


# ----------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class TensorSpec:
    name: str                  # graph input / output name
    role: str                  # param, fixed, stat, momentum, data, dropout, hyper, loss
    shape: tuple[int, ...]
    dtype: str = "float32"     # or "int64" (y)
    state: str | None = None   # the state_dict entry it carries (param, fixed, stat, momentum of)
    feeds: str | None = None   # outputs: the input to feed it back to at the next step
    decay: bool | None = None  # params: whether weight decay applies
    p: float | None = None     # dropout masks: the drop probability (draw 1 with probability 1 - p)


@dataclass(frozen=True)
class StepSpec:
    model: str
    batch_size: int
    opset: int
    momentum: bool                   # momentum buffers are inputs / outputs
    nesterov: bool                   # fixed at export, from the model's recipe
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    torch_version: str = torch.__version__

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "StepSpec":
        d = json.loads(text)
        tensors = lambda rows: tuple(TensorSpec(**{**r, "shape": tuple(r["shape"])}) for r in rows)  # noqa: E731
        return cls(**{**d, "inputs": tensors(d["inputs"]), "outputs": tensors(d["outputs"])})


# ----------------------------------------------------------------------------- the model's layout
class MaskedDropout(nn.Module):
    """Stands in for ``nn.Dropout`` in the exported step: the keep-mask is a buffer that the step
    passes in (as ``functional_call`` does for state), so no random op enters the graph."""

    def __init__(self, p: float, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.keep = 1.0 - p
        self.register_buffer("mask", torch.ones(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.mask / self.keep)  # torch: input * (bernoulli(1 - p) / (1 - p))


def dropout_shapes(model: nn.Module, batch_size: int) -> dict[str, tuple[float, tuple[int, ...]]]:
    """{module name: (p, shape of its input)} for every ``nn.Dropout``, in forward order."""
    found, hooks = {}, []

    def record(name: str, module: nn.Dropout, args: tuple) -> None:
        found.setdefault(name, (module.p, tuple(args[0].shape)))

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            if type(m) is not nn.Dropout:
                raise ExportError(f"step export: {type(m).__name__} at '{name}' is not supported (only nn.Dropout)")
            if not 0 <= m.p < 1:
                raise ExportError(f"step export: dropout p must be in [0, 1), got {m.p} at '{name}'")
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: record(name, mod, args)))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(batch_size, 3, 32, 32))  # eval: leaves the BN statistics alone
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def mask_dropout(model: nn.Module, shapes: dict[str, tuple[float, tuple[int, ...]]]) -> None:
    """Replace each ``nn.Dropout`` named in ``shapes`` by a ``MaskedDropout`` (in place)."""
    for name, (p, shape) in shapes.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, MaskedDropout(p, shape))


def step_layout(model_name: str, model: nn.Module, recipe: Recipe, batch_size: int, momentum: bool,
                dropout: dict[str, tuple[float, tuple[int, ...]]]) -> StepSpec:
    """The graph's inputs and outputs for ``model`` (whose state_dict names they carry)."""
    # make_optimizer decides which parameters decay (the value is an input) and whether Nesterov applies
    opt = make_optimizer(model, dataclasses.replace(recipe, weight_decay=1.0))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    trainable = {id(p) for p in registry.trainable_parameters(model)}
    params, fixed, stats = [], [], []
    named = dict(model.named_parameters())
    for name, value in model.state_dict(keep_vars=True).items():
        shape = tuple(value.shape)
        if name in named and id(named[name]) in trainable:
            params.append(TensorSpec(f"p:{name}", "param", shape, state=name, decay=id(named[name]) in decayed))
        elif name in named:
            fixed.append(TensorSpec(f"f:{name}", "fixed", shape, state=name))
        elif value.is_floating_point() and is_running_stat(name):
            stats.append(TensorSpec(f"s:{name}", "stat", shape, state=name))
        elif value.is_floating_point():
            raise ExportError(f"step export: state entry '{name}' is neither a parameter nor a running statistic")
    buffers = [TensorSpec(f"m:{t.state}", "momentum", t.shape, state=t.state) for t in params] if momentum else []
    data = [TensorSpec("x", "data", (batch_size, 3, 32, 32)), TensorSpec("y", "data", (batch_size,), "int64")]
    masks = [TensorSpec(f"d:{name}", "dropout", shape, p=p) for name, (p, shape) in dropout.items()]
    hyper = [TensorSpec(h, "hyper", ()) for h in HYPERPARAMETERS if momentum or h != "momentum"]
    new = lambda t: dataclasses.replace(t, name=f"new_{t.name}", feeds=t.name, decay=None)  # noqa: E731
    return StepSpec(model=model_name, batch_size=batch_size, opset=OPSET, momentum=momentum,
                    nesterov=bool(momentum and opt.defaults["nesterov"]),
                    inputs=tuple(params + fixed + stats + buffers + data + masks + hyper),
                    outputs=(TensorSpec("loss", "loss", ()), *map(new, params + buffers + stats)))


# ----------------------------------------------------------------------------- the step
def cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, y, label_smoothing=ls)`` with ``ls`` a tensor (a graph input), in
    ATen's own formula: (1 - ls) * nll + ls / classes * mean over the batch of -sum(log p)."""
    logp = F.log_softmax(logits, 1)
    return (1 - label_smoothing) * F.nll_loss(logp, y) + (-logp.sum(1)).mean() * (label_smoothing / logits.shape[1])


def sgd(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None, lr: torch.Tensor, mu: torch.Tensor | None,
        wd: torch.Tensor, decay: bool, nesterov: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One parameter's ``torch.optim.SGD`` update (dampening 0; a zero buffer = torch's first step)."""
    if decay:
        g = g + wd * p
    if buf is not None:
        buf = buf * mu + g
        g = g + mu * buf if nesterov else buf
    return p - lr * g, buf


def make_step(model: nn.Module, spec: StepSpec) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The step as a function of the flat graph inputs (in ``spec.inputs`` order) -> flat outputs."""
    params = [t for t in spec.inputs if t.role == "param"]
    counters = [n for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]

    def step(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = dict(zip(spec.input_names, flat))
        fixed = {t.state: feed[t.name] for t in spec.inputs if t.role == "fixed"}
        fixed |= {f"{t.name[2:]}.mask": feed[t.name] for t in spec.inputs if t.role == "dropout"}
        # batch norm updates these in place: copies, passed through the grad transform as an argument
        stats = {t.state: feed[t.name].clone() for t in spec.inputs if t.role == "stat"}
        counts = {n: torch.zeros((), dtype=torch.long) for n in counters}  # unused with a fixed BN momentum
        x, y, ls = feed["x"], feed["y"], feed["label_smoothing"]

        def loss_of(ps: dict[str, torch.Tensor], mutable: dict[str, torch.Tensor]) -> torch.Tensor:
            return cross_entropy(functional_call(model, {**fixed, **mutable, **ps}, (x,)), y, ls)

        grads, loss = grad_and_value(loss_of)({t.state: feed[t.name] for t in params}, stats | counts)
        new_p, new_m = [], []
        for t in params:
            buf = feed[f"m:{t.state}"] if spec.momentum else None
            p, buf = sgd(feed[t.name], grads[t.state], buf, feed["lr"], feed.get("momentum"),
                         feed["weight_decay"], t.decay, spec.nesterov)
            new_p.append(p)
            new_m += [buf] if buf is not None else []
        return (loss, *new_p, *new_m, *stats.values())

    return step


def example_inputs(spec: StepSpec, recipe: Recipe, model: nn.Module, seed: int = 0) -> list[torch.Tensor]:
    """Inputs to trace with: the model's state, zero momentum, a random batch, the recipe's scalars."""
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    out = []
    for t in spec.inputs:
        if t.state is not None and t.role != "momentum":
            out.append(state[t.state].detach().clone().float())
        elif t.role == "momentum":
            out.append(torch.zeros(t.shape))
        elif t.name == "x":
            out.append(torch.randint(0, 256, t.shape, generator=g).float())
        elif t.name == "y":
            out.append(torch.randint(0, NUM_CLASSES, t.shape, generator=g))
        elif t.role == "dropout":
            out.append(torch.bernoulli(torch.full(t.shape, 1 - t.p), generator=g))
        else:
            out.append(torch.tensor(float(getattr(recipe, t.name)), dtype=torch.float32))
    return out


class _Graph(nn.Module):
    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph

    def forward(self, *flat: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.graph_module(*flat)
        return tuple(out) if isinstance(out, (tuple, list)) else out


def trace_step(model_name: str, batch_size: int, *, momentum: bool = True, target: str = "cpu"
               ) -> tuple[torch.fx.GraphModule, StepSpec, list[torch.Tensor]]:
    """make_fx of one training step: (graph, spec, the example inputs it was traced with)."""
    recipe = registry.get(model_name).recipe
    if recipe.loss != "ce":
        raise ExportError(f"step export: loss '{recipe.loss}' of model '{model_name}' is not exported "
                          "(only cross-entropy with label smoothing; focal is left to the Python worker)")
    with torch.random.fork_rng():  # the caller's global RNG is left as it was
        torch.manual_seed(0)  # the traced values do not matter (they are all inputs), only the shapes
        model = registry.build(model_name).train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.momentum is None or not m.track_running_stats):
            raise ExportError("step export: batch norm needs a fixed momentum and running statistics")
    dropout = dropout_shapes(model, batch_size)
    spec = step_layout(model_name, model, recipe, batch_size, momentum, dropout)
    mask_dropout(model, dropout)
    args = example_inputs(spec, recipe, model)
    if target not in TARGETS:
        raise ExportError(f"step export: target must be one of {', '.join(TARGETS)}, got {target!r}")
    graph = make_fx(make_step(model, spec), decomposition_table=DECOMPOSITIONS[target])(*args)
    random = sorted({str(n.target) for n in graph.graph.nodes if any(r in str(n.target) for r in RANDOM_OPS)})
    if random:
        raise ExportError(f"step export: random ops left in the traced step: {', '.join(random)}")
    return graph, spec, args


def write_onnx(graph: torch.fx.GraphModule, args: list[torch.Tensor], path: str | os.PathLike,
               input_names: list[str], output_names: list[str]) -> None:
    """Export a traced (already decomposed) graph with the dynamo exporter, weights-free, one file."""
    torch.onnx.export(_Graph(graph).eval(), tuple(args), str(path), input_names=input_names,
                      output_names=output_names, dynamo=True, external_data=False,
                      opset_version=OPSET, verbose=False)


def export_step(model_name: str, batch_size: int, path: str | os.PathLike, *, momentum: bool = True,
                target: str = "cpu") -> StepSpec:
    """Write one training step of ``model_name`` at ``batch_size`` as an ONNX graph to ``path``."""
    graph, spec, args = trace_step(model_name, batch_size, momentum=momentum, target=target)
    write_onnx(graph, args, path, spec.input_names, spec.output_names)
    check_io(path, spec)
    return spec


def check_io(path: str | os.PathLike, spec: StepSpec) -> None:
    """The written graph's inputs and outputs are exactly the spec's (the exporter drops unused inputs)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got_in, got_out = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        missing = sorted(set(spec.input_names + spec.output_names) - set(got_in + got_out))
        raise ExportError(f"step export of '{spec.model}': graph inputs/outputs differ from the spec "
                          f"(missing {missing})")


# ----------------------------------------------------------------------------- the cache
def source_hash() -> str:
    """sha256 over the code of every module in models/ (the definition of what a step computes): its syntax
    tree without docstrings, so that a change to a comment, a docstring or the layout exports nothing again
    (an export is a minute of CPU per model, batch size and target; every coordinator start and test
    suite after such a change paid it). Read again only when a file's size or time changed."""
    stats = [(f, f.stat()) for f in sorted(MODELS_DIR.glob("*.py"))]
    return _code_hash(tuple((f, st.st_mtime_ns, st.st_size) for f, st in stats))


@functools.lru_cache(maxsize=4)
def _code_hash(files: tuple[tuple[Path, int, int], ...]) -> str:
    h = hashlib.sha256()
    for f, _, _ in files:
        h.update(f.name.encode() + b"\0" + code_of(f.read_bytes()).encode() + b"\0")
    return h.hexdigest()


_PARSE_ONE_AT_A_TIME = threading.Lock()


def _parse(source: bytes) -> ast.Module:
    """``ast.parse``, safe beside other threads: CPython 3.11 keeps the AST constructor's recursion depth per
    interpreter, not per thread, so a parse that overlaps another thread's (3.11's traceback formatting parses
    too) can fail with a spurious ``SystemError: AST constructor recursion depth mismatch`` (python/cpython
    gh-106905; seen in a coordinator building a step graph while its other threads worked). One of ours at a
    time, and a spurious failure tried again."""
    for attempt in range(4):
        try:
            with _PARSE_ONE_AT_A_TIME:
                return ast.parse(source)
        except SystemError:
            time.sleep(0.01 * (attempt + 1))
    with _PARSE_ONE_AT_A_TIME:
        return ast.parse(source)


def code_of(source: bytes) -> str:
    """A module's syntax tree, docstrings left out, as text (comments and layout are not in it)."""
    tree = _parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


def cache_key(model_name: str, batch_size: int, momentum: bool = True, target: str = "cpu") -> str:
    # onnxscript's version from its metadata: importing it costs a second and a half of CPU, and a
    # coordinator reads a cached graph at every start
    parts = [model_name, str(batch_size), str(momentum), str(OPSET), torch.__version__,
             importlib.metadata.version("onnxscript"), source_hash()] + ([target] if target != "cpu" else [])
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _cache_stem(model_name: str, batch_size: int, cache_dir: str | os.PathLike, momentum: bool, target: str) -> Path:
    registry.get(model_name)  # unknown names fail before any work
    if target not in TARGETS:
        raise ExportError(f"step export: target must be one of {', '.join(TARGETS)}, got {target!r}")
    variant = ("" if momentum else "-nomom") + ("" if target == "cpu" else f"-{target}")
    return Path(cache_dir) / f"{model_name}-b{batch_size}{variant}-{cache_key(model_name, batch_size, momentum, target)}"


def cached_step_graph(model_name: str, batch_size: int, cache_dir: str | os.PathLike, *,
                      momentum: bool = True, target: str = "cpu") -> tuple[bytes, StepSpec] | None:
    """``step_graph``'s answer when ``cache_dir`` holds it intact, else None (never exports)."""
    stem = _cache_stem(model_name, batch_size, cache_dir, momentum, target)
    try:
        meta = json.loads(stem.with_suffix(".json").read_text())
        data = stem.with_suffix(".onnx").read_bytes()
        if hashlib.sha256(data).hexdigest() == meta["sha256"]:
            return data, StepSpec.from_json(json.dumps(meta["spec"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or damaged
    return None


def step_graph(model_name: str, batch_size: int, cache_dir: str | os.PathLike, *,
               momentum: bool = True, target: str = "cpu") -> tuple[bytes, StepSpec]:
    """The step graph's ONNX bytes and spec, exported once per (model, batch, momentum, target,
    opset, torch and onnxscript versions, source of models/) and read from ``cache_dir`` after."""
    cached = cached_step_graph(model_name, batch_size, cache_dir, momentum=momentum, target=target)
    if cached is not None:
        return cached
    stem = _cache_stem(model_name, batch_size, cache_dir, momentum, target)
    onnx_path, meta_path = stem.with_suffix(".onnx"), stem.with_suffix(".json")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        t0 = time.perf_counter()
        spec = export_step(model_name, batch_size, Path(tmp) / "step.onnx", momentum=momentum, target=target)
        data = (Path(tmp) / "step.onnx").read_bytes()
        meta = {"sha256": hashlib.sha256(data).hexdigest(), "export_seconds": round(time.perf_counter() - t0, 2),
                "spec": json.loads(spec.to_json())}
        (Path(tmp) / "step.json").write_text(json.dumps(meta, indent=1))
        os.replace(Path(tmp) / "step.onnx", onnx_path)  # the spec last: it vouches for the bytes
        os.replace(Path(tmp) / "step.json", meta_path)
    return data, spec


def main(argv: list[str] | None = None) -> int:
    """``python -m models.onnx_step MODEL BATCH --cache DIR [--target cpu webgpu]``: export into
    the cache (the coordinator runs this in a subprocess so an export never stalls its event loop)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m models.onnx_step", description=main.__doc__)
    p.add_argument("model")
    p.add_argument("batch_size", type=int)
    p.add_argument("--cache", required=True, help="cache folder for the graph and its spec")
    p.add_argument("--no-momentum", action="store_true")
    p.add_argument("--target", nargs="+", choices=TARGETS, default=["cpu"], help="graph variants to export")
    args = p.parse_args(argv)
    for target in args.target:
        try:
            data, spec = step_graph(args.model, args.batch_size, args.cache, momentum=not args.no_momentum,
                                    target=target)
        except (ExportError, KeyError, ValueError) as e:
            print(f"error: {e}", flush=True)
            return 2
        print(f"{spec.model} batch {spec.batch_size} ({target}): {len(data):,} bytes", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
