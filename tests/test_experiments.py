"""The experiment drivers: sweep files, the local sweep runner, the report and the demo pipeline (tiny scale)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from experiments import report
from experiments.compare import SCALES, Scale, run_comparison
from experiments.demo import run_pipeline
from experiments.sweep import expand_command, grid, run_sweep
from lightning_modules.cli import run

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted(REPO.glob("experiments/sweeps/*.yaml"))
M = "--model.model.init_args."
TINY = ["--data.batch_size=4", "--data.tgt_len=16", f"{M}n_layers=2", f"{M}d_model=32", f"{M}n_heads=4",
        f"{M}d_head=8", f"{M}n_persistent=32", f"{M}d_inner=64", f"{M}tgt_len=16", f"{M}mem_len=16",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.limit_test_batches=3"]


def test_grid_is_the_cartesian_product_of_values_with_fixed_values():
    points = grid({"a": {"values": [1, 2]}, "b": {"value": "x"}, "c": {"values": [0.1, 0.2, 0.3]}})
    assert len(points) == 6 and points[0] == {"a": 1, "b": "x", "c": 0.1} and points[-1]["c"] == 0.3
    with pytest.raises(ValueError, match="needs `values` or `value`"):
        grid({"a": {"distribution": "uniform", "min": 0, "max": 1}})


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.name)
def test_every_swept_parameter_is_a_valid_cli_override(sweep_file: Path, capsys):
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["method"] == "grid" and "${args}" in sweep["command"]
    points = grid(sweep["parameters"])
    for point in (points[0], points[-1]):
        command = expand_command(sweep["command"], "headprune", point)
        assert command[:2] == ["headprune", "fit"]
        with pytest.raises(SystemExit) as exit_info:
            run([*[part.replace("experiments/", f"{REPO}/experiments/", 1) for part in command[1:]],
                 "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        for name, value in point.items():
            node = printed
            for key in name.split("."):
                if isinstance(node, list):  # the callbacks list: the swept arguments are HeadPruning's
                    node = next(c["init_args"] for c in node if "HeadPruning" in c["class_path"])
                node = node[key]
            assert node == value, f"{name} did not reach the config"


def test_local_sweep_runner_runs_a_grid_offline_and_the_report_reads_it(tmp_path, wikitext2_dir, wt2_cache_dir,
                                                                        monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = {"program": "headprune", "name": "tiny", "method": "grid",
             "parameters": {"trainer.callbacks.target_sparsity": {"values": [0.25, 0.5]}},
             "command": ["${env}", "${program}", "fit", "--config",
                         "experiments/wt2/all_attention_small_prune.yaml", "${args}"]}
    sweep_file = tmp_path / "tiny.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))
    extra = [*TINY, f"--data.data_dir={wikitext2_dir}", f"--data.cache_dir={wt2_cache_dir}",
             "--trainer.max_steps=12", "--trainer.val_check_interval=12", "--trainer.limit_val_batches=2",
             "--trainer.callbacks.warmup_steps=4", "--trainer.callbacks.prune_after_step=4",
             "--model.gate_lr_factor=300"]
    runs = run_sweep(sweep_file, tmp_path / "runs", {}, extra)
    assert [r.name for r in runs] == ["all_attention-target_sparsity0.25", "all_attention-target_sparsity0.5"]
    assert [r.heads for r in runs] == [6, 4], "each run ends at its own target"
    assert list((tmp_path / "runs").glob("*/wandb/offline-run-*")), "runs are logged to wandb offline"
    # the report regenerates the same table from the runs' files alone
    again = report.generate(tmp_path / "runs", tmp_path / "again")
    assert [(r.name, r.test_ppl, r.heads) for r in again] == [(r.name, r.test_ppl, r.heads) for r in runs]
    with (tmp_path / "again" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["target_sparsity"] for row in rows] == ["0.25", "0.5"]
    assert (tmp_path / "again" / "ppl_vs_params.png").stat().st_size > 0


def test_demo_pipeline_at_tiny_scale(tmp_path, wikitext2_dir, wt2_cache_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    runs = run_pipeline(tmp_path / "demo", str(wikitext2_dir), target=0.5, dense_steps=30, prune_from_step=15,
                        extra_args=[*TINY, f"--data.cache_dir={wt2_cache_dir}", "--model.gate_lr_factor=300"],
                        limit_val_batches=2)
    dense, pruned = runs
    assert (dense.role, pruned.role) == ("dense", "pruned")
    assert dense.heads == 8 and pruned.heads == 4
    assert pruned.params_non_embedding < dense.params_non_embedding
    assert pruned.steps == dense.steps == 30
    text = (tmp_path / "demo" / "report.md").read_text()
    assert "| all_attention-dense |" in text and "| all_attention-pruned-50 |" in text
    for name in ("results.csv", "ppl_vs_params.png", "head_map_all_attention-pruned-50.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0


def test_comparison_at_tiny_scale_prunes_both_architectures(tmp_path, wikitext2_dir, wt2_cache_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cpu = SCALES["wt2-cpu"]
    tiny = Scale(dense=cpu.dense, prune=cpu.prune, dense_steps=20, prune_from_step=10, prune_steps=20,
                 targets=(0.5,), args=["--trainer.limit_val_batches=2"])
    runs = run_comparison(tiny, tmp_path / "cmp", [*TINY, f"--data.data_dir={wikitext2_dir}",
                                                   f"--data.cache_dir={wt2_cache_dir}", "--model.gate_lr_factor=300"],
                          use_wandb=False)
    by_name = {r.name: r for r in runs}
    assert set(by_name) == {"all_attention-dense", "all_attention-pruned-50", "transformer_xl-dense",
                            "transformer_xl-pruned-50"}
    assert by_name["all_attention-pruned-50"].heads == by_name["transformer_xl-pruned-50"].heads == 4
    aa_cut = 1 - (by_name["all_attention-pruned-50"].params_non_embedding
                  / by_name["all_attention-dense"].params_non_embedding)
    txl_cut = 1 - (by_name["transformer_xl-pruned-50"].params_non_embedding
                   / by_name["transformer_xl-dense"].params_non_embedding)
    assert aa_cut == pytest.approx(0.5, abs=0.01) and txl_cut < aa_cut, "All-attention shrinks with its heads"
