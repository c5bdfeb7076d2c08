"""The headprune CLI on the real WikiText-2 recipe, shrunk by dotted overrides: fit, test, and 2-process DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lightning_modules.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "experiments" / "wt2" / "all_attention_small.yaml"


def tiny_args(wikitext2_dir: Path, cache: Path, root: Path, layer_type: str = "all_attention") -> list[str]:
    return [
        f"--config={RECIPE}",
        f"--data.data_dir={wikitext2_dir}", f"--data.cache_dir={cache}", "--data.batch_size=4", "--data.tgt_len=16",
        f"--model.model.init_args.layer_type={layer_type}", "--model.model.init_args.n_layers=1",
        "--model.model.init_args.d_model=32", "--model.model.init_args.n_heads=2", "--model.model.init_args.d_head=16",
        "--model.model.init_args.n_persistent=32", "--model.model.init_args.d_inner=64",
        "--model.model.init_args.tgt_len=16", "--model.model.init_args.mem_len=16",
        "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=3", "--trainer.limit_test_batches=3", f"--trainer.default_root_dir={root}",
    ]


@pytest.mark.parametrize("layer_type", ["all_attention", "transformer_xl"])
def test_fit_then_test_from_the_cli(wikitext2_dir: Path, wt2_cache_dir: Path, tmp_path: Path, layer_type: str):
    args = tiny_args(wikitext2_dir, wt2_cache_dir, tmp_path, layer_type)
    fit = main(["fit", *args, "--trainer.max_steps=4", "--trainer.val_check_interval=4"])
    assert fit.model.model.vocab_size == 33278, "the vocabulary size is linked from the data"
    val_ppl = float(fit.trainer.callback_metrics["val/ppl"])
    assert math.isfinite(val_ppl) and 1 < val_ppl < 2 * 33278
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "fit saves a checkpoint"
    test = main(["test", *args, f"--ckpt_path={checkpoints[-1]}"])
    test_ppl = float(test.trainer.callback_metrics["test/ppl"])
    assert math.isfinite(test_ppl) and 1 < test_ppl < 2 * 33278


def test_two_process_ddp_fit_on_cpu(wikitext2_dir: Path, wt2_cache_dir: Path, tmp_path: Path):
    args = tiny_args(wikitext2_dir, wt2_cache_dir, tmp_path)
    fit = main(["fit", *args, "--trainer.strategy=ddp_spawn", "--trainer.devices=2", "--trainer.max_steps=3",
                "--trainer.val_check_interval=3", "--trainer.enable_checkpointing=false"])
    assert fit.trainer.world_size == 2
    assert math.isfinite(float(fit.trainer.callback_metrics["val/ppl"]))
