"""Coordinator capacity: accepted submissions per second and aggregation time per update.

Claim: the coordinator folds an update in close to the time the memory system needs to touch
the model and the delta, and accepts submissions fast enough that CPU workers never wait on it.
For models of 0.1M, 1M and 10M parameters (an MLP registered for this benchmark only), it
measures side by side in one run:
  - aggregation: ``strategy.add`` + ``aggregate`` alone (async_sgd), against the bound
    3 * 4 * P bytes (read model, read delta, write model) at the measured copy bandwidth;
  - the whole path: real HTTP on 127.0.0.1 into ``create_app``, with the contract's decode and
    checks, the SQLite log (fsync) and the model written on the coordinator's default persistence
    policy (``--persist-every-s`` / ``--persist-every-versions``); precomputed valid
    results, each with a delta of its own (``--same-delta``: all the same bytes, as before 2026-12-04 b)
    (``--codec``: fp32 unless told; the coordinator asks its workers for fp16 by default)
    from 4 concurrent clients (a process of their own unless ``--in-process-clients``);
    async_sgd (a version per aggregation: the aggregation task folds every update that arrived
    while it was busy) and fedbuff with K=10. Accepted/s counts until every result is folded into a version; answered/s until
    every submission is answered (folding runs off the request path).

    python bench/coordinator_capacity.py [--sizes 0.1 1 10] [--submissions 40]

Writes bench/out/coordinator_capacity-<date>/{config,results}.json and its section of
docs/results.md. Hardware and runs are printed and saved.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import commit, hardware, shown, write_section  # noqa: E402
from contract.codecs import encode_delta, get_codec  # noqa: E402
from contract.units import UnitResult, WorkUnit, pack_result  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.job import Job  # noqa: E402
from coordinator.strategies import Update, make_strategy  # noqa: E402
from models import registry  # noqa: E402
from models.layers import Normalize  # noqa: E402
from models.recipe import Recipe  # noqa: E402
from tests.helpers.tiny_cifar import tiny_cifar10  # noqa: E402


def mlp(width: int):
    def build(num_classes: int = 10) -> nn.Module:
        return nn.Sequential(Normalize(), nn.Flatten(), nn.Linear(3072, width), nn.ReLU(), nn.Linear(width, num_classes))
    return build


def register(millions: float) -> str:
    width = max(1, round(millions * 1e6 / 3083))     # 3072*w + w + 10*w + 10 parameters
    name = f"bench_mlp_{millions:g}m"
    registry.MODELS[name] = registry.ModelSpec(name, mlp(width), Recipe(), "dense", "capacity benchmark MLP")
    return name


def copy_bandwidth(n: int, repeats: int = 5) -> float:
    """Bytes per second of ``c = a + b`` on float32 arrays of ``n`` elements (3 * 4 * n bytes)."""
    a, b, c = (np.ones(n, np.float32) for _ in range(3))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.add(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 12 * n / best


def aggregation_time(state: dict, repeats: int) -> float:
    strategy = make_strategy("async_sgd")
    delta = {k: np.full_like(v, 1e-3) for k, v in state.items()}
    times = []
    for version in range(repeats):
        t = time.perf_counter()
        strategy.add(Update(delta, version, 1), version)
        state, _ = strategy.aggregate(state, version)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def distinct(raw: bytes, i: int) -> bytes:
    """The fp16 or fp32 delta container ``raw`` with its last two values set from ``i`` (exact binary
    fractions, below 2 in magnitude): a delta of its own for each of up to 4 million results."""
    length = int.from_bytes(raw[4:8], "little")
    header = json.loads(raw[8:8 + length])
    size = {"fp16": 2, "fp32": 4}[header["codec"]]
    dtype = "<f2" if size == 2 else "<f4"
    last = header["tensors"][-1]
    n = int(np.prod(last["shape"]))
    assert n >= 2, "the last tensor holds at least two values"
    end = len(raw) - (-(n * size) % 4)   # the last tensor's payload ends here (then its padding)
    values = np.array([(i % 2048 + 1) / 1024, (i // 2048 + 1) / 1024], dtype).tobytes()
    return raw[:end - 2 * size] + values + raw[end:]


def pack_bodies(units: list[dict], raw: bytes) -> list[bytes]:
    """One result body per unit of the plan (packed before the clock), each carrying a delta of its own
    made from ``raw`` (``distinct``; a unit with ``same_delta`` carries ``raw`` itself): a store that names
    a delta's blob by its content writes it once when every result carries the same bytes."""
    return [pack_result(UnitResult(unit_id=u["unit_id"], lease=u["lease"], worker_id=u["worker"],
                                   base_version=u["model_version"],
                                   delta=raw if u.get("same_delta") else distinct(raw, i), loss_before=2.3,
                                   loss_after=2.2, num_samples=u["batch_size"], compute_seconds=1.0))
            for i, u in enumerate(units)]


