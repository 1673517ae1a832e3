"""The model out of a coordinator: ``crowdtrain export`` (offline, from a state directory) and
``GET /api/v1/model`` (from the running job); both through ``models.export``.

Which version: ``final`` (the latest, the default), ``best`` (the highest test accuracy among
the evaluated versions whose blob is still on disk; a pruned better one is named) or a number.

Batch norm: a version holds the aggregated running statistics, which do not fit aggregated
weights; the evaluator re-estimates them on the first ``CALIBRATION_IMAGES`` training images
before it measures test accuracy. The model taken out gets the same re-estimate, from the
job's own shards in the state directory, so it is the model whose accuracy the dashboard and
``evals`` report (``--no-recalibrate``: the version's arrays as stored).

    crowdtrain export --state state/ --format onnx --out model.onnx [--version best]

The arguments are parsed in ``coordinator.export_cli`` (torch-free, so ``--help`` answers at once).
"""
from __future__ import annotations

import asyncio
import re
import sys
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from aiohttp import web

from contract.codecs import decode_delta
from contract.shards import decode_shard
from coordinator.evaluator import CALIBRATION_IMAGES
from coordinator.keys import JOB
from coordinator.store import Store, Version
from models import export, registry
from models.local import recalibrate_bn, state_arrays

WHICH = ("final", "best")
CACHE_ENTRIES = 4   # exported files kept in memory per job (the newest requests)


class NotFound(LookupError):
    """No such version, or its blob was pruned; ``str(e)`` is one line."""

    def __str__(self) -> str:
        return str(self.args[0])


# ----------------------------------------------------------------------------- which version
def parse_version(text: str | None) -> int | str:
    """``final`` (also for None or ""), ``best`` or a version number >= 0; ValueError naming the field."""
    if text is None or text == "":
        return "final"
    if text in WHICH:
        return text
    if text.isdigit():
        return int(text)
    raise ValueError(f"version: expected a version number, 'final' or 'best', got {text!r}")


@dataclass(frozen=True)
class Chosen:
    version: Version
    which: str               # as asked: "final", "best" or the number
    evaluation: dict | None  # the version's row in Store.evals() (its best one), None if never evaluated
    finished: bool           # the job had spent its budget
    note: str = ""           # e.g. the best evaluated version was pruned


def choose(store: Store, which: int | str) -> Chosen:
    """The version ``which`` names, with its blob on disk; NotFound otherwise (SQLite reads only)."""
    latest = store.latest_version()
    if latest is None:
        raise NotFound("the state holds no model version yet")
    evaluated: dict[int, dict] = {}
    for row in store.evals():   # best row per version; ties: the later row
        if row["version"] not in evaluated or row["test_acc"] >= evaluated[row["version"]]["test_acc"]:
            evaluated[row["version"]] = row
    finished, note = bool(store.get_meta("finished", False)), ""
    if which == "final":
        version = latest
        if not version.blob:   # folded after the last persisted version (a coordinator that died)
            written = store.latest_written_version()
            if written is None:
                raise NotFound(f"final: version {latest.step} was not written and no version is")
            version = written
            note = (f"version {latest.step}, the newest, was not written (versions are persisted every few "
                    f"seconds); took version {written.step}, the newest written; starting the coordinator "
                    f"on this state replays the log and writes {latest.step}")
    elif which == "best":
        ranked = sorted(evaluated.values(), key=lambda r: (r["test_acc"], r["version"]), reverse=True)
        if not ranked:
            raise NotFound("best: no version has been evaluated yet; ask for 'final' or a version number")
        kept = [r for r in ranked if _on_disk(store, store.version(r["version"]))]
        if not kept:
            top = ranked[0]
            raise NotFound(f"best: version {top['version']} ({100 * top['test_acc']:.2f}%) and every other "
                           "evaluated version were pruned (their blobs are gone); ask for 'final'")
        version = store.version(kept[0]["version"])
        if kept[0] is not ranked[0]:
            top = ranked[0]
            note = (f"the best evaluated version, {top['version']} ({100 * top['test_acc']:.2f}%), was pruned; "
                    f"took the best one kept, version {version.step} ({100 * kept[0]['test_acc']:.2f}%)")
    else:
        version = store.version(int(which))
        if version is None:
            raise NotFound(f"version {which}: no such version (the latest is {latest.step})")
        if not _on_disk(store, version):
            raise NotFound(f"version {which}: pruned (its blob is no longer kept); the latest is {latest.step}")
    if not _on_disk(store, version):
        raise NotFound(f"version {version.step}: its blob is missing from {store.blob_dir}")
    return Chosen(version, str(which), evaluated.get(version.step), finished, note)


