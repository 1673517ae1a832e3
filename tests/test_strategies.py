"""Aggregation strategies: pure maths on tiny arrays, strategy semantics, wrappers, state."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from coordinator.strategies import (
    STRATEGIES, AsyncSGD, FedAsync, FedAvg, FedBuff, NormClip, StalenessCap, StrategyState,
    SupermaskMax, SupermaskMean, Update, make_strategy,
)
from coordinator.strategies import staleness as st
from coordinator.strategies import tensors as T
from models.state_names import is_running_stat


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def upd(base: int, n: int = 1, **delta: np.ndarray) -> Update:
    return Update(dict(delta), base_version=base, num_samples=n, worker_id=f"w{base}{n}")


def close(model: dict, **expected: np.ndarray) -> None:
    assert set(model) == set(expected)
    for k, v in expected.items():
        assert model[k].dtype == np.float32, k
        np.testing.assert_allclose(model[k], v, rtol=0, atol=1e-6, err_msg=k)


# --- staleness functions -----------------------------------------------------------------

def test_staleness_values() -> None:
    assert st.constant(0) == st.constant(100) == 1.0
    assert st.polynomial(0) == 1.0
    assert st.polynomial(3, a=0.5) == 0.5
    assert st.polynomial(1, a=1.0) == 0.5
    assert st.hinge(4, a=10, b=4) == 1.0
    assert st.hinge(5, a=10, b=4) == pytest.approx(1 / 11)
    assert st.hinge(6, a=10, b=4) == pytest.approx(1 / 21)
    assert st.staleness_weight(3) == 0.5  # polynomial, a = 0.5 by default
    assert st.staleness_weight(5, "hinge") == pytest.approx(1 / 11)  # a = 10, b = 4 by default


@pytest.mark.parametrize("kind", list(st.KINDS))
def test_staleness_monotone_and_bounded(kind: str) -> None:
    fn = st.StalenessFn(kind)
    values = [fn(t) for t in range(60)]
    assert values[0] == 1.0
    assert all(0 < v <= 1 for v in values)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_staleness_validation() -> None:
    with pytest.raises(ValueError, match="constant, polynomial, hinge"):
        st.StalenessFn("exponential")
    with pytest.raises(ValueError, match="staleness_b"):
        st.StalenessFn("polynomial", 0.5, 3)
    with pytest.raises(ValueError, match="staleness_a"):
        st.StalenessFn("hinge", -1.0)
    with pytest.raises(ValueError, match=">= 0"):
        st.StalenessFn("polynomial")(-1)
    assert st.StalenessFn("hinge", b=2).a == 10.0


# --- pure tensor maths ---------------------------------------------------------------------

def test_weighted_mean_and_sum() -> None:
    deltas = [{"w": arr(1, 0)}, {"w": arr(0, 4)}]
    np.testing.assert_array_equal(T.weighted_mean(deltas, [1, 3])["w"], [0.25, 3.0])
    partial = T.weighted_sum([{"a": arr(1)}, {"a": arr(2), "b": arr(5)}], [2, 1])
    np.testing.assert_array_equal(partial["a"], [4.0])
    np.testing.assert_array_equal(partial["b"], [5.0])
    with pytest.raises(ValueError, match="positive sum"):
        T.weighted_mean(deltas, [0, 0])


def test_norms_clip_and_max() -> None:
    assert T.global_norm({"a": arr(3), "b": arr(4)}) == 5.0
    big = {"a": arr(6), "b": arr(8)}
    clipped, factor = T.clip_by_global_norm(big, 5.0)
    assert factor == 0.5
    close(clipped, a=[3], b=[4])
    small = {"a": arr(0.3, 0.4)}
    same, factor = T.clip_by_global_norm(small, 5.0)
    assert factor == 1.0 and same is small
    np.testing.assert_array_equal(T.elementwise_max([arr(1, 5, -2), arr(3, 0, -1), arr(2, 2, -3)]), [3, 5, -1])
    merged = T.max_merge({"s": arr(0, 5, 1), "w": arr(9, 9, 9)}, [{"s": arr(1, 4, 1)}, {"s": arr(-2, 7, 1.5)}])
    close(merged, s=[1, 7, 1.5], w=[9, 9, 9])


def test_check_delta_reasons() -> None:
    model = {"w": arr(0, 0)}
    assert T.check_delta({"w": arr(1, 2)}, model) is None
    assert "unknown tensor" in T.check_delta({"x": arr(1, 2)}, model)
    assert "shape" in T.check_delta({"w": arr(1)}, model)
    assert "non-finite" in T.check_delta({"w": arr(1, np.nan)}, model)
    assert T.check_delta({}, model) == "empty delta"


# --- strategies ----------------------------------------------------------------------------

def test_fedavg_sample_weighted_round() -> None:
    s = FedAvg(clients_per_round=2, server_lr=1.0)
    model = {"w": arr(1, 1), "b": arr(7)}
    assert s.add(upd(0, 1, w=arr(1, 0)), version=0) is False
    assert s.add(upd(0, 3, w=arr(0, 4)), version=0) is True
    new, m = s.aggregate(model, version=0)
    close(new, w=[1.25, 4.0], b=[7])  # + (1*[1,0] + 3*[0,4]) / 4
    assert (m["updates"], m["samples"], m["staleness_max"], m["rejected"]) == (2, 4, 0, 0)
    assert m["step_norm"] == pytest.approx(np.hypot(0.25, 3.0))


def test_fedavg_drops_other_rounds() -> None:
    s = FedAvg(clients_per_round=2, server_lr=0.5)
    assert s.add(upd(0, w=arr(2)), version=1) is False  # from the previous round
    assert s.dropped == 1
    assert s.add(upd(1, w=arr(2)), version=1) is False
    # the version moved on without this round aggregating: the buffered one is discarded
    assert s.add(upd(2, w=arr(4)), version=2) is False
    assert s.dropped == 2 and s.describe()["buffered"] == 1
    assert s.add(upd(2, w=arr(8)), version=2) is True
    new, m = s.aggregate({"w": arr(0)}, version=2)
    close(new, w=[3.0])  # 0.5 * mean(4, 8)
    assert m["updates"] == 2


def test_async_sgd_applies_each_update() -> None:
    s = AsyncSGD(server_lr=0.5)
    assert s.add(upd(0, w=arr(2, -4)), version=0) is True
    new, m = s.aggregate({"w": arr(1, 1)}, version=0)
    close(new, w=[2, -1])
    poly = AsyncSGD(server_lr=1.0, staleness="polynomial", staleness_a=1.0)
    poly.add(upd(2, w=arr(2, 2)), version=3)  # staleness 1 -> s = 1/2
    new, m = poly.aggregate({"w": arr(0, 0)}, version=3)
    close(new, w=[1, 1])
    assert m["staleness_weight_mean"] == 0.5 and m["staleness_mean"] == 1.0


def test_fedasync_mixing() -> None:
    s = FedAsync(alpha=0.5, staleness="polynomial", staleness_a=0.5)
    assert s.add(upd(2, w=arr(4, 8)), version=5) is True  # staleness 3 -> a_t = 0.5 * 0.5
    new, m = s.aggregate({"w": arr(1, 1)}, version=5)
    close(new, w=[2, 3])
    assert m["mixing_mean"] == 0.25
    # staleness 0: exactly (1 - a) x + a x_local with x_local = x + delta
    x, local = arr(1, 2), arr(3, -2)
    s.add(Update({"w": local - x}, 5, 1), 5)
    new, _ = s.aggregate({"w": x}, 5)
    close(new, w=0.5 * x + 0.5 * local)
    hinge = FedAsync(alpha=1.0, staleness="hinge", staleness_a=1.0, staleness_b=1.0)
    hinge.add(upd(0, w=arr(3)), version=3)  # t = 3 > b: 1 / (1 * 2 + 1)
    close(hinge.aggregate({"w": arr(0)}, 3)[0], w=[1])


def test_fedbuff_buffer_and_staleness_weights() -> None:
    s = FedBuff(buffer_size=2, server_lr=0.5)  # polynomial a = 0.5
    assert s.add(upd(4, w=arr(2, 4)), version=4) is False
    assert s.describe()["buffered"] == 1 and not s.describe()["due"]
    assert s.add(upd(1, w=arr(4, 8)), version=4) is True  # staleness 3 -> weight 1/2
    new, m = s.aggregate({"w": arr(0, 0)}, version=4)
    close(new, w=[1, 2])  # 0.5 * (1*[2,4] + 0.5*[4,8]) / 2
    assert m["updates"] == 2 and m["staleness_mean"] == 1.5 and m["staleness_weight_mean"] == 0.75
    assert s.describe()["buffered"] == 0
    # a deadline flush of a partial buffer divides by the count it has
    s.add(upd(5, w=arr(2, 2)), version=5)
    close(s.aggregate({"w": arr(0, 0)}, 5)[0], w=[1, 1])
    # nothing buffered: the same model back, no update counted
    new, m = s.aggregate({"w": arr(3, 3)}, 6)
    close(new, w=[3, 3])
    assert m["updates"] == 0


def test_fedbuff_server_momentum() -> None:
    s = FedBuff(buffer_size=1, server_lr=1.0, server_momentum=0.5)
    model = {"w": arr(0)}
    for version, expected in ((0, 2.0), (1, 5.0), (2, 8.5)):  # m: 2, 3, 3.5
        s.add(upd(version, w=arr(2)), version)
        model, _ = s.aggregate(model, version)
        close(model, w=[expected])


def test_supermask_mean() -> None:
    s = SupermaskMean(buffer_size=2, server_lr=1.0)
    scores = {"s": arr(0, 0), "w": arr(5, 5)}
    assert s.add(upd(0, 1, s=arr(1, -1)), 0) is False
    assert s.add(upd(0, 3, s=arr(3, 3)), 0) is True
    new, m = s.aggregate(scores, 0)
    close(new, s=[2.5, 2.0], w=[5, 5])
    assert m["samples"] == 4


def test_supermask_max_same_base() -> None:
    s = SupermaskMax(buffer_size=2)
    model = {"s": arr(0, 5, 1), "w": arr(9, 9, 9)}
    s.add(upd(0, s=arr(1, -1, 0)), 0)
    assert s.add(upd(0, s=arr(-2, 2, 0.5)), 0) is True
    new, m = s.aggregate(model, 0)
    close(new, s=[1, 7, 1.5], w=[9, 9, 9])  # max(current, current + delta_i), frozen w kept
    assert m["changed_fraction"] == 1.0
    s.add(upd(0, s=arr(-1, -1, -1)), 0)  # negative deltas never lower a score
    close(s.aggregate(model, 0)[0], s=[0, 5, 1], w=[9, 9, 9])


def test_supermask_max_by_magnitude() -> None:
    np.testing.assert_array_equal(T.elementwise_max_abs([arr(1, -5, 2), arr(-3, 4, -2)]), [-3, -5, 2])
    s = SupermaskMax(compare="magnitude")
    s.add(upd(0, s=arr(-3, 1, 0)), 0)  # reported [-2, 0, 2]: |-2| beats |1|, |0| loses to |-1|
    new, m = s.aggregate({"s": arr(1, -1, 2)}, 0)
    close(new, s=[-2, -1, 2])
    assert m["changed_fraction"] == pytest.approx(1 / 3)


def test_supermask_max_stale_base_uses_reported_scores() -> None:
    s = SupermaskMax(buffer_size=1, history=2)
    v0 = {"s": arr(0, 0)}
    s.add(upd(0, s=arr(0, 3)), 0)
    v1, _ = s.aggregate(v0, 0)
    close(v1, s=[0, 3])
    # trained from v0, the worker reported [2, 2]: element 1 stays at 3 (not 3 + 2)
    s.add(upd(0, s=arr(2, 2)), 1)
    v2, m = s.aggregate(v1, 1)
    close(v2, s=[2, 3])
    assert m["staleness_max"] == 1
    s.add(upd(0, s=arr(2, 2)), 2)  # the same report again changes nothing
    close(s.aggregate(v2, 2)[0], s=[2, 3])
    approx = SupermaskMax(missing_base="current")  # never saw v0: current + delta
    approx.add(upd(0, s=arr(2, 2)), 1)
    close(approx.aggregate(v1, 1)[0], s=[2, 5])


def test_supermask_max_drops_unknown_base() -> None:
    s = SupermaskMax(history=1)
    model = {"s": arr(0)}
    for v in range(3):  # keeps the current version and one before it
        s.add(upd(v, s=arr(1)), v)
        model, _ = s.aggregate(model, v)
    close(model, s=[3])
    s.add(upd(1, s=arr(10)), 3)  # base 1 was dropped from history (3 and 2 kept)
    new, m = s.aggregate(model, 3)
    close(new, s=[3])
    assert m["updates"] == 0 and m["rejected"] == 1 and "history" in m["reject_reason"]
    s.add(upd(2, s=arr(10)), 3)  # base 2 is known: reported 2 + 10
    close(s.aggregate(model, 3)[0], s=[12])


def test_bad_deltas_are_rejected_not_applied() -> None:
    s = FedBuff(buffer_size=3)
    s.add(upd(0, w=arr(1, 1)), 0)
    s.add(upd(0, w=arr(1)), 0)
    s.add(upd(0, w=arr(np.inf, 0)), 0)
    new, m = s.aggregate({"w": arr(0, 0)}, 0)
    close(new, w=[1, 1])
    assert m["updates"] == 1 and m["rejected"] == 2 and "shape" in m["reject_reason"]
    with pytest.raises(ValueError, match="ahead"):
        s.add(upd(3, w=arr(1, 1)), 2)
    with pytest.raises(ValueError, match="num_samples"):
        Update({"w": arr(1)}, 0, 0)


# --- wrappers ------------------------------------------------------------------------------

def test_staleness_cap() -> None:
    s = StalenessCap(AsyncSGD(), max_staleness=2)
    assert s.add(upd(0, w=arr(100)), version=3) is False  # staleness 3 > 2
    assert s.add(upd(1, w=arr(1)), version=3) is True
    new, m = s.aggregate({"w": arr(0)}, 3)
    close(new, w=[1])
    assert m["capped"] == 1 and m["updates"] == 1
    assert s.describe()["capped"] == 1 and s.describe()["inner"]["name"] == "async_sgd"
    assert s.aggregate({"w": arr(0)}, 3)[1]["capped"] == 0  # per-aggregation count resets


def test_norm_clip() -> None:
    s = NormClip(FedBuff(buffer_size=2, staleness="constant"), max_norm=5.0)
    big, small = upd(0, w=arr(6, 8)), upd(0, w=arr(0.3, 0.4))
    s.add(big, 0)
    s.add(small, 0)
    new, m = s.aggregate({"w": arr(0, 0)}, 0)
    close(new, w=[(3 + 0.3) / 2, (4 + 0.4) / 2])  # big scaled to norm 5, small untouched
    assert m["clipped"] == 1
    np.testing.assert_array_equal(big.delta["w"], [6, 8])  # the caller's update is unchanged


# --- cross-cutting properties ----------------------------------------------------------------

def all_strategies() -> list:
    return [
        FedAvg(clients_per_round=2), AsyncSGD(), FedAsync(), FedBuff(buffer_size=2, server_momentum=0.9),
        SupermaskMean(buffer_size=2), SupermaskMax(buffer_size=2),
        make_strategy("fedbuff", buffer_size=2, max_staleness=5, max_norm=0.1),
    ]


@pytest.mark.parametrize("strategy", all_strategies(), ids=lambda s: s.name)
def test_inputs_never_mutated(strategy) -> None:
    rng = np.random.default_rng(0)
    model = {"s": rng.normal(size=(2, 3)).astype(np.float32), "w": arr(1, 2)}
    updates = [Update({"s": rng.normal(size=(2, 3)).astype(np.float32)}, 1, 4) for _ in range(2)]
    model_copy, updates_copy = copy.deepcopy(model), copy.deepcopy(updates)
    for u in updates:
        strategy.add(u, 1)
    new, metrics = strategy.aggregate(model, 1)
    assert metrics["updates"] == 2
    for k in model:
        np.testing.assert_array_equal(model[k], model_copy[k])
        assert new[k] is not model[k]
    for u, c in zip(updates, updates_copy):
        np.testing.assert_array_equal(u.delta["s"], c.delta["s"])
    json.dumps(metrics)
    json.dumps(strategy.describe())
    json.dumps(strategy.state_dict().meta)


def simulate(factory, steps: int = 9, interrupt_at: int | None = None) -> tuple[dict, list]:
    """An aggregation loop over deterministic updates; optionally save/reload mid-way."""
    rng = np.random.default_rng(1)
    strategy, model, version, history = factory(), {"s": arr(0, 1, 2), "w": arr(5)}, 0, []
    for i in range(steps):
        base = max(0, version - int(rng.integers(0, 3)))
        delta = {"s": rng.normal(size=3).astype(np.float32) * 3}
        if strategy.name == "fedavg":
            base = version
        if strategy.add(Update(delta, base, int(rng.integers(1, 5))), version):
            model, metrics = strategy.aggregate(model, version)
            version += metrics["updates"] > 0
            history.append(metrics)
        if i == interrupt_at:
            blob = strategy.state_dict().to_bytes()
            strategy = factory()
            strategy.load_state_dict(StrategyState.from_bytes(blob))
    return model, history


FACTORIES = {
    "fedavg": lambda: FedAvg(clients_per_round=3),
    "async_sgd": lambda: AsyncSGD(staleness="hinge", staleness_b=1),
    "fedasync": lambda: FedAsync(),
    "fedbuff": lambda: FedBuff(buffer_size=3, server_momentum=0.5),
    "supermask_mean": lambda: SupermaskMean(buffer_size=3),
    "supermask_max": lambda: SupermaskMax(buffer_size=3, history=1),
    "wrapped": lambda: make_strategy("fedbuff", buffer_size=3, server_momentum=0.5, max_staleness=1, max_norm=4.0),
}


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("interrupt_at", [3, 4])  # with K = 3: one, then two updates buffered
def test_state_round_trip_mid_buffer(name: str, interrupt_at: int) -> None:
    expected, expected_metrics = simulate(FACTORIES[name])
    resumed, resumed_metrics = simulate(FACTORIES[name], interrupt_at=interrupt_at)
    assert not np.array_equal(expected["s"], arr(0, 1, 2))
    for k in expected:
        np.testing.assert_array_equal(resumed[k], expected[k])
    assert resumed_metrics == expected_metrics  # same updates folded, dropped, clipped


@pytest.mark.parametrize("name", ["fedbuff", "supermask_max", "wrapped"])
def test_state_without_buffer_plus_replay(name: str) -> None:
    """A store that replays its unapplied results re-adds them at the same version."""
    rng = np.random.default_rng(2)
    model, versions = {"s": arr(0, 1, 2), "w": arr(5)}, [0, 0, 0, 1, 1, 1, 2, 2, 2]
    updates = [Update({"s": rng.normal(size=3).astype(np.float32)}, max(0, v - i % 2), 2)
               for i, v in enumerate(versions)]
    a, b = FACTORIES[name](), FACTORIES[name]()
    for i, (u, v) in enumerate(zip(updates, versions)):
        a.add(u, v)
        b.add(u, v)
        if i % 3 == 2:
            ma, _ = a.aggregate(model, v)
            mb, _ = b.aggregate(model, v)
            model = ma
        if i == 4:  # two updates buffered: save without them, reload, replay
            b2 = FACTORIES[name]()
            b2.load_state_dict(StrategyState.from_bytes(b.state_dict(include_buffer=False).to_bytes()))
            assert "buffer.0/s" not in b.state_dict(include_buffer=False).arrays
            for replay in updates[3:5]:
                b2.add(replay, 1)
            b = b2
    for k in model:
        np.testing.assert_array_equal(mb[k], ma[k])


def test_state_is_for_one_strategy() -> None:
    with pytest.raises(ValueError, match="fedbuff"):
        FedAvg().load_state_dict(FedBuff().state_dict())


# --- registry and parameters -------------------------------------------------------------------

def test_registry_and_errors() -> None:
    assert set(STRATEGIES) == {"fedavg", "async_sgd", "fedasync", "fedbuff", "supermask_mean", "supermask_max",
                               "delayed_nesterov", "ordered_momentum"}
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'.*fedavg, async_sgd, fedasync, fedbuff"):
        make_strategy("fedprox")
    with pytest.raises(ValueError, match="unknown parameter 'k' for strategy 'fedbuff'.*buffer_size.*max_norm"):
        make_strategy("fedbuff", k=3)
    wrapped = make_strategy("fedavg", clients_per_round=4, max_staleness=0, max_norm=1.0)
    assert isinstance(wrapped, StalenessCap) and isinstance(wrapped.inner, NormClip)
    assert isinstance(wrapped.inner.inner, FedAvg) and wrapped.inner.inner.clients_per_round == 4


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_defaults_and_params_rebuild(name: str) -> None:
    strategy = make_strategy(name)
    params = strategy.describe()["params"]
    assert make_strategy(name, **params).describe() == strategy.describe()


@pytest.mark.parametrize(("name", "params", "field"), [
    ("fedavg", {"clients_per_round": 0}, "clients_per_round"),
    ("fedavg", {"server_lr": -1.0}, "server_lr"),
    ("async_sgd", {"staleness": "linear"}, "staleness"),
    ("fedasync", {"alpha": 1.5}, "alpha"),
    ("fedasync", {"alpha": 0.0}, "alpha"),
    ("fedbuff", {"buffer_size": 2.5}, "buffer_size"),
    ("fedbuff", {"server_momentum": 1.0}, "server_momentum"),
    ("fedbuff", {"staleness_a": float("nan")}, "staleness_a"),
    ("supermask_mean", {"buffer_size": True}, "buffer_size"),
    ("supermask_max", {"missing_base": "ignore"}, "missing_base"),
    ("supermask_max", {"history": 0}, "history"),
    ("fedbuff", {"max_staleness": -1}, "max_staleness"),
    ("fedbuff", {"max_norm": 0}, "max_norm"),
])
def test_parameter_validation_names_the_parameter(name: str, params: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make_strategy(name, **params)


# --- the coordinator's lookahead ------------------------------------------------------------

def test_lookahead_syncs_to_the_running_average_by_progress() -> None:
    """Syncs after every ``every_samples`` folded samples and at the end of the budget: avg moves
    (1 - d) of the way to the folded model, d = 0.95^steps x progress^3, and the new version is avg;
    nothing changes early in the run (d = 0) and integer tensors pass through."""
    from coordinator.strategies import Lookahead
    from models.recipe import lookahead_decay

    la = Lookahead(AsyncSGD(), total_samples=100, every_samples=20)   # a step is 4 samples
    model = {"w": arr(0.0), "count": np.array([7], dtype=np.int64)}
    la.add(upd(0, 10, w=arr(1.0), count=np.array([0])), 0)
    model, m = la.aggregate(model, 0)      # 10 samples: no sync yet
    close({"w": model["w"]}, w=arr(1.0))
    assert m["syncs"] == 0 and "lookahead_decay" not in m
    la.add(upd(1, 10, w=arr(1.0), count=np.array([0])), 1)
    model, m = la.aggregate(model, 1)      # 20 samples: a sync at progress 0.2 (avg was 0, the model 2)
    d = lookahead_decay(0.2, 5)
    assert m["syncs"] == 1 and m["lookahead_decay"] == pytest.approx(d) and 0 < d < 0.01
    close({"w": model["w"]}, w=arr(2 * (1 - d)))
    assert model["count"].dtype == np.int64 and model["count"][0] == 7
    avg = 2 * (1 - d)
    la.add(upd(2, 80, w=arr(10.0), count=np.array([0])), 2)
    model, m = la.aggregate(model, 2)      # the budget: a sync at progress 1 after 80 samples (20 steps)
    d = lookahead_decay(1.0, 20)
    assert d == pytest.approx(0.95 ** 20)
    close({"w": model["w"]}, w=arr(avg + (1 - d) * (avg + 10.0 - avg)))


def test_lookahead_state_round_trip_gives_the_same_versions() -> None:
    """Its average and counters are part of the state: a strategy restored mid-run folds as the original."""
    from coordinator.strategies import Lookahead

    def fresh() -> Lookahead:
        return Lookahead(StalenessCap(AsyncSGD(), 8), total_samples=60, every_samples=8)

    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=3).astype(np.float32) for _ in range(10)]
    a, model = fresh(), {"w": arr(0.0, 0.0, 0.0)}
    for i, dl in enumerate(deltas[:5]):
        a.add(upd(i, 6, w=dl), i)
        model, _ = a.aggregate(model, i)
    b = fresh()
    state = a.state_dict(include_buffer=False)
    b.load_state_dict(StrategyState.from_bytes(state.to_bytes()))
    assert json.loads(json.dumps(state.meta)) == state.meta
    ma, mb = model, {k: v.copy() for k, v in model.items()}
    for i, dl in enumerate(deltas[5:], start=5):
        for s, which in ((a, "a"), (b, "b")):
            s.add(upd(i, 6, w=dl), i)
        ma, _ = a.aggregate(ma, i)
        mb, _ = b.aggregate(mb, i)
        np.testing.assert_array_equal(ma["w"], mb["w"])
    assert a.describe()["syncs"] == b.describe()["syncs"] == 5   # every 2 folds of 6 samples
    with pytest.raises(ValueError, match="every_samples"):
        Lookahead(AsyncSGD(), total_samples=10, every_samples=0)


def test_freeze_keeps_a_tensor_once_its_samples_are_folded() -> None:
    """``Freeze``: a named tensor takes its folds until ``after`` samples are folded (the fold crossing the mark
    whole), then each new version keeps it as the version folded into had it; the others train on. The
    samples folded are state: restored mid-run, it holds the same tensor at the same fold."""
    from coordinator.strategies import Freeze

    def fresh() -> Freeze:
        return Freeze(AsyncSGD(), {"b": 20})

    fz, model = fresh(), {"w": arr(0.0), "b": arr(0.0)}
    seen = []
    for i in range(2):   # 2 x 12 samples: the second fold starts at 12 < 20, so it moves b too
        fz.add(upd(i, 12, w=arr(1.0), b=arr(1.0)), i)
        model, m = fz.aggregate(model, i)
        seen.append((float(model["w"][0]), float(model["b"][0]), m["held"]))
    restored = fresh()
    restored.load_state_dict(StrategyState.from_bytes(fz.state_dict(include_buffer=False).to_bytes()))
    for s in (fz, restored):
        s.add(upd(2, 12, w=arr(1.0), b=arr(1.0)), 2)
    held, _ = restored.aggregate({k: v.copy() for k, v in model.items()}, 2)
    model, m = fz.aggregate(model, 2)
    seen.append((float(model["w"][0]), float(model["b"][0]), m["held"]))
    assert seen[0][0] > 0 and seen[0][1] == seen[0][0] and seen[0][2] == 0
    assert seen[1][1] == seen[1][0] > seen[0][1] and seen[1][2] == 0
    assert seen[2][0] > seen[1][0] and seen[2][1] == seen[1][1] and seen[2][2] == 1
    np.testing.assert_array_equal(held["b"], model["b"])
    np.testing.assert_array_equal(held["w"], model["w"])
    assert fz.describe()["held"] == 1 and fz.params() == {"after": {"b": 20}}
    with pytest.raises(ValueError, match="after"):
        Freeze(AsyncSGD(), {})
    with pytest.raises(ValueError, match=r"after\[b\]"):
        Freeze(AsyncSGD(), {"b": 0})


# --- batch-norm statistics: at most a convex combination per fold ------------------------------

def test_fused_step_mixes_statistics_convexly_and_sums_the_rest() -> None:
    """A statistic's deltas are differences to the model (rebased): where their weights sum above 1 the
    step is their weighted mean; other tensors' deltas add up as before; at or below 1 nothing changes."""
    model = {"bn.running_mean": arr(1.0, 1.0), "w": arr(0.0, 0.0)}
    d1 = {"bn.running_mean": arr(2.0, 0.0), "w": arr(1.0, 1.0)}     # targets 3, 1
    d2 = {"bn.running_mean": arr(4.0, 2.0), "w": arr(1.0, -1.0)}    # targets 5, 3
    new, info = T.fused_step(model, [d1, d2], [1.0, 1.0], convex=is_running_stat)
    close(new, **{"bn.running_mean": arr(4.0, 2.0), "w": arr(2.0, 0.0)})   # the mean of 3 and 5, of 1 and 3
    assert info["step_sq"] == pytest.approx(9 + 1 + 4 + 0)
    new, _ = T.fused_step(model, [d1, d2], [0.25, 0.5], convex=is_running_stat)   # 0.75: as before
    close(new, **{"bn.running_mean": arr(3.5, 2.0), "w": arr(0.75, -0.25)})
    new, _ = T.fused_step(model, [d1], [1.0], factor=3.0, convex=is_running_stat)  # server lr 3: capped at 1
    close(new, **{"bn.running_mean": arr(3.0, 1.0), "w": arr(3.0, 3.0)})
    new, _ = T.fused_step(model, [d1, d2], [1.0, 1.0])   # without ``convex``: the plain sum
    close(new, **{"bn.running_mean": arr(7.0, 3.0), "w": arr(2.0, 0.0)})


