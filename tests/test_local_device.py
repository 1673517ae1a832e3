"""A work unit is the same computation on every torch device: its random draws (batches, crops,
mirrors, dropout masks) come from CPU generators, wherever the steps run (models.local.run_local).

The CUDA comparison runs only where torch sees a GPU (never needed: CI has none); the CPU-side
guarantees it rests on are checked everywhere."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import registry
from models.augment import augment
from models.local import SeededDropout, cpu_keep_mask, run_local, seeded_dropout, state_arrays
from models.train import resolve_device


def fresh_unit_inputs(name: str, n: int) -> tuple[dict, np.ndarray, np.ndarray, object]:
    """(a fresh base of model ``name``, ``n`` random images, their labels, the model's recipe)."""
    torch.manual_seed(0)
    base = state_arrays(registry.build(name))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return base, x, rng.integers(0, 10, n).astype(np.int64), registry.get(name).recipe


@pytest.mark.parametrize("p", [0.25, 0.5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_keep_mask_is_the_mask_f_dropout_draws(p, layout):
    x = torch.rand(8, 16, 6, 6) + 0.5                       # no zeros: the mask is readable from the output
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(123)
    dropped = F.dropout(x, p, training=True)
    torch.manual_seed(123)
    keep = cpu_keep_mask(x, p)
    assert torch.equal(dropped != 0, keep.bool())
    assert torch.equal(dropped, x * keep.float().div_(1 - p))
    assert 0.3 < keep.float().mean() < 0.9                   # a real draw, not all kept or all dropped


def test_seeded_dropout_swaps_only_plain_dropout_keeps_p_and_draws_what_nn_dropout_drew():
    model = registry.build("cnn")
    ps = [m.p for m in model.modules() if type(m) is torch.nn.Dropout]
    assert ps, "cnn has dropout layers"
    seeded_dropout(model, torch.Generator().manual_seed(5))
    seeded_dropout(model, torch.Generator().manual_seed(5))  # idempotent: the layers stay, the generator is new
    swapped = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(type(m) is SeededDropout for m in swapped)
    assert [m.p for m in swapped] == ps
    x = torch.rand(4, 3, 32, 32) * 255                       # nn.Dropout after torch.manual_seed, draw for draw
    ref = registry.build("cnn")
    ref.load_state_dict(model.state_dict())
    torch.manual_seed(5)
    assert torch.equal(model.train()(x), ref.train()(x))
    seeded_dropout(model, None)                              # no generator: nn.Dropout's own draws
    torch.manual_seed(6)
    a = model(x)
    torch.manual_seed(6)
    assert torch.equal(a, ref(x))


def test_a_units_dropout_masks_are_its_own_whatever_another_thread_draws():
    """The coordinator recomputes a unit in one thread while another builds a model or exports a step graph
    (``torch.random.fork_rng``, ``torch.manual_seed``: torch's process-wide generator). The unit's masks come
    from its own generator, so the result is the one computed alone (it was not: an honest result was refuted
    at cosine 0.30 in CI on 2026-12-05)."""
    base, x, y, recipe = fresh_unit_inputs("cnn", 256)
    alone = run_local("cnn", base, x, y, recipe, 4, recipe.lr * 0.5, seed=7)
    stop, meddled = threading.Event(), []

    def meddle() -> None:
        while not stop.is_set():
            with torch.random.fork_rng():
                torch.manual_seed(len(meddled))
                meddled.append(float(torch.rand(64, 1024).sum()))

    thread = threading.Thread(target=meddle)
    thread.start()
    try:
        beside = run_local("cnn", base, x, y, recipe, 4, recipe.lr * 0.5, seed=7)
    finally:
        stop.set()
        thread.join()
    assert len(meddled) > 10, "the other thread drew while the unit ran"
    for name, value in alone.delta.items():
        assert np.array_equal(value, beside.delta[name]), name


def test_augment_draws_do_not_depend_on_the_images_device():
    """The crops and mirrors come from the CPU generator passed in: the same for a tensor on any device
    (here the CPU twice, and a GPU where there is one)."""
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = augment(x, 4, True, torch.Generator().manual_seed(3), reflect=True)
    b = augment(x.clone(), 4, True, torch.Generator().manual_seed(3), reflect=True)
    assert torch.equal(a, b) and not torch.equal(a, x.float())
    if torch.cuda.is_available():
        c = augment(x.cuda(), 4, True, torch.Generator().manual_seed(3), reflect=True)
        assert torch.equal(a, c.cpu())


def test_resolve_device_refuses_what_torch_cannot_use():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this torch sees none)")
@pytest.mark.parametrize("name", ["cnn", "resnet_fast"])
def test_a_unit_on_cuda_agrees_with_the_cpu_within_the_replica_tolerance(name):
    from coordinator.trust import Tolerance, similarity

    base, x, y, recipe = fresh_unit_inputs(name, 512)
    runs = [run_local(name, base, x, y, recipe, 2, recipe.lr * 0.5, seed=7, device=d) for d in ("cpu", "cuda")]
    s = similarity(runs[0].delta, runs[1].delta)
    assert s.cosine >= Tolerance().min_cosine and s.norm_diff <= Tolerance().max_norm_diff, s


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
@pytest.mark.parametrize("command", [["train", "--model", "cnn", "--limit-train", "64", "--epochs", "1"],
                                     ["worker", "--coordinator", "http://127.0.0.1:9", "--no-progress"]])
def test_asking_for_a_gpu_torch_cannot_see_exits_2_with_the_reason(command, tmp_path):
    """``--device cuda`` on a CPU-only torch: exit status 2 and the reason, before any data is read or any
    coordinator is asked (port 9 has no server: a worker that asked would retry, not exit 2)."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "crowdtrain.py"), *command, "--device", "cuda"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CROWDTRAIN_DATA": str(tmp_path)})
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "sees no CUDA GPU" in run.stdout + run.stderr
