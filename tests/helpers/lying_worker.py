"""A real ``crowdtrain worker`` process that lies: the worker's own CLI, loop, client and training,
with each unit's result made by a ``Liar`` (``coordinator.sim.faults``, the simulator's and the benches'
liars) from the worker's honest computation: every lie of ``LIES`` (sign flip, scale, noise, free ride,
label flip, replay of its first delta, a little is enough, a turn into the check's inconclusive band). The hook replaces ``worker_py.runner.run_unit``
in this process only; production code has no fault switch.

    python -m tests.helpers.lying_worker sign_flip --coordinator URL --worker-id liar [worker options]
"""
from __future__ import annotations

import sys

import numpy as np

from coordinator.sim.faults import LIES, Fault, Liar, flip_labels
from worker_py import main, runner


def install(fault: Fault) -> None:
    """From now on this process's worker sends, for each unit, what a ``Liar`` of ``fault`` makes of it:
    computed honestly (on labels shifted by one class for a label flip) and then changed, or not computed."""
    honest_run = runner.run_unit
    liars: dict[str, Liar] = {}

    def run_unit(unit, base, x, y, worker_id, **kwargs):
        liar = liars.setdefault(worker_id, Liar(worker_id, fault))

        def honest(u, flip: bool):
            return honest_run(u, base, x, flip_labels(np.asarray(y)) if flip else y, worker_id, **kwargs)

        return liar.result(unit, honest)

    runner.run_unit = run_unit


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in {f.value for f in LIES}:
        sys.exit(f"usage: python -m tests.helpers.lying_worker {{{','.join(f.value for f in LIES)}}} "
                 "[crowdtrain worker options]")
    install(Fault(name))
    sys.exit(main.cli(sys.argv[2:]))
