"""The donate page and its static assets, served by the coordinator itself.

A volunteer's browser loads nothing from third-party hosts: the page (``GET /``), its
scripts from ``worker_web/`` and onnxruntime-web's files from ``worker_web/node_modules``
(installed by deploy/setup.sh from npm) all come from here, under a versioned prefix
``/static/<version>/`` so that they can be cached for good (``immutable``); the page itself
is ``no-cache`` and names the current version. Compressible files are gzipped once into
the cache folder and sent compressed to clients that accept gzip.

Every response carries ``Cross-Origin-Opener-Policy: same-origin`` and
``Cross-Origin-Embedder-Policy: require-corp`` (the page is cross-origin isolated, so
onnxruntime-web may use WebAssembly threads) and ``Cross-Origin-Resource-Policy: same-origin``.
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from aiohttp import web

log = logging.getLogger("crowdtrain.coordinator")
WEB_DIR = Path(__file__).resolve().parents[1] / "worker_web"
ORT_DIST = WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"
PAGE_FILES = ("main.js", "worker.js", "contract.js", "feedback.js", "draw.js", "style.css")
# The WebGPU build (jsep: WebGPU and WASM kernels) and the smaller WASM-only build; a tab
# loads the second when it has no WebGPU adapter.
ORT_FILES = ("ort.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm",
             "ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
         ".css": "text/css", ".html": "text/html"}
IMMUTABLE = "public, max-age=31536000, immutable"
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}


class Assets:
    """The files under ``/static/<version>/``: ``rel path -> source path``, and their gzip copies."""

    def __init__(self, cache_dir: str | os.PathLike, web_dir: Path = WEB_DIR, ort_dist: Path = ORT_DIST) -> None:
        self.files: dict[str, Path] = {}
        for name in PAGE_FILES:
            if (web_dir / name).is_file():
                self.files[name] = web_dir / name
        self.missing_ort = [name for name in ORT_FILES if not (ort_dist / name).is_file()]
        if not self.missing_ort:
            self.files.update({f"ort/{name}": ort_dist / name for name in ORT_FILES})
        h = hashlib.sha256()
        for rel, path in sorted(self.files.items()):
            stat = path.stat()
            # page files by content; onnxruntime-web's (large, versioned by npm) by size and time
            token = path.read_bytes() if not rel.startswith("ort/") else f"{stat.st_size}:{stat.st_mtime_ns}".encode()
            h.update(rel.encode() + b"\0" + token + b"\0")
        self.version = h.hexdigest()[:16]
        self.gz_dir = Path(cache_dir) / "web" / self.version
        self.index = (web_dir / "index.html").read_text() if (web_dir / "index.html").is_file() else None

    @property
    def prefix(self) -> str:
        return f"/static/{self.version}"

    def prepare(self) -> None:
        """Gzip every file now (a coordinator does it at start, off the event loop)."""
        for rel in self.files:
            self.gzipped(rel)

    def gzipped(self, rel: str) -> Path:
        """The gzip copy of one file, made once and kept in the cache folder across restarts."""
        target = self.gz_dir / (rel + ".gz")
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(self.files[rel], "rb") as src, gzip.GzipFile(tmp, "wb", compresslevel=9, mtime=0) as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(tmp, target)
        return target

    def page(self) -> str:
        """The donate page with its settings (asset prefix, what is missing) filled in."""
        if self.index is None:
            return "<!doctype html><title>crowdtrain</title><p>worker_web/index.html is missing."
        settings = {"assets": self.prefix, "ortMissing": self.missing_ort}
        return self.index.replace("{{SETTINGS}}", json.dumps(settings)).replace("{{ASSETS}}", self.prefix)

    async def serve(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        if request.match_info["version"] != self.version or rel not in self.files:
            raise web.HTTPNotFound(text=f"no such asset: {request.path} (the page may be from an older version; "
                                        "reload it)")
        headers = {"Cache-Control": IMMUTABLE, "Content-Type": TYPES.get(Path(rel).suffix, "application/octet-stream"),
                   "Vary": "Accept-Encoding", **ISOLATION}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = await asyncio.to_thread(lambda: self.gzipped(rel).read_bytes())
            return web.Response(body=body, headers={**headers, "Content-Encoding": "gzip"})
        return web.FileResponse(self.files[rel], headers=headers)
