"""One configuration: CoordinatorConfig's fields make the checks, the flags, --help and the scenario keys."""
import argparse
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

import crowdtrain
from coordinator import config as C
from coordinator.config import CoordinatorConfig, OptionError, config_from_args
from coordinator.main import build_parser
from coordinator.run import build_parser as run_parser
from coordinator.sim.scenario import COORDINATOR_KEYS, MODEL_KEYS, SCHEMA, ScenarioError, parse

ROOT = Path(__file__).resolve().parents[1]

# A value other than the default for every field, as a flag's text and as the config holds it. A new field
# must be added here (test_every_field_round_trips checks the set).
VALUES = {
    "state": (["--state", "st"], Path("st")),
    "keep_versions": (["--keep-versions", "3"], 3),
    "persist_every_s": (["--persist-every-s", "2.5"], 2.5),
    "persist_every_versions": (["--persist-every-versions", "7"], 7),
    "unit_batch_scale": (["--unit-batch-scale", "0.5"], 0.5),
    "unit_seconds": (["--unit-seconds", "12"], 12.0),
    "unit_batch_workers": (["--no-unit-batch-workers"], False),
    "dynamic_steps": (["--dynamic-steps"], True),
    "flight_samples": (["--flight-samples", "8000"], 8000),
    "unit_momentum": (["--unit-momentum", "0.5"], 0.5),
    "unit_lr": (["--unit-lr", "recipe"], "recipe"),
    "model": (["--model", "cnn"], "cnn"),
    "strategy": (["--strategy", "fedbuff"], "fedbuff"),
    "strategy_params": (["--param", "buffer_size=3", "--param", "server_momentum=0.5"],
                        {"buffer_size": 3, "server_momentum": 0.5}),
    "robust": (["--robust", "trimmed_mean:0.25"], "trimmed_mean:0.25"),
    "lookahead": (["--lookahead", "on"], "on"),
    "version_download": (["--version-download", "fp16"], "fp16"),
    "job": (["--job", "j2"], "j2"),
    "seed": (["--seed", "7"], 7),
    "epochs": (["--epochs", "2.5"], 2.5),
    "data": (["--data", "/d"], "/d"),
    "download": (["--download"], True),
    "limit_train": (["--limit-train", "4000"], 4000),
    "shard_size": (["--shard-size", "500"], 500),
    "shards_per_unit": (["--shards-per-unit", "2"], 2),
    "local_steps": (["--local-steps", "8"], 8),
    "batch_size": (["--batch-size", "128"], 128),
    "lr": (["--lr", "0.05"], 0.05),
    "codec": (["--codec", "topk:0.1"], "topk:0.1"),
    "lease_min_s": (["--lease-min", "2"], 2.0),
    "lease_max_s": (["--lease-max", "600"], 600.0),
    "lease_first_s": (["--lease-first", "4"], 4.0),
    "lease_factor": (["--lease-factor", "2.5"], 2.5),
    "late_results": (["--late-results", "drop"], "drop"),
    "max_staleness": (["--max-staleness", "none"], None),
    "stale_median": (["--stale-median", "2.5"], 2.5),
    "stale_floor": (["--stale-floor", "4"], 4),
    "on_stale": (["--on-stale", "drop"], "drop"),
    "max_delta_norm": (["--max-delta-norm", "5"], 5.0),
    "on_large_norm": (["--on-large-norm", "clip"], "clip"),
    "body_slack_bytes": (["--body-slack-bytes", "4096"], 4096),
    "replication": (["--replication", "off"], "off"),
    "replica_wait_s": (["--replica-wait", "30"], 30.0),
    "check_max_steps": (["--check-max-steps", "12"], 12),
    "eval_every_s": (["--eval-every", "2"], 2.0),
    "eval_images": (["--eval-images", "2000"], 2000),
    "host": (["--host", "0.0.0.0"], "0.0.0.0"),
    "port": (["--port", "0"], 0),
    "unit_rate_worker": (["--unit-rate-worker", "none"], None),
    "unit_rate_address": (["--unit-rate-address", "60"], 60.0),
    "worker_tokens": (["--worker-tokens", "tokens.txt"], Path("tokens.txt")),
    "trusted_tokens": (["--trusted-tokens", "own.txt"], Path("own.txt")),
    "admin_token_file": (["--admin-token-file", "admin.txt"], Path("admin.txt")),
    "access_log": (["--access-log", "json"], "json"),
    "browser_graph": (["--browser-graph", "on-demand"], "on-demand"),
}


