"""The ``crowdtrain`` command: a thin dispatcher; each subcommand imports its module lazily.

Every subcommand's module parses its arguments before it imports torch, so ``--help``, a bad
argument, ``models`` and ``strategies`` answer in well under a second (tests/test_cli.py).
"""
from __future__ import annotations

import sys

SUBCOMMANDS = {
    "run": ("coordinator.run", "the main job: a coordinator on CIFAR-10 plus local workers (prints the URL)"),
    "coordinator": ("coordinator.main", "run a coordinator that hands out work units and aggregates deltas"),
    "worker": ("worker_py.main", "run a headless worker that computes work units for a coordinator"),
    "train": ("models.cli", "train one model on CIFAR-10 in this process"),
    "models": ("models.registry", "list the registered models with parameter counts (--recipes: hyperparameters)"),
    "strategies": ("coordinator.strategy_docs", "the aggregation strategies and their --param names, with defaults"),
    "data": ("models.data", "check, decode and cache a CIFAR-10 copy (optionally download it)"),
    "sim": ("coordinator.sim.main", "simulate volunteer workers with churn on a simulated clock, compare strategies"),
    "jobs": ("coordinator.jobs_cli", "list, add, pause, resume, remove the jobs of a running coordinator (admin API)"),
    "export": ("coordinator.export_cli", "take a model version out of a coordinator's state as .onnx or .pt"),
    "eval": ("models.cli", "test accuracy of a .pt or .onnx model on the CIFAR-10 test split"),
}


def version() -> str:
    """``crowdtrain X.Y.Z`` from the installed distribution (else pyproject.toml), with Python's version."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        number = dist_version("crowdtrain")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent / "pyproject.toml"
        m = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        number = m.group(1) if m else "unknown"
    return f"crowdtrain {number} (Python {sys.version.split()[0]})"


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    return (f"usage: crowdtrain <command> [options]\n       crowdtrain --version\n\ncommands:\n{rows}\n\n"
            "`crowdtrain <command> --help` lists a command's options with their defaults.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"crowdtrain: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.cli(rest, prog=f"crowdtrain {name}", command=name) or 0)
    except BrokenPipeError:   # `crowdtrain models | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
