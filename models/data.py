"""CIFAR-10 loading: find a copy, decode it once, cache it as ``.npy``, return uint8 arrays.

Two layouts are read, each as a folder or a ``.tar.gz`` streamed without extracting:

* the official release, ``cifar-10-python.tar.gz`` / ``cifar-10-batches-py/`` (pickled
  ``data_batch_1..5``, ``test_batch``, ``batches.meta``), unpickled with an allow-list;
* an image folder, ``train/<class>/*`` and ``test/<class>/*`` with 32x32 RGB images,
  optionally under one wrapping folder inside the archive.

Image-folder images come in round-robin class order (the first image of every class, then
the second, ...), so any prefix of the training split is class-balanced, as it is for the
shuffled official batches. Decoded arrays are cached under ``$CROWDTRAIN_CACHE`` (default
``~/.cache/crowdtrain``), keyed by the sha256 of the archive, or for a folder a hash of its
files' relative paths, sizes and mtimes. ``crowdtrain data`` checks a copy from the shell.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
OFFICIAL_ARCHIVE = "cifar-10-python.tar.gz"
OFFICIAL_DIR = "cifar-10-batches-py"
IMAGE_ARCHIVE = "cifar10-jpeg.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_BATCH = "batches.meta"
OFFICIAL_FILES = (*TRAIN_BATCHES, TEST_BATCH, META_BATCH)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
DOWNLOAD_TIMEOUT_S = 15.0
CACHE_FORMAT = 1

_ARRAYS = ("train_x", "train_y", "test_x", "test_y")
_PEEK_MEMBERS = 64
_CHUNK = 1 << 20
_CLASS_LIST = ", ".join(CLASSES)
_LOOKED_FOR = (f"{OFFICIAL_ARCHIVE}, {OFFICIAL_DIR}/, {IMAGE_ARCHIVE}, train/ + test/ folders, "
               "or a single *.tar.gz holding one of these layouts")

Arrays = dict[str, np.ndarray]


class DataError(Exception):
    """A CIFAR-10 copy that cannot be used; ``str(e)`` is one line naming the file."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True, eq=False)
class Cifar10:
    train_x: np.ndarray = field(repr=False)   # uint8 [N, 3, 32, 32], NCHW, RGB
    train_y: np.ndarray = field(repr=False)   # int64 [N], index into ``classes``
    test_x: np.ndarray = field(repr=False)    # uint8 [M, 3, 32, 32]
    test_y: np.ndarray = field(repr=False)    # int64 [M]
    classes: tuple[str, ...]
    source: str                               # the resolved file or folder
    digest: str                               # cache key: sha256 hex of the source


# ----------------------------------------------------------------------------- finding the data
def resolve_data_path(path: str | os.PathLike | None = None) -> Path:
    """The archive or folder to read: ``path``, else ``$CROWDTRAIN_DATA``; a folder is searched."""
    origin = ""
    if path is None or str(path) == "":
        path = os.environ.get("CROWDTRAIN_DATA", "")
        origin = " (from CROWDTRAIN_DATA)"
        if not path:
            raise DataError("no CIFAR-10 data given: pass --data PATH or set CROWDTRAIN_DATA "
                            "to the folder or archive (or use --download)")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}{origin}: no such file or directory; expected a CIFAR-10 folder or .tar.gz archive")
    if p.is_file():
        return p.resolve()
    found = _pick_in_dir(p)
    if found is None:
        raise DataError(f"{p}{origin}: no CIFAR-10 data found; looked for {_LOOKED_FOR}")
    return found.resolve()


def _pick_in_dir(d: Path) -> Path | None:
    """The best CIFAR-10 source inside folder ``d``: official archive, unpacked, image folder."""
    if _is_official_dir(d):
        return d
    if (d / OFFICIAL_ARCHIVE).is_file():
        return d / OFFICIAL_ARCHIVE
    if (d / OFFICIAL_DIR).is_dir():
        return d / OFFICIAL_DIR
    if (d / IMAGE_ARCHIVE).is_file():
        return d / IMAGE_ARCHIVE
    if _is_image_dir(d):
        return d
    try:
        archives = [a for a in sorted(d.iterdir()) if a.is_file() and a.name.endswith(ARCHIVE_SUFFIXES)]
    except OSError as e:
        raise DataError(f"{d}: cannot list the folder ({_reason(e)})") from None
    cifar = [a for a in archives if _peek_layout(a) is not None]
    if len(cifar) > 1:
        names = ", ".join(a.name for a in cifar)
        raise DataError(f"{d}: several CIFAR-10 archives ({names}); pass one of them with --data")
    if cifar:
        return cifar[0]
    return d if any((d / split).is_dir() for split in SPLITS) else None


