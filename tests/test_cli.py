"""The ``crowdtrain`` command line as help: every option of every subcommand states its default,
``--help``, ``models`` and ``strategies`` start without torch, ``--version``, the strategy docs."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import crowdtrain
from coordinator import strategy_docs
from coordinator.config import CoordinatorConfig
from coordinator.main import checks_line
from coordinator.strategies import STRATEGIES, make_strategy
from models import registry

ROOT = Path(__file__).resolve().parents[1]


def help_text(command: str, capsys) -> str:
    try:
        code = crowdtrain.main([command, "--help"])   # (`data` returns argparse's exit status)
    except SystemExit as e:
        code = e.code
    assert code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> list[str]:
    """Each option's entry (its flags and help, joined) of an argparse help text; positionals left out."""
    entries: list[str] = []
    section = ""
    for line in text.splitlines():
        if line and not line.startswith(" "):
            section = line
            continue
        if section.startswith("positional arguments"):
            continue
        if re.match(r"^  -", line):
            entries.append(line.strip())
        elif entries and re.match(r"^\s{3,}\S", line):
            entries[-1] += " " + line.strip()
    return [" ".join(e.split()) for e in entries]


@pytest.mark.parametrize("command", list(crowdtrain.SUBCOMMANDS))
def test_help_lists_a_default_for_every_option(command, capsys):
    entries = option_entries(help_text(command, capsys))
    assert entries, command
    for entry in entries:
        if entry.startswith("-h, --help"):
            continue
        assert "(default: " in entry or "(required)" in entry, f"{command}: {entry}"


def test_the_top_level_help_and_version(capsys):
    assert crowdtrain.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in crowdtrain.SUBCOMMANDS) and "--version" in out
    assert crowdtrain.main(["--version"]) == 0
    assert re.fullmatch(r"crowdtrain \d+\.\d+\.\d+\S* \(Python 3\.\d+\.\d+\)\n", capsys.readouterr().out)


def test_help_models_and_strategies_start_without_torch():
    code = ("import sys, crowdtrain\n"
            "for c in crowdtrain.SUBCOMMANDS:\n"
            "    try:\n"
            "        crowdtrain.main([c, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "for argv in (['models'], ['models', '--recipes'], ['strategies'], ['--version']):\n"
            "    assert crowdtrain.main(argv) == 0\n"
            "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'matplotlib') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_models_table_states_the_built_models_parameter_counts():
    for spec in registry.MODELS.values():
        assert registry.count_parameters(spec.build()) == spec.params, spec.name


def test_export_formats_are_the_exporters():
    from coordinator.export_cli import FORMATS
    from models.export import FORMATS as EXPORT_FORMATS

    assert FORMATS == EXPORT_FORMATS


def test_strategies_documents_every_parameter_with_its_default(capsys):
    assert crowdtrain.main(["strategies"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in STRATEGIES:
        assert f"{name}: " in out
        for param, default, about in strategy_docs.parameters(name):
            assert about, f"{name}.{param} has no explanation in coordinator/strategy_docs.PARAMS"
            assert f"--param {param}={strategy_docs._value(default)} {' '.join(about.split())}" in out, param
    assert "--on-stale drop --max-staleness N" in out
    assert crowdtrain.main(["strategies", "fedbuff"]) == 0
    assert "Defaults:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        crowdtrain.main(["strategies", "fedprox"])
    assert "unknown strategy 'fedprox'" in capsys.readouterr().err


def test_dashboard_settings_are_named_and_explained():
    strategy = make_strategy("async_sgd", staleness="polynomial", max_staleness=5)
    levels = strategy_docs.settings(strategy.describe())
    assert [level["name"] for level in levels] == ["staleness_cap", "async_sgd"]
    cap, inner = levels
    assert cap["about"].startswith("drops updates staler than") and cap["settings"][0]["key"] == "max_staleness"
    assert inner["about"].startswith("Asynchronous SGD") and "Dean et al." in inner["about"]
    keys = {row["key"]: row for row in inner["settings"]}
    assert keys["staleness"]["value"] == "polynomial" and keys["staleness_a"]["value"] == "0.5"
    assert "staleness_b" not in keys, "a setting that does not apply is left out"
    assert all(row["about"] for row in inner["settings"])
    state = {row["key"]: row for row in inner["state"]}
    assert "due" not in state and state["buffered"]["label"] == "waiting" and state["buffered"]["about"]


def test_the_start_banner_says_who_may_send_results_and_how_far_they_are_checked(tmp_path):
    """coordinator and run print ``checks_line``: by default (replication on) who may send and how checks go;
    with replication off an operator is told that results are folded unchecked and how to check them; the
    operator's own workers (--trusted-tokens) are said to be unchecked."""
    config = CoordinatorConfig(state=tmp_path)
    default = checks_line(config)
    assert default.startswith("checks: anyone who reaches this URL may send results; --replication adaptive: "
                              "another computation of the same unit must agree"), default
    assert "unchecked" not in default and "--trusted-tokens" not in default
    own = checks_line(dataclasses.replace(config, trusted_tokens=tmp_path / "own"))
    assert own.endswith("; the operator's own workers (--trusted-tokens) are not checked")
    off = checks_line(dataclasses.replace(config, replication="off"))
    assert off.startswith("checks: anyone who reaches this URL may send results, folded unchecked (adaptive_clip only)")
    assert "--replication adaptive" in off
    bare = checks_line(dataclasses.replace(config, replication="off", robust="none"))
    assert "folded unchecked (no robust aggregation)" in bare
    closed = checks_line(dataclasses.replace(config, replication="adaptive", robust="median",
                                             worker_tokens=tmp_path / "tokens"))
    assert closed.startswith("checks: workers with a token from --worker-tokens may send results; "
                             "--replication adaptive: another computation of the same unit must agree")
    assert "unchecked" not in closed
