"""The two training stages every experiment is made of, each a `headprune fit` with its own run folder:
a dense run that also checkpoints the step pruning starts from, and a pruning run started from that checkpoint.
Both write ``run.json`` for the report and log to CSV (and wandb, unless turned off)."""

from __future__ import annotations

from pathlib import Path

from experiments import report
from experiments.runs import finish_wandb, loggers, write_overlay
from lightning_modules.cli import run


def fit_dense(folder: Path, recipe: Path, layer_type: str, steps: int, checkpoint_step: int, args: list[str],
              group: str, use_wandb: bool, project: str, val_every: int | None = None, name: str | None = None,
              role: str = "dense", **meta: object) -> Path:
    """Train ``steps`` steps; returns the checkpoint saved at ``checkpoint_step`` (``last.ckpt`` is the end).

    Validation runs every ``val_every`` steps (default ``checkpoint_step``). ``name``, ``role`` and ``meta``
    (e.g. ``seed``) are recorded in ``run.json`` for the report."""
    name = name or f"{layer_type}-dense"
    overlay = write_overlay(folder, {"trainer": {
        "max_steps": steps, "val_check_interval": val_every or checkpoint_step,
        "logger": loggers(folder, name, group, [layer_type, role], use_wandb, project),
        "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                       "init_args": {"dirpath": str(folder / "checkpoints"), "save_last": True, "save_top_k": -1,
                                     "every_n_train_steps": checkpoint_step, "filename": "step{step}",
                                     "auto_insert_metric_name": False, "monitor": None}}]}})
    report.write_run_file(folder, name=name, layer_type=layer_type, role=role, method="dense", steps=steps, **meta)
    run(["fit", f"--config={recipe}", f"--config={overlay}",
         f"--model.model.init_args.layer_type={layer_type}", *args])
    finish_wandb()
    return folder / "checkpoints" / f"step{checkpoint_step}.ckpt"


def pruning_callback(method: str, target: float, steps: int, seed: int = 0, score_batches: int = 50) -> dict:
    """The callback config that prunes to ``target`` in a run of ``steps`` steps.

    ``gates``: HeadPruning's hard-concrete gates, target ramp over the first 40%, shut heads removed every 10
    steps after it. ``random`` and ``importance``: HeadRemoval removes the heads at the start (chosen at random
    with ``seed``, or by importance scores over ``score_batches`` training batches) and the rest fine-tunes."""
    if method == "gates":
        warmup = max(1, int(0.4 * steps))
        return {"class_path": "callbacks.head_pruning.HeadPruning",
                "init_args": {"target_sparsity": target, "warmup_steps": warmup, "prune_every_n_steps": 10,
                              "prune_on_validation": False, "prune_after_step": warmup, "lagrangian_lr": 0.05,
                              "l0_coefficient": None}}
    if method in ("random", "importance"):
        return {"class_path": "callbacks.head_removal.HeadRemoval",
                "init_args": {"method": method, "target_sparsity": target, "seed": seed,
                              "score_batches": score_batches}}
    raise ValueError(f"unknown pruning method {method!r}; choose gates, random or importance")


def fit_pruned(folder: Path, recipe: Path, layer_type: str, start: Path, steps: int, total_steps: int,
               target: float, args: list[str], group: str, use_wandb: bool, project: str, method: str = "gates",
               name: str | None = None, seed: int = 0, score_batches: int = 50, **meta: object) -> Path:
    """Prune from checkpoint ``start`` to ``target`` in ``steps`` steps with ``method`` (see
    :func:`pruning_callback`); returns ``pruned.ckpt``. ``total_steps`` (dense + pruning) and ``meta`` are
    recorded for the report."""
    name = name or f"{layer_type}-pruned-{round(100 * target)}"
    overlay = write_overlay(folder, {"trainer": {
        "max_steps": steps, "val_check_interval": max(1, steps // 3),
        "logger": loggers(folder, name, group, [layer_type, "pruned", method, f"target-{target}"], use_wandb,
                          project),
        "callbacks": [
            {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(folder / "checkpoints"), "save_last": True, "filename": "step{step}",
                           "auto_insert_metric_name": False, "monitor": None}},
            pruning_callback(method, target, steps, seed, score_batches)]}})
    report.write_run_file(folder, name=name, layer_type=layer_type, role="pruned", method=method,
                          target_sparsity=target, steps=total_steps, seed=seed, **meta)
    run(["fit", f"--config={recipe}", f"--config={overlay}", f"--model.init_from={start}",
         f"--model.model.init_args.layer_type={layer_type}", *args])
    finish_wandb()
    return folder / "checkpoints" / "pruned.ckpt"
