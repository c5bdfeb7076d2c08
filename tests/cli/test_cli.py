"""The headprune CLI on the real WikiText-2 recipe, shrunk by dotted overrides: fit, test, and 2-process DDP."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from lightning_modules.cli import run

REPO = Path(__file__).resolve().parents[2]
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
    fit = run(["fit", *args, "--trainer.max_steps=4", "--trainer.val_check_interval=4"])
    assert fit.model.model.vocab_size == 33278, "the vocabulary size is linked from the data"
    val_ppl = float(fit.trainer.callback_metrics["val/ppl"])
    assert math.isfinite(val_ppl) and 1 < val_ppl < 2 * 33278
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "fit saves a checkpoint"
    test = run(["test", *args, f"--ckpt_path={checkpoints[-1]}"])
    test_ppl = float(test.trainer.callback_metrics["test/ppl"])
    assert math.isfinite(test_ppl) and 1 < test_ppl < 2 * 33278


@pytest.mark.slow
def test_two_process_ddp_fit_on_cpu_aggregates_every_rank_once(wikitext2_dir: Path, wt2_cache_dir: Path,
                                                                 tmp_path: Path, headprune_script: Path):
    """Real `ddp` (separate processes, gloo), launched through the installed console script like a user would."""
    args = [*tiny_args(wikitext2_dir, wt2_cache_dir, tmp_path), "--trainer.strategy=ddp", "--trainer.devices=2",
            "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=pytorch_lightning.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    done = subprocess.run([str(headprune_script), "fit", *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    values = [row.split(",") for row in metrics[1:]]
    val_tokens = [float(row[header.index("val/tokens")]) for row in values if row[header.index("val/tokens")]]
    # 2 ranks x limit_val_batches 3 x batch 4 x tgt_len 16, every one scored (the start of the valid split)
    assert val_tokens == [2 * 3 * 4 * 16]
    val_ppl = [float(row[header.index("val/ppl")]) for row in values if row[header.index("val/ppl")]]
    assert len(val_ppl) == 1 and math.isfinite(val_ppl[0])


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in REPO.glob("experiments/wt*/*.yaml")))
def test_every_recipe_parses(recipe: str, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", f"--config={REPO / recipe}", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_modules.model.MemoryTransformerLM" in printed


def test_predict_continues_prompts_with_the_vocabulary(wikitext2_dir: Path, wt2_cache_dir: Path, tmp_path: Path):
    args = tiny_args(wikitext2_dir, wt2_cache_dir, tmp_path)
    cli = run(["predict", *args, "--data.predict_prompts=[\"The game was\", \"In 1996 ,\"]",
                "--model.max_new_tokens=5", "--model.temperature=0"])
    predictions = cli.trainer.predict_loop.predictions
    assert [p["prompt"] for p in predictions] == ["The game was", "In 1996 ,"]
    assert all(len(p["continuation"].replace("\n", " ").split()) <= 5 for p in predictions)
    assert all(p["continuation"].strip() for p in predictions)


@pytest.mark.slow
def test_console_script_exits_zero_on_success(headprune_script):
    done = subprocess.run([str(headprune_script), "fit", f"--config={RECIPE}", "--print_config"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "layer_type: all_attention" in done.stdout


def test_predict_from_a_checkpoint_takes_its_settings_from_the_command_line(wikitext2_dir: Path, wt2_cache_dir: Path,
                                                                         tmp_path: Path):
    """Lightning's CLI would overwrite the module's settings with those saved in the checkpoint (a temperature of 1
    from training); the command line must win, so greedy decoding stays greedy."""
    args = tiny_args(wikitext2_dir, wt2_cache_dir, tmp_path)
    run(["fit", *args, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    (checkpoint,) = sorted((tmp_path / "checkpoints").glob("*.ckpt"))[-1:]
    prompts = "--data.predict_prompts=[\"The game was\"]"
    continuations = []
    for _ in range(2):
        cli = run(["predict", *args, f"--ckpt_path={checkpoint}", prompts, "--model.max_new_tokens=8",
                   "--model.temperature=0", "--model.top_k=3"])
        assert (cli.model.temperature, cli.model.max_new_tokens, cli.model.top_k) == (0.0, 8, 3)
        continuations.append(cli.trainer.predict_loop.predictions[0]["continuation"])
    assert continuations[0] == continuations[1], "greedy decoding is deterministic"
