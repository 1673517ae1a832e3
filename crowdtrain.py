"""The ``crowdtrain`` command: a thin dispatcher; each subcommand imports its module lazily."""
from __future__ import annotations

import sys

SUBCOMMANDS = {
    "train": ("models.train", "train one model on CIFAR-10 in this process"),
    "models": ("models.registry", "list the registered models with parameter counts"),
    "data": ("models.data", "check, decode and cache a CIFAR-10 copy (optionally download it)"),
    "coordinator": ("coordinator.main", "run a coordinator that hands out work units and aggregates deltas"),
    "run": ("coordinator.run", "the main job: a coordinator on CIFAR-10 plus local workers (prints the URL)"),
    "worker": ("worker_py.main", "run a headless worker that computes work units for a coordinator"),
    "sim": ("coordinator.sim.main", "simulate volunteer workers with churn on a simulated clock, compare strategies"),
    "export": ("coordinator.model_out", "take a model version out of a coordinator's state as .onnx or .pt"),
    "eval": ("models.export", "test accuracy of a .pt or .onnx model on the CIFAR-10 test split"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    return f"usage: crowdtrain <command> [options]\n\ncommands:\n{rows}\n\n`crowdtrain <command> --help` for options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"crowdtrain: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.cli(rest, prog=f"crowdtrain {name}", command=name) or 0)


if __name__ == "__main__":
    sys.exit(main())
