"""The model out: a registered model's state as an ONNX inference graph or a ``.pt`` checkpoint,
one loader for both, and ``crowdtrain eval``.

Input is what every trainer and the coordinator hold: a model name and its float state arrays
(``models.local.state_arrays``; a coordinator version decoded with ``contract.codecs``).

- ONNX: input ``images`` uint8 NCHW [N, 3, 32, 32] (RGB, 0..255, any N), output ``logits``
  float32 [N, 10] in ``models.data.CLASSES`` order. The graph casts to float and runs the
  model in eval mode; its first layer is the trainer's own ``Normalize``, so normalisation is
  inside. A supermask layer is exported with its effective weight (fixed weight times torch's
  top-k mask of the scores) as one constant: no scores and no top-k in the graph. Every export
  is run once in onnxruntime against torch on random images and fails loudly on a mismatch.
- ``.pt``: ``{"model", "state_dict", "config", "metrics"}``, the layout of ``crowdtrain
  train``'s ``OUT/model.pt`` plus a top-level ``model``; ``load_predictor`` reads both.

    crowdtrain eval --model runs/cnn/model.pt --data ../shared/data
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import registry
from models.data import CLASSES, DataError, load_cifar10
from models.local import load_arrays

FORMATS = ("onnx", "pt")
INPUT, OUTPUT = "images", "logits"
OPSET = 18
IMAGE_SHAPE = (3, 32, 32)
CHECK_IMAGES = 4          # random images an ONNX export is checked on (and 1, for the dynamic batch)
CHECK_TOLERANCE = 1e-3    # max |logit difference| allowed, relative to max(1, max |logit|)
PREDICT_BATCH = 500       # images per forward pass when predicting
META_PREFIX = "crowdtrain."


class ExportError(ValueError):
    """The model cannot be exported, or the exported graph does not compute what torch does."""


class ModelFileError(ValueError):
    """A model file that cannot be used; ``str(e)`` is one line naming the file."""


# ----------------------------------------------------------------------------- the model
class Pixels(nn.Module):
    """uint8 images [N, 3, 32, 32] -> logits: the cast the trainer does before the forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.float())


def build_model(name: str, arrays: dict[str, np.ndarray]) -> nn.Module:
    """Model ``name`` in eval mode with ``arrays`` loaded (the caller's RNG is left as it was)."""
    with torch.random.fork_rng():
        model = registry.build(name)
    load_arrays(model, arrays)
    return model.eval()


def freeze_supermasks(model: nn.Module) -> nn.Module:
    """In place: each supermask layer's weight becomes its masked weight; its scores go."""
    for m in model.modules():
        if hasattr(m, "masked_weight") and isinstance(getattr(m, "scores", None), nn.Parameter):
            with torch.no_grad():
                effective = m.masked_weight().detach().clone()
            del m.scores
            m.weight = nn.Parameter(effective, requires_grad=False)
            m.masked_weight = types.MethodType(lambda self: self.weight, m)
    return model


# ----------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet():
    """The exporter's notes (torchvision missing, deprecations) are not the user's business."""
    logger, level = logging.getLogger("torch.onnx"), logging.getLogger("torch.onnx").level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def to_onnx(name: str, arrays: dict[str, np.ndarray], metadata: dict[str, object] | None = None
            ) -> tuple[bytes, float]:
    """(ONNX bytes of the inference graph, max |logit difference| against torch on the check)."""
    model = build_model(name, arrays)
    graph = Pixels(freeze_supermasks(copy.deepcopy(model))).eval()
    example = torch.zeros(2, *IMAGE_SHAPE, dtype=torch.uint8)
    try:
        with _quiet():
            program = torch.onnx.export(graph, (example,), None, input_names=[INPUT], output_names=[OUTPUT],
                                        dynamo=True, dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
                                        opset_version=OPSET, external_data=False, verbose=False)
    except Exception as e:
        raise ExportError(f"ONNX export of '{name}' failed: {_first_line(e)}") from e
    proto = program.model_proto
    proto.doc_string = (f"crowdtrain {name}: uint8 NCHW images [N,3,32,32] (RGB 0..255) -> "
                        f"logits [N,10] ({', '.join(CLASSES)})")
    meta = {"model": name, "classes": json.dumps(CLASSES), "input": "uint8 NCHW [N,3,32,32], RGB 0..255",
            **(metadata or {})}
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value if isinstance(value, str) else json.dumps(value)
    data = proto.SerializeToString()
    return data, check_onnx(data, Pixels(model), name)