@pytest.mark.parametrize("name", ["async_sgd", "fedbuff"])
def test_many_stale_updates_folded_at_once_keep_statistics_bounded(name: str) -> None:
    """What a load test found (docs/results.md, "Several coordinator processes on Redis"): a hundred
    results folded at once, their statistics rebased on the model, summed with weights 1 / (1 + s) whose
    total was about 17, moved the statistics 16 times past their targets, and the next fold past that:
    after a few folds the running means were 1e38, then Inf, and every unit request failed. Through the
    coordinator's own aggregator they now stay within the workers' statistics."""
    from coordinator.aggregator import Aggregator
    from coordinator.strategies.robust import AdaptiveClip

    rng = np.random.default_rng(0)
    start = {"bn.running_mean": np.zeros(8, np.float32), "bn.running_var": np.ones(8, np.float32),
             "w": np.zeros(8, np.float32)}
    history = {0: start}
    params = {"buffer_size": 100, "server_lr": 3.0} if name == "fedbuff" else {"staleness": "polynomial",
                                                                            "staleness_a": 1.0}
    agg = Aggregator(AdaptiveClip(make_strategy(name, **params)), start, 0, 0, lambda s: history[s])
    seq = 0
    for _ in range(30):
        for _ in range(100):
            base = max(0, agg.step - int(rng.integers(0, 8)))
            worker = {k: v + rng.normal(0, 0.1, 8).astype(np.float32) + 0.5 for k, v in history[base].items()}
            seq += 1
            agg.add(seq, {k: worker[k] - history[base][k] for k in start}, base, 64)
        folded = agg.aggregate()
        agg.advance(folded)
        history[agg.step] = agg.state
    assert agg.step == 30
    assert all(np.isfinite(v).all() for v in agg.state.values())
    assert np.abs(agg.state["bn.running_mean"]).max() < 30 and 0 < agg.state["bn.running_var"].min() < 30, agg.state


