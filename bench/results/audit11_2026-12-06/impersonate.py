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
    cfg = CoordinatorConfig(state=tmp / "state", model="cnn", shard_size=16, epochs=20.0, codec="fp32")  # defaults otherwise
    job = open_job(cfg, tiny_cifar10(n_train=256, n_test=64))
    job.trust.put(T.Record("alice", backend="python", address="203.0.113.7", consecutive_valid=40, valid=40))
    ids = [row.worker_id for row in job.status().trust]
    print("ids published in /api/status trust rows:", ids)
    folded = 0
    for i in range(8):   # an attacker on another address claims alice's id
        u = job.next_unit(UnitRequest(worker_id="alice", backend="python"), address="198.51.100.9")
        await job.submit(u.unit_id, body(compute(u, job.store.get_blob, "alice"), Fault.SIGN_FLIP))
        await job.settle()
    await job.settle()
    rows = job.store.results()
    print("lies sent as alice:", len(rows), "folded:", sum(r["applied_step"] is not None for r in rows),
          "held:", sum(r["check_state"] == "held" for r in rows))
    print("alice now:", job.trust.get("alice"))
    job.close()
asyncio.run(main())