def check_onnx(data: bytes, reference: nn.Module, name: str) -> float:
    """Run the graph in onnxruntime on random images (a batch and a single one) against
    ``reference``; the max |logit difference|, or ExportError when it is too large."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (CHECK_IMAGES, *IMAGE_SHAPE), dtype=np.uint8)
    session = _session(data)
    with torch.no_grad():
        want = reference.eval()(torch.from_numpy(x)).numpy()
    got = np.concatenate([session.run([OUTPUT], {INPUT: x[:-1]})[0], session.run([OUTPUT], {INPUT: x[-1:]})[0]])
    if got.shape != want.shape or not np.isfinite(got).all():
        raise ExportError(f"ONNX export of '{name}': expected finite logits {want.shape}, got {got.shape}")
    diff = float(np.abs(got - want).max())
    tolerance = CHECK_TOLERANCE * max(1.0, float(np.abs(want).max()))
    if diff > tolerance:
        raise ExportError(f"ONNX export of '{name}' does not compute what torch does: max |logit difference| "
                          f"{diff:.3g} > {tolerance:.3g} on {CHECK_IMAGES} random images")
    return diff


def to_pt(name: str, arrays: dict[str, np.ndarray], config: dict | None = None,
          metrics: dict | None = None) -> bytes:
    """Bytes of a ``.pt`` checkpoint in ``crowdtrain train``'s layout plus a top-level ``model``."""
    model = build_model(name, arrays)
    buf = io.BytesIO()
    torch.save({"model": name, "state_dict": model.state_dict(), "config": {"model": name, **(config or {})},
                "metrics": metrics}, buf)
    return buf.getvalue()


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- loading
class Predictor:
    """``predictor(images)``: uint8 [N, 3, 32, 32] (numpy or torch) -> float32 logits [N, 10] (numpy)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], model: str, kind: str, path: Path,
                 info: dict) -> None:
        self._run, self.model, self.kind, self.path, self.info = run, model, kind, path, info

    def __call__(self, images) -> np.ndarray:
        x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"images: expected uint8 [N, 3, 32, 32], got {x.dtype} {list(x.shape)}")
        parts = [self._run(np.ascontiguousarray(x[i:i + PREDICT_BATCH])) for i in range(0, len(x), PREDICT_BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, len(CLASSES)), np.float32)

    def __repr__(self) -> str:
        return f"Predictor({self.model!r}, {self.kind}, {str(self.path)!r})"


def load_predictor(path: str | os.PathLike, threads: int | None = None) -> Predictor:
    """A ``.pt`` (``crowdtrain export`` or ``crowdtrain train``) or ``.onnx`` model file as a
    Predictor; ModelFileError with one line on a missing, unreadable or foreign file.
    ``threads``: onnxruntime's (default: all cores); a .pt runs with torch's global setting."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: no such file; expected a .pt or .onnx model "
                             "(from `crowdtrain export` or `crowdtrain train`)")
    with open(p, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"   # torch.save writes a zip archive
    kind = "onnx" if p.suffix.lower() == ".onnx" else "pt" if p.suffix.lower() in (".pt", ".pth") or zipped else "onnx"
    return _load_pt(p, threads) if kind == "pt" else _load_onnx(p, threads)


def read_pt(path: str | os.PathLike) -> tuple[str, nn.Module, dict]:
    """(model name, the model in eval mode, the checkpoint dict) of a ``.pt`` checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: no such file; expected a .pt checkpoint")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFileError(f"{p}: not a readable torch checkpoint ({_first_line(e)})") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    config = ckpt.get("config") if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) else {}
    name = (ckpt.get("model") if isinstance(ckpt, dict) else None) or config.get("model")
    if not isinstance(state, dict) or not isinstance(name, str):
        raise ModelFileError(f"{p}: expected a crowdtrain checkpoint (a dict with 'model' or config.model, "
                             "and 'state_dict')")
    try:
        with torch.random.fork_rng():
            model = registry.build(name)
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise ModelFileError(f"{p}: does not fit model '{name}': {_first_line(e)}") from None
    return name, model.eval(), ckpt


def _load_pt(p: Path, threads: int | None) -> Predictor:
    name, model, ckpt = read_pt(p)

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x).float()).numpy()
    return Predictor(run, name, "pt", p, {"config": ckpt.get("config"), "metrics": ckpt.get("metrics")})


def _session(model, threads: int | None = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _load_onnx(p: Path, threads: int | None) -> Predictor:
    try:
        session = _session(str(p), threads)
    except Exception as e:
        raise ModelFileError(f"{p}: not a loadable ONNX model ({_first_line(e)})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or shape[1:] != list(IMAGE_SHAPE) or len(outputs) != 1:
        got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise ModelFileError(f"{p}: expected one input uint8 [N, 3, 32, 32] and one output (a `crowdtrain export` "
                             f"graph), got inputs {got}")
    meta = {k[len(META_PREFIX):]: v for k, v in session.get_modelmeta().custom_metadata_map.items()
            if k.startswith(META_PREFIX)}
    in_name, out_name = inputs[0].name, outputs[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([out_name], {in_name: x})[0]
    return Predictor(run, meta.get("model", "unknown"), "onnx", p, meta)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ----------------------------------------------------------------------------- crowdtrain eval
def evaluate(predictor: Predictor, x_u8: np.ndarray, y: np.ndarray, tta: int = 0) -> tuple[float, float, float]:
    """(mean cross-entropy, accuracy in [0, 1], accuracy without test-time augmentation), as
    ``models.train.evaluate`` computes them; ``tta``: the level of ``models.train.tta_views`` (its views of
    uint8 images are uint8 images again, so a predictor sees what the module would)."""
    from models.train import tta_views

    plain, logits = tta_views(lambda v: torch.from_numpy(predictor(v.to(torch.uint8))),
                              torch.from_numpy(np.ascontiguousarray(x_u8)).float(), tta)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    n = max(len(labels), 1)
    return (float(F.cross_entropy(logits, labels, reduction="sum")) / n, int((logits.argmax(1) == labels).sum()) / n,
            int((plain.argmax(1) == labels).sum()) / n)


def recipe_tta(model: str) -> int:
    """The test-time augmentation level of a registered model's recipe (0 for a model not registered)."""
    try:
        return registry.get(model).recipe.tta
    except ValueError:   # a file whose model is not registered here
        return 0


def run_eval(args) -> int:
    """``crowdtrain eval`` once its arguments are parsed (``models.cli``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        predictor = load_predictor(args.model, threads=args.threads)
        data = load_cifar10(args.data, progress=False)
    except (ModelFileError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    x, y = data.test_x[:args.limit], data.test_y[:args.limit]
    tta = recipe_tta(predictor.model) if args.tta is None else args.tta
    loss, acc, plain = evaluate(predictor, x, y, tta)
    views = f" (test-time augmentation {tta}; without: {100 * plain:.2f}%)" if tta else ""
    print(f"{predictor.path} ({predictor.model}, {predictor.kind}): test accuracy {100 * acc:.2f}%{views} "
          f"on {len(y):,} CIFAR-10 test images (loss {loss:.4f}; {data.source})")
    return 0