def _on_disk(store: Store, version: Version | None) -> bool:
    return version is not None and store.blob_path(version.blob) is not None


# ----------------------------------------------------------------------------- conversion
@dataclass(frozen=True)
class Exported:
    data: bytes
    format: str
    filename: str          # e.g. cifar10-resnet_fast-v123.onnx
    max_diff: float | None  # ONNX: max |logit difference| against torch on the export's check
    recalibrated: int       # calibration images the batch-norm statistics were re-estimated on (0: none)


def filename(job: str, model: str, step: int, fmt: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{job}-{model}-v{step}") + f".{fmt}"


def calibration_images(store: Store, shards: list, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """The first ``n`` training images, as the job's evaluator takes them, read from the job's
    shards (``shards``: the ``shards`` meta entry, ``[[blob_id, size], ...]``, in data order)."""
    parts, have = [], 0
    for blob_id, _ in shards:
        if have >= n:
            break
        x, _ = decode_shard(store.get_blob(blob_id))
        parts.append(x[:n - have])
        have += len(parts[-1])
    if not parts:
        raise NotFound("the state holds no training shards to re-estimate batch-norm statistics on; "
                       "use --no-recalibrate")
    return np.concatenate(parts)


def has_batch_norm(model_name: str) -> bool:
    with torch.random.fork_rng():
        model = registry.build(model_name)
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def convert(store: Store, model: str, job: str, chosen: Chosen, fmt: str, shards: list | None) -> Exported:
    """Blocking (file reads and torch; no SQLite): the chosen version as ``fmt`` bytes. ``shards``:
    re-estimate batch-norm statistics on those shards' first images, as the evaluator does (None: don't)."""
    v = chosen.version
    try:
        arrays = decode_delta(store.get_blob(v.blob))
    except KeyError:
        raise NotFound(f"version {v.step}: pruned while it was being exported") from None
    recalibrated = 0
    if shards is not None and has_batch_norm(model):
        images = calibration_images(store, shards)
        net = export.build_model(model, arrays)
        recipe = registry.get(model).recipe     # the job's units augment as the model's recipe does
        recalibrate_bn(net, torch.from_numpy(np.ascontiguousarray(images)), crop_pad=recipe.crop_pad, flip=recipe.flip,
                       reflect=recipe.crop_reflect)
        arrays, recalibrated = state_arrays(net), len(images)
    info = {"job": job, "version": v.step, "samples": v.samples, "created": v.created,
            "bn_recalibration_images": recalibrated}
    ev = chosen.evaluation
    if ev is not None:
        info.update(test_acc=ev["test_acc"], test_loss=ev["test_loss"])
    if fmt == "onnx":
        data, diff = export.to_onnx(model, arrays, info)
    else:
        metrics = None if ev is None else {k: ev[k] for k in ("version", "samples", "test_acc", "test_loss")}
        data, diff = export.to_pt(model, arrays, config={"source": "coordinator", **info}, metrics=metrics), None
    return Exported(data, fmt, filename(job, model, v.step, fmt), diff, recalibrated)


# ----------------------------------------------------------------------------- HTTP
class _Cache:
    """A job's exported files by (version, format), the newest few; one conversion at a time."""

    def __init__(self) -> None:
        self.files: OrderedDict[tuple[int, str, str], Exported] = OrderedDict()
        self.lock = asyncio.Lock()


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # Job -> _Cache


def _error(code: str, status: int, message: str, field: str) -> web.Response:
    """The body shape of ``coordinator.app.error``."""
    return web.json_response({"error": {"code": code, "field": field, "message": message}}, status=status)


async def get_model(request: web.Request, job=None) -> web.Response:
    """``GET /api/v1/model?format=onnx|pt[&version=N|final|best]``: the job's model as a download (``job``: the
    app's first job unless given)."""
    job = job or request.app[JOB]
    fmt = request.query.get("format", "onnx")
    if fmt not in export.FORMATS:
        return _error("invalid", 400, f"format: expected one of {', '.join(export.FORMATS)}, got {fmt!r}", "format")
    try:
        which = parse_version(request.query.get("version"))
    except ValueError as e:
        return _error("invalid", 400, str(e), "version")
    if which == "final" and not job.finished:
        await job.publish()   # a live job: write the newest version if the persistence policy has not yet
    try:
        chosen = choose(job.store, which)
    except NotFound as e:
        return _error("unknown_version", 404, str(e), "version")
    cache = _CACHES.setdefault(job, _Cache())
    key = (chosen.version.step, chosen.version.blob, fmt)
    async with cache.lock:
        out = cache.files.get(key)
        if out is None:
            shards = job.store.get_meta("shards") or []
            try:
                out = await asyncio.to_thread(convert, job.store, job.config.model, job.config.job, chosen, fmt, shards)
            except NotFound as e:
                return _error("unknown_version", 404, str(e), "version")
            except export.ExportError as e:
                return _error("export_failed", 500, str(e), "format")
            cache.files[key] = out
            while len(cache.files) > CACHE_ENTRIES:
                cache.files.popitem(last=False)
        cache.files.move_to_end(key)
    headers = {"Content-Disposition": f'attachment; filename="{out.filename}"',
               "X-Crowdtrain-Version": str(chosen.version.step), "Cache-Control": "no-cache"}
    if chosen.note:
        headers["X-Crowdtrain-Note"] = chosen.note
    return web.Response(body=out.data, headers=headers, content_type="application/octet-stream")


# ----------------------------------------------------------------------------- crowdtrain export
def run_export(args) -> int:
    """``crowdtrain export`` once its arguments are parsed (``coordinator.export_cli``)."""
    suffix = args.out.suffix.lstrip(".").lower() if args.out else ""
    fmt = args.format or (suffix if suffix in export.FORMATS else "onnx")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.model:
            path, text = from_checkpoint(args.model, fmt, args.out)
        else:
            path, text = from_state(args.state, fmt, args.out, parse_version(args.version), not args.no_recalibrate)
    except export.ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (NotFound, export.ModelFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"  crowdtrain eval --model {path} --data PATH")
    return 0


def from_state(state: Path, fmt: str, out: Path | None, which: int | str, recalibrate: bool) -> tuple[Path, str]:
    """Export version ``which`` of the job in ``state``; (the file written, what to print)."""
    t0 = time.perf_counter()
    if not (state / "state.db").is_file():
        raise NotFound(f"{state}: not a coordinator state directory (no state.db)")
    store = Store(state)
    try:
        identity = store.get_meta("identity") or {}
        model, job = identity.get("model"), identity.get("job", "job")
        if not model:
            raise NotFound(f"{state}: the state names no model (no job identity)")
        chosen = choose(store, which)
        exported = convert(store, model, job, chosen, fmt, (store.get_meta("shards") or []) if recalibrate else None)
    finally:
        store.close()
    path = export.write_atomic(out or Path(exported.filename), exported.data)
    return path, describe(path, model, chosen, exported, time.perf_counter() - t0)


def from_checkpoint(src: Path, fmt: str, out: Path | None) -> tuple[Path, str]:
    """Convert a .pt checkpoint (``crowdtrain train``'s or an export) to ``fmt``."""
    t0 = time.perf_counter()
    name, model, ckpt = export.read_pt(src)
    arrays = state_arrays(model)
    out = out or src.with_suffix(f".{fmt}")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out: {out} is the checkpoint itself; name another file")
    config = {k: v for k, v in (ckpt.get("config") or {}).items() if k != "model"}
    metrics = ckpt.get("metrics") if isinstance(ckpt.get("metrics"), dict) else None
    diff = None
    if fmt == "onnx":
        info = {"source": str(src), **({"test_acc": metrics["test_acc"]} if metrics and "test_acc" in metrics else {})}
        data, diff = export.to_onnx(name, arrays, info)
    else:
        data = export.to_pt(name, arrays, config=config, metrics=metrics)
    path = export.write_atomic(out, data)
    text = f"wrote {path}: {name} from {src}, {len(data) / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s"
    if diff is not None:
        text += f"\n  ONNX graph checked against torch: max |logit difference| {diff:.2g}"
    return path, text


def describe(path: Path, model: str, chosen: Chosen, out: Exported, seconds: float) -> str:
    v, ev = chosen.version, chosen.evaluation
    which = {"final": "final" if chosen.finished else "latest; the job has not finished",
             "best": "best evaluated"}.get(chosen.which, "as asked")
    acc = f"test accuracy {100 * ev['test_acc']:.2f}%" if ev else "not evaluated"
    lines = [f"wrote {path}: {model} version {v.step} ({which}; {v.samples:,} samples; {acc}), "
             f"{len(out.data) / 1e6:.1f} MB, {seconds:.1f} s"]
    if out.recalibrated:
        lines.append(f"  batch-norm statistics re-estimated on {out.recalibrated} training images, as evaluated")
    if out.max_diff is not None:
        lines.append(f"  ONNX graph checked against torch: max |logit difference| {out.max_diff:.2g}")
    if chosen.note:
        lines.append(f"  note: {chosen.note}")
    return "\n".join(lines)
