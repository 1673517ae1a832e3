"""A real ``crowdtrain worker`` process that lies: the worker's own CLI, loop, client and training,
with each computed result changed by a ``Fault`` (``tests.helpers.fault_worker.lie``) before it is
sent. The hook replaces ``worker_py.runner.run_unit`` in this process only; production code has
no fault switch.

    python -m tests.helpers.lying_worker sign_flip --coordinator URL --worker-id liar [worker options]
"""
from __future__ import annotations

import dataclasses
import sys

from contract.codecs import decode_delta, encode_delta, get_codec
from tests.helpers.fault_worker import Fault, lie
from worker_py import main, runner

LIES = (Fault.SIGN_FLIP, Fault.SCALE, Fault.NOISE, Fault.FREE_RIDE)


def install(fault: Fault) -> None:
    """From now on this process's worker computes each unit honestly and sends ``lie(delta, fault)``."""
    honest = runner.run_unit

    def run_unit(unit, base, x, y, worker_id, **kwargs):
        result = honest(unit, base, x, y, worker_id, **kwargs)
        lied = lie(decode_delta(result.delta), fault, seed=unit.seed)
        return dataclasses.replace(result, delta=encode_delta(get_codec(unit.codec), lied))

    runner.run_unit = run_unit


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in {f.value for f in LIES}:
        sys.exit(f"usage: python -m tests.helpers.lying_worker {{{','.join(f.value for f in LIES)}}} "
                 "[crowdtrain worker options]")
    install(Fault(name))
    sys.exit(main.cli(sys.argv[2:]))