def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_every_field_has_one_flag_with_help_and_its_default():
    parser = build_parser("crowdtrain coordinator")
    by_dest = actions(parser)
    help_text = flat(parser.format_help())
    for f in dataclasses.fields(CoordinatorConfig):
        action = by_dest[f.name]
        assert C.flag_of(f.name) in action.option_strings
        assert f.metadata["help"] and f.metadata["group"] in C.GROUPS
        shown = C.shown_default(f.name)
        assert action.help.endswith(f"(default: {shown})"), (f.name, action.help)
        assert flat(f"{f.metadata['help']} (default: {shown})") in help_text, f.name
    for title in C.GROUPS.values():
        assert title in help_text
    assert "--max-staleness N versions a result's base may be behind the current model (default: 64; none: no cap)" \
        in help_text
    assert "--epochs X sample budget, in passes over the training split (default: none, the model's recipe)" \
        in help_text
    assert "(default: ./state)" in help_text and "--threads" in help_text


def test_run_builds_on_the_same_flags_and_states_its_state_default():
    run, coordinator = actions(run_parser("crowdtrain run")), actions(build_parser("crowdtrain coordinator"))
    assert set(coordinator) <= set(run) and {"workers", "worker_threads"} <= set(run)
    assert run["state"].default is None and run["state"].help.endswith("(default: runs/job-<time>)")
    assert "runs/job-<time>" in flat(run_parser("crowdtrain run").format_help())


def test_every_field_round_trips_through_its_flag():
    assert set(VALUES) == set(C.FIELDS), "a field without a round-trip case"
    argv = [word for flags, _ in VALUES.values() for word in flags]
    config = config_from_args(build_parser("x").parse_args(argv))
    for name, (_, value) in VALUES.items():
        assert getattr(config, name) == value, name
        assert getattr(config, name) != getattr(CoordinatorConfig(state=Path("s")), name) or name == "state", name


def test_defaults_without_flags_are_the_dataclass_defaults():
    config = config_from_args(build_parser("x").parse_args([]))
    assert config == CoordinatorConfig(state=Path("state"))
    assert (config.on_stale, config.on_large_norm, config.max_staleness) == ("refuse", "refuse", 64)


def test_existing_spellings_keep_working():
    # as tests/test_e2e.py, tests/test_browser.py, bench/churn_real.py and bench/async_vs_sync.py write them
    argv = ["--data", "d", "--model", "cnn", "--limit-train", "4000", "--shard-size", "500", "--batch-size", "128",
            "--local-steps", "8", "--eval-images", "2000", "--eval-every", "2", "--epochs", "5", "--lease-first", "4",
            "--lease-min", "2", "--strategy", "fedbuff", "--param", "buffer_size=3", "--max-staleness", "1000",
            "--max-delta-norm", "10000.0", "--late-results", "use", "--state", "s", "--host", "127.0.0.1",
            "--port", "8081", "--threads", "2", "--seed", "0", "--lr", "0.1", "--shards-per-unit", "1",
            "--codec", "fp16"]
    args = build_parser("x").parse_args(argv)
    config = config_from_args(args)
    assert args.threads == 2
    assert (config.lease_first_s, config.lease_min_s, config.eval_every_s) == (4.0, 2.0, 2.0)
    assert config.max_staleness == 1000
    assert config.strategy_params == {"buffer_size": 3} and config.state == Path("s") and config.port == 8081


