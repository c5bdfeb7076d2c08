"""Run a wandb sweep file's grid locally, without a wandb server: one offline run per grid point, then a test of
each run's final model and the report over all of them.

The sweep file is the one `wandb sweep` takes (``parameters`` with ``values``/``value``, and a ``command`` using
``${env}``, ``${program}`` and ``${args}``), so both routes run the same commands. Runs are named after what
varies (e.g. ``all_attention-target_sparsity0.43-lr0.001``), grouped by the sweep's name and tagged with the
architecture and each swept value.

    python -m experiments.sweep experiments/sweeps/wt2_target_sparsity.yaml --out runs/sweeps/wt2 \
        [--set model.init_from=PATH] [--limit N] [--no-test] [-- extra CLI overrides]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from experiments import report
from experiments.runs import evaluation_overlay, final_checkpoint, loggers, wandb_offline, write_overlay

REPO = Path(__file__).resolve().parents[1]


def grid(parameters: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of a sweep's parameters (``values`` lists and fixed ``value`` entries)."""
    names, choices = [], []
    for name, spec in parameters.items():
        if "values" in spec:
            choices.append(list(spec["values"]))
        elif "value" in spec:
            choices.append([spec["value"]])
        else:
            raise ValueError(f"sweep parameter {name!r} needs `values` or `value` (distributions need a wandb "
                             "server: run those with `wandb agent`)")
        names.append(name)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def cli_value(value: Any) -> str:
    """A value as LightningCLI parses it after ``--key=``."""
    if value is None:
        return "null"
    if isinstance(value, list | dict | bool):
        return json.dumps(value)
    return str(value)


def expand_command(command: list[str], program: str, point: dict[str, Any]) -> list[str]:
    """The sweep's command for one grid point, as a wandb agent would build it."""
    args = [f"--{name}={cli_value(value)}" for name, value in point.items()]
    expanded: list[str] = []
    for part in command:
        if part == "${env}":
            continue
        if part == "${program}":
            expanded.append(program)
        elif part == "${args}":
            expanded += args
        elif "${" in part:
            raise ValueError(f"sweep command macro {part!r} is not supported by the local runner")
        else:
            expanded.append(part)
    return expanded


def executable(name: str) -> str:
    """The console script ``name`` of this environment, else the one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"cannot find the {name!r} command; install the project (make install)")
    return found


def recipe_of(command: list[str]) -> Path:
    """The first ``--config`` file of a command."""
    for i, part in enumerate(command):
        if part == "--config" and i + 1 < len(command):
            return Path(command[i + 1])
        if part.startswith("--config="):
            return Path(part.split("=", 1)[1])
    raise ValueError("the sweep command has no --config recipe")


def run_name(layer_type: str, point: dict[str, Any], varying: list[str]) -> str:
    """A readable run name from the architecture, the swept values and the seed (when the sweep fixes one)."""
    parts = [layer_type] + [f"{name.rsplit('.', 1)[-1]}{point[name]}" for name in varying]
    if "seed_everything" in point and "seed_everything" not in varying:
        parts.append(f"s{point['seed_everything']}")
    return "-".join(parts).replace("/", "_")


def run_sweep(sweep_file: Path, out: Path, overrides: dict[str, Any], extra: list[str], limit: int | None = None,
              test: bool = True, use_wandb: bool = True) -> list[report.RunResult]:
    """Run every grid point of ``sweep_file`` (fixed ``overrides`` replace parameter values), test, report."""
    sweep = yaml.safe_load(sweep_file.read_text())
    parameters = dict(sweep["parameters"])
    for name, value in overrides.items():
        parameters[name] = {"value": value}
    varying = [name for name, spec in parameters.items() if len(spec.get("values", [])) > 1]
    points = grid(parameters)[:limit]
    program = executable(sweep.get("program", "headprune"))
    group = sweep.get("name", sweep_file.stem)
    env = os.environ | ({"WANDB_MODE": "offline"} if wandb_offline() else {})
    for i, point in enumerate(points, 1):
        command = expand_command(sweep["command"], program, point)
        recipe = recipe_of(command)
        config = yaml.safe_load((REPO / recipe if not recipe.is_absolute() else recipe).read_text())
        layer_type = point.get("model.model.init_args.layer_type",
                               config["model"]["model"]["init_args"]["layer_type"])
        name = run_name(layer_type, point, varying)
        folder = out / name
        pruning = any("HeadPruning" in c.get("class_path", "") for c in config["trainer"].get("callbacks", []))
        target = point.get("trainer.callbacks.target_sparsity")
        report.write_run_file(folder, name=name, layer_type=layer_type, role="pruned" if pruning else "dense",
                              target_sparsity=target, l0_coefficient=point.get("trainer.callbacks.l0_coefficient"),
                              sweep=group, point=point)
        tags = [layer_type, *(f"{n.rsplit('.', 1)[-1]}={point[n]}" for n in varying)]
        if "seed_everything" in point:
            tags.append(f"seed={point['seed_everything']}")
        overlay = write_overlay(folder, {"trainer": {"logger": loggers(folder, name, group, tags, use_wandb,
                                                                       sweep.get("project", "headprune"))}})
        full = [*command, f"--config={overlay}", f"--trainer.default_root_dir={folder}", *extra]
        print(f"[{i}/{len(points)}] {name}: {' '.join(full[1:])}", flush=True)
        done = subprocess.run(full, cwd=REPO, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"sweep run {name} failed with exit status {done.returncode}; its logs are in {folder}")
        if test:
            test_args = [a for a in extra if not a.startswith("--trainer.callbacks")]  # testing has no callbacks
            tested = subprocess.run([program, "test", f"--config={recipe}", f"--config={evaluation_overlay(folder)}",
                                     f"--ckpt_path={final_checkpoint(folder)}", *test_args], cwd=REPO, env=env)
            if tested.returncode != 0:
                raise RuntimeError(f"testing sweep run {name} failed with exit status {tested.returncode}")
    return report.generate(out) if test else []


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values parsed as YAML (numbers, null, lists)."""
    result = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set takes key=value; got {pair!r}")
        key, value = pair.split("=", 1)
        result[key] = yaml.safe_load(value)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a wandb sweep file (experiments/sweeps/*.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the report")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="fix a parameter (e.g. model.init_from=PATH)")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N grid points")
    parser.add_argument("--no-test", action="store_true", help="skip testing and the report")
    parser.add_argument("--no-wandb", action="store_true", help="CSV logs only")
    args, extra = parser.parse_known_args()
    runs = run_sweep(args.sweep, args.out, parse_overrides(args.set), [e for e in extra if e != "--"], args.limit,
                     test=not args.no_test, use_wandb=not args.no_wandb)
    if runs:
        print("\n" + report.markdown_table(runs))


if __name__ == "__main__":
    main()
