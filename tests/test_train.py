"""The single-process trainer: outputs, command line, Ctrl-C, and real CIFAR-10 runs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models import registry
from models.data import load_cifar10
from models.local import recalibrate_bn, run_local, state_arrays
from models.recipe import Recipe
from models.train import evaluate, train
from tests.helpers.tiny_cifar import tiny_cifar10, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
CROWDTRAIN = [sys.executable, "-m", "crowdtrain"]
needs_data = pytest.mark.skipif(not os.environ.get("CROWDTRAIN_DATA"),
                                reason="set CROWDTRAIN_DATA to the folder or archive of CIFAR-10 (e.g. ../shared/data)")


def run_cli(*args, cache=None, timeout=300):
    env = {**os.environ, **({"CROWDTRAIN_CACHE": str(cache)} if cache else {})}
    return subprocess.run([*CROWDTRAIN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def real_data():
    if not os.environ.get("CROWDTRAIN_DATA"):
        pytest.skip("set CROWDTRAIN_DATA to the folder or archive of CIFAR-10 (e.g. ../shared/data)")
    return load_cifar10(progress=False)


def test_train_writes_metrics_checkpoint_and_curves(tmp_path):
    data = tiny_cifar10(n_train=256, n_test=64)
    recipe = Recipe(batch_size=32, lr=0.1, epochs=4, warmup=0.1)
    result = train("resnet_fast", data, recipe, tmp_path, seed=0, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and not result.interrupted
    for r in rows:
        assert {"epoch", "train_loss", "test_loss", "test_acc", "seconds"} <= set(r)
        assert 0 <= r["test_acc"] <= 1 and r["seconds"] > 0
    assert rows[-1]["test_acc"] > 0.6, "the tiny classes are easy: 4 epochs get far above chance (0.1)"
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    ckpt = torch.load(tmp_path / "model.pt", weights_only=False)
    assert ckpt["config"]["model"] == "resnet_fast" and ckpt["config"]["recipe"]["epochs"] == 4
    model = registry.build("resnet_fast")
    model.load_state_dict(ckpt["state_dict"])
    _, acc = evaluate(model, torch.from_numpy(data.test_x), torch.from_numpy(data.test_y))
    assert acc == pytest.approx(rows[-1]["test_acc"])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_run(tmp_path):
    data = tiny_cifar10(n_train=128, n_test=32)
    recipe = Recipe(batch_size=32, lr=0.05, epochs=1)
    a = train("cnn", data, recipe, None, seed=5, progress=False).rows[-1]
    b = train("cnn", data, recipe, None, seed=5, progress=False).rows[-1]
    assert a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"]


def test_alternating_flips_change_the_run_only_when_flips_are_on():
    """``alt_flip`` chooses how flips are drawn: with ``flip`` off it is moot (no error, the same run), with it on
    it draws once per image instead of once per step (another run from the same seed)."""
    data = tiny_cifar10(n_train=128, n_test=32)

    def loss(**fields) -> float:
        return train("cnn", data, Recipe(batch_size=32, lr=0.05, epochs=2, **fields), None, seed=5,
                     progress=False).rows[-1]["train_loss"]

    assert loss(flip=False, alt_flip=True) == loss(flip=False)
    assert loss(alt_flip=True) != loss()


def test_bad_data_path_is_one_clear_line(tmp_path):
    missing = tmp_path / "nope"
    out = run_cli("train", "--data", str(missing), "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0]
    assert "Traceback" not in out.stderr


def test_corrupt_archive_is_one_clear_line(tmp_path):
    good = write_image_folder(tmp_path / "src", n_train_per_class=2, n_test_per_class=1, tar=True)
    bad = tmp_path / "cut.tar.gz"
    bad.write_bytes(Path(good).read_bytes()[:300])
    out = run_cli("train", "--data", str(bad), "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "cut.tar.gz" in lines[0]
    assert "Traceback" not in out.stderr


def test_unknown_model_and_bad_hyperparameter_are_clear(tmp_path):
    data = write_image_folder(tmp_path / "d", n_train_per_class=2, n_test_per_class=1, tar=False)
    out = run_cli("train", "--model", "vgg", "--data", str(data), cache=tmp_path / "c")
    assert out.returncode == 2 and "unknown model 'vgg'" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("train", "--lr", "-1", "--data", str(data), cache=tmp_path / "c")
    assert out.returncode == 2 and "'lr'" in out.stderr and "Traceback" not in out.stderr


def test_ctrl_c_stops_cleanly_and_keeps_what_was_written(tmp_path):
    data = write_image_folder(tmp_path / "d", n_train_per_class=40, n_test_per_class=4, tar=False)
    out_dir = tmp_path / "run"
    env = {**os.environ, "CROWDTRAIN_CACHE": str(tmp_path / "c")}
    proc = subprocess.Popen([*CROWDTRAIN, "train", "--model", "cnn", "--data", str(data), "--epochs", "500",
                             "--batch-size", "16", "--out", str(out_dir), "--threads", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as from a terminal: a suite started in the background (`cmd &` in a script)
                            # runs with SIGINT ignored, and a child would inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = out_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)   # it stops after the current step, then saves
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) >= 2 and [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    ckpt = torch.load(out_dir / "model.pt", weights_only=False)
    assert ckpt["metrics"]["epoch"] >= 2
    assert (out_dir / "curves.png").exists()


def test_recalibration_augments_like_training_and_is_deterministic():
    """Batch-norm statistics re-estimated on images cropped and flipped as the recipe trains (the
    evaluator's and the export's), reproducibly: the same seed gives the same statistics."""
    torch.manual_seed(0)
    model = registry.build("resnet_fast")
    x = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)

    def stats(**aug) -> dict:
        recalibrate_bn(model, x, batch=32, **aug)
        return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}

    plain, first, again = stats(), stats(crop_pad=4, flip=True), stats(crop_pad=4, flip=True)
    other_seed = stats(crop_pad=4, flip=True, seed=1)
    reflected = stats(crop_pad=4, flip=True, reflect=True)   # a recipe with crop_reflect (airbench's) pads so
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.allclose(first[k], plain[k]) for k in first), "augmentation changed no statistic"
    assert not all(torch.equal(first[k], other_seed[k]) for k in first), "the seed changed nothing"
    assert not all(torch.allclose(first[k], reflected[k]) for k in first), "reflection changed no statistic"


def test_the_evaluator_calibrates_with_the_recipes_reflected_crops(tmp_path):
    """The job's evaluator augments its calibration images as the recipe trains, reflection included:
    airbench's crops are padded by reflection, cnn's with zeros (zero-padded calibration cost a trained
    airbench 0.7 points, docs/results.md)."""
    from coordinator.config import CoordinatorConfig
    from coordinator.job import Job
    from tests.helpers.tiny_cifar import tiny_cifar10

    for model, reflect in (("airbench", True), ("cnn", False)):
        job = Job(CoordinatorConfig(state=tmp_path / model, model=model, shard_size=64))
        job.open(tiny_cifar10(n_train=128, n_test=32))
        ev = job.evaluator
        assert (ev.crop_pad, ev.flip, ev.reflect) == (job.recipe.crop_pad, job.recipe.flip, reflect)


def test_cli_help_lists_subcommands():
    out = subprocess.run([*CROWDTRAIN, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and all(c in out.stdout for c in ("train", "models", "data", "run"))


@pytest.mark.parametrize("name", sorted(registry.MODELS))
def test_every_model_learns_from_real_data(name, real_data):
    """A few steps on a fixed slice of real CIFAR-10 lower the loss on that slice."""
    torch.manual_seed(0)
    n = 256
    x, y = real_data.train_x[:n], real_data.train_y[:n]
    spec = registry.get(name)
    recipe = Recipe(**{**spec.recipe.to_dict(), "batch_size": 64, "crop_pad": 0, "flip": False})   # (alt_flip moot)
    lr = spec.recipe.lr * min(1.0, 64 / spec.recipe.batch_size)   # the recipe's lr, scaled to batch 64
    model = registry.build(name)
    base = state_arrays(model)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    recalibrate_bn(model, xt)   # BN statistics for the weights evaluated, as the coordinator does
    before, _ = evaluate(model, xt, yt)
    result = run_local(name, base, x, y, recipe, steps=12, lr=lr, seed=0, model=model)
    recalibrate_bn(model, xt)
    after, _ = evaluate(model, xt, yt)
    assert after < before, f"{name}: loss on the trained slice went {before:.3f} -> {after:.3f}"
    assert result.num_samples == 12 * 64 and all(np.isfinite(v).all() for v in result.delta.values())


@needs_data
@pytest.mark.timeout(900)   # ~30 s on a quiet machine; several times that on a loaded one
def test_cnn_one_epoch_on_real_cifar10_beats_chance(tmp_path):
    """The issue's check, `crowdtrain train --model cnn --epochs 1` on real data well above chance (10%), on a
    tenth of the training split at batch 64 so the suite stays within its time (the whole epoch took 72 s
    quiet and reached > 35%; bench/seed_models.py measures full runs). Measured: 26.25% on the whole test
    split (48 s of training on a loaded machine; 12,500 images at batch 256 took 87 s in the suite for 21.3%)."""
    out = run_cli("train", "--model", "cnn", "--epochs", "1", "--limit-train", "5000", "--batch-size", "64",
                  "--out", str(tmp_path / "cnn"), "--no-progress", "--threads", "1", timeout=800)
    assert out.returncode == 0, out.stderr
    assert "training cnn on 5000 images" in out.stdout + out.stderr
    row = json.loads((tmp_path / "cnn" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["epoch"] == 1 and row["step"] == 5000 // 64 and row["test_acc"] > 0.16, row
