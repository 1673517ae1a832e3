"""How close two honest computations of one work unit are, and how far a lie is: the tolerance of
a replicated spot check (coordinator/trust.py).

Claim under test: a unit is deterministic given its base, shards, hyperparameters and seed, so
two honest Python workers return deltas whose cosine similarity is at least the trust policy's
``min_cosine`` and whose norms differ by at most ``max_norm_diff``, also with other torch thread
counts; every attack of tests/helpers/fault_worker.py (and an honest unit with another seed, what
a browser tab's replica would be: it draws batches with another generator) is far outside.

For each model and two bases (version 0, and a base after ``--warm`` honest units were added),
one unit of ``--shard-size`` CIFAR-10 images with the recipe's batch size and the job's default
codec (fp16) is computed with each ``--threads`` count (the first twice), then compared.
No timing; one run per model and base (the numbers are deterministic for a given machine).

    python bench/replica_tolerance.py --data ../shared/data [--models cnn resnet_fast] [--threads 1 2]

Writes bench/out/replica_tolerance-<date>/{config,results}.json and its section of docs/results.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import hardware, shown, write_section  # noqa: E402
from contract.codecs import decode_delta  # noqa: E402
from contract.units import WorkUnit  # noqa: E402
from coordinator.trust import Similarity, Tolerance, compare, similarity  # noqa: E402
from models import registry  # noqa: E402
from models.data import load_cifar10  # noqa: E402
from models.local import is_running_stat, state_arrays  # noqa: E402
from tests.helpers.fault_worker import Fault, a_little, a_little_z, flip_labels, lie  # noqa: E402
from worker_py.unit import run_unit  # noqa: E402

HEX = "0" * 64


def unit_of(model: str, shard_size: int, seed: int, codec: str, lr_fraction: float = 0.5) -> WorkUnit:
    recipe = registry.get(model).recipe
    batch = min(recipe.batch_size, shard_size)
    hyper = {"lr": recipe.lr * lr_fraction, "momentum": recipe.momentum, "nesterov": recipe.nesterov,
             "weight_decay": recipe.weight_decay, "label_smoothing": recipe.label_smoothing, "loss": recipe.loss,
             "focal_gamma": recipe.focal_gamma, "crop_pad": recipe.crop_pad, "flip": recipe.flip}
    return WorkUnit(job="bench", unit_id=f"u{seed}", model=model, model_version=HEX, base_step=0, shard_ids=[HEX],
                    local_steps=math.ceil(shard_size / batch), batch_size=batch, hyper=hyper, seed=seed, codec=codec,
                    lease="bench", deadline=1e12)


def delta(unit: WorkUnit, base: dict, x: np.ndarray, y: np.ndarray, threads: int, device: str = "cpu") -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return decode_delta(run_unit(unit, base, x, y, "bench", device=device).delta)
    finally:
        torch.set_num_threads(before)


def row(s: Similarity) -> dict:
    return {"cosine": s.cosine, "norm_diff": s.norm_diff}


def measure(model: str, data, args) -> list[dict]:
    torch.manual_seed(0)
    base = state_arrays(registry.build(model))
    x, y = data.train_x[:args.shard_size], data.train_y[:args.shard_size]
    rows = []
    for stage in ("version 0", f"after {args.warm} units"):
        if stage != "version 0":   # a base that has learned something: honest units added one after another
            for k in range(args.warm):
                lo = args.shard_size * (k + 1)
                d = delta(unit_of(model, args.shard_size, 100 + k, "fp32"), base, data.train_x[lo:lo + args.shard_size],
                          data.train_y[lo:lo + args.shard_size], args.threads[0])
                base = {n: base[n] + d.get(n, 0) for n in base}
        unit = unit_of(model, args.shard_size, 7, args.codec)
        honest = delta(unit, base, x, y, args.threads[0])
        pairs = {f"honest, threads {args.threads[0]} twice": delta(unit, base, x, y, args.threads[0])}
        for t in args.threads[1:]:
            pairs[f"honest, threads {args.threads[0]} vs {t}"] = delta(unit, base, x, y, t)
        for device in args.devices:   # a donor's GPU against the CPU: the same unit, the same seeded draws
            pairs[f"honest, cpu vs {device}"] = delta(unit, base, x, y, args.threads[0], device)
        other = delta(unit_of(model, args.shard_size, 8, args.codec), base, x, y, args.threads[0])
        pairs["another seed (a browser's replica)"] = other
        replay_x, replay_y = data.train_x[-args.shard_size:], data.train_y[-args.shard_size:]
        pairs["replay (another unit's delta)"] = delta(unit_of(model, args.shard_size, 9, args.codec), base, replay_x,
                                                       replay_y, args.threads[0])
        pairs["label flip"] = delta(unit, base, x, flip_labels(y), args.threads[0])
        pairs["a little is enough (z for 1 of 3)"] = a_little([honest, other], a_little_z(3, 1))
        for fault in (Fault.SIGN_FLIP, Fault.SCALE, Fault.NOISE, Fault.FREE_RIDE):
            pairs[fault.value] = lie(honest, fault, seed=1)
        for name, d in pairs.items():
            weights = similarity(*({k: v for k, v in e.items() if not is_running_stat(k)} for e in (honest, d)))
            rows.append({"model": model, "base": stage, "pair": name, **row(compare(honest, d)),
                         "weights": row(weights)})
            print(f"{model:12s} {stage:16s} {name:40s} 1 - cos {1 - rows[-1]['cosine']:.2e}  "
                  f"norm diff {rows[-1]['norm_diff']:.2e}", flush=True)
    return rows


def onnx_vs_torch(model: str, data, batch: int = 32, steps: int = 8) -> Similarity:
    """The exported step graph in onnxruntime (CPU kernels, what a tab's WebAssembly backend runs)
    against torch, each chained for ``steps`` steps on the same real images and dropout masks (the
    reference functions of tests/test_onnx_step.py): the unit's delta compared as a check would."""
    import warnings

    from models import onnx_step
    from tests import test_onnx_step as ref

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, spec = onnx_step.step_graph(model, batch, ROOT / "bench" / "out" / "step-cache")
    run = ref.session(graph)
    start = ref.initial_feed(model, spec)
    ort_state, torch_state = dict(start), dict(start)
    for k in range(steps):
        x = data.train_x[k * batch:(k + 1) * batch].astype(np.float32)
        y = data.train_y[k * batch:(k + 1) * batch].astype(np.int64)
        masks = ref.dropout_masks(spec, 100 + k)
        feed = ort_state | {"x": x, "y": y} | masks
        got = dict(zip(spec.output_names, run.run(None, feed)))
        ort_state = feed | {t.feeds: got[t.name] for t in spec.outputs[1:]}
        feed = torch_state | {"x": x, "y": y} | masks
        want = ref.torch_step(model, spec, feed, 100 + k)
        torch_state = feed | {t.feeds: want[t.name] for t in spec.outputs[1:]}

    def delta(state: dict) -> dict:
        return {t.state: state[t.name] - start[t.name] for t in spec.inputs if t.role in ("param", "stat")}
    return compare(delta(ort_state), delta(torch_state))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="CIFAR-10 path (default: $CROWDTRAIN_DATA)")
    p.add_argument("--models", nargs="+", default=["cnn", "resnet_fast"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--codec", default="fp16")
    p.add_argument("--devices", nargs="*", default=[], metavar="DEV",
                   help="also compute the honest unit on these torch devices (cuda, cuda:N) and compare with the CPU")
    p.add_argument("--warm", type=int, default=3, help="honest units added to make the second base")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / f"replica_tolerance-{datetime.date.today()}")
    p.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--report-only", action="store_true", help="rebuild the docs section from --out's results")
    p.add_argument("--onnx-only", action="store_true", help="only print onnxruntime vs torch for --models "
                   "(8 chained steps of 32, same batches; not in the docs section)")
    args = p.parse_args(argv)
    if args.onnx_only:
        torch.set_num_threads(args.threads[0])
        data = load_cifar10(args.data, progress=False)
        for model in args.models:
            s = onnx_vs_torch(model, data)
            print(f"{model}: onnxruntime vs torch, 8 steps of 32: 1 - cosine {1 - s.cosine:.2e}, "
                  f"norm difference {s.norm_diff:.2e}")
        return 0
    if args.report_only:
        rows = json.loads((args.out / "results.json").read_text())
        hw = json.loads((args.out / "config.json").read_text())["hardware"]
    else:
        data = load_cifar10(args.data, progress=False)
        rows = [r for m in args.models for r in measure(m, data, args)]
        args.out.mkdir(parents=True, exist_ok=True)
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        hw = hardware(args.devices[0] if args.devices else None)
        (args.out / "config.json").write_text(json.dumps({**config, "hardware": hw}, indent=1))
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    tol = Tolerance()
    honest = [r for r in rows if r["pair"].startswith("honest")]
    lies = [r for r in rows if not r["pair"].startswith("honest")]
    near = max((r for r in lies if r["norm_diff"] <= tol.refute_norm_diff), key=lambda r: r["cosine"])
    lines = [f"### Replica tolerance ({datetime.date.today()})", "",
             f"- Units: {args.shard_size} CIFAR-10 images each, the recipe's batch size, codec {args.codec}, "
             f"computed by `worker_py.unit.run_unit`; bases: version 0 and after {args.warm} honest units.",
             f"- Hardware: {hw}; torch threads {', '.join(map(str, args.threads))}.",
             f"- Command: `python bench/replica_tolerance.py --models {' '.join(args.models)} --threads "
             f"{' '.join(map(str, args.threads))}`; raw results in `{shown(args.out)}`.",
             f"- Tolerance in `coordinator/trust.py`: agree at cosine >= {tol.min_cosine} and norm difference <= "
             f"{tol.max_norm_diff}; against the coordinator's own computation a delta is refuted below cosine "
             f"{tol.refute_cosine} or above norm difference {tol.refute_norm_diff} (inconclusive in between). "
             f"Cosine and norm difference are the worse of the weights' and the batch-norm statistics' (each on "
             f"its own). Honest pairs: 1 - cosine <= {max(1 - r['cosine'] for r in honest):.1e}, norm difference "
             f"<= {max(r['norm_diff'] for r in honest):.1e}. Every other pair is refuted; the closest is "
             f"`{near['model']}` {near['pair']} ({near['base']}): cosine {near['cosine']:.3f}, norm difference "
             f"{near['norm_diff']:.3f}.",
             "", "| model | base | compared with the honest delta | 1 - cosine | norm difference | agrees |",
             "|---|---|---|---:|---:|---|"]
    for r in rows:
        ok = r["cosine"] >= tol.min_cosine and r["norm_diff"] <= tol.max_norm_diff
        lines.append(f"| `{r['model']}` | {r['base']} | {r['pair']} | {1 - r['cosine']:.2e} | {r['norm_diff']:.2e} | "
                     f"{'yes' if ok else 'no'} |")
    write_section("replica_tolerance", "\n".join(lines), args.results_md)
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