def _is_official_dir(d: Path) -> bool:
    return (d / TRAIN_BATCHES[0]).is_file() or (d / TEST_BATCH).is_file()


def _is_image_dir(d: Path) -> bool:
    return all((d / split).is_dir() for split in SPLITS)


def _peek_layout(archive: Path) -> str | None:
    """"official" or "image" if the first members of ``archive`` look like CIFAR-10, else None."""
    try:
        with tarfile.open(archive, "r:*") as tf:
            for i, member in enumerate(tf):
                kind = _classify(_member_parts(member.name, archive)) if member.isfile() else None
                if kind is not None:
                    return kind[0]
                if i >= _PEEK_MEMBERS:
                    return None
    except (tarfile.TarError, zlib.error, EOFError, OSError, DataError):
        return None
    return None


# ----------------------------------------------------------------------------- archive members
def _member_parts(name: str, archive: Path) -> list[str]:
    """Path components of a tar member; refuses absolute paths and ``..`` (never extracted anyway)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(f"{archive}: unsafe member name {name!r}; expected relative paths inside the archive")
    return parts


def _classify(parts: list[str]) -> tuple[str, str, str] | None:
    """("official", file, "") or ("image", split, class) for a member's parts; None to skip it."""
    if not parts or parts[-1].startswith("."):
        return None
    if parts[-1] in OFFICIAL_FILES and len(parts) <= 3:
        return ("official", parts[-1], "")
    if len(parts) == 4 and parts[1] in SPLITS:
        parts = parts[1:]
    if len(parts) == 3 and parts[0] in SPLITS:
        return ("image", parts[0], parts[1])
    return None


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ----------------------------------------------------------------------------- official layout
class _SafeUnpickler(pickle.Unpickler):
    """Unpickles the plain containers and numpy arrays of a CIFAR-10 batch, nothing else."""

    def find_class(self, module: str, name: str) -> object:
        allowed = _numpy_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return allowed[(module, name)]


def _numpy_globals() -> dict[tuple[str, str], object]:
    core = getattr(np, "_core", None) or np.core
    reconstruct, frombuffer = core.multiarray._reconstruct, core.numeric._frombuffer
    import _codecs

    pairs = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _codecs.encode}
    for prefix in ("numpy.core", "numpy._core"):
        pairs[(f"{prefix}.multiarray", "_reconstruct")] = reconstruct
        pairs[(f"{prefix}.numeric", "_frombuffer")] = frombuffer
    return pairs


def _unpickle(data: bytes, where: str) -> dict[str, object]:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise DataError(f"{where}: not a CIFAR-10 pickle batch ({_reason(e)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict with b'data' and b'labels', got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _batch_arrays(batch: dict[str, object], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 [N, 3, 32, 32], y int64 [N]) from one unpickled batch."""
    if "data" not in batch or "labels" not in batch:
        keys = ", ".join(sorted(batch)) or "none"
        raise DataError(f"{where}: expected keys b'data' and b'labels', got {keys}")
    data = batch["data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: expected b'data' as uint8 [N, 3072], got {got}")
    labels = _labels(batch["labels"], len(data), where)
    return np.ascontiguousarray(data).reshape(-1, 3, 32, 32), labels


def _labels(raw: object, n: int, where: str) -> np.ndarray:
    try:
        y = np.asarray(raw)
        ok = y.shape == (n,) and (n == 0 or (y.dtype.kind in "iu" and y.min() >= 0 and y.max() < len(CLASSES)))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{where}: expected b'labels' as {n} integers in 0..{len(CLASSES) - 1}")
    return y.astype(np.int64)


def _check_meta(meta: dict[str, object], where: str) -> None:
    names = meta.get("label_names")
    decoded = [n.decode() if isinstance(n, bytes) else n for n in names] if isinstance(names, list) else names
    if decoded != list(CLASSES):
        raise DataError(f"{where}: label_names are {decoded!r}; expected {_CLASS_LIST}")


def _official_arrays(files: dict[str, tuple[bytes, str]], where: str, bar) -> Arrays:
    """Arrays from the raw bytes of the official files, keyed by file name (value: bytes, location)."""
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if n not in files]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}; expected {OFFICIAL_DIR}/ with "
                        f"{', '.join(TRAIN_BATCHES)}, {TEST_BATCH}")
    if META_BATCH in files:
        _check_meta(_unpickle(*files[META_BATCH]), files[META_BATCH][1])
    parts = []
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        parts.append(_batch_arrays(_unpickle(*files[name]), files[name][1]))
        bar.update(len(parts[-1][1]))
    train, test = parts[:-1], parts[-1]
    return {"train_x": np.concatenate([x for x, _ in train]), "train_y": np.concatenate([y for _, y in train]),
            "test_x": test[0], "test_y": test[1]}


