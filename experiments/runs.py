"""Helpers shared by the demo, the comparison and the sweep runner: logger configs, config overlays, testing a
run's final checkpoint into its folder."""

from __future__ import annotations

import os
from pathlib import Path

import wandb
import yaml

from lightning_modules.cli import run


def wandb_offline() -> bool:
    """Offline unless WANDB_MODE says online or an API key is configured (env or ~/.netrc)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode:
        return mode != "online"
    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    return not logged_in


def loggers(folder: Path, name: str, group: str, tags: list[str], use_wandb: bool,
            project: str = "headprune") -> list[dict]:
    """A CSV log in ``folder`` and, with ``use_wandb``, a wandb run named ``name`` in ``group`` with ``tags``."""
    result = [{"class_path": "pytorch_lightning.loggers.CSVLogger",
               "init_args": {"save_dir": str(folder), "name": "logs", "version": 0}}]
    if use_wandb:
        result.append({"class_path": "pytorch_lightning.loggers.WandbLogger",
                       "init_args": {"project": project, "name": name, "group": group, "tags": tags,
                                     "save_dir": str(folder), "offline": wandb_offline()}})
    return result


def write_overlay(folder: Path, config: dict, name: str = "overlay.yaml") -> Path:
    """A YAML config to layer over a recipe with a second ``--config``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def final_checkpoint(folder: Path) -> Path:
    """The model a run ended with: its ``pruned.ckpt`` if it pruned, else its ``last.ckpt``."""
    for name in ("pruned.ckpt", "last.ckpt"):
        found = sorted(folder.glob(f"**/{name}"))
        if found:
            return found[-1]
    raise FileNotFoundError(f"no pruned.ckpt or last.ckpt under {folder}: did the run finish?")


def evaluation_overlay(folder: Path, subcommand: str = "test") -> Path:
    """The config layered over a recipe to evaluate a run's model: no callbacks, CSV logs in ``folder/<subcommand>``
    (where the report reads them)."""
    return write_overlay(folder / subcommand, {"trainer": {
        "callbacks": [], "logger": [{"class_path": "pytorch_lightning.loggers.CSVLogger",
                                     "init_args": {"save_dir": str(folder / subcommand), "name": "logs"}}]}})


def evaluate_into(folder: Path, recipe: Path, checkpoint: Path, args: list[str], subcommand: str = "test") -> None:
    """``headprune test`` (or ``validate``) of ``checkpoint``, in this process, with its logs in
    ``folder/<subcommand>``."""
    run([subcommand, f"--config={recipe}", f"--config={evaluation_overlay(folder, subcommand)}",
         f"--ckpt_path={checkpoint}", *args])


def finish_wandb() -> None:
    """End the current wandb run, so the next stage starts its own."""
    wandb.finish()