@pytest.mark.parametrize("name", ["async_sgd", "fedbuff"])
def test_an_update_prepared_in_a_thread_is_offered_as_add_would_offer_it(name: str) -> None:
    """``Aggregator.prepare`` (the rebase of stale statistics and the norm, run in a thread by ``Job.settle``)
    gives ``add`` the arrays and norm it would make itself: the same models to the last bit, through clipping
    wrappers that clip some updates; a preparation made before the model moved is not used."""
    from coordinator.aggregator import Aggregator
    from coordinator.strategies.robust import AdaptiveClip

    rng = np.random.default_rng(1)
    start = {"bn.running_mean": np.zeros(8, np.float32), "bn.running_var": np.ones(8, np.float32),
             "w": np.zeros(8, np.float32)}
    params = {"buffer_size": 4} if name == "fedbuff" else {}
    history = ({0: start}, {0: start})
    plain, prepared = (Aggregator(AdaptiveClip(make_strategy(name, **params), warmup=4), start, 0, 0,
                                  lambda s, h=h: h[s]) for h in history)
    seq = 0
    for _ in range(12):
        held = []
        for _ in range(6):
            base = max(0, plain.step - int(rng.integers(0, 4)))
            scale = 10.0 if rng.random() < 0.3 else 1.0   # some above the adaptive bound: clipped
            delta = {k: ((rng.normal(0, 0.1, 8) + 0.5) * scale).astype(np.float32) for k in start}
            seq += 1
            ready = prepared.prepare(delta, base)
            assert ready.norm == math.sqrt(T.sq_norm(ready.delta))
            held.append((seq, delta, base, ready))
            plain.add(seq, delta, base, 64)
            prepared.add(seq, delta, base, 64, prepared=ready)
        for agg, h in zip((plain, prepared), history):
            agg.advance(agg.aggregate())
            h[agg.step] = agg.state
        # prepared before this fold: ignored (the model moved), the update made again from its delta
        seq += 1
        _, delta, base, old = held[-1]
        plain.add(seq, delta, base, 64)
        prepared.add(seq, delta, base, 64, prepared=old)
    for agg, h in zip((plain, prepared), history):
        agg.advance(agg.aggregate())
    assert plain.step == prepared.step == 13
    for k in start:
        assert np.array_equal(plain.state[k], prepared.state[k]), k
    assert plain.strategy.bound == prepared.strategy.bound and plain.strategy.total == prepared.strategy.total > 0


@pytest.mark.parametrize("name", ["async_sgd", "fedbuff"])
def test_a_fold_that_would_overflow_drops_its_updates_and_keeps_the_model(name: str) -> None:
    """Finite deltas whose weighted sum overflows float32: the model stays as it was (finite) and the
    updates are dropped with the reason, instead of a version of Inf that no unit can be cut from."""
    s = make_strategy(name, **({"buffer_size": 2} if name == "fedbuff" else {}))
    model = {"w": arr(3e38, 0.0)}
    s.offer(upd(0, w=arr(3e38, 1.0)), 0)
    s.offer(upd(0, w=arr(3e38, 1.0)), 0)
    out = s.fold(model, 0)
    assert out.folded == () and [d.reason for d in out.dropped] == ["incompatible"] * 2
    assert "overflow" in out.dropped[0].detail
    close(out.model, w=arr(3e38, 0.0))