@pytest.mark.parametrize("changes, message", [
    ({"keep_versions": 0}, "coordinator option 'keep_versions': expected an integer >= 1, got 0"),
    ({"lr": -1}, "coordinator option 'lr': expected a number > 0 or none, got -1"),
    ({"max_staleness": -2}, "coordinator option 'max_staleness': expected an integer >= 0 or none, got -2"),
    ({"seed": True}, "coordinator option 'seed': expected an integer >= 0, got True"),
    ({"port": 70000}, "coordinator option 'port': expected an integer in [0, 65535], got 70000"),
    ({"on_stale": "keep"}, "coordinator option 'on_stale': expected a string, one of refuse, drop, got 'keep'"),
    ({"on_large_norm": "scale"}, "coordinator option 'on_large_norm': expected a string, one of refuse, clip"),
    ({"late_results": "late"}, "coordinator option 'late_results': expected a string, one of use, drop"),
    ({"codec": "zip"}, "coordinator option 'codec': expected a codec: fp32, fp16, int8 or topk:<fraction>"),
    ({"model": "vgg"}, "coordinator option 'model': expected a string, one of cnn,"),
    ({"strategy": "fedprox"}, "coordinator option 'strategy': expected a string, one of fedavg,"),
    ({"lease_min_s": 30, "lease_max_s": 10},
     "coordinator option 'lease_max_s': expected a number >= lease_min_s (30)"),
    ({"eval_every_s": float("nan")}, "coordinator option 'eval_every_s': expected a number > 0, got nan"),
    ({"strategy_params": {"max_norm": 1.0}}, ("coordinator option 'strategy_params': expected no 'max_norm' "
                                              "(a coordinator policy: --on-large-norm clip with --max-delta-norm N")),
    ({"strategy_params": {"max_staleness": 3}}, ("expected no 'max_staleness' (a coordinator policy: --on-stale drop "
                                                 "with --max-staleness N")),
])
def test_bad_values_are_a_clear_value_error(changes, message):
    with pytest.raises(ValueError) as e:
        CoordinatorConfig(state=Path("s"), **changes)
    assert isinstance(e.value, OptionError) and message in str(e.value), str(e.value)


def test_numbers_are_normalised():
    config = CoordinatorConfig(state="s", lease_min_s=5, max_delta_norm=3)
    assert config.state == Path("s") and isinstance(config.lease_min_s, float) and config.max_delta_norm == 3.0


