# Diagnostic: while an event-loop callback has run over 5 ms, sample the loop thread's stack every 2 ms;
# collapsed stacks with counts go to /tmp/slowcb/<pid>.stacks every 10 s.
import asyncio.events, collections, os, sys, threading, time, traceback
_orig = asyncio.events.Handle._run
_st = {"t": None, "tid": None}
def _run(self):
    _st["tid"] = threading.get_ident(); _st["t"] = time.perf_counter()
    try:
        _orig(self)
    finally:
        _st["t"] = None
asyncio.events.Handle._run = _run
_counts = collections.Counter()
def _watch():
    last = time.time()
    while True:
        time.sleep(0.002)
        t = _st["t"]
        if t is not None and time.perf_counter() - t > 0.005:
            f = sys._current_frames().get(_st["tid"])
            if f is not None:
                st = [f"{fr.f_code.co_name}@{'/'.join(fr.f_code.co_filename.split('/')[-2:])}:{fr.f_lineno}" for fr, _ in traceback.walk_stack(f)]
                _counts[";".join(reversed(st))] += 1
        if time.time() - last > 10 and _counts:
            last = time.time()
            os.makedirs("/tmp/slowcb", exist_ok=True)
            with open(f"/tmp/slowcb/{os.getpid()}.stacks", "w") as fh:
                for k, v in _counts.most_common():
                    fh.write(f"{k} {v}\n")
threading.Thread(target=_watch, daemon=True, name="slowcb-watch").start()
