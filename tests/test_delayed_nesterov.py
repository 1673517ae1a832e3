"""Delayed Nesterov (Liu et al. 2024): the maths on tiny arrays, the strategy's folds, its state."""
from __future__ import annotations

import numpy as np
import pytest

from coordinator.strategies import STRATEGIES, StrategyState, Update, make_strategy
from coordinator.strategies import delayed_nesterov as dn


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def upd(base: int, **delta: np.ndarray) -> Update:
    return Update(dict(delta), base_version=base, num_samples=1)


def fold(strategy, model: dict, *deltas: dict, stale: int = 0) -> dict:
    """Add each delta at the current version (staleness ``stale``) and fold it at once."""
    for d in deltas:
        version = 10
        assert strategy.add(upd(version - stale, **d), version)
        model, metrics = strategy.aggregate(model, version)
        assert metrics["updates"] == 1
    return model


def test_momentum_update_maths() -> None:
    m, gathered = {"w": np.array([1.0])}, {"w": np.array([4.0])}
    step, new = dn.momentum_update(m, gathered, 2, beta=0.5, lr=1.0, c=0.0, nesterov=False)
    assert new["w"][0] == pytest.approx(0.5 * 1 + 2) and step["w"][0] == pytest.approx(2.5)
    step, new = dn.momentum_update(m, gathered, 2, beta=0.5, lr=2.0, c=0.0, nesterov=True)
    assert step["w"][0] == pytest.approx(2 * (0.5 * 2.5 + 2))
    step, _ = dn.momentum_update(m, gathered, 2, beta=0.5, lr=2.0, c=0.5, nesterov=True)
    assert step["w"][0] == pytest.approx(2 * (0.5 * 2.5 + 2) - 2 * 0.5 * 4)
    step, new = dn.momentum_update({}, gathered, 1, beta=0.9, lr=1.0, c=0.0, nesterov=True)
    assert new["w"][0] == 4.0 and step["w"][0] == pytest.approx(1.9 * 4)


def test_split_statistics() -> None:
    params, stats = dn.split_statistics({"c.weight": arr(1), "bn.running_mean": arr(2), "bn.running_var": arr(3)})
    assert set(params) == {"c.weight"} and set(stats) == {"bn.running_mean", "bn.running_var"}


def test_no_momentum_period_one_adds_each_delta() -> None:
    s = make_strategy("delayed_nesterov", server_momentum=0.0)
    model = fold(s, {"w": arr(1, 1)}, {"w": arr(0.5, -1)}, {"w": arr(1, 1)}, stale=3)
    np.testing.assert_allclose(model["w"], [2.5, 1], atol=1e-6)
    assert model["w"].dtype == np.float32


def test_nesterov_every_update() -> None:
    s = make_strategy("delayed_nesterov", server_momentum=0.9)
    d1, d2 = {"w": arr(1)}, {"w": arr(2)}
    model = fold(s, {"w": arr(0)}, d1)
    assert model["w"][0] == pytest.approx(1.9)                   # m = 1; step = 0.9 m + 1
    model = fold(s, model, d2)
    m = 0.9 * 1 + 2
    assert model["w"][0] == pytest.approx(1.9 + 0.9 * m + 2)


def test_heavy_ball_moves_each_delta_one_over_one_minus_beta() -> None:
    s = make_strategy("delayed_nesterov", server_momentum=0.5, nesterov=False)
    model = fold(s, {"w": arr(0)}, {"w": arr(1)}, *({"w": arr(0)} for _ in range(40)))
    assert model["w"][0] == pytest.approx(2.0, abs=1e-5)


def test_period_holds_back_then_steps_with_the_mean() -> None:
    s = make_strategy("delayed_nesterov", server_momentum=0.5, period=2)
    model = fold(s, {"w": arr(0)}, {"w": arr(1)})
    assert model["w"][0] == 0.0 and s.describe()["buffered"] == 0
    model = fold(s, model, {"w": arr(3)})
    assert model["w"][0] == pytest.approx(0.5 * 2 + 2)            # g = 2, m = 2, step = 0.5 m + g


def test_period_with_c_applies_deltas_at_once_and_momentum_later() -> None:
    s = make_strategy("delayed_nesterov", server_momentum=0.5, period=2, c=0.5, server_lr=2.0)
    model = fold(s, {"w": arr(0)}, {"w": arr(1)})
    assert model["w"][0] == pytest.approx(1.0)                    # lr c d
    model = fold(s, model, {"w": arr(3)})
    assert model["w"][0] == pytest.approx(1 + 3 + 2 * 0.5 * 2)    # + lr c d + lr beta m (g cancelled)


def test_staleness_function_scales_deltas() -> None:
    s = make_strategy("delayed_nesterov", server_momentum=0.0, staleness="polynomial")
    model = fold(s, {"w": arr(0)}, {"w": arr(1)}, stale=3)
    assert model["w"][0] == pytest.approx(0.5)


def test_running_statistics_are_averaged_not_accelerated() -> None:
    s = make_strategy("delayed_nesterov", server_momentum=0.9)
    model = {"w": arr(0), "bn.running_mean": arr(1), "bn.running_var": arr(1)}
    for v in (0.2, 0.4):
        s.add(upd(10, w=arr(1), **{"bn.running_mean": arr(v), "bn.running_var": arr(-v)}), 10)
    new, _ = s.aggregate(model, 10)
    assert new["bn.running_mean"][0] == pytest.approx(1.3) and new["bn.running_var"][0] == pytest.approx(0.7)
    assert "bn.running_mean" not in s.state_dict().meta["extra"] and not any(
        "running" in k for k in s.state_dict().arrays)


def test_state_round_trip_resumes_the_same_trajectory() -> None:
    kwargs = {"server_momentum": 0.8, "period": 3, "c": 0.2}
    a = make_strategy("delayed_nesterov", **kwargs)
    model = fold(a, {"w": arr(0, 0)}, *({"w": arr(i, -i)} for i in range(1, 5)))
    b = make_strategy("delayed_nesterov", **kwargs)
    b.load_state_dict(StrategyState.from_bytes(a.state_dict().to_bytes()))
    assert b.state_dict().meta["extra"] == {"count": 1}
    assert set(b.state_dict().arrays) == {"momentum/w", "gathered/w"}
    nxt = [{"w": arr(5, 1)}, {"w": arr(-2, 3)}]
    np.testing.assert_allclose(fold(a, model, *nxt)["w"], fold(b, model, *nxt)["w"], atol=1e-6)


def test_registered_and_validated() -> None:
    assert STRATEGIES["delayed_nesterov"] is dn.DelayedNesterov
    with pytest.raises(ValueError, match="c:"):
        make_strategy("delayed_nesterov", period=2, c=0.6)
    with pytest.raises(ValueError, match="nesterov"):
        make_strategy("delayed_nesterov", nesterov="yes")
    with pytest.raises(ValueError, match="server_momentum"):
        make_strategy("delayed_nesterov", server_momentum=1.0)
    with pytest.raises(ValueError, match="period"):
        make_strategy("delayed_nesterov", period=0)
