"""Tiny, deterministic CIFAR-10 look-alikes in both layouts, for data and training tests.

Every image is its class colour, modulated by class-specific stripes, plus per-image noise
and a brightness shift: a small model learns the classes in a few steps. Pixel values are
a pure function of (seed, split, class/index), so tests can rebuild what a loader must
return: ``official_expected`` and ``image_folder_expected`` give the arrays in loader order.

    write_official_archive(tmp_path)                 # tmp_path/cifar-10-python.tar.gz
    write_official_archive(tmp_path, tar=False)      # tmp_path/cifar-10-batches-py/
    write_image_folder(tmp_path, fmt="png")          # tmp_path/tiny-cifar10.tar.gz
    write_image_folder(tmp_path, tar=False)          # tmp_path/ with train/ and test/
    tiny_cifar10()                                   # an in-memory models.data.Cifar10
"""
from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from models.data import CLASSES, OFFICIAL_ARCHIVE, OFFICIAL_DIR, Cifar10

PALETTE = np.array([
    (135, 206, 235), (200, 30, 30), (240, 200, 40), (150, 90, 40), (60, 150, 60),
    (230, 140, 40), (40, 200, 170), (120, 60, 170), (30, 60, 160), (128, 128, 128),
], dtype=np.float64)
_SPLIT_ID = {"train": 1, "test": 2}


def class_pattern(label: int) -> np.ndarray:
    """float [3, 32, 32]: the class colour times stripes of a class-specific angle and period."""
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    angle = np.pi * label / len(CLASSES)
    period = 4.0 + 2.0 * (label % 3)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    return PALETTE[label][:, None, None] * (0.8 + 0.2 * stripes[None])


def make_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [3, 32, 32] of class ``label``: pattern, brightness shift, noise."""
    noisy = class_pattern(label) + rng.uniform(-25, 25) + rng.normal(0, 20, size=(3, 32, 32))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def make_split(n: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 [n, 3, 32, 32], y int64 [n]): labels balanced (``i % 10``) in a shuffled order."""
    rng = np.random.default_rng([seed, _SPLIT_ID[split]])
    y = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    x = np.stack([make_image(int(label), rng) for label in y]) if n else np.zeros((0, 3, 32, 32), np.uint8)
    return x, y


def folder_image(split: str, label: int, index: int, seed: int = 0) -> np.ndarray:
    """uint8 [3, 32, 32]: image ``index`` of class ``label`` in the image-folder layout."""
    return make_image(label, np.random.default_rng([seed, _SPLIT_ID[split], label, index]))


# ----------------------------------------------------------------------------- official layout
def official_expected(n_train: int = 50, n_test: int = 20, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(train_x, train_y, test_x, test_y) that ``write_official_archive`` stores."""
    return (*make_split(n_train, seed, "train"), *make_split(n_test, seed, "test"))


def official_files(n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict[str, bytes]:
    """The pickled files of ``cifar-10-batches-py/`` by name (bytes keys, like the release)."""
    train_x, train_y, test_x, test_y = official_expected(n_train, n_test, seed)
    files = {}
    for i, idx in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        files[f"data_batch_{i}"] = _batch(train_x[idx], train_y[idx], f"training batch {i} of 5")
    files["test_batch"] = _batch(test_x, test_y, "testing batch 1 of 1")
    meta = {b"num_cases_per_batch": max(1, n_train // 5), b"label_names": [c.encode() for c in CLASSES],
            b"num_vis": 3072}
    files["batches.meta"] = pickle.dumps(meta, protocol=2)
    return files


def _batch(x: np.ndarray, y: np.ndarray, label: str) -> bytes:
    names = [f"img_{i:05d}.png".encode() for i in range(len(y))]
    batch = {b"batch_label": label.encode(), b"labels": [int(v) for v in y],
             b"data": x.reshape(len(x), 3072), b"filenames": names}
    return pickle.dumps(batch, protocol=2)


def write_official_archive(dir: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0,
                           tar: bool = True, name: str = OFFICIAL_ARCHIVE) -> Path:
    """``dir/cifar-10-python.tar.gz`` (or, with ``tar=False``, ``dir/cifar-10-batches-py/``)."""
    files = {f"{OFFICIAL_DIR}/{k}": v for k, v in official_files(n_train, n_test, seed).items()}
    return _write(Path(dir), files, tar, name, OFFICIAL_DIR)


# ----------------------------------------------------------------------------- image-folder layout
def image_folder_expected(n_train_per_class: int = 5, n_test_per_class: int = 2,
                          seed: int = 0) -> tuple[np.ndarray, ...]:
    """(train_x, train_y, test_x, test_y) in loader order: classes round-robin, by file name."""
    out: list[np.ndarray] = []
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        pairs = [(folder_image(split, c, i, seed), c) for i in range(n) for c in range(len(CLASSES))]
        out += [np.stack([x for x, _ in pairs]), np.array([c for _, c in pairs], dtype=np.int64)]
    return tuple(out)


def encode_image(chw: np.ndarray, fmt: str = "png") -> bytes:
    """PNG (lossless) or JPEG (quality 95) bytes of a uint8 [3, H, W] image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))).save(
        buf, format="PNG" if fmt == "png" else "JPEG", **({} if fmt == "png" else {"quality": 95}))
    return buf.getvalue()


def image_folder_files(n_train_per_class: int = 5, n_test_per_class: int = 2, fmt: str = "png",
                       seed: int = 0, classes: tuple[str, ...] = CLASSES) -> dict[str, bytes]:
    """``{"train/<class>/0000.png": bytes, ...}``; ``classes`` renames (or drops) class folders."""
    files = {}
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        for label, cls in enumerate(classes):
            for i in range(n):
                files[f"{split}/{cls}/{i:04d}.{fmt}"] = encode_image(folder_image(split, label, i, seed), fmt)
    return files


def write_image_folder(dir: str | Path, n_train_per_class: int = 5, n_test_per_class: int = 2,
                       fmt: str = "png", tar: bool = True, seed: int = 0, wrapper: str | None = None,
                       classes: tuple[str, ...] = CLASSES, name: str = "tiny-cifar10.tar.gz") -> Path:
    """``dir/<name>`` holding train/ and test/ (under ``wrapper/`` if given), or with
    ``tar=False`` the folders themselves; returns the archive or the folder holding train/."""
    files = image_folder_files(n_train_per_class, n_test_per_class, fmt, seed, classes)
    if wrapper:
        files = {f"{wrapper}/{k}": v for k, v in files.items()}
    return _write(Path(dir), files, tar, name, wrapper or "")


# ----------------------------------------------------------------------------- writing
def write_tar_gz(path: str | Path, files: dict[str, bytes]) -> Path:
    """A deterministic .tar.gz (fixed mtimes and owners) of ``files``, in the given order."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirname in sorted({str(Path(n).parent) for n in files} - {"."}):
            info = tarfile.TarInfo(dirname)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    path = Path(path)
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    return path


def _write(dir: Path, files: dict[str, bytes], tar: bool, name: str, root: str) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    if tar:
        return write_tar_gz(dir / name, files)
    for member, data in files.items():
        target = dir / member
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dir / root if root else dir


def tiny_cifar10(n_train: int = 200, n_test: int = 50, seed: int = 0) -> Cifar10:
    """An in-memory ``Cifar10`` with the same images as ``write_official_archive``."""
    train_x, train_y, test_x, test_y = official_expected(n_train, n_test, seed)
    return Cifar10(train_x, train_y, test_x, test_y, classes=CLASSES, source="tiny-cifar10",
                   digest=f"tiny-{n_train}-{n_test}-{seed}")
