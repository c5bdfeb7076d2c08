"""The HeadPruning callback under a real Trainer through the CLI: mid-run removal, target mode, checkpoints,
resume, the all-heads error and 2-process DDP (gloo) agreement."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import wandb
import yaml

from lightning_modules.cli import run
from lightning_modules.errors import UsageError
from lightning_modules.training.language_model import LanguageModel

REPO = Path(__file__).resolve().parents[2]
PRUNE_RECIPE = REPO / "experiments" / "wt2" / "all_attention_small_prune.yaml"


def prune_args(wikitext2_dir: Path, cache: Path, root: Path, layer_type: str = "all_attention",
               checkpoint: dict | None = None, **pruning) -> list[str]:
    """The WikiText-2 pruning recipe shrunk to 2 layers x 4 heads, with fast gates and the given callback args
    (and ModelCheckpoint args in ``checkpoint``)."""
    callback = {"target_sparsity": 0.5, "warmup_steps": 20, "lagrangian_lr": 0.1, "prune_every_n_steps": 5,
                "prune_on_validation": False, "prune_after_step": 20} | pruning
    if "l0_coefficient" in pruning:
        callback["target_sparsity"] = None  # the recipe's value would be merged in otherwise
    overlay = {"trainer": {"callbacks": [
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": 10, "save_top_k": -1, "filename": "step{step}",
                       "auto_insert_metric_name": False} | (checkpoint or {})},
        {"class_path": "callbacks.head_pruning.HeadPruning", "init_args": callback},
    ]}}
    overlay_path = root / "overlay.yaml"
    root.mkdir(parents=True, exist_ok=True)
    overlay_path.write_text(yaml.safe_dump(overlay))
    m = "--model.model.init_args."
    return [
        f"--config={PRUNE_RECIPE}", f"--config={overlay_path}",
        f"--data.data_dir={wikitext2_dir}", f"--data.cache_dir={cache}", "--data.batch_size=4", "--data.tgt_len=16",
        f"{m}layer_type={layer_type}", f"{m}n_layers=2", f"{m}d_model=32", f"{m}n_heads=4", f"{m}d_head=8",
        f"{m}n_persistent=32", f"{m}d_inner=64", f"{m}tgt_len=16", f"{m}mem_len=16",
        "--model.optimizer.init_args.lr=0.001", "--model.gate_lr_factor=100",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.max_steps=60",
        "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=20",
        "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
        "--trainer.num_sanity_val_steps=0", "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        f"--trainer.logger.save_dir={root}", f"--trainer.default_root_dir={root}",
    ]


def logged(root: Path, name: str) -> list[float]:
    """Every logged value of metric ``name`` in the CSV log under ``root``."""
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    with path.open() as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.mark.parametrize("layer_type", ["all_attention", "transformer_xl"])
def test_target_mode_removes_heads_mid_run_and_ends_at_the_target(wikitext2_dir, wt2_cache_dir, tmp_path,
                                                                   layer_type):
    cli = run(["fit", *prune_args(wikitext2_dir, wt2_cache_dir, tmp_path, layer_type)])
    model = cli.model.model
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "HeadPruning")
    assert sum(model.heads_per_layer) == 4, "half of the 8 heads removed"
    removed = logged(tmp_path, "prune/removed")
    assert removed[-5] > 0 and max(removed) <= 0.5, "heads go while training goes on, never beyond the target"
    decided = logged(tmp_path, "prune/sparsity")  # the gates' own decision, before the final rounding
    assert abs(decided[-1] - 0.5) <= 0.125 + 1e-9, f"the controller brings the gates within a head: {decided}"
    assert callback.rounded_decisions <= 1, "the final rounding changes at most one head's decision"
    assert all(torch.isfinite(torch.tensor(logged(tmp_path, "train/loss"))))
    (head_map,) = tmp_path.glob("lightning_logs/version_*/head_map.csv")
    with head_map.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 8, "one row per original head at each of the 3 validations and at the end of fit"
    assert sum(row["state"] == "removed" for row in rows[-8:]) == 4
    assert {row["state"] for row in rows} <= {"open", "shut", "removed"}

    pruned = Path(cli.trainer.checkpoint_callback.dirpath) / "pruned.ckpt"
    reloaded = LanguageModel.load_from_checkpoint(pruned)
    assert reloaded.model.heads_per_layer == model.heads_per_layer
    assert reloaded.model.head_ids == model.head_ids
    x = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(reloaded.model.eval()(x).log_probs, model.eval()(x).log_probs)
    # the plain recipe (no callback) tests the pruned checkpoint: the fresh model is shrunk before loading
    plain = [a for a in prune_args(wikitext2_dir, wt2_cache_dir, tmp_path / "test", layer_type)
             if "overlay" not in a]
    test = run(["test", *plain, f"--ckpt_path={pruned}"])
    assert test.model.model.heads_per_layer == model.heads_per_layer
    assert torch.isfinite(test.trainer.callback_metrics["test/ppl"])


def test_a_checkpoint_saved_after_a_removal_resumes_with_its_layout_and_state(wikitext2_dir, wt2_cache_dir,
                                                                               tmp_path):
    first = run(["fit", *prune_args(wikitext2_dir, wt2_cache_dir, tmp_path / "a"), "--trainer.max_steps=50",
                 "--trainer.callbacks.prune_every_n_steps=2"])
    step50 = Path(first.trainer.checkpoint_callback.dirpath) / "step50.ckpt"
    saved = torch.load(step50, weights_only=False)
    assert len(saved["headprune"]["head_ids"]) == 2
    assert sum(saved["headprune"]["heads_per_layer"]) < 8, "heads were removed before this checkpoint"
    lambdas = next(v for k, v in saved["callbacks"].items() if "HeadPruning" in k)

    resumed = run(["fit", *prune_args(wikitext2_dir, wt2_cache_dir, tmp_path / "b"), "--trainer.max_steps=54",
                   f"--ckpt_path={step50}"])
    callback = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "HeadPruning")
    assert resumed.trainer.global_step == 54
    assert callback.lambda_1 != lambdas["lambda_1"] or lambdas["lambda_1"] == 0  # restored, then moved on
    layout = resumed.model.model.heads_per_layer
    assert all(k <= n for k, n in zip(layout, saved["headprune"]["heads_per_layer"], strict=True))
    state_shapes = [s["exp_avg"].shape for s in resumed.trainer.optimizers[0].state.values() if "exp_avg" in s]
    param_shapes = {p.shape for p in resumed.model.parameters()}
    assert state_shapes and all(shape in param_shapes for shape in state_shapes)


def test_closing_every_head_of_the_model_stops_with_a_clear_error(wikitext2_dir, wt2_cache_dir, tmp_path):
    args = prune_args(wikitext2_dir, wt2_cache_dir, tmp_path, l0_coefficient=50.0, warmup_steps=0,
                      prune_after_step=0, prune_every_n_steps=2)
    with pytest.raises(UsageError, match="shut every remaining head"):
        run(["fit", *args, "--model.model.init_args.gate_init=0.01"])
    assert not list(tmp_path.rglob("pruned.ckpt"))


@pytest.mark.slow
def test_two_process_ddp_removes_the_same_heads_on_every_rank_mid_run(wikitext2_dir, wt2_cache_dir, tmp_path,
                                                                       headprune_script):
    record = tmp_path / "record"
    args = [*prune_args(wikitext2_dir, wt2_cache_dir, tmp_path, prune_on_validation=True),
            "--trainer.strategy=ddp", "--trainer.devices=2",
            "--trainer.max_steps=50", "--trainer.callbacks+=tests.helpers.LayoutRecorder",
            f"--trainer.callbacks.folder={record}"]
    env = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([str(headprune_script), "fit", *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["changes"] == ranks[1]["changes"], "every rank holds the same heads and the same weights"
    mid_run = [c for c in ranks[0]["changes"][1:] if c["step"] < 50]
    assert mid_run, f"heads must be removed while training goes on: {ranks[0]['changes']}"
    assert ranks[0]["finite"] and ranks[1]["finite"]
    assert len(ranks[0]["losses"]) == 50


def test_validation_sends_the_head_map_image_to_an_offline_wandb_run(wikitext2_dir, wt2_cache_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [a for a in prune_args(wikitext2_dir, wt2_cache_dir, tmp_path) if "logger" not in a]
    run(["fit", *args, "--trainer.max_steps=20", "--trainer.logger=pytorch_lightning.loggers.WandbLogger",
         f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.offline=true", "--trainer.logger.project=test"])
    images = list(tmp_path.glob("wandb/offline-run-*/files/media/images/prune/head_map_*.png"))
    assert len(images) == 2, "one head map per validation (step 20) and one at the end of fit"
    wandb.finish()


@pytest.mark.parametrize("gamma, zeta", [(-0.1, 1.1), (-0.2, 1.1), (-0.1, 1.05), (-0.3, 1.2)])
def test_rounding_to_the_target_opens_gates_for_any_stretch(gamma, zeta):
    """Opening a gate sets its log_alpha past the threshold, not onto it: for a non-default stretch the threshold,
    rounded to float32, can still read as shut, and every head would then be removed."""
    from callbacks.head_pruning import HeadPruning
    from lightning_modules.model import MemoryTransformerLM

    model = MemoryTransformerLM(vocab_size=50, n_layers=2, d_model=16, n_heads=4, d_head=4, n_persistent=8,
                                tgt_len=4, mem_len=4, cutoffs=[], gate_gamma=gamma, gate_zeta=zeta, max_len=16)
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.log_alpha.fill_(-5.0)  # every gate shut
    callback = HeadPruning(target_sparsity=0.5)
    callback._round_to_target(None, model)
    assert sum(int((~mask).sum()) for mask in model.head_keep_mask()) == 4
    assert callback.rounded_decisions == 4
