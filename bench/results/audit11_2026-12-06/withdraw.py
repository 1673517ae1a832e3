"""A trusted worker's unchecked lies waiting in FedBuff's buffer are folded even after it loses a check."""
import asyncio, sys, tempfile
from pathlib import Path
sys.dont_write_bytecode = True
sys.path.insert(0, "/work/main")
from contract.units import UnitRequest
from coordinator import trust as T
from coordinator.config import CoordinatorConfig
from tests.helpers.fault_worker import Fault, body, compute
from tests.helpers.protocol import open_job
from tests.helpers.tiny_cifar import tiny_cifar10

async def main():
    tmp = Path(tempfile.mkdtemp())
    cfg = CoordinatorConfig(state=tmp / "state", model="cnn", shard_size=16, epochs=20.0, codec="fp32",
                            strategy="fedbuff", strategy_params={"buffer_size": 6, "staleness": "constant"},
                            robust="none", replication="adaptive")
    job = open_job(cfg, tiny_cifar10(n_train=256, n_test=64))
    job.trust.put(T.Record("liar", backend="python", consecutive_valid=1000, valid=1000))   # long trusted
    job.trust.put(T.Record("h", backend="python", consecutive_valid=1000, valid=1000))
    draws = iter([0.9, 0.9, 0.9, 0.0])     # the liar's first 3 results unchecked, the 4th checked
    job._draw = lambda: next(draws, 0.9)
    units = []
    for i in range(4):
        u = job.next_unit(UnitRequest(worker_id="liar", backend="python"))
        units.append(u)
        await job.submit(u.unit_id, body(compute(u, job.store.get_blob, "liar"), Fault.SIGN_FLIP))
        await job.settle()
    print("after 4 lies: buffered in strategy", job.aggregator.buffered, "held", job.status().updates_held)
    # an honest worker computes the replica of the 4th: disagreement -> coordinator recomputes -> liar loses
    r = job.next_unit(UnitRequest(worker_id="h", backend="python"))
    print("replica of the held unit:", r.shard_ids == units[3].shard_ids)
    await job.submit(r.unit_id, body(compute(r, job.store.get_blob, "h")))
    await job.settle()
    print("liar record:", job.trust.get("liar"))
    # two more honest results fill FedBuff's buffer (6)
    for i in range(3):
        u = job.next_unit(UnitRequest(worker_id="h", backend="python"))
        await job.submit(u.unit_id, body(compute(u, job.store.get_blob, "h")))
        await job.settle()
    for _ in range(3):
        await job.settle()
    rows = [r for r in job.store.results() if r["worker_id"] == "liar"]
    for r in rows:
        print(r["unit_id"], "applied_step", r["applied_step"], "dropped", r["dropped"], "check", r["check_state"])
    job.close()

asyncio.run(main())
