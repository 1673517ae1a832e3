import asyncio.events, os, time, sys
_orig = asyncio.events.Handle._run
_f = None
def _inner(c):
    # innermost awaited coroutine's frame, as it stands
    fr = None
    while c is not None:
        f = getattr(c, "cr_frame", None) or getattr(c, "gi_frame", None)
        if f is None: break
        fr = f
        c = getattr(c, "cr_await", None) or getattr(c, "gi_yieldfrom", None)
    return fr
def _run(self):
    global _f
    cb = self._callback
    task = getattr(cb, "__self__", None)
    before = ""
    if task is not None and hasattr(task, "get_coro"):
        c = task.get_coro()
        fr = getattr(c, "cr_frame", None)
        if fr is not None:
            req = fr.f_locals.get("request")
            if req is not None:
                before = f"{req.method} {req.path.split('/')[3] if req.path.count('/')>2 else req.path}"
            inner = _inner(c)
            if inner is not None:
                before += f" from {inner.f_code.co_name}@{inner.f_code.co_filename.split('/')[-1]}:{inner.f_lineno}"
    t = time.perf_counter()
    _orig(self)
    d = time.perf_counter() - t
    if d > 0.008:
        if _f is None:
            _f = open(f"/tmp/slowcb/{os.getpid()}.log", "a", buffering=1)
        what = repr(cb)[:200]
        if task is not None and hasattr(task, "get_coro"):
            c = task.get_coro()
            inner = _inner(c)
            what = f"task {getattr(c, '__qualname__', c)} [{before}] -> " + (f"{inner.f_code.co_name}@{inner.f_code.co_filename.split('/')[-1]}:{inner.f_lineno}" if inner else "done")
        _f.write(f"{time.time():.3f} {d*1e3:.1f} {what}\n")
asyncio.events.Handle._run = _run
