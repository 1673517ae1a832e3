"""Leases from what workers have shown (``coordinator.scheduler.Deadlines``)."""
import statistics

from coordinator.scheduler import Deadlines


def test_a_new_workers_lease_follows_the_fleets_median_pace_sorted_again_as_records_change():
    d = Deadlines(min_s=1.0, max_s=1e6, factor=3.0, first_s=10.0, slack_s=0.0, alpha=1.0)
    assert d.lease_seconds("new", 100) == 10.0                       # no record at all: first_s
    for i, rate in enumerate((1.0, 2.0, 9.0)):
        d.observe(f"w{i}", rate * 100, 100)
    assert d.fleet_rate() == 2.0 and d.lease_seconds("new", 100) == 2 * 3.0 * 2.0 * 100
    assert d.lease_seconds("w2", 100) == 3.0 * 9.0 * 100             # a known worker: its own pace
    d.observe("w3", 8.0 * 100, 100)
    assert d.fleet_rate() == statistics.median([1.0, 2.0, 9.0, 8.0]), "a small fleet: the median of every record"
    # a thousand workers: sorted again once the observations since the last sort reach 50 (a twentieth)
    big = Deadlines(alpha=1.0)
    for i in range(1000):
        big.observe(f"w{i}", 1.0, 1)
    assert big.fleet_rate() == 1.0
    for i in range(49):
        big.observe(f"w{i}", 5.0, 1)
    assert big.fleet_rate() == 1.0                                    # 49 of 1,000 changed: not sorted again
    for i in range(49, 600):
        big.observe(f"w{i}", 5.0, 1)
    assert big.fleet_rate() == statistics.median(big.per_sample.values()) == 5.0
