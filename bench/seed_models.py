"""The seeds' table, reproduced at one equal budget.

Claim under test (the "Physics-Driven AlexNet" paper): CIFAR-10 test accuracy CNN 70.02%,
AlexNet 78.39%, Physics-Driven AlexNet 88.64%. We train those three plus the thesis's
edge-popup models and our default net, every model for the same number of epochs with
its own registered recipe, several seeds each, on one machine, and report mean and spread
of the final test accuracy beside the claims, whatever it shows.

    python bench/seed_models.py --data ../shared/data --epochs 4 --seeds 0 1
    python bench/seed_models.py --data ../shared/data --epochs 30 --seeds 0 \
        --models alexnet physics_alexnet cnn --section seed_models_long
    # on a GPU machine, one process per run side by side, then one table from their results:
    python bench/seed_models.py --device cuda --epochs 50 --models cnn --seeds 0 --out W/cnn-s0 --no-docs
    python bench/seed_models.py --merge W/*/ --out bench/results/seed_models_gpu50 --section seed_models_gpu

Writes bench/out/seed_models-<date>/{config.json,results.json,<model>-s<seed>/...} and
replaces the seed-models section of docs/results.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import commit, hardware, shown, write_section  # noqa: E402
from models import registry  # noqa: E402
from models.data import load_cifar10  # noqa: E402
from models.train import describe_device, resolve_device, set_threads, train  # noqa: E402

MODELS = ["cnn", "alexnet", "physics_alexnet", "supermask_fc", "supermask_conv", "resnet_fast"]
CLAIMS = {"cnn": 70.02, "alexnet": 78.39, "physics_alexnet": 88.64}  # % test accuracy, paper's table


def command_line() -> str:
    """This invocation as a command to quote in the docs."""
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def summarise(runs: list[dict]) -> list[dict]:
    table = []
    for name in dict.fromkeys(r["model"] for r in runs):
        accs = [100 * r["test_acc"] for r in runs if r["model"] == name]
        secs = [r["seconds"] for r in runs if r["model"] == name]
        table.append({"model": name, "runs": len(accs), "mean_acc": statistics.mean(accs),
                      "std_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "min_acc": min(accs), "max_acc": max(accs), "mean_seconds": statistics.mean(secs),
                      "best_epoch_acc": statistics.mean(100 * max(r["epochs"]) for r in runs if r["model"] == name),
                      "claim": CLAIMS.get(name)})
    return table


def markdown(table: list[dict], cfg: dict) -> str:
    lines = [f"### Seed models at an equal budget of {cfg['epochs']} epochs ({cfg['date']})", "",
             f"- Budget: {cfg['epochs']} epochs of the 50,000 training images for every model, each with its "
             f"registered recipe (`crowdtrain models`; one-cycle or cosine schedule over those epochs); "
             f"seeds {', '.join(map(str, cfg['seeds']))}.",
             f"- Data: {cfg['data']} (the JPEG copy of CIFAR-10, quality 75; test split of 10,000).",
             f"- Hardware: {cfg['hardware']}; {cfg['threads']} torch thread{'s' if cfg['threads'] != 1 else ''}"
             + (f"; trained on {cfg['device']}" if cfg.get("device", "cpu") != "cpu" else "")
             + (f"; {cfg['side_by_side']} runs side by side on it" if cfg.get("side_by_side", 1) > 1 else "")
             + "; the machine was shared with other work during the run, so the seconds are indicative only "
             "(accuracies are not affected).",
             (f"- Commands: `{cfg['commands'][0]}` and likewise for each model and seed (one process each, side by "
              f"side), then `{cfg['commands'][1]}`; raw results in `{cfg['out']}`." if cfg.get("side_by_side", 1) > 1
              else f"- Command{'s' if len(cfg['commands']) > 1 else ''}: "
              f"{'; '.join(f'`{c}`' for c in cfg['commands'])}; raw results in `{cfg['out']}`."), "",
             "| model | params | test acc. mean (%) | spread (std; min-max) | best epoch, mean (%) | paper's claim (%) "
             "| s / run |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for row in table:
        claim = f"{row['claim']:.2f}" if row["claim"] is not None else "-"
        lines.append(f"| `{row['model']}` | {cfg['params'][row['model']]:,} | {row['mean_acc']:.2f} | "
                     f"{row['std_acc']:.2f}; {row['min_acc']:.2f}-{row['max_acc']:.2f} | {row['best_epoch_acc']:.2f} | "
                     f"{claim} | "
                     f"{row['mean_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="CIFAR-10 path (default $CROWDTRAIN_DATA)")
    p.add_argument("--epochs", type=int, default=4, help="the equal budget: epochs per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/results.md (a run among several)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                   help="train nothing: join the runs of these --out folders (same epochs) into --out's "
                        "results.json and the docs' table")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out's results.json (same epochs) and run only the missing "
                        "model x seed pairs: a long table can be built over several sittings")
    p.add_argument("--section", default="seed_models",
                   help="the docs section to replace (another name keeps a longer budget's table beside the 4-epoch one)")
    args = p.parse_args()
    if args.merge:
        if args.out is None:
            p.error("--merge: name the joined folder with --out")
        return merge(args)

    threads = set_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    data = load_cifar10(args.data)
    date = time.strftime("%Y-%m-%d")
    out = args.out or ROOT / "bench" / "out" / f"seed_models-{date}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"date": date, "epochs": args.epochs, "seeds": args.seeds, "models": args.models,
           "data": data.source, "data_digest": data.digest, "hardware": hardware(str(device)), "threads": threads,
           "device": describe_device(device),
           "command": command_line(),
           "out": shown(out),
           "params": {m: registry.count_parameters(registry.build(m))[0] for m in args.models},
           "recipes": {m: dataclasses.replace(registry.get(m).recipe, epochs=args.epochs).to_dict()
                       for m in args.models}}
    runs, earlier = [], []
    if args.resume and (out / "results.json").exists():
        before = json.loads((out / "results.json").read_text())
        if before["config"]["epochs"] != args.epochs:
            p.error(f"--resume: {out / 'results.json'} holds runs of {before['config']['epochs']} epochs, "
                    f"not {args.epochs}")
        runs = before["runs"]
        cfg["seeds"] = sorted(set(before["config"]["seeds"]) | set(args.seeds))
        cfg["models"] = list(dict.fromkeys(before["config"]["models"] + args.models))
        cfg["params"] = {**before["config"]["params"], **cfg["params"]}
        cfg["recipes"] = {**before["config"]["recipes"], **cfg["recipes"]}
        earlier = before["config"].get("commands", [before["config"]["command"]])
        print(f"resuming: {len(runs)} run(s) kept from {out / 'results.json'}", file=sys.stderr)
    done = {(r["model"], r["seed"]) for r in runs}
    trains = any((m, seed) not in done for seed in args.seeds for m in args.models)
    # a sitting that only writes the table is not one of its commands
    cfg["commands"] = earlier + [cfg["command"]] if trains or not earlier else earlier
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    for seed in args.seeds:          # seed-major order: a cut-short run still has every model once
        for name in args.models:
            if (name, seed) in done:
                continue
            recipe = dataclasses.replace(registry.get(name).recipe, epochs=args.epochs)
            t0 = time.perf_counter()
            result = train(name, data, recipe, out / f"{name}-s{seed}", seed=seed, progress=True,
                           eval_every_epoch=True, device=device)
            if result.interrupted:
                print("interrupted: results so far are in", out, file=sys.stderr)
                return 130
            last = result.rows[-1]
            runs.append({"model": name, "seed": seed, "test_acc": last["test_acc"], "test_loss": last["test_loss"],
                         "seconds": time.perf_counter() - t0, "epochs": [r["test_acc"] for r in result.rows],
                         "date": time.strftime("%Y-%m-%d"), "commit": commit()})
            print(f"{name} seed {seed}: {100 * last['test_acc']:.2f}% in {runs[-1]['seconds']:.0f} s", flush=True)
            (out / "results.json").write_text(json.dumps({"config": cfg, "runs": runs}, indent=2) + "\n")

    table = summarise(runs)
    (out / "results.json").write_text(json.dumps({"config": cfg, "runs": runs, "table": table}, indent=2) + "\n")
    section = markdown(table, cfg)
    if not args.no_docs:
        write_section(args.section, section, args.docs)
    print(section)
    return 0


def merge(args: argparse.Namespace) -> int:
    """``--merge``: the runs of several ``--out`` folders (one process each, side by side) as one table."""
    parts = []
    for folder in args.merge:
        path = folder / "results.json"
        if not path.is_file():
            print(f"error: --merge: {path} does not exist", file=sys.stderr)
            return 2
        parts.append(json.loads(path.read_text()))
    epochs = {part["config"]["epochs"] for part in parts}
    if len(epochs) != 1:
        print(f"error: --merge: the folders hold runs of different budgets ({sorted(epochs)} epochs)", file=sys.stderr)
        return 2
    cfg = dict(parts[0]["config"])
    runs = [run for part in parts for run in part["runs"]]
    cfg["models"] = list(dict.fromkeys(m for part in parts for m in part["config"]["models"]))
    cfg["seeds"] = sorted({run["seed"] for run in runs})
    cfg["params"] = {k: v for part in parts for k, v in part["config"]["params"].items()}
    cfg["recipes"] = {k: v for part in parts for k, v in part["config"]["recipes"].items()}
    commands = list(dict.fromkeys(c for part in parts for c in part["config"].get("commands", [])))
    # one process per run: their commands differ only in --models, --seeds and --out; the first stands for all
    cfg["commands"] = [commands[0], command_line()]
    cfg["side_by_side"] = len(parts)
    cfg["out"] = shown(args.out)
    runs.sort(key=lambda r: (r["seed"], cfg["models"].index(r["model"])))
    table = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"config": cfg, "runs": runs, "table": table}, indent=2) + "\n")
    section = markdown(table, cfg)
    if not args.no_docs:
        write_section(args.section, section, args.docs)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
