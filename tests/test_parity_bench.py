"""bench/parity.py's pure parts: strategy specs and the scenario it writes for `crowdtrain sim`.

The bench itself is not run here (its --quick smoke run takes minutes: three setups of real processes).
"""
from __future__ import annotations

import argparse
import math

import pytest

from bench.parity import Spec, parse_spec, scenario_toml, sim_scenario, unit_keys
from coordinator.config import CoordinatorConfig
from coordinator.job import Job
from coordinator.sim.scenario import load
from tests.helpers.cluster import ROOT


def args(**kw) -> argparse.Namespace:
    base = {"model": "resnet_fast", "train_images": 10_000, "epochs": 3, "test_images": 10_000, "sim_evals": 6,
            "sim_set": [], "seed": 0}
    return argparse.Namespace(**{**base, **kw})


def test_spec_parsing_and_fedavg_round_per_worker():
    spec = parse_spec("fedbuff:buffer_size=2,server_lr=0.5")
    assert (spec.name, spec.params, spec.label) == ("fedbuff", {"buffer_size": 2, "server_lr": 0.5},
                                                    "fedbuff:buffer_size=2,server_lr=0.5")
    assert parse_spec("fedavg").at(8) == {"clients_per_round": 8}
    assert parse_spec("fedavg:clients_per_round=3").at(8) == {"clients_per_round": 3}
    assert Spec("async_sgd", {"staleness": "polynomial"}, default=True).label.endswith("(default)")
    with pytest.raises(ValueError):
        parse_spec("fedbuff:no_such_param=1")


def test_units_match_the_coordinator_defaults(tmp_path):
    keys = unit_keys(args())
    job = Job(CoordinatorConfig(state=tmp_path, model="resnet_fast"))   # the recipe a default job's units get
    assert (keys["model.batch_size"], keys["model.lr"]) == (job.recipe.batch_size, job.recipe.lr)
    assert keys["model.shard_size"] == job.config.shard_size
    assert keys["model.local_steps"] == math.ceil(job.config.shard_size / job.recipe.batch_size)  # one pass


@pytest.mark.parametrize("scenario", ["mild_churn", "heavy_churn", "churn_real"])
def test_written_scenario_reads_back(tmp_path, scenario):
    specs = [Spec("async_sgd", {"staleness": "polynomial"}, default=True), parse_spec("fedavg")]
    sc = sim_scenario(args(sim_set=["workers.prefetch=true"]), ROOT / "scenarios" / f"{scenario}.toml", 32, specs)
    path = tmp_path / "s.toml"
    path.write_text(scenario_toml(sc.to_dict()))
    back = load(path)
    assert back.to_dict() == sc.to_dict()
    assert back["workers.count"] == 32 and back["budget.train_images"] == 10_000 and back["workers.prefetch"]
    assert [s.params for s in back.strategies] == [{"staleness": "polynomial"}, {"clients_per_round": 32}]


def test_the_kept_model_is_scored_with_its_recipes_test_time_augmentation(tmp_path):
    """A real run's kept model.pt is scored as one process's last evaluation is (airbench: level 2), so the two
    compare alike; a recipe without it (resnet_fast) gets no such number."""
    import torch

    from bench.parity import tta_accuracy
    from models import registry
    from models.data import load_cifar10
    from models.train import evaluate, save_checkpoint
    from tests.helpers.tiny_cifar import write_official_archive

    archive = write_official_archive(tmp_path / "data", n_train=20, n_test=200)
    torch.manual_seed(2)
    model = registry.build("airbench")
    registry.init_from_data(model, torch.from_numpy(load_cifar10(str(archive), progress=False).train_x))
    model.eval()
    save_checkpoint(tmp_path / "model.pt", model, {"model": "airbench"}, None)
    test = load_cifar10(str(archive), progress=False)
    want = evaluate(model, torch.from_numpy(test.test_x), torch.from_numpy(test.test_y), tta=2)[1]
    plain = evaluate(model, torch.from_numpy(test.test_x), torch.from_numpy(test.test_y))[1]
    assert want != plain, "the augmented views change some answers here: the check below tells them apart"
    got = tta_accuracy(args(model="airbench", test_images=200, threads=1), str(archive), tmp_path / "model.pt")
    assert got == want
    assert tta_accuracy(args(test_images=200, threads=1), str(archive), tmp_path / "model.pt") is None
    assert tta_accuracy(args(model="airbench", test_images=200, threads=1), str(archive), None) is None