@pytest.mark.parametrize("argv, message", [
    (["--max-staleness", "-1"], "error: argument --max-staleness: expected an integer >= 0 or none, got -1"),
    (["--param", "max_norm=1"], ("error: argument --param: expected no 'max_norm' (a coordinator policy: "
                                 "--on-large-norm clip with --max-delta-norm N")),
    (["--param", "max_staleness=5"], "--on-stale drop with --max-staleness N"),
    (["--on-stale", "later"], "error: argument --on-stale: expected a string, one of refuse, drop, got 'later'"),
    (["--lease-min", "60", "--lease-max", "30"], "argument --lease-max: expected a number >= lease_min_s (60)"),
])
def test_cli_bad_value_is_one_error_line_and_exit_2(tmp_path, argv, message, capsys):
    assert crowdtrain.main(["coordinator", "--state", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --") and message in err, err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, message", [
    (["--port", "http"], "error: argument --port: expected an integer in [0, 65535], got 'http'"),
    (["--lr", "fast"], "error: argument --lr: expected a number > 0 or none, got 'fast'"),
    (["--param", "buffer_size"], "error: argument --param: expected name=value, got 'buffer_size'"),
    (["--max-stale", "3", "--bogus"], "error: unrecognized arguments: --bogus"),
])
def test_cli_unparsable_value_is_one_error_line_and_exit_2(argv, message, capsys):
    for command in ("coordinator", "run"):
        with pytest.raises(SystemExit) as e:
            crowdtrain.main([command, *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err


def test_scenario_coordinator_section_is_the_configs():
    assert {"max_staleness", "stale_median", "stale_floor", "on_stale", "max_delta_norm", "on_large_norm",
            "late_results", "lease_min_s", "lease_max_s", "lease_first_s", "lease_factor", "keep_versions",
            "persist_every_s", "persist_every_versions", "body_slack_bytes", "replication", "replica_wait_s",
            "check_max_steps", "robust", "version_download", "unit_batch_scale", "unit_lr", "dynamic_steps",
            "flight_samples", "unit_momentum", "lookahead"}\
        == set(COORDINATOR_KEYS)
    for name in COORDINATOR_KEYS:
        assert SCHEMA["coordinator"][name].default == C.FIELDS[name].default
        assert SCHEMA["coordinator"][name].help.startswith(C.FIELDS[name].metadata["help"])
    for key, name in MODEL_KEYS.items():
        assert name in C.FIELDS and SCHEMA["model"][key].help.startswith(C.FIELDS[name].metadata["help"])


TOML = """
[model]
name = "cnn"
[coordinator]
{coordinator}
[[strategies]]
name = "fedbuff"
params = {{ {params} }}
"""


@pytest.mark.parametrize("coordinator, params, message", [
    ('on_stale = "later"', "", 'coordinator.on_stale: expected a string, one of refuse, drop, got "later"'),
    ("max_staleness = -1", "", 'coordinator.max_staleness: expected an integer >= 0 or "none", got -1 (an integer)'),
    ("body_slack_bytes = 0", "", "coordinator.body_slack_bytes: expected an integer >= 1, got 0 (an integer)"),
    ("lease_min_s = 60\nlease_max_s = 30", "", "coordinator.lease_max_s: expected a number >= lease_min_s (60)"),
    ("", "max_norm = 1.0", ('strategies[0].params.max_norm: a coordinator policy, not a strategy parameter: '
                            'set coordinator.on_large_norm = "clip" and coordinator.max_delta_norm')),
    ("", "max_staleness = 2", ('strategies[0].params.max_staleness: a coordinator policy, not a strategy '
                               'parameter: set coordinator.on_stale = "drop" and coordinator.max_staleness')),
])
def test_scenario_checks_come_from_the_config(coordinator, params, message):
    with pytest.raises(ScenarioError) as e:
        parse(tomllib.loads(TOML.format(coordinator=coordinator, params=params)))
    assert message in str(e.value), str(e.value)


def test_scenario_policies_and_no_cap():
    doc = tomllib.loads(TOML.format(coordinator='on_stale = "drop"\non_large_norm = "clip"\nmax_staleness = "none"',
                                    params="buffer_size = 2"))
    values = parse(doc).values["coordinator"]
    assert (values["on_stale"], values["on_large_norm"], values["max_staleness"]) == ("drop", "clip", None)
    CoordinatorConfig(state=Path("s"), **values)     # the simulator builds its config from these keys


def test_docs_list_every_scenario_coordinator_key():
    text = (ROOT / "docs" / "simulator.md").read_text()
    assert all(f"`{name}`" in text for name in COORDINATOR_KEYS)


def test_unit_batch_scale_is_an_eighth_of_resnet_fasts_batch_unless_a_batch_is_given():
    from coordinator.job import unit_recipe
    from models import registry

    recipe = registry.get("resnet_fast").recipe
    scaled = unit_recipe(recipe, CoordinatorConfig(state=Path("s")), "dense")
    assert (scaled.batch_size, scaled.lr) == (recipe.batch_size // 8, recipe.lr) == (64, 0.4)   # at the recipe's lr
    linear = unit_recipe(recipe, CoordinatorConfig(state=Path("s"), unit_lr="linear"), "dense")
    split = unit_recipe(recipe, CoordinatorConfig(state=Path("s"), unit_lr="split"), "dense")
    assert (split.batch_size, split.lr) == (recipe.batch_size // 8, recipe.lr)
    assert (linear.batch_size, linear.lr) == (recipe.batch_size // 8, recipe.lr / 8)
    assert unit_recipe(recipe, CoordinatorConfig(state=Path("s"), lr=1.0), "dense").lr == 1.0
    assert unit_recipe(recipe, CoordinatorConfig(state=Path("s"), lr=1.0, unit_lr="linear"), "dense").lr == 0.125
    half = unit_recipe(recipe, CoordinatorConfig(state=Path("s"), unit_batch_scale=0.5), "dense")
    assert (half.batch_size, half.lr) == (recipe.batch_size // 2, recipe.lr)
    given = unit_recipe(recipe, CoordinatorConfig(state=Path("s"), batch_size=64, lr=0.1), "dense")
    assert (given.batch_size, given.lr) == (64, 0.1)
    assert unit_recipe(recipe, CoordinatorConfig(state=Path("s"), unit_batch_scale=1.0), "dense") == recipe
    assert unit_recipe(recipe, CoordinatorConfig(state=Path("s")), "supermask") == recipe


def test_unit_batch_scale_is_the_models_own_unless_given():
    """Each model carries the unit share of its batch measured best for it (airbench a quarter: 2 real workers ended
    0.41 behind one process at 4 x 256 a unit, 2.27 at 8 x 128); ``--unit-batch-scale`` overrides it."""
    from coordinator.job import unit_recipe
    from models import registry

    spec = registry.get("airbench")
    assert spec.unit_batch_scale == 0.25 and registry.get("resnet_fast").unit_batch_scale == 0.125
    own = unit_recipe(spec.recipe, CoordinatorConfig(state=Path("s"), model="airbench"), "dense")
    assert (own.batch_size, own.lr) == (256, spec.recipe.lr)
    given = unit_recipe(spec.recipe, CoordinatorConfig(state=Path("s"), model="airbench", unit_batch_scale=0.125),
                        "dense")
    assert given.batch_size == 128
    with pytest.raises(ValueError, match="unit_batch_scale"):
        dataclasses.replace(spec, unit_batch_scale=0.0)
