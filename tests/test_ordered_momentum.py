"""Ordered momentum (after Shi et al. 2024): catch-up shares on tiny arrays, folds, state."""
from __future__ import annotations

import numpy as np
import pytest

from coordinator.strategies import STRATEGIES, StrategyState, Update, make_strategy
from coordinator.strategies import ordered_momentum as om


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def fold(strategy, model: dict, *deltas: dict, stale: int = 0) -> dict:
    for d in deltas:
        assert strategy.add(Update(dict(d), base_version=20 - stale, num_samples=1), 20)
        model, metrics = strategy.aggregate(model, 20)
        assert metrics["updates"] == 1
    return model


def test_catch_up_shares() -> None:
    assert om.catch_up(0.5, 0) == (0.0, 1.0)
    assert om.catch_up(0.5, 1) == (1.0, 0.5)
    assert om.catch_up(0.5, 2) == pytest.approx((1.5, 0.25))
    for s in range(12):            # now + late / (1 - beta) == 1 / (1 - beta): the same total move
        now, late = om.catch_up(0.9, s)
        assert now + late / 0.1 == pytest.approx(10.0)


def test_ordered_step_maths() -> None:
    step, m = om.ordered_step({"w": np.array([2.0])}, {"w": np.array([4.0])}, beta=0.5, staleness=2)
    assert m["w"][0] == pytest.approx(0.5 * 2 + 0.25 * 4) and step["w"][0] == pytest.approx(2 + 1.5 * 4)


def test_fresh_deltas_are_heavy_ball() -> None:
    s = make_strategy("ordered_momentum", server_momentum=0.5)
    model = fold(s, {"w": arr(0)}, {"w": arr(1)}, {"w": arr(1)})
    assert model["w"][0] == pytest.approx(1 + 1.5)


@pytest.mark.parametrize("stale", [0, 1, 3, 8])
def test_every_delta_moves_the_model_lr_over_one_minus_beta(stale: int) -> None:
    s = make_strategy("ordered_momentum", server_momentum=0.5, server_lr=0.5)
    model = fold(s, {"w": arr(0, 0)}, {"w": arr(1, -2)}, stale=stale)
    model = fold(s, model, *({"w": arr(0, 0)} for _ in range(40)))
    np.testing.assert_allclose(model["w"], [1.0, -2.0], atol=1e-5)


def test_stale_delta_catches_up_at_once() -> None:
    s = make_strategy("ordered_momentum", server_momentum=0.5)
    model = fold(s, {"w": arr(0)}, {"w": arr(1)}, stale=2)
    assert model["w"][0] == pytest.approx(1.5 + 0.25)


def test_staleness_function_and_statistics() -> None:
    s = make_strategy("ordered_momentum", server_momentum=0.9, staleness="polynomial")
    model = {"w": arr(0), "bn.running_var": arr(1)}
    new = fold(s, model, {"w": arr(1), "bn.running_var": arr(-0.5)}, stale=3)
    assert new["w"][0] == pytest.approx(0.5 * (1 + 0.9 + 0.81 + 0.729))   # s(3) = 0.5, catch-up 3 + momentum
    assert new["bn.running_var"][0] == pytest.approx(0.5)                  # averaged, not accelerated
    assert set(s.state_dict().arrays) == {"momentum/w"}


def test_state_round_trip() -> None:
    a = make_strategy("ordered_momentum", server_momentum=0.7)
    model = fold(a, {"w": arr(0, 0)}, {"w": arr(1, 2)}, {"w": arr(-1, 1)}, stale=2)
    b = make_strategy("ordered_momentum", server_momentum=0.7)
    b.load_state_dict(StrategyState.from_bytes(a.state_dict().to_bytes()))
    nxt = [{"w": arr(3, 1)}]
    np.testing.assert_allclose(fold(a, model, *nxt, stale=1)["w"], fold(b, model, *nxt, stale=1)["w"], atol=1e-6)


def test_registered_and_validated() -> None:
    assert STRATEGIES["ordered_momentum"] is om.OrderedMomentum
    with pytest.raises(ValueError, match="server_momentum"):
        make_strategy("ordered_momentum", server_momentum=1.0)
    with pytest.raises(ValueError, match="server_lr"):
        make_strategy("ordered_momentum", server_lr=0)
