"""Training-step graphs for browser workers, served as immutable blobs with a known-answer check.

A browser tab trains with onnxruntime-web by running one exported SGD step per batch
(``models.onnx_step``), in one of two formulations: ``graph`` for onnxruntime's CPU kernels
(WebAssembly) and ``webgpu.graph`` for its WebGPU kernels (``models.onnx_step.TARGETS``). The
coordinator exports the job's model once per batch size, in a
subprocess (an export takes seconds to tens of seconds of CPU and must not stall the event
loop), caches the graph on disk across jobs, stores it as a content-addressed blob of the job
and publishes a *manifest* at ``GET /api/v1/steps/<model>/<batch>``:

    {"model", "batch_size", "graph": <blob id>, "graph_bytes", "spec": {...StepSpec...},
     "check": {"state": <blob id>, "shard": <blob id>, "hyper": {...},
               "loss": float, "outputs": {name: {"norm": float, "proj": float}},
               "tolerance": {"loss": rel, "norm": rel, "proj": rel}},
     "webgpu": {"graph": <blob id>, "graph_bytes", "loss": float, "outputs": {...}}}

The check is a known-answer test for a backend the tab is unsure of (WebGPU): one step on
inputs the tab can rebuild exactly (a model state blob, the first images of a data shard
without augmentation, zero momentum, the dropout masks of ``check_mask``, the hyperparameters
above), whose answer was computed here with onnxruntime's CPU kernels (for each graph: ``check``
holds the CPU graph's answer, ``webgpu`` the WebGPU graph's). For every output the
manifest gives the L2 norm of (output - its input) and its projection on a +-1 pattern
(``check_signs``), which catches a wrong sign as well as a wrong scale. Both functions are
written in worker_web/worker.js too, with the same constants.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract.codecs import decode_delta, encode_delta, get_codec
from contract.shards import decode_shard
from models import registry
from models.data import default_cache_dir
from models.local import state_arrays
from models.onnx_step import TARGETS, ExportError, StepSpec, cached_step_graph, step_graph

log = logging.getLogger("crowdtrain.coordinator")
ROOT = Path(__file__).resolve().parents[1]
CHECK_SEED = 20261122                      # the check's model state: a fresh build with this seed
CHECK_HYPER = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "label_smoothing": 0.1}
TOLERANCE = {"loss": 1e-3, "norm": 2e-2, "proj": 5e-2}   # relative; proj relative to the norm
HASH_MUL = 2654435761                       # Knuth's multiplicative hash, 32 bits
ANSWERS_KEPT = 256                          # known answers kept in the cache (``_prune_answers``)


def step_cache_dir() -> Path:
    """Where exported step graphs are cached, across jobs (``$CROWDTRAIN_CACHE``/steps)."""
    return default_cache_dir() / "steps"


def check_hash(n: int) -> np.ndarray:
    """uint32 hash of the element indices 0..n-1 (the JS worker computes the same)."""
    i = np.arange(n, dtype=np.uint64)
    return ((i * HASH_MUL) % (1 << 32)).astype(np.uint32)


def check_mask(n: int, p: float) -> np.ndarray:
    """The check's dropout keep-mask: element i is kept when hash(i) / 2^32 >= p."""
    return (check_hash(n).astype(np.float64) / 2.0**32 >= p).astype(np.float32)


def check_signs(n: int) -> np.ndarray:
    """The +-1 pattern outputs are projected on: +1 where bit 16 of hash(i) is set."""
    return np.where((check_hash(n) >> 16) & 1, 1.0, -1.0)


