"""models/browser_unit.py: a tab's unit computed in Python, what the coordinator recomputes to
check a tab (coordinator/job.py ``_recompute``). Its draws against worker_web/draw.js are tested
through tests/golden/browser_draw.json (tests/test_contract.py reproduces the file from this
module, worker_web/test/draw.test.mjs reads it); against a real tab in tests/test_browser.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from contract.units import WorkUnit
from coordinator.trust import Tolerance, compare, judge
from models import browser_unit as B
from models import registry
from models.local import state_arrays
from worker_py.unit import run_unit


def test_generator_is_mulberry32():
    # seed 0's first draws as 32-bit integers (node: mulberry32(0) in worker_web/draw.js gives the same)
    got = B.Mulberry32(0).take(3)
    assert [round(v * 2**32) for v in got] == [1144304738, 1416247, 958946056]
    # drawing in one go or one at a time is the same stream
    one = B.Mulberry32(12345)
    assert [one() for _ in range(5)] == B.Mulberry32(12345).take(5).tolist()


def test_batches_cover_a_pass_before_repeating():
    batches = B.batch_indices(10, 5, 4, B.Mulberry32(3))
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and all(len(b) == 4 for b in batches)
    with pytest.raises(ValueError, match="batch size 11"):
        B.batch_indices(10, 1, 11, B.Mulberry32(3))


def test_augment_crops_with_zeros_and_mirrors():
    x = np.arange(2 * 3 * 32 * 32, dtype=np.int64).reshape(2, 3, 32, 32) % 200 + 1
    x = x.astype(np.uint8)
    plain, y = B.augment_batch(x, np.array([3, 5]), [1, 0], B.Mulberry32(1), 0, False)
    assert np.array_equal(plain[0], x[1]) and y.tolist() == [5, 3]
    # with padding 4 and mirrors, every image is its source shifted by at most 4 (the rest zeros), maybe mirrored
    out, _ = B.augment_batch(x, np.array([3, 5]), [0, 1, 0, 1], B.Mulberry32(7), 4, True)
    for k, src in enumerate([0, 1, 0, 1]):
        img = out[k]
        found = False
        padded = np.pad(x[src].astype(np.float32), ((0, 0), (4, 4), (4, 4)))
        for mirror in (False, True):
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    # mirror then shift: output column j reads source column (31 - j) + dx, i.e. padded[31 - j + dx + 4]
                    cols = (31 - np.arange(32) if mirror else np.arange(32)) + dx + 4
                    rows = np.arange(32) + dy + 4
                    cand = padded[:, rows][:, :, cols]
                    found |= np.array_equal(img, cand)
        assert found, f"image {k} is no crop/mirror of its source"


def test_augment_reflects_as_torch_pads():
    """With ``reflect`` every crop is a window of the image padded by reflection (numpy's and torch's
    "reflect": the edge row is not repeated), maybe mirrored: no zeros come in."""
    x = np.random.default_rng(0).integers(1, 256, (2, 3, 32, 32)).astype(np.uint8)
    out, _ = B.augment_batch(x, np.array([3, 5]), [0, 1, 0, 1, 1, 0], B.Mulberry32(9), 4, True, reflect=True)
    assert (out > 0).all()
    shifted = 0
    for k, src in enumerate([0, 1, 0, 1, 1, 0]):
        padded = np.pad(x[src].astype(np.float32), ((0, 0), (4, 4), (4, 4)), mode="reflect")
        hits = [(dy, dx) for mirror in (False, True) for dy in range(-4, 5) for dx in range(-4, 5)
                if np.array_equal(out[k], padded[:, np.arange(32) + dy + 4][:, :, (31 - np.arange(32) if mirror
                                                                                   else np.arange(32)) + dx + 4])]
        assert hits, f"image {k} is no reflected crop of its source"
        shifted += any(h != (0, 0) for h in hits)
    assert shifted >= 3   # the draws did shift (a reflected edge, not only the image itself)


@pytest.fixture(scope="module")
def cnn_unit(tmp_path_factory):
    """A cnn unit of 3 steps of 32 on 64 random images, a fresh base, and the step-graph cache."""
    torch.manual_seed(0)
    base = state_arrays(registry.build("cnn"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, 64).astype(np.uint8)
    recipe = registry.get("cnn").recipe
    hyper = {"lr": 0.05, "momentum": recipe.momentum, "nesterov": recipe.nesterov, "weight_decay": 5e-4,
             "label_smoothing": 0.1, "loss": "ce", "crop_pad": 4, "flip": True}
    unit = WorkUnit(job="t", unit_id="u1", model="cnn", model_version="0" * 64, base_step=0, shard_ids=["1" * 64],
                    local_steps=3, batch_size=32, hyper=hyper, seed=42, codec="fp32", lease="l", deadline=1e12)
    from coordinator.steps import step_cache_dir
    return unit, base, x, y, step_cache_dir()


def tab_delta(unit, base, x, y, cache) -> dict:
    """What a tab computes for ``unit``, with the step graph of the coordinator's cache."""
    from models.onnx_step import step_graph

    return B.run_with_graph(unit, base, x, y, *step_graph(unit.model, unit.batch_size, cache)).delta


