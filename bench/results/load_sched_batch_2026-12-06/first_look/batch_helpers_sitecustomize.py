# Experiment: every thread but the main one of a coordinator process runs SCHED_BATCH (no wakeup preemption).
import os, sys, threading
if "coordinator" in " ".join(sys.argv) or os.environ.get("BATCH_ALL"):
    _orig = threading.Thread._bootstrap_inner
    def _inner(self):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass
        return _orig(self)
    threading.Thread._bootstrap_inner = _inner
