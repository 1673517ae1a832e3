"""One unit's computation (models/local.py): state round trips, delta names, statistics rebasing."""
import numpy as np
import torch

from models import registry
from models.local import (batch_indices, delta_names, load_arrays, rebase_running_stats, run_local, sanitize_state,
                          state_arrays)
from models.recipe import Recipe
from tests.helpers.tiny_cifar import tiny_cifar10


def test_state_round_trip_and_delta_names():
    model = registry.build("resnet_fast")
    state = state_arrays(model)
    assert all(v.dtype == np.float32 for v in state.values())
    assert not any(k.endswith("num_batches_tracked") for k in state)
    other = registry.build("resnet_fast")
    load_arrays(other, state)
    assert all(np.array_equal(v, state_arrays(other)[k]) for k, v in state.items())
    names = delta_names(model)
    assert any(n.endswith("running_var") for n in names) and any(n.endswith(".weight") for n in names)


def test_supermask_deltas_carry_scores_not_fixed_weights():
    names = delta_names(registry.build("supermask_fc"))
    assert names and all("score" in n for n in names), names


def test_batch_indices_cover_the_shard_before_repeating():
    batches = batch_indices(10, 5, 4, torch.Generator().manual_seed(0))
    flat = torch.cat(batches).tolist()
    assert len(flat) == 20 and sorted(flat[:10]) == list(range(10))
    assert all(len(b) == 4 for b in batches)


def test_run_local_is_deterministic_for_a_seed():
    data = tiny_cifar10(n_train=64, n_test=8)
    base = state_arrays(registry.build("cnn"))
    recipe = Recipe(batch_size=16)
    torch.set_num_threads(1)
    a = run_local("cnn", base, data.train_x, data.train_y, recipe, 3, 0.05, seed=7)
    b = run_local("cnn", base, data.train_x, data.train_y, recipe, 3, 0.05, seed=7)
    assert a.num_samples == 48 and a.loss_before == b.loss_before
    assert all(np.array_equal(a.delta[k], b.delta[k]) for k in a.delta)


def test_stale_statistics_are_rebased_to_mix_convexly():
    """A stale delta of a running variance, added as is, can go negative; rebased it cannot."""
    base = {"bn.running_var": np.array([5.0], np.float32), "w": np.array([1.0], np.float32)}
    current = {"bn.running_var": np.array([1.0], np.float32), "w": np.array([2.0], np.float32)}
    delta = {"bn.running_var": np.array([-4.5], np.float32), "w": np.array([0.5], np.float32)}  # worker's var: 0.5
    assert current["bn.running_var"] + delta["bn.running_var"] < 0          # the bug this prevents
    rebased = rebase_running_stats(delta, base, current)
    assert rebased["w"] is delta["w"]                                        # weights add up unchanged
    assert np.allclose(current["bn.running_var"] + rebased["bn.running_var"], 0.5)   # = the worker's estimate
    assert np.allclose(current["bn.running_var"] + 0.3 * rebased["bn.running_var"], 0.85)  # convex mix


def test_sanitize_clamps_only_variances():
    state = {"a.running_var": np.array([-1.0, 2.0], np.float32), "a.weight": np.array([-1.0], np.float32)}
    clean = sanitize_state(state)
    assert clean["a.running_var"].tolist() == [0.0, 2.0] and clean["a.weight"].tolist() == [-1.0]