async def post_all(url: str, units: list[dict], bodies: list[bytes], clients: int, wait_go: bool = False) -> None:
    """The clients: ``clients`` concurrent connections posting one result per unit (``wait_go``: say ``ready``
    first and start on a line of stdin)."""
    from aiohttp import ClientSession

    async with ClientSession() as session:
        async def client(k: int) -> None:
            for i in range(k, len(units), clients):
                async with session.post(f"{url}/api/v1/units/{units[i]['unit_id']}/result", data=bodies[i]) as r:
                    assert r.status == 200, await r.text()
        if wait_go:
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)   # "go"
        await asyncio.gather(*(client(k) for k in range(clients)))
    if wait_go:
        print("done", flush=True)


def client_process(argv: list[str]) -> int:
    """``--post URL PLAN CLIENTS``: the clients in a process of their own (the default; not with
    ``--in-process-clients``)."""
    url, plan, clients = argv
    units = json.loads(Path(plan).read_text())
    bodies = pack_bodies(units, Path(plan).with_suffix(".delta").read_bytes())
    asyncio.run(post_all(url, units, bodies, int(clients), wait_go=True))
    return 0


async def http_rate(model: str, strategy: str, params: dict, submissions: int, clients: int = 4,
                    own_process: bool = False, codec: str = "fp32", same_delta: bool = False) -> dict:
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    from coordinator.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        cfg = CoordinatorConfig(state=Path(tmp), model=model, strategy=strategy, strategy_params=params,
                                codec=codec, shard_size=64, epochs=1e6, eval_every_s=1e9, max_staleness=None,
                                replication="off")   # every result folded: the fold path's capacity
        job = Job(cfg)
        job.open(tiny_cifar10(n_train=256, n_test=16))
        server = TestServer(create_app(cfg, job), host="127.0.0.1")
        await server.start_server()
        url = f"http://127.0.0.1:{server.port}"
        async with ClientSession() as session:
            units = []
            for i in range(submissions):
                async with session.post(url + "/api/v1/units/next", json={
                        "protocol": 1, "worker_id": f"c{i % clients}", "backend": "python"}) as r:
                    units.append(WorkUnit.from_json(await r.json()))
            delta = {k: np.full(s, 1e-4, np.float32) for k, (s, _) in job.spec.items()}
            raw = encode_delta(get_codec(codec), delta)
            plan = [{"unit_id": u.unit_id, "lease": u.lease, "worker": f"c{i % clients}",
                     "model_version": u.model_version, "batch_size": u.batch_size, "same_delta": same_delta}
                    for i, u in enumerate(units)]
            if own_process:
                (Path(tmp) / "plan.json").write_text(json.dumps(plan))
                (Path(tmp) / "plan.delta").write_bytes(raw)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--post", url, str(Path(tmp) / "plan.json"), str(clients),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
                assert (await proc.stdout.readline()).strip() == b"ready"
                t, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
                assert (await proc.stdout.readline()).strip() == b"done", "a client failed"
                answered = time.perf_counter() - t
            else:
                bodies = pack_bodies(plan, raw)
                t, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
                await post_all(url, plan, bodies, clients)
                answered = time.perf_counter() - t
            while job.inbox or job.aggregator.due:   # the aggregation task catches up (a partial
                await job.settle()                     # FedBuff buffer stays buffered, by design)
            seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
            used = resource.getrusage(resource.RUSAGE_SELF)
            system = used.ru_stime - usage.ru_stime   # the kernel's share: page faults, socket reads, writes
            if own_process:
                assert await proc.wait() == 0   # after the clock: the clients' interpreter takes a while to exit
        versions = job.step
        totals = job.store.result_totals()
        assert totals["applied"] + job.aggregator.buffered == totals["accepted"] == submissions, totals
        await server.close()
    return {"accepted_per_s": submissions / seconds, "answered_per_s": submissions / answered, "seconds": seconds,
            "cpu_seconds": cpu, "system_cpu_seconds": system, "accepted_per_cpu_s": submissions / cpu,
            "submissions": submissions, "versions": versions, "delta_bytes": len(raw), "codec": codec,
            "same_delta": same_delta}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="millions of parameters")
    p.add_argument("--submissions", type=int, default=40)
    p.add_argument("--clients", type=int, default=4, help="concurrent clients posting results")
    p.add_argument("--in-process-clients", action="store_true",
                   help="the clients in the coordinator's process and event loop, as before 2026-12-02 (default: "
                        "a process of their own, so the coordinator's CPU is its own)")
    p.add_argument("--codec", default="fp32", choices=("fp32", "fp16"),
                   help="the results' delta codec (default fp32; the coordinator asks its workers for fp16 unless "
                        "told otherwise, half the bytes to read, hash and log)")
    p.add_argument("--same-delta", action="store_true",
                   help="every result carries the same delta bytes, as before 2026-12-04 b (a store that names "
                        "blobs by content then writes the first one only); default: a delta of its own each")
    p.add_argument("--out", type=Path)
    p.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    args = p.parse_args()
    own = not args.in_process_clients
    torch.set_num_threads(1)
    # the coordinator's process reuses large buffers (create_app does this); the aggregation timed below
    # runs as it would there. getattr: older checkouts, measured side by side through worktrees, lack it
    from coordinator import app as coordinator_app
    getattr(coordinator_app, "reuse_large_buffers", lambda: None)()
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"coordinator_capacity-{date}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"date": date, "sizes_millions": args.sizes, "submissions": args.submissions, "clients": args.clients,
           "codec": args.codec, "same_delta": args.same_delta, "commit": commit("coordinator", "contract"),
           "clients_process": own, "hardware": hardware(), "command": "python " + " ".join(sys.argv)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    rows = []
    for millions in args.sizes:
        name = register(millions)
        state = {k: v.detach().numpy().copy() for k, v in registry.build(name).state_dict().items()}
        params = sum(v.size for v in state.values())
        bandwidth = copy_bandwidth(params)
        agg = aggregation_time(state, repeats=8)
        bound = 12 * params / bandwidth
        row = {"model": name, "params": params, "aggregation_s": agg, "bandwidth_bound_s": bound,
               "bound_ratio": agg / bound, "copy_bandwidth_gb_s": bandwidth / 1e9}
        for strategy, sparams in (("async_sgd", {}), ("fedbuff", {"buffer_size": 10})):
            row[strategy] = asyncio.run(http_rate(name, strategy, sparams, args.submissions, args.clients, own,
                                                   args.codec, args.same_delta))
        rows.append(row)
        print(f"{name}: {params:,} params, aggregation {1e3 * agg:.2f} ms (bound {1e3 * bound:.2f} ms, "
              f"x{agg / bound:.1f}); HTTP accepted/s async_sgd {row['async_sgd']['accepted_per_s']:.1f} "
              f"(answered {row['async_sgd']['answered_per_s']:.1f}, per CPU-second "
              f"{row['async_sgd']['accepted_per_cpu_s']:.1f}, system {row['async_sgd']['system_cpu_seconds']:.1f} of "
              f"{row['async_sgd']['cpu_seconds']:.1f} CPU-s), fedbuff {row['fedbuff']['accepted_per_s']:.1f}",
              flush=True)
    (out / "results.json").write_text(json.dumps({"config": cfg, "rows": rows}, indent=2) + "\n")
    lines = [f"### Coordinator capacity ({date})", "",
             f"- Hardware: {cfg['hardware']}; 1 torch thread; one run, median of 7 aggregations.",
             f"- Command: `{cfg['command']}`; raw results in `{shown(out)}`.",
             "- Aggregation: async_sgd `add` + `aggregate` alone. Bound: 12 bytes per parameter (read model, "
             "read delta, write model) at the `c = a + b` bandwidth measured in the same run.",
             f"- Accepted/s: real HTTP on 127.0.0.1, {args.clients} concurrent clients ("
             + ("in a process of their own" if own else "in the coordinator's process and event loop")
             + f") posting precomputed {args.codec} results, "
             "until every result is folded into a version; includes decoding and checks, the durable result log "
             "(delta blob fsynced, SQLite row made durable by a group fdatasync of the WAL, before each answer) "
             "and the model written on the default persistence policy "
             "(every 10 s or 100 versions, and at the end). Answered/s: until every submission is answered "
             "(aggregation runs in a background task, off the request path). Per CPU-second: accepted results "
             "per second of the coordinator process's CPU time (all threads"
             + (")" if own else ", the clients' share included)") + " over the same "
             "interval: about the rate with a core to itself, on a shared machine (the fsync waits overlap "
             "other work only with enough concurrent clients).",
             "", "| params | aggregation (ms) | memory bound (ms) | ratio | accepted/s async_sgd | "
             "answered/s async_sgd | per CPU-second async_sgd | versions async_sgd | accepted/s fedbuff K=10 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a = r["async_sgd"]
        lines.append(f"| {r['params']:,} | {1e3 * r['aggregation_s']:.2f} | {1e3 * r['bandwidth_bound_s']:.2f} | "
                     f"{r['bound_ratio']:.1f} | {a['accepted_per_s']:.1f} | {a['answered_per_s']:.1f} | "
                     f"{a['accepted_per_cpu_s']:.1f} | "
                     f"{a['versions']} | {r['fedbuff']['accepted_per_s']:.1f} |")
    if not args.no_docs:
        write_section("coordinator_capacity", "\n".join(lines), ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(client_process(sys.argv[2:]) if sys.argv[1:2] == ["--post"] else main())
