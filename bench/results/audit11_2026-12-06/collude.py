"""Two fresh ids from two addresses: one lies, the other computes the replica and tells the same lie."""
import asyncio, sys, tempfile
from pathlib import Path
sys.dont_write_bytecode = True
sys.path.insert(0, "/work/main")
from contract.units import UnitRequest
from coordinator.config import CoordinatorConfig
from tests.helpers.fault_worker import Fault, body, compute
from tests.helpers.protocol import open_job
from tests.helpers.tiny_cifar import tiny_cifar10

async def main():
    tmp = Path(tempfile.mkdtemp())
    cfg = CoordinatorConfig(state=tmp / "state", model="cnn", shard_size=16, epochs=20.0, codec="fp32")   # defaults
    job = open_job(cfg, tiny_cifar10(n_train=256, n_test=64))
    folded = 0
    for i in range(6):
        a, b = f"sybil-a{i}", f"sybil-b{i}"          # fresh ids each round (minting)
        u = job.next_unit(UnitRequest(worker_id=a, backend="python"), address=f"2001:db8::{i}:1")
        job.next_unit(UnitRequest(worker_id=b, backend="python"), address=f"2001:db8::{i}:2")  # b is about
        await job.submit(u.unit_id, body(compute(u, job.store.get_blob, a), Fault.SIGN_FLIP))
        await job.settle()
        r = job.next_unit(UnitRequest(worker_id=b, backend="python"), address=f"2001:db8::{i}:2")
        assert r.shard_ids == u.shard_ids and r.seed == u.seed, "b got the replica"
        await job.submit(r.unit_id, body(compute(r, job.store.get_blob, b), Fault.SIGN_FLIP))
        await job.settle()
    await job.settle()
    rows = job.store.results()
    print("results:", len(rows), "lies folded:", sum(x["applied_step"] is not None for x in rows),
          "check states:", sorted({x["check_state"] for x in rows if x["check_state"]}),
          "recomputed by coordinator:", job.check_counts["recomputed"], "model version:", job.step)
    print("sybil-a0:", job.trust.get("sybil-a0"))
    job.close()
asyncio.run(main())