# ----------------------------------------------------------------------------- image-folder layout
def _decode_image(data: bytes, where: str) -> np.ndarray:
    """HWC uint8 pixels of a 32x32 RGB image file."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (32, 32) or im.mode != "RGB":
                raise DataError(f"{where}: expected a 32x32 RGB image, got {im.size[0]}x{im.size[1]} {im.mode}")
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: not a readable image ({_reason(e)})") from None


class _ImageSplits:
    """Decoded images by split and class, turned into arrays once all are in."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.images: dict[str, dict[str, list[tuple[str, np.ndarray]]]] = {s: {} for s in SPLITS}

    def add(self, split: str, cls: str, name: str, pixels: np.ndarray) -> None:
        self.images[split].setdefault(cls, []).append((name, pixels))

    def arrays(self) -> Arrays:
        out: Arrays = {}
        for split in SPLITS:
            out[f"{split}_x"], out[f"{split}_y"] = self._split(split)
        return out

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        by_class = self.images[split]
        self._check_classes(split, by_class)
        keyed = []
        for label, cls in enumerate(CLASSES):
            ranked = sorted(by_class[cls], key=lambda item: item[0])
            keyed += [(rank, label, pixels) for rank, (_, pixels) in enumerate(ranked)]
        keyed.sort(key=lambda item: item[:2])
        x = np.stack([pixels for _, _, pixels in keyed]).transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x), np.array([label for _, label, _ in keyed], dtype=np.int64)

    def _check_classes(self, split: str, by_class: dict[str, list]) -> None:
        if not by_class:
            raise DataError(f"{self.where}: no images under {split}/; expected {split}/<class>/ image files")
        unexpected = sorted(set(by_class) - set(CLASSES))
        if unexpected:
            raise DataError(f"{self.where}: unexpected class folder(s) {', '.join(unexpected)} under {split}/; "
                            f"expected exactly {_CLASS_LIST}")
        missing = [c for c in CLASSES if c not in by_class]
        if missing:
            raise DataError(f"{self.where}: no images for class(es) {', '.join(missing)} under {split}/; "
                            f"expected {split}/<class>/ for each of {_CLASS_LIST}")


# ----------------------------------------------------------------------------- decoding sources
def _progress_bar(progress: bool, total: int | None, desc: str, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr,
                disable=None if progress else True, dynamic_ncols=True)


def _decode(source: Path, progress: bool) -> Arrays:
    if source.is_file():
        return _decode_archive(source, progress)
    if _is_official_dir(source) or source.name == OFFICIAL_DIR:
        return _decode_official_dir(source, progress)
    return _decode_image_dir(source, progress)


def _decode_archive(archive: Path, progress: bool) -> Arrays:
    """One streaming pass over a tar(.gz) of either layout; nothing is written to disk."""
    official: dict[str, tuple[bytes, str]] = {}
    images = _ImageSplits(str(archive))
    with _progress_bar(progress, None, f"decoding {archive.name}") as bar:
        try:
            with tarfile.open(archive, "r:*") as tf:
                for member in tf:
                    kind = _classify(_member_parts(member.name, archive)) if member.isfile() else None
                    if kind is None:
                        continue
                    where = f"{archive}:{member.name}"
                    data = tf.extractfile(member).read()
                    if kind[0] == "official":
                        official[kind[1]] = (data, where)
                    else:
                        images.add(kind[1], kind[2], member.name, _decode_image(data, where))
                        bar.update(1)
        except (tarfile.TarError, zlib.error, EOFError, OSError) as e:
            raise DataError(f"{archive}: not a readable tar.gz archive ({_reason(e)})") from None
        return _archive_arrays(archive, official, images, bar)


def _archive_arrays(archive: Path, official: dict, images: _ImageSplits, bar) -> Arrays:
    has_images = any(images.images[s] for s in SPLITS)
    if official and has_images:
        raise DataError(f"{archive}: holds both {OFFICIAL_DIR} batches and train/ test/ images; "
                        "expected one layout")
    if official:
        return _official_arrays(official, str(archive), bar)
    if has_images:
        return images.arrays()
    raise DataError(f"{archive}: no CIFAR-10 inside; expected {OFFICIAL_DIR}/data_batch_1..5 + test_batch, "
                    "or train/<class>/ and test/<class>/ images")


