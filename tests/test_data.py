"""models.data: both CIFAR-10 layouts, path resolution, the cache, errors, download, CLI."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models import data as D
from models.data import CLASSES, DataError, load_cifar10, resolve_data_path
from tests.helpers import tiny_cifar as T

REAL_DATA = os.environ.get("CROWDTRAIN_DATA")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CROWDTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CROWDTRAIN_DATA", raising=False)


def load(path, **kw):
    return load_cifar10(path, progress=False, **kw)


def assert_arrays(data, expected):
    assert data.classes == CLASSES
    for name, want in zip(D._ARRAYS, expected):
        got = getattr(data, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.flags.c_contiguous and got.flags.writeable, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def assert_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tar", [True, False])
def test_official_round_trip(tmp_path, tar):
    path = T.write_official_archive(tmp_path, n_train=50, n_test=20, tar=tar)
    data = load(path)
    assert_arrays(data, T.official_expected(50, 20))
    assert data.train_x.shape == (50, 3, 32, 32) and data.train_y.dtype == np.int64
    assert data.source == str(path.resolve())


def test_official_pickle_from_numpy_1(tmp_path):
    """The real release pickles name numpy.core.multiarray; that must still load."""
    files = {f"{D.OFFICIAL_DIR}/{k}": v for k, v in T.official_files(10, 10).items()}
    old = {k: v.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n") for k, v in files.items()}
    assert old != files
    data = load(T.write_tar_gz(tmp_path / "old.tar.gz", old))
    assert_arrays(data, T.official_expected(10, 10))


@pytest.mark.parametrize("tar", [True, False])
def test_image_folder_png_round_trip(tmp_path, tar):
    path = T.write_image_folder(tmp_path, n_train_per_class=3, n_test_per_class=2, fmt="png", tar=tar)
    data = load(path)
    assert_arrays(data, T.image_folder_expected(3, 2))
    assert data.train_y[:10].tolist() == list(range(10)), "classes come round-robin"


def test_image_folder_jpeg_with_wrapper_folder(tmp_path):
    path = T.write_image_folder(tmp_path, 2, 1, fmt="jpg", wrapper="cifar10")
    data = load(path)
    train_x, train_y, test_x, test_y = T.image_folder_expected(2, 1)
    np.testing.assert_array_equal(data.train_y, train_y)
    np.testing.assert_array_equal(data.test_y, test_y)
    colour_error = np.abs(data.train_x.mean(axis=(2, 3)) - train_x.mean(axis=(2, 3))).max()
    assert colour_error < 4, f"JPEG round trip changed an image's mean colour by {colour_error:.1f}"


def test_helper_classes_are_learnable():
    """Nearest class mean colour beats chance by far: the tiny data carries class signal."""
    train_x, train_y, test_x, test_y = T.official_expected(200, 100)
    means = np.stack([train_x[train_y == c].mean(axis=(0, 2, 3)) for c in range(10)])
    pred = np.argmin(((test_x.mean(axis=(2, 3))[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == test_y).mean() > 0.9
    assert T.tiny_cifar10(20, 10).train_x.shape == (20, 3, 32, 32)


# ----------------------------------------------------------------------------- resolution
def test_folder_holding_the_official_folder(tmp_path):
    T.write_official_archive(tmp_path, tar=False)
    assert resolve_data_path(tmp_path) == (tmp_path / D.OFFICIAL_DIR).resolve()


def test_folder_preference(tmp_path):
    T.write_image_folder(tmp_path, 1, 1, tar=False)
    assert resolve_data_path(tmp_path) == tmp_path.resolve()
    T.write_image_folder(tmp_path, 1, 1, name=D.IMAGE_ARCHIVE)
    assert resolve_data_path(tmp_path) == (tmp_path / D.IMAGE_ARCHIVE).resolve()
    T.write_official_archive(tmp_path, tar=False)
    assert resolve_data_path(tmp_path) == (tmp_path / D.OFFICIAL_DIR).resolve()
    T.write_official_archive(tmp_path)
    assert resolve_data_path(tmp_path) == (tmp_path / D.OFFICIAL_ARCHIVE).resolve()


def test_single_archive_of_any_name(tmp_path):
    (tmp_path / "notes.tar.gz").write_bytes(b"not an archive")
    path = T.write_image_folder(tmp_path, 1, 1, name="my-copy.tar.gz")
    assert resolve_data_path(tmp_path) == path.resolve()
    T.write_official_archive(tmp_path, name="other.tgz")
    with pytest.raises(DataError) as e:
        resolve_data_path(tmp_path)
    assert_error(e, tmp_path, "my-copy.tar.gz", "other.tgz")


def test_environment_variable(tmp_path, monkeypatch):
    T.write_official_archive(tmp_path)
    monkeypatch.setenv("CROWDTRAIN_DATA", str(tmp_path))
    assert resolve_data_path(None) == (tmp_path / D.OFFICIAL_ARCHIVE).resolve()
    assert load(None).train_x.shape == (50, 3, 32, 32)


def test_nothing_given():
    with pytest.raises(DataError) as e:
        resolve_data_path(None)
    assert_error(e, "--data", "CROWDTRAIN_DATA", "--download")


def test_missing_path(tmp_path):
    with pytest.raises(DataError) as e:
        load(tmp_path / "nowhere")
    assert_error(e, tmp_path / "nowhere", "no such file")


def test_folder_without_data_lists_what_was_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError) as e:
        load(tmp_path)
    assert_error(e, tmp_path, D.OFFICIAL_ARCHIVE, D.OFFICIAL_DIR, D.IMAGE_ARCHIVE, "train/ + test/")


# ----------------------------------------------------------------------------- cache
def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    path = T.write_image_folder(tmp_path, 2, 1)
    first = load(path)
    assert first.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert D.cache_entry(first.digest).is_dir()

    def boom(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(D, "_decode", boom)
    assert_arrays(load(path), T.image_folder_expected(2, 1))


@pytest.mark.parametrize("damage", ["truncate", "wrong_shape", "drop_meta", "bad_labels"])
def test_corrupt_cache_entry_is_rebuilt(tmp_path, damage):
    path = T.write_official_archive(tmp_path, tar=False)
    entry = D.cache_entry(load(path).digest)
    if damage == "truncate":
        (entry / "train_x.npy").write_bytes((entry / "train_x.npy").read_bytes()[:1000])
    elif damage == "wrong_shape":
        np.save(entry / "test_x.npy", np.zeros((20, 3, 16, 16), np.uint8))
    elif damage == "drop_meta":
        (entry / "meta.json").unlink()
    else:
        np.save(entry / "train_y.npy", np.full(50, 99, np.int64))
    assert_arrays(load(path), T.official_expected())
    assert D._read_cache(entry) is not None


def test_cache_dir_argument_and_folder_digest(tmp_path):
    path = T.write_official_archive(tmp_path / "src", tar=False)
    data = load(path, cache_dir=tmp_path / "elsewhere")
    assert D.cache_entry(data.digest, tmp_path / "elsewhere").is_dir()
    assert not (tmp_path / "cache").exists()
    os.utime(path / "test_batch", ns=(0, 0))
    assert load(path, cache_dir=tmp_path / "elsewhere").digest != data.digest


# ----------------------------------------------------------------------------- errors
def test_truncated_archive(tmp_path):
    path = T.write_image_folder(tmp_path, 2, 1)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError) as e:
        load(path)
    assert_error(e, path, "tar.gz")


def test_not_an_archive(tmp_path):
    path = tmp_path / "cifar.tar.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(300))
    with pytest.raises(DataError) as e:
        load(path)
    assert_error(e, path, "not a readable tar.gz")


def test_archive_without_cifar(tmp_path):
    path = T.write_tar_gz(tmp_path / "x.tar.gz", {"docs/readme.txt": b"hello"})
    with pytest.raises(DataError) as e:
        load(path)
    assert_error(e, path, "no CIFAR-10 inside")


def official_variant(tmp_path, name, payload):
    files = {f"{D.OFFICIAL_DIR}/{k}": v for k, v in T.official_files(10, 10).items()}
    files[f"{D.OFFICIAL_DIR}/{name}"] = payload
    return T.write_tar_gz(tmp_path / "bad.tar.gz", files)


@pytest.mark.parametrize("payload, expected", [
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "expected keys b'data' and b'labels'"),
    (pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}), "uint8 [N, 3072]"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8 [N, 3072]"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "2 integers in 0..9"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 integers in 0..9"),
    (pickle.dumps([1, 2, 3]), "expected a pickled dict"),
    (b"garbage", "not a CIFAR-10 pickle batch"),
    (pickle.dumps({b"data": os.system}), "refusing to load global"),
])
def test_bad_pickle_batch(tmp_path, payload, expected):
    path = official_variant(tmp_path, "data_batch_3", payload)
    with pytest.raises(DataError) as e:
        load(path)
    assert_error(e, path, "data_batch_3", expected)


def test_wrong_label_names(tmp_path):
    path = official_variant(tmp_path, "batches.meta", pickle.dumps({b"label_names": [b"apple"] * 10}))
    with pytest.raises(DataError) as e:
        load(path)
    assert_error(e, path, "batches.meta", "label_names", "airplane")


def test_missing_batch(tmp_path):
    folder = T.write_official_archive(tmp_path, tar=False)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError) as e:
        load(folder)
    assert_error(e, folder, "missing data_batch_4")


@pytest.mark.parametrize("size, mode", [((32, 16), "RGB"), ((32, 32), "L"), ((32, 32), "RGBA")])
def test_image_not_32x32_rgb(tmp_path, size, mode):
    from PIL import Image

    files = T.image_folder_files(1, 1)
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    files["test/cat/0000.png"] = buf.getvalue()
    path = T.write_tar_gz(tmp_path / "c.tar.gz", files)
    with pytest.raises(DataError) as e:
        load(path)
    assert_error(e, path, "test/cat/0000.png", "32x32 RGB", mode)


def test_unreadable_image_in_folder(tmp_path):
    root = T.write_image_folder(tmp_path, 1, 1, tar=False)
    (root / "train" / "dog" / "0000.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as e:
        load(root)
    assert_error(e, root / "train" / "dog" / "0000.png", "not a readable image")


@pytest.mark.parametrize("tar", [True, False])
def test_missing_class_folder(tmp_path, tar):
    path = T.write_image_folder(tmp_path, 1, 1, tar=tar, classes=CLASSES[:9])
    with pytest.raises(DataError) as e:
        load(path)
    assert_error(e, path, "truck", "train/")


def test_wrong_class_names(tmp_path):
    path = T.write_image_folder(tmp_path, 1, 1, classes=(*CLASSES[:9], "lorry"))
    with pytest.raises(DataError) as e:
        load(path)
    assert_error(e, path, "lorry", "expected exactly airplane")


def test_folder_without_test_split(tmp_path):
    root = T.write_image_folder(tmp_path, 1, 1, tar=False)
    shutil.rmtree(root / "test")
    with pytest.raises(DataError) as e:
        load(tmp_path)
    assert_error(e, tmp_path, "missing test/")


def test_empty_split(tmp_path):
    files = {k: v for k, v in T.image_folder_files(1, 1).items() if k.startswith("train/")}
    files["test/readme.txt"] = b"nothing here"
    path = T.write_tar_gz(tmp_path / "e.tar.gz", files)
    with pytest.raises(DataError) as e:
        load(path)
    assert_error(e, path, "no images under test/")


def test_unsafe_member_is_refused_and_nothing_extracted(tmp_path):
    files = T.image_folder_files(1, 1)
    files["../../escaped.png"] = files["train/cat/0000.png"]
    path = T.write_tar_gz(tmp_path / "evil.tar.gz", files)
    with pytest.raises(DataError) as e:
        load(path)
    assert_error(e, path, "unsafe member", "escaped.png")
    assert not list(tmp_path.parent.rglob("escaped.png"))


# ----------------------------------------------------------------------------- download
def test_download_checks_md5(tmp_path, monkeypatch):
    archive = T.write_official_archive(tmp_path / "server")
    monkeypatch.setattr(D, "OFFICIAL_URL", archive.as_uri())
    with pytest.raises(DataError) as e:
        D.download_cifar10(tmp_path / "dl")
    assert_error(e, archive.as_uri(), "md5", D.OFFICIAL_MD5)
    assert not list((tmp_path / "dl").iterdir()), "nothing left behind"

    monkeypatch.setattr(D, "OFFICIAL_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    got = D.download_cifar10(tmp_path / "dl")
    assert got == tmp_path / "dl" / D.OFFICIAL_ARCHIVE and got.read_bytes() == archive.read_bytes()
    monkeypatch.setattr(D, "OFFICIAL_URL", (tmp_path / "gone.tar.gz").as_uri())
    assert D.download_cifar10(tmp_path / "dl") == got, "a verified copy is reused"


def test_load_with_download(tmp_path, monkeypatch):
    archive = T.write_official_archive(tmp_path / "server")
    monkeypatch.setattr(D, "OFFICIAL_URL", archive.as_uri())
    monkeypatch.setattr(D, "OFFICIAL_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    data = load(None, download=True)
    assert data.source == str((tmp_path / "cache" / D.OFFICIAL_ARCHIVE).resolve())
    assert_arrays(data, T.official_expected())
    assert load(tmp_path / "empty", download=True).source == str(tmp_path / "empty" / D.OFFICIAL_ARCHIVE)


def test_download_unreachable(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "OFFICIAL_URL", (tmp_path / "missing.tar.gz").as_uri())
    with pytest.raises(DataError) as e:
        load(None, download=True)
    assert_error(e, "missing.tar.gz", "cannot download", "--data")


# ----------------------------------------------------------------------------- command line
def run_cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    exe = Path(sys.executable).with_name("crowdtrain")
    cmd = [str(exe)] if exe.exists() else [sys.executable, str(ROOT / "crowdtrain.py")]
    return subprocess.run([*cmd, "data", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def test_cli_bad_data(tmp_path):
    result = run_cli("--data", str(tmp_path / "BAD"))
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and str(tmp_path / "BAD") in result.stderr


def test_cli_summary(tmp_path):
    path = T.write_official_archive(tmp_path)
    result = run_cli("--data", str(path), "--cache", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    line, = result.stdout.splitlines()
    assert str(path) in line and "train 50, test 20" in line and "per class ok" in line
    assert str(tmp_path / "c") in line
    assert D.cli(["--data", str(path)]) == 0


# ----------------------------------------------------------------------------- the real data
REAL_DATA_REASON = "set CROWDTRAIN_DATA to the folder or archive of CIFAR-10 (e.g. ../shared/data)"


@pytest.mark.skipif(not REAL_DATA, reason=REAL_DATA_REASON)
def test_real_cifar10(monkeypatch):
    # the shared cache, as every other user of the real data: decoding the 60,000 JPEGs again into a private
    # one cost ~40 s of a busy core per test run (both layouts' decoding is tested above on small archives)
    monkeypatch.delenv("CROWDTRAIN_CACHE", raising=False)
    data = load(REAL_DATA)
    assert data.train_x.shape == (50000, 3, 32, 32) and data.test_x.shape == (10000, 3, 32, 32)
    assert data.train_x.dtype == np.uint8 and data.train_y.dtype == np.int64
    assert np.bincount(data.train_y, minlength=10).tolist() == [5000] * 10
    assert np.bincount(data.test_y, minlength=10).tolist() == [1000] * 10
    assert data.classes == CLASSES
