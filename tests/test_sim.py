"""The churn simulator: reproducible runs, lost and reissued units, scenario errors, the CLI.

Data is the tiny synthetic CIFAR-10 of tests/helpers/tiny_cifar.py; runs are a few dozen
units of a small model, so the whole file takes seconds.
"""
import json
from pathlib import Path

import pytest

import crowdtrain
from coordinator.sim import report
from coordinator.sim.engine import run_scenario
from coordinator.sim.scenario import ScenarioError, load, override, parse
from tests.helpers.tiny_cifar import tiny_cifar10, write_image_folder

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
seed = 3
[model]
name = "cnn"
batch_size = 16
local_steps = 2
lr = 0.01
shard_size = 32
codec = "fp32"
[budget]
train_images = 256
epochs = 1.5
eval_images = 64
evals = 3
[workers]
count = 4
speed = { dist = "lognormal", median = 2.0, sigma = 0.5 }
[coordinator]
lease_first_s = 60
version_download = "fp32"   # whole versions, the download times these scenarios were tuned with
replication = "off"         # honest workers, aggregation alone (the liars' runs say adaptive)
[[strategies]]
name = "fedavg"
params = { clients_per_round = 3 }
[[strategies]]
name = "async_sgd"
params = { staleness = "polynomial" }
"""
CHURN = """
[churn]
leave_per_hour = 30.0
join_per_hour = 30.0
die_in_unit = 0.25
hand_back = 0.5
restart_s = 20
"""


@pytest.fixture(scope="module")
def data():
    return tiny_cifar10(n_train=256, n_test=64)


def scenario_file(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def simulate(tmp_path, text, data, out="out", **kw):
    scenario = load(scenario_file(tmp_path, text, out + ".toml"))
    runs = run_scenario(scenario, data, **kw)
    report.write(tmp_path / out, scenario, runs, {"digest": data.digest}, 1.0, 1)
    return json.loads((tmp_path / out / "results.json").read_text()), runs


def test_same_seed_same_results_other_seed_others(tmp_path, data):
    text = TINY.replace("[coordinator]", CHURN + "[coordinator]")
    first, _ = simulate(tmp_path, text, data, "a", only=["async_sgd"])
    second, _ = simulate(tmp_path, text, data, "b", only=["async_sgd"])
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    updates = [(tmp_path / d / "async_sgd.updates.csv").read_bytes() for d in ("a", "b")]
    assert updates[0] == updates[1]
    other, _ = simulate(tmp_path, text.replace("seed = 3", "seed = 4"), data, "c", only=["async_sgd"])
    assert other["runs"][0]["evals"] != first["runs"][0]["evals"]
    assert first["runs"][0]["summary"]["finished"] and first["runs"][0]["summary"]["samples_applied"] >= 384


def test_churn_loses_and_reissues_units_through_the_coordinator(tmp_path, data):
    doc, runs = simulate(tmp_path, TINY.replace("[coordinator]", CHURN + "[coordinator]"), data)
    for run in runs:
        s = run.summary
        assert s["finished"] and not s["stalled"]
        assert s["units_lost"] > 0 and s["units_handed_back"] > 0, s["unit_fates"]
        assert s["units_reissued"] > 0
        assert s["samples_applied"] >= s["budget_samples"] == 384
        # a lost unit stays expired in the coordinator's store (its lease ran out), or "superseded" when a
        # second copy handed out at the job's tail delivered; a handed-back one "returned"
        for u in run.units:
            if u["fate"].startswith("lost"):
                assert u["store_status"] in ("expired", "leased", "superseded"), u
            if u["fate"] == "handed back":
                assert u["store_status"] == "returned"
        # the job ran on the simulated clock: deadlines are simulated seconds, not unix time
        assert max(u["deadline_s"] for u in run.units) < s["sim_time_s"] + 3600
    fedavg, async_sgd = runs
    # the coordinator's FedAvg drops results from an older version; async SGD applies them, stale
    assert fedavg.summary["staleness_max"] == 0 and fedavg.summary["units_dropped_by_strategy"] > 0
    assert async_sgd.summary["staleness_max"] > 0 and async_sgd.summary["units_dropped_by_strategy"] == 0
    units_csv = (tmp_path / "out" / "async_sgd.units.csv").read_text().splitlines()
    assert units_csv[0].startswith("unit_id,worker_id,issued_s")
    assert len(units_csv) == runs[1].summary["units_issued"] + 1


def test_no_churn_loses_nothing(tmp_path, data):
    doc, runs = simulate(tmp_path, TINY, data, only=["async_sgd"])
    s = runs[0].summary
    assert s["units_lost"] == s["units_reissued"] == s["units_expired"] == 0
    assert s["samples_computed"] == s["samples_applied"]


@pytest.mark.parametrize("change, message", [
    (("count = 4", 'count = "eight"'), 'workers.count: expected an integer >= 1, got "eight" (a string)'),
    (("count = 4", "count = 0"), "workers.count: expected an integer >= 1, got 0 (an integer)"),
    (("evals = 3", "evals = 2.5"), "budget.evals: expected an integer >= 1, got 2.5 (a float)"),
    (("lr = 0.01", 'lr = "fast"'), 'model.lr: expected a number > 0 or "none", got "fast" (a string)'),
    (("median = 2.0", "median = -1"), "workers.speed.median: expected a number > 0, got -1 (an integer)"),
    (('dist = "lognormal", median = 2.0, sigma = 0.5', 'dist = "lognormal", median = 2.0'),
     'workers.speed.sigma: missing; expected a number (dist = "lognormal")'),
    (('dist = "lognormal"', 'dist = "gauss"'),
     'workers.speed.dist: expected a string, one of constant, lognormal, uniform, pareto, exponential, got "gauss"'),
    (("[workers]", "[workers]\ncuont = 3"), "workers.cuont: unknown key; expected one of count, speed"),
    (('name = "cnn"', 'name = "vgg"'), 'model.name: expected a string, one of cnn, alexnet'),
    (("clients_per_round = 3", "rounds = 3"), "strategies[0].params: unknown parameter 'rounds' for strategy"),
    (('name = "fedavg"', 'name = "fedprox"'), 'strategies[0].name: expected a string, one of fedavg'),
    (("[budget]", "budget = 3\n[oops]"), "oops: unknown key; expected one of name, description, seed"),
    (("seed = 3", "seed = [3"), "not valid TOML"),
])
def test_bad_scenario_is_one_line_naming_the_key(tmp_path, change, message, capsys):
    assert_one_line_error(scenario_file(tmp_path, TINY.replace(*change)), message, tmp_path, capsys)


def assert_one_line_error(path: Path, message: str, tmp_path: Path, capsys) -> None:
    """Loading the scenario at ``path`` fails with ``message`` on one line, and so does `crowdtrain sim`."""
    with pytest.raises(ScenarioError) as e:
        load(path)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert crowdtrain.main(["sim", str(path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and message in err and "\n" not in err and "Traceback" not in err


def test_none_gives_the_coordinators_own_units(tmp_path, data):
    """model.batch_size / lr / local_steps = "none": the coordinator's units (the recipe's batch and lr at
    ``unit_batch_scale``, split over the Python workers in flight), as `crowdtrain coordinator` cuts them."""
    from coordinator.sim.engine import Simulation

    text = TINY.replace("shard_size = 32", "shard_size = 128").replace("count = 4", "count = 8")
    sc = load(scenario_file(tmp_path, text))
    for key in ("batch_size", "lr", "local_steps"):
        sc = override(sc, f'model.{key}="none"')
    sc = override(sc, "coordinator.unit_batch_scale=0.25")   # cnn's 64 (the default eighth, 32, is the split's floor)
    sim = Simulation(sc, sc.strategies[1], data, tmp_path / "run", "async_sgd")
    cfg, recipe = sim.config, sim.job.recipe
    assert (cfg.batch_size, cfg.lr, cfg.local_steps) == (None, None, None)
    sim.run()
    import sqlite3
    with sqlite3.connect(tmp_path / "run" / "state" / "state.db") as db:
        batches = [json.loads(wire)["batch_size"] for (wire,) in
                   db.execute("SELECT wire FROM units WHERE replica_of IS NULL ORDER BY rowid")]
    assert batches[:2] == [recipe.batch_size] * 2              # two workers in flight: the recipe's unit batch
    assert batches[2] == recipe.batch_size // 2 < recipe.batch_size   # the third of eight: split (a power of two)


def test_override_and_sweep_points():
    import tomllib
    scenario = parse(tomllib.loads(TINY + '[sweep]\n"workers.count" = [2, 3]\n"model.local_steps" = [1, 2, 4]\n'))
    assert len(scenario.points()) == 6 and scenario.at(scenario.points()[-1])["model.local_steps"] == 4
    assert override(scenario, "budget.eval_images=2000")["budget.eval_images"] == 2000
    with pytest.raises(ScenarioError, match="budget.evals: expected an integer >= 1"):
        override(scenario, "budget.evals=many")
    scaled = scenario.scaled(4.0, train_size=512)   # 256 images x 1.5 epochs x 4 = 1536 samples
    assert scaled["budget.train_images"] == 512 and scaled["budget.epochs"] == 3.0


def test_bundled_scenarios_load():
    names = sorted(p.stem for p in (ROOT / "scenarios").glob("*.toml"))
    assert {"no_churn", "mild_churn", "heavy_churn", "stragglers", "edge_popup_sweep"} <= set(names)
    for name in names:
        scenario = load(ROOT / "scenarios" / f"{name}.toml")
        assert scenario.name == name and scenario.strategies
    heavy = load(ROOT / "scenarios" / "heavy_churn.toml")
    assert heavy["churn.leave_per_hour"] == 0.3 and heavy["workers.speed"].kind == "lognormal"
    sweep = load(ROOT / "scenarios" / "edge_popup_sweep.toml")
    assert {s.name for s in sweep.strategies} == {"supermask_max", "supermask_mean"} and len(sweep.points()) == 6
    liars = load(ROOT / "scenarios" / "liars.toml")   # issue 11: 20% of 10 workers lying, every defence
    assert liars["liars.fraction"] * liars["workers.count"] == 2 and liars["liars.fault"] == ("sign_flip",)
    assert [s.coordinator.get("robust") for s in liars.strategies] == [
        "none", "adaptive_clip", "centered_clip", "trimmed_mean:0.34", "adaptive_clip"]
    assert liars.strategies[-1].coordinator["replication"] == "adaptive"


def test_cli_writes_results_csvs_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CROWDTRAIN_CACHE", str(tmp_path / "cache"))
    archive = write_image_folder(tmp_path / "data", n_train_per_class=12, n_test_per_class=4)
    path = scenario_file(tmp_path, TINY.replace("train_images = 256", "train_images = 96")
                         .replace("shard_size = 32", "shard_size = 16").replace("eval_images = 64", "eval_images = 0"))
    out = tmp_path / "out"
    assert crowdtrain.main(["sim", str(path), "--data", str(archive), "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["fedavg", "async_sgd"]
    assert doc["data"]["train_images"] == 96 and doc["data"]["test_images"] == 40
    for label in ("fedavg", "async_sgd"):
        for kind in ("accuracy", "updates", "units"):
            assert (out / f"{label}.{kind}.csv").stat().st_size > 0
    header = (out / "fedavg.accuracy.csv").read_text().splitlines()[0]
    assert header == "sim_time_s,samples_applied,samples_computed,version,test_acc,test_loss"
    for png in ("accuracy_vs_time.png", "accuracy_vs_samples.png", "staleness_hist.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "async_sgd" in capsys.readouterr().out


def test_prefetch_asks_early_so_bases_are_staler(tmp_path, data):
    text = TINY.replace("local_steps = 2", "local_steps = 4")
    _, plain = simulate(tmp_path, text, data, "plain", only=["async_sgd"])
    text = text.replace("[workers]", "[workers]\nprefetch = true")
    _, early = simulate(tmp_path, text, data, "early", only=["async_sgd"])
    # each worker's next unit is cut before its own previous result is in: about +1 version
    assert early[0].summary["staleness_mean"] >= plain[0].summary["staleness_mean"] + 0.5
    assert early[0].summary["finished"] and early[0].summary["units_lost"] == 0
    # with churn, a leaving worker's prefetched unit goes with it (lost, or handed back) and comes back
    _, churn = simulate(tmp_path, text.replace("[coordinator]", CHURN + "[coordinator]"), data, "churn",
                        only=["async_sgd"])
    s = churn[0].summary
    assert s["finished"] and s["units_lost"] + s["units_handed_back"] > 0 and s["units_reissued"] > 0
    assert "in flight" not in {u["fate"] for u in churn[0].units if u["store_status"] != "leased"}


# --- lying workers ([liars]) -----------------------------------------------------------------------
LIARS = """
[liars]
fraction = 0.5
fault = ["sign_flip", "free_ride"]
"""
DEFENDED = """
[[strategies]]
name = "async_sgd"
label = "undefended"
params = { staleness = "polynomial" }
coordinator = { robust = "none" }
[[strategies]]
name = "async_sgd"
label = "replication"
params = { staleness = "polynomial" }
coordinator = { replication = "adaptive" }
"""


def liar_text(liars: str = LIARS) -> str:
    """TINY with ``liars`` and two runs: undefended, and replication + reputation + quarantine."""
    return TINY.split("[[strategies]]")[0].replace("epochs = 1.5", "epochs = 3") + liars + DEFENDED


def test_liars_are_quarantined_and_never_folded_after(tmp_path, data):
    doc, (undefended, defended) = simulate(tmp_path, liar_text(), data)
    # the same two liars (drawn from the seed, 2 of 4) with their faults in turn, in both runs
    assert undefended.summary["liars"] == defended.summary["liars"]
    assert sorted(defended.summary["liars"].values()) == ["free_ride", "sign_flip"]
    # undefended: nothing checks, their lies are folded and nobody is quarantined
    assert undefended.summary["liar_units_folded"] > 0
    assert set(undefended.summary["quarantined_after_units"].values()) == {None}
    assert undefended.summary["units_replica"] == 0 and undefended.summary["replication_overhead"] == 0
    s = defended.summary
    assert s["finished"] and s["samples_applied"] >= s["budget_samples"]
    for liar, units in s["quarantined_after_units"].items():
        assert units is not None and 1 <= units <= s["liar_units_sent"][liar], (liar, s)
    # a new worker's every result is held for a check, so nothing of theirs was folded, before or after
    assert s["liar_units_folded"] == s["liar_units_folded_after_quarantine"] == 0
    # the coordinator's own log agrees: every liar's result after its quarantine was dropped as such (or as
    # superseded: a replica whose check was decided without it), none folded
    for liar, at in s["quarantined_at_s"].items():
        mine = [u for u in defended.updates if u["worker_id"] == liar]
        assert all(u["applied_step"] is None for u in mine)
        # (``at`` is rounded to the microsecond: the result whose check quarantined it, judged as it came in
        # when its replica was in first, is accepted at that very instant)
        later = [u for u in mine if u["accepted"] > at + 1e-6]
        assert later and "quarantined" in {u["dropped"] for u in later}, later
        assert {u["dropped"] for u in later} <= {"quarantined", "superseded"}, later
    # replication cost: replicas computed by the workers, and the coordinator's own recomputations
    assert s["units_replica"] > 0 and s["checks"]["disagreed"] > 0 and s["coordinator_recomputed"] > 0
    assert s["replication_overhead"] == pytest.approx(
        (s["units_replica"] + s["coordinator_recomputed"]) / (s["units_computed"] + s["coordinator_recomputed"]),
        abs=1e-6)
    row = next(r for r in doc["comparison"] if r["label"] == "replication")
    assert json.loads(row["quarantined_after_units"]) == s["quarantined_after_units"]


def test_no_liars_by_default_and_the_same_fleet_with_them(tmp_path, data):
    _, clean = simulate(tmp_path, liar_text(""), data, "clean", only=["undefended"])
    _, lying = simulate(tmp_path, liar_text(), data, "lying", only=["undefended"])
    assert clean[0].summary["liars"] == {} and clean[0].summary["liar_units_folded"] == 0
    # the liars' draw is apart from the fleet's: the same units go to the same workers at the same times
    first = [(u["worker_id"], u["issued_s"]) for u in clean[0].units][:4]
    assert first == [(u["worker_id"], u["issued_s"]) for u in lying[0].units][:4]


@pytest.mark.parametrize("change, message", [
    (("fraction = 0.5", "fraction = 1.5"), "liars.fraction: expected a number in [0, 1], got 1.5 (a float)"),
    (('fault = ["sign_flip", "free_ride"]', 'fault = "lie"'),
     ('liars.fault: expected a fault (sign_flip, scale, noise, free_ride, label_flip, replay, a_little, band) or an '
      'array of them, got "lie" (a string)')),
    (('"free_ride"]', '"nan"]'), 'liars.fault[1]: expected a fault (sign_flip'),
    (('fault = ["sign_flip", "free_ride"]', "fault = []"), "liars.fault: expected a fault"),
    (("fraction = 0.5", "fraction = 0.5\ncolude = true"),
     "liars.colude: unknown key; expected one of fraction, fault, collude, z, window"),
    (("fraction = 0.5", 'fraction = 0.5\nz = "big"'), 'liars.z: expected "auto" or a number >= 0, got "big"'),
    (("fraction = 0.5", "fraction = 0.5\nwindow = 1"), "liars.window: expected an integer >= 2, got 1"),
    (("fraction = 0.5", "fraction = 0.5\ncollude = 1"), "liars.collude: expected true or false, got 1"),
    (('replication = "adaptive"', 'replicaton = "adaptive"'),
     "strategies[1].coordinator.replicaton: unknown key; expected one of"),
    (('replication = "adaptive"', 'replication = "always"'),
     'strategies[1].coordinator.replication: expected a string, one of off, adaptive, got "always"'),
    (('robust = "none"', 'robust = "krum"'), "strategies[0].coordinator.robust: expected none, adaptive_clip"),
])
def test_bad_liars_or_defence_is_one_line_naming_the_key(tmp_path, change, message, capsys):
    text = liar_text()
    assert change[0] in text
    assert_one_line_error(scenario_file(tmp_path, text.replace(*change, 1)), message, tmp_path, capsys)


def test_liars_sweep_and_override():
    import tomllib
    scenario = parse(tomllib.loads(liar_text() + '[sweep]\n"liars.fault" = ["noise", ["replay", "a_little"]]\n'))
    assert [p["liars.fault"] for p in scenario.points()] == [("noise",), ("replay", "a_little")]
    assert override(scenario, "liars.fraction=0")["liars.fraction"] == 0.0
    assert override(scenario, 'liars.fault="label_flip"')["liars.fault"] == ("label_flip",)
    assert scenario.strategies[1].coordinator == {"replication": "adaptive"}
    with pytest.raises(ScenarioError, match="liars.fraction: expected a number in"):
        override(scenario, "liars.fraction=2")


def test_version_deltas_rebuild_the_bases_of_warm_workers(tmp_path, data):
    # the default download: a virtual worker's later units come as version deltas from the version it
    # holds, rebuilt and hash-checked as worker_py does (engine._base raises on a mismatch)
    text = TINY.replace('version_download = "fp32"', 'version_download = "delta"')
    _, (run,) = simulate(tmp_path, text, data, only=["async_sgd"])
    assert run.summary["finished"]
    first, warm = {}, []
    for u in sorted(run.units, key=lambda u: u["issued_s"]):
        (warm if u["worker_id"] in first else []).append(u["model_bytes"])
        first.setdefault(u["worker_id"], u["model_bytes"])
    whole = max(first.values())   # the version as fp16
    assert warm and max(warm) < 0.3 * whole and min(first.values()) == whole, (first, warm)
