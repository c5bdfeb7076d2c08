"""The experiment drivers: sweep files, the local sweep runner, the report and the demo pipeline (tiny scale)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import yaml

from experiments import report
from experiments.compare import SCALES, is_done, once, prune_targets, run_comparison
from experiments.demo import run_pipeline
from experiments.sweep import expand_command, grid, run_sweep
from lightning_modules.cli import run

REPO = Path(__file__).resolve().parents[2]
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_a_completed_run_is_skipped_and_an_unfinished_one_starts_again(tmp_path):
    calls = []

    def work() -> dict:
        calls.append(1)
        (tmp_path / "run" / "checkpoint").mkdir(parents=True)
        return {"value": 3}

    assert once(tmp_path / "run", work)["value"] == 3 and is_done(tmp_path / "run")
    assert once(tmp_path / "run", work)["value"] == 3 and len(calls) == 1, "done: skipped, its record read back"
    (tmp_path / "cut" / "partial").mkdir(parents=True)  # a run cut short: no marker
    once(tmp_path / "cut", lambda: {})
    assert not (tmp_path / "cut" / "partial").exists() and is_done(tmp_path / "cut")


def test_every_seed_prunes_the_seeded_targets_and_the_first_seed_all_of_them():
    cpu = SCALES["wt2-cpu"]
    assert cpu.seeds == (0, 1, 2) and set(cpu.targets) >= {0.25, 0.43, 0.6}
    assert all(prune_targets(cpu, seed) == cpu.targets for seed in cpu.seeds), "every target from every seed"
    scale = dataclasses.replace(cpu, seeded_targets=(0.43,))
    assert prune_targets(scale, 0) == scale.targets
    assert prune_targets(scale, 1) == prune_targets(scale, 2) == (0.43,)


@pytest.mark.slow
def test_comparison_at_tiny_scale_runs_every_method_and_seed_and_resumes(tmp_path, wikitext2_dir, wt2_cache_dir,
                                                                         monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cpu = SCALES["wt2-cpu"]
    tiny = dataclasses.replace(cpu, dense_steps=12, prune_steps=6, val_every=6, targets=(0.25, 0.5), seeds=(0, 1),
                               seeded_targets=(0.5,), lrs=(0.001, 0.003), sweep_steps=4, score_batches=2,
                               args=["--trainer.limit_val_batches=2"])
    args = [*TINY, f"--data.data_dir={wikitext2_dir}", f"--data.cache_dir={wt2_cache_dir}",
            "--model.gate_lr_factor=300"]
    out = tmp_path / "cmp"
    runs = run_comparison(tiny, out, args, use_wandb=False, layer_types=("all_attention",), stages=("sweep", "dense"))
    assert runs == [] and sorted(p.name for p in out.iterdir()) == [
        "all_attention-dense-s0", "all_attention-dense-s1", "lr-sweep", "lr_sweep.csv"]
    with (out / "lr_sweep.csv").open() as f:
        sweep = list(csv.DictReader(f))
    assert [row["lr"] for row in sweep] == ["0.001", "0.003"] and [row["chosen"] for row in sweep].count("True") == 1
    dense_marker = (out / "all_attention-dense-s0" / "done.json").stat().st_mtime_ns
    (hparams,) = (out / "all_attention-dense-s0").glob("logs/version_*/hparams.yaml")
    assert "decay_steps: 10\n" in hparams.read_text(), "the cosine ends at 80% of the 12 steps, the rest holds"
    # an interrupted pruning run: its folder exists without a done marker, and is redone from scratch
    (out / "all_attention-random-50-s1" / "stale").mkdir(parents=True)
    capsys.readouterr()
    runs = run_comparison(tiny, out, args, use_wandb=False, layer_types=("all_attention",))
    assert "all_attention-dense-s0: done, skipped" in capsys.readouterr().out
    assert (out / "all_attention-dense-s0" / "done.json").stat().st_mtime_ns == dense_marker, "not run again"
    assert not (out / "all_attention-random-50-s1" / "stale").exists()

    by_name = {r.name: r for r in runs}
    pruned = {f"all_attention-{m}-{t}-s0" for m in ("gates", "random", "importance") for t in (25, 50)}
    pruned |= {f"all_attention-{m}-50-s1" for m in ("gates", "random", "importance")}
    assert set(by_name) == {"all_attention-dense-s0", "all_attention-dense-s1"} | pruned
    for name in pruned:
        r = by_name[name]
        assert r.heads == (6 if r.target_sparsity == 0.25 else 4), name
        assert r.steps == 18 and r.method in name and f"-s{r.seed}" in name
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"name", "layer_type", "method", "target_sparsity", "seed", "steps", "test_ppl", "params_non_embedding",
            "heads_per_layer"} <= set(rows[0])
    assert {row["method"] for row in rows} == {"dense", "gates", "random", "importance"}
    text = (out / "report.md").read_text()
    assert "| all_attention | gates | 50% | 2 |" in text, "the 50% point is summarised over both seeds"
    curve = report.validation_curve(out / "all_attention-dense-s0")
    assert [step for step, _ in curve] == [5, 11, 12], "the fit's validations, then the final model's at step 12"
    assert "| all_attention-dense-s0 | 12 |" in text
    for name in ("ppl_vs_params.png", "learning_curves.png", "head_map_all_attention-gates-50-s0.png"):
        assert (out / name).stat().st_size > 0

    # everything is done: a third call trains nothing and reports the same
    again = run_comparison(tiny, out, args, use_wandb=False, layer_types=("all_attention",))
    assert [(r.name, r.test_ppl) for r in again] == [(r.name, r.test_ppl) for r in runs]


@pytest.mark.slow
def test_comparison_jobs_run_the_layer_types_in_parallel_processes(tmp_path, wikitext2_dir, wt2_cache_dir):
    tiny = dataclasses.replace(SCALES["wt2-cpu"], lrs=(0.001, 0.003), sweep_steps=3,
                               args=["--trainer.limit_val_batches=2"])
    args = [*TINY, f"--data.data_dir={wikitext2_dir}", f"--data.cache_dir={wt2_cache_dir}"]
    out = tmp_path / "cmp"
    assert run_comparison(tiny, out, args, use_wandb=False, stages=("sweep",), jobs=2) == []
    with (out / "lr_sweep.csv").open() as f:
        sweep = list(csv.DictReader(f))
    assert sorted((row["layer_type"], row["lr"]) for row in sweep) == [
        (t, lr) for t in ("all_attention", "transformer_xl") for lr in ("0.001", "0.003")]
    assert all(is_done(out / "lr-sweep" / f"{t}-lr{lr:g}") for t in ("all_attention", "transformer_xl")
               for lr in tiny.lrs)