def _decode_official_dir(d: Path, progress: bool) -> Arrays:
    files = {}
    for name in OFFICIAL_FILES:
        path = d / name
        if path.is_file():
            try:
                files[name] = (path.read_bytes(), str(path))
            except OSError as e:
                raise DataError(f"{path}: cannot read ({_reason(e)})") from None
    with _progress_bar(progress, 60000, f"decoding {d.name}") as bar:
        return _official_arrays(files, str(d), bar)


def _image_files(root: Path) -> Iterator[tuple[str, str, Path]]:
    """(split, class, file) for every non-hidden file at ``root/<split>/<class>/``."""
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"{root}: missing {split}/ folder; expected train/<class>/ and test/<class>/")
        for class_dir in sorted(split_dir.iterdir()):
            if class_dir.is_dir() and not class_dir.name.startswith("."):
                for f in sorted(class_dir.iterdir()):
                    if f.is_file() and not f.name.startswith("."):
                        yield split, class_dir.name, f


def _decode_image_dir(root: Path, progress: bool) -> Arrays:
    files = list(_image_files(root))
    images = _ImageSplits(str(root))
    with _progress_bar(progress, len(files), f"decoding {root.name}") as bar:
        for split, cls, f in files:
            try:
                data = f.read_bytes()
            except OSError as e:
                raise DataError(f"{f}: cannot read ({_reason(e)})") from None
            images.add(split, cls, f.name, _decode_image(data, str(f)))
            bar.update(1)
    return images.arrays()


# ----------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    return Path(os.environ.get("CROWDTRAIN_CACHE") or "~/.cache/crowdtrain").expanduser()