def check_inputs(spec: StepSpec, state: dict[str, np.ndarray], x_u8: np.ndarray, y: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """The check step's feeds, built the way the browser rebuilds them."""
    b = spec.batch_size
    reps = math.ceil(b / len(y))
    x, y = np.tile(x_u8, (reps, 1, 1, 1))[:b], np.tile(y, reps)[:b]
    feeds = {}
    for t in spec.inputs:
        if t.role in ("param", "fixed", "stat"):
            feeds[t.name] = state[t.state].astype(np.float32)
        elif t.role == "momentum":
            feeds[t.name] = np.zeros(t.shape, np.float32)
        elif t.name == "x":
            feeds["x"] = x.astype(np.float32)
        elif t.name == "y":
            feeds["y"] = y.astype(np.int64)
        elif t.role == "dropout":
            feeds[t.name] = check_mask(math.prod(t.shape), t.p).reshape(t.shape)
        else:
            feeds[t.name] = np.array(CHECK_HYPER[t.name], np.float32)
    return feeds


def check_answer(graph: bytes, spec: StepSpec, feeds: dict[str, np.ndarray], cache_dir: Path | None = None) -> dict:
    """Run the check step on onnxruntime's CPU kernels: loss, and norm/projection per output. With
    ``cache_dir``, an answer computed before for the same graph, feeds and onnxruntime is read from
    ``cache_dir/answers`` (a coordinator computes the same check at every start of the same job)."""
    import onnxruntime as ort

    path = None
    if cache_dir is not None:
        h = hashlib.sha256(graph)
        h.update(f"\0onnxruntime {ort.__version__}\0".encode())
        for name in sorted(feeds):
            a = np.ascontiguousarray(feeds[name])
            h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
            h.update(a.tobytes())
        path = Path(cache_dir) / "answers" / f"{h.hexdigest()[:32]}.json"
        try:
            known = json.loads(path.read_text())
            if isinstance(known.get("loss"), float) and isinstance(known.get("outputs"), dict):
                os.utime(path)   # recently used: kept by ``_prune_answers``
                return known
        except (OSError, ValueError, AttributeError):
            pass  # not computed yet, or damaged: computed again
    answer = _run_check(ort, graph, spec, feeds)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(answer))
            os.replace(tmp, path)
            _prune_answers(path.parent)
        except OSError as e:
            log.warning("cannot cache the known answer in %s: %s", path.parent, e)
    return answer


def _prune_answers(folder: Path) -> None:
    """Keep the ``ANSWERS_KEPT`` most recently used known answers (about 1 KB each; one per graph and job)."""
    entries = []
    for p in folder.glob("*.json"):
        try:
            entries.append((p.stat().st_mtime, p))
        except OSError:
            pass   # removed meanwhile by another coordinator
    for _, p in sorted(entries, reverse=True)[ANSWERS_KEPT:]:
        p.unlink(missing_ok=True)


def _run_check(ort, graph: bytes, spec: StepSpec, feeds: dict[str, np.ndarray]) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    names = spec.output_names
    out = dict(zip(names, session.run(names, feeds)))
    outputs = {}
    for t in spec.outputs[1:]:
        change = (out[t.name].astype(np.float64) - feeds[t.feeds].astype(np.float64)).ravel()
        outputs[t.name] = {"norm": float(np.linalg.norm(change)),
                           "proj": float(change @ check_signs(change.size))}
    return {"loss": float(out["loss"]), "outputs": outputs}


class StepUnavailable(Exception):
    """This model cannot be trained by a browser (the export failed); the message says why."""


# an export that failed for a reason of the model's (StepUnavailable, ExportError) fails again: remembered. An
# unexpected error (a bug, a full disk, an interpreter's spurious SystemError) may not: built again this many
# seconds later, at the next request, rather than leaving the job's tabs idle until the coordinator restarts
RETRY_INTERNAL_S = 15.0


@dataclass
class _Entry:
    task: asyncio.Task | None = None
    manifest: dict | None = None
    error: str | None = None
    retry_at: float | None = None   # the loop's time after which an internal error is tried again