def test_a_tab_unit_is_reproducible_and_is_not_a_torch_unit(cnn_unit):
    unit, base, x, y, cache = cnn_unit
    a = tab_delta(unit, base, x, y, cache)
    b = tab_delta(unit, base, x, y, cache)
    assert set(a) <= set(base) and all(a[k].dtype == np.float32 and a[k].shape == base[k].shape for k in a)
    assert all(np.array_equal(a[k], b[k]) for k in a)              # the same seed: the same delta, bit for bit
    assert sum(float(np.abs(v).sum()) for v in a.values()) > 0      # and it trained
    tol = Tolerance()
    other = tab_delta(dataclasses.replace(unit, seed=43), base, x, y, cache)
    assert judge(compare(a, other), tol) == "invalid"                # another seed is another sample
    # a Python worker's delta for the same unit draws with torch's generator: as far as another seed,
    # which is why the coordinator must recompute a tab's unit with this module, not with run_unit
    from contract.codecs import decode_delta
    torch_delta = decode_delta(run_unit(unit, base, x, y, "t").delta)
    assert judge(compare(a, torch_delta), tol) == "invalid", compare(a, torch_delta)


def test_units_a_tab_would_refuse_are_refused(cnn_unit):
    unit, base, x, y, cache = cnn_unit
    with pytest.raises(ValueError, match="loss 'focal'"):
        tab_delta(dataclasses.replace(unit, hyper={**unit.hyper, "loss": "focal"}), base, x, y, cache)
    with pytest.raises(ValueError, match="the model version has no"):
        tab_delta(unit, {k: v for k, v in list(base.items())[1:]}, x, y, cache)


def test_a_python_worker_computes_a_replica_of_a_tabs_unit_as_the_tab(cnn_unit):
    """``worker_py.unit.run_unit`` on a unit with ``compute_as="browser"`` and the tab's step graph gives the
    tab's delta (the coordinator's recomputation), bit for bit; without the graph it refuses."""
    import dataclasses as dc

    from contract.codecs import decode_delta
    from models.onnx_step import step_graph

    unit, base, x, y, cache = cnn_unit
    replica = dc.replace(unit, compute_as="browser")
    graph, spec = step_graph("cnn", 32, cache)
    result = run_unit(replica, base, x, y, "py-1", step_graph=(graph, spec))
    want = tab_delta(unit, base, x, y, cache)
    got = decode_delta(result.delta)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert result.num_samples == 3 * 32 and 0 < result.loss_after and result.loss_before > 0
    with pytest.raises(ValueError, match="step graph"):
        run_unit(replica, base, x, y, "py-1")
    with pytest.raises(ValueError, match="batch 64"):
        B.run_with_graph(dc.replace(replica, batch_size=64), base, x, y, graph, spec)