def cache_entry(digest: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the cached arrays of the source with this digest."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / f"cifar10-v{CACHE_FORMAT}-{digest}"


def source_digest(source: Path) -> str:
    """sha256 of an archive's bytes; for a folder, of its files' relative paths, sizes and mtimes."""
    h = hashlib.sha256()
    try:
        if source.is_file():
            with open(source, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        else:
            for rel, st in _dir_listing(source):
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError as e:
        raise DataError(f"{source}: cannot read ({_reason(e)})") from None
    return h.hexdigest()


def _dir_listing(d: Path) -> Iterable[tuple[str, os.stat_result]]:
    roots = [d / s for s in SPLITS] if _is_image_dir(d) and not _is_official_dir(d) else [d]
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                yield path.relative_to(d).as_posix(), path.stat()


def _read_cache(entry: Path) -> Arrays | None:
    """The cached arrays, or None when the entry is missing, incomplete or corrupt."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        arrays = {k: np.load(entry / f"{k}.npy", allow_pickle=False) for k in _ARRAYS}
    except (OSError, ValueError, EOFError):
        return None
    return arrays if _cache_valid(arrays, meta) else None


def _cache_valid(arrays: Arrays, meta: object) -> bool:
    if not isinstance(meta, dict) or meta.get("classes") != list(CLASSES):
        return False
    for split in SPLITS:
        x, y, n = arrays[f"{split}_x"], arrays[f"{split}_y"], meta.get(f"n_{split}")
        if x.dtype != np.uint8 or x.shape != (n, 3, 32, 32) or y.dtype != np.int64 or y.shape != (n,):
            return False
        if n and (y.min() < 0 or y.max() >= len(CLASSES)):
            return False
    return True


def _write_cache(entry: Path, arrays: Arrays, source: Path) -> None:
    """Each file written to a temporary name and renamed; meta.json last marks the entry done."""
    meta = {"classes": list(CLASSES), "source": str(source), "format": CACHE_FORMAT,
            "n_train": len(arrays["train_y"]), "n_test": len(arrays["test_y"])}
    try:
        entry.mkdir(parents=True, exist_ok=True)
        for key in _ARRAYS:
            _atomic_write(entry / f"{key}.npy", lambda f, a=arrays[key]: np.save(f, a, allow_pickle=False))
        _atomic_write(entry / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as e:
        warnings.warn(f"cannot write the CIFAR-10 cache {entry} ({_reason(e)}); set CROWDTRAIN_CACHE "
                      "to a writable folder", RuntimeWarning, stacklevel=3)


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- download
def download_cifar10(dest_dir: str | os.PathLike, *, url: str | None = None, md5: str | None = None,
                     timeout: float | None = None, progress: bool = False) -> Path:
    """``dest_dir/cifar-10-python.tar.gz``, downloaded unless a copy with the right md5 is there."""
    url, md5 = url or OFFICIAL_URL, (md5 or OFFICIAL_MD5).lower()
    dest = Path(dest_dir).expanduser()
    target = dest / OFFICIAL_ARCHIVE
    if target.is_file() and _file_md5(target) == md5:
        return target
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{OFFICIAL_ARCHIVE}.", suffix=".part")
    except OSError as e:
        raise DataError(f"{dest}: cannot write the download here ({_reason(e)})") from None
    try:
        with os.fdopen(fd, "wb") as out:
            got = _fetch(url, out, timeout or DOWNLOAD_TIMEOUT_S, progress)
        if got != md5:
            raise DataError(f"{url}: downloaded file has md5 {got}, expected {md5}; not saved as {target}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _fetch(url: str, out, timeout: float, progress: bool) -> str:
    """Copy ``url`` into ``out``; returns the md5 hex of what was copied."""
    import http.client

    h = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with _progress_bar(progress, total, f"downloading {OFFICIAL_ARCHIVE}", unit="B") as bar:
                while chunk := resp.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise DataError(f"{url}: cannot download ({_reason(e)}); fetch {OFFICIAL_ARCHIVE} "
                        "elsewhere and pass --data") from None
    return h.hexdigest()


def _file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- loading
def load_cifar10(path: str | os.PathLike | None = None, *, download: bool = False,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Cifar10:
    """CIFAR-10 from ``path`` (or ``$CROWDTRAIN_DATA``), decoded once and then read from the cache.

    With ``download`` and no usable copy, the official archive is downloaded into the given
    folder, or into the cache folder when no path is given, and read from there.
    """
    source = _source(path, download, cache_dir, progress)
    digest = source_digest(source)
    entry = cache_entry(digest, cache_dir)
    arrays = _read_cache(entry)
    if arrays is None:
        arrays = _decode(source, progress)
        _write_cache(entry, arrays, source)
    return Cifar10(**arrays, classes=CLASSES, source=str(source), digest=digest)


def _source(path, download: bool, cache_dir, progress: bool) -> Path:
    if not download:
        return resolve_data_path(path)
    given = path if path is not None and str(path) != "" else os.environ.get("CROWDTRAIN_DATA") or None
    if given is None:
        dest = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    else:
        p = Path(given).expanduser()
        if p.is_file() or (p.is_dir() and _pick_in_dir(p) is not None):
            return resolve_data_path(p)
        dest = p.parent if p.name.endswith(ARCHIVE_SUFFIXES) else p
    return download_cifar10(dest, progress=progress).resolve()


# ----------------------------------------------------------------------------- command line
def cli(argv: list[str] | None, prog: str = "crowdtrain data", command: str = "data") -> int:
    """``crowdtrain data``: decode and cache a copy, print one summary line; 2 on a data error."""
    parser = argparse.ArgumentParser(prog=prog, description="Check, decode and cache a CIFAR-10 copy "
                                     "(official pickles or train/ test/ image folders, folder or .tar.gz).")
    parser.add_argument("--data", metavar="PATH", help="folder or archive (default: $CROWDTRAIN_DATA)")
    parser.add_argument("--download", action="store_true",
                        help=f"download {OFFICIAL_ARCHIVE} when no usable copy is given (default: off)")
    parser.add_argument("--cache", metavar="DIR",
                        help="cache folder (default: $CROWDTRAIN_CACHE or ~/.cache/crowdtrain)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    start = time.perf_counter()
    try:
        data = load_cifar10(args.data, download=args.download, cache_dir=args.cache)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(data, cache_entry(data.digest, args.cache), time.perf_counter() - start))
    return 0


def summary(data: Cifar10, cache: Path, seconds: float) -> str:
    """One line: source, split sizes, per-class counts, cache folder, seconds."""
    train = np.bincount(data.train_y, minlength=len(data.classes))
    test = np.bincount(data.test_y, minlength=len(data.classes))
    if train.min() == train.max() and test.min() == test.max():
        per_class = f"per class ok ({train[0]} train, {test[0]} test each)"
    else:
        per_class = f"per class uneven (train {train.tolist()}, test {test.tolist()})"
    return (f"{data.source}: train {len(data.train_y)}, test {len(data.test_y)}, {per_class}; "
            f"cache {cache}; {seconds:.2f} s")