class StepGraphs:
    """Step graphs of one job's model, per batch size: built on demand, one export at a time."""

    def __init__(self, job, cache_dir: str | Path) -> None:
        self.job = job
        self.model = job.config.model
        self.cache_dir = Path(cache_dir)
        self.entries: dict[int, _Entry] = {}
        self._one_at_a_time = asyncio.Lock()
        self.unavailable = registry.get(self.model).browser   # known without an export: why not, or None

    def manifest(self, batch_size: int) -> dict | None:
        """The manifest, or None while it is being built (the build starts if it has not).
        Raises StepUnavailable when the export failed, or when the model is known not to export."""
        if self.unavailable:
            raise StepUnavailable(self.unavailable)
        entry = self.entries.get(batch_size)
        loop = asyncio.get_running_loop()
        if entry is None or (entry.retry_at is not None and loop.time() >= entry.retry_at):
            entry = self.entries[batch_size] = _Entry()
            entry.task = loop.create_task(self._build(batch_size, entry))
        if entry.error is not None:
            raise StepUnavailable(entry.error)
        return entry.manifest

    def state(self, batch_size: int) -> str:
        """Where the step graph at this batch size stands, without starting a build: ``ready``,
        ``building``, ``not started`` or ``unavailable: <why>``."""
        if self.unavailable:
            return f"unavailable: {self.unavailable}"
        entry = self.entries.get(batch_size)
        if entry is None:
            return "not started"
        if entry.error is not None:
            return f"unavailable: {entry.error}"
        return "building" if entry.manifest is None else "ready"

    async def close(self) -> None:
        """Stop builds in progress (their export subprocesses are killed)."""
        tasks = [e.task for e in self.entries.values() if e.task is not None and not e.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self, batch_size: int) -> dict:
        """The manifest, waiting for the build (tests and warm-up)."""
        self.manifest(batch_size)
        await asyncio.shield(self.entries[batch_size].task)
        return self.manifest(batch_size)

    async def _build(self, batch_size: int, entry: _Entry) -> None:
        try:
            async with self._one_at_a_time:
                graphs = await asyncio.to_thread(self._cached, batch_size)
                if graphs is None:
                    await self._export(batch_size)
                entry.manifest = await asyncio.to_thread(self._make_manifest, batch_size, graphs)
            log.info("browser step graph for %s at batch %d: blob %s (%d bytes)", self.model, batch_size,
                     entry.manifest["graph"][:12], entry.manifest["graph_bytes"])
        except (StepUnavailable, ExportError, ValueError, OSError) as e:
            entry.error = str(e)
            log.warning("no browser step graph for %s at batch %d: %s", self.model, batch_size, e)
        except Exception as e:  # never leave a task with an unretrieved exception
            entry.error = f"internal error while building the step graph ({type(e).__name__})"
            entry.retry_at = asyncio.get_running_loop().time() + RETRY_INTERNAL_S
            log.exception("building the step graph for %s at batch %d failed (tried again in %.0f s)", self.model,
                          batch_size, RETRY_INTERNAL_S)

    async def _export(self, batch_size: int) -> None:
        """Export in a subprocess (CPU-heavy, and torch's exporter is not made for threads)."""
        cmd = [sys.executable, "-m", "models.onnx_step", self.model, str(batch_size), "--cache", str(self.cache_dir),
               "--target", *TARGETS]
        # its own session: a Ctrl-C in the coordinator's terminal is the coordinator's to handle (close() ends it)
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:   # the coordinator is shutting down: no orphaned export
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
            why = next((ln[len("error: "):] for ln in lines if ln.startswith("error: ")), None)
            raise StepUnavailable(why or f"the export exited with {proc.returncode}: {' | '.join(lines[-3:])}")

    def _cached(self, batch_size: int) -> dict[str, tuple[bytes, StepSpec]] | None:
        """Every target's graph and spec from the cache, or None when one is missing (only then is the export
        subprocess started: it would spend seconds of CPU importing torch only to read them)."""
        graphs = {t: cached_step_graph(self.model, batch_size, self.cache_dir, target=t) for t in TARGETS}
        return None if any(g is None for g in graphs.values()) else graphs

    def _make_manifest(self, batch_size: int, graphs: dict[str, tuple[bytes, StepSpec]] | None = None) -> dict:
        """``graphs``: ``_cached``'s answer; None after an export (then read from the cache it wrote)."""
        if graphs is None:
            graphs = {t: step_graph(self.model, batch_size, self.cache_dir, target=t) for t in TARGETS}
        graph, spec = graphs["cpu"]
        store = self.job.store
        with torch.random.fork_rng():
            torch.manual_seed(CHECK_SEED)
            state = state_arrays(registry.build(self.model))
        # an extra entry keeps this blob distinct from every model version (whose blobs get pruned)
        marked = {**state, "known_answer_check": np.zeros(1, np.float32)}
        state_blob = store.put_blob(encode_delta(get_codec("fp32"), marked))
        state = decode_delta(store.get_blob(state_blob))   # exactly what the browser decodes
        shard = next(iter(self.job.factory.shard_sizes))   # the job's first shard
        x, y = decode_shard(store.get_blob(shard))
        feeds = check_inputs(spec, state, x[:batch_size], y[:batch_size])
        gpu_graph, gpu_spec = graphs["webgpu"]
        if gpu_spec != spec:
            raise StepUnavailable("the WebGPU step graph takes other tensors than the CPU one")
        return {"model": self.model, "batch_size": batch_size, "graph": store.put_blob(graph),
                "graph_bytes": len(graph), "spec": {"momentum": spec.momentum, "nesterov": spec.nesterov,
                                                    "inputs": [_tensor(t) for t in spec.inputs],
                                                    "outputs": [_tensor(t) for t in spec.outputs]},
                "check": {"state": state_blob, "shard": shard, "hyper": dict(CHECK_HYPER),
                          **check_answer(graph, spec, feeds, self.cache_dir), "tolerance": dict(TOLERANCE)},
                "webgpu": {"graph": store.put_blob(gpu_graph), "graph_bytes": len(gpu_graph),
                           **check_answer(gpu_graph, spec, feeds, self.cache_dir)}}


def _tensor(t) -> dict:
    d = {"name": t.name, "role": t.role, "shape": list(t.shape), "dtype": t.dtype}
    for key in ("state", "feeds", "p"):
        if getattr(t, key) is not None:
            d[key] = getattr(t, key)
    return d
