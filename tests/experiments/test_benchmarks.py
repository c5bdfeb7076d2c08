"""The benchmark scripts run end to end and print well-formed figures (never timed: figures vary by machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_benchmark(module: str, *args: str) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", f"experiments.benchmarks.{module}", *args], capture_output=True,
                            text=True, timeout=900, check=True, cwd=REPO)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for line in lines:
        assert {"workload", "metric", "value", "unit", "hardware"} <= line.keys()
    return lines


@pytest.mark.slow
def test_throughput_benchmark_prints_every_w1_figure(tmp_path):
    lines = run_benchmark("throughput", "--repeats", "1", "--data", str(tmp_path / "no-data"))
    metrics = {(line["metric"], line.get("layer_type"), line.get("heads_removed")) for line in lines}
    for layer_type in ("all_attention", "transformer_xl"):
        for metric in ("layer_stack_eval_efficiency", "layer_stack_train_efficiency", "eval_tokens_per_s",
                       "train_tokens_per_s"):
            assert (metric, layer_type, None) in metrics
        assert ("layer_stack_eval_speedup", layer_type, 0.75) in metrics
        assert ("model_eval_speedup", layer_type, 0.5) in metrics
        assert ("train_step_speedup_after_removal", layer_type, 0.5) in metrics
    assert all(line["value"] > 0 for line in lines)
    assert {line["tokens"] for line in lines} == {"Zipf(1) ids"}


@pytest.mark.slow
def test_pruning_speedup_benchmark_reports_ideal_ratios():
    lines = run_benchmark("pruning_speedup", "--layers", "1", "--batch", "1", "--repeats", "1", "--warmup", "0")
    params = {(line["layer_type"], line["heads_removed"]): line
              for line in lines if line["metric"] == "parameter_ratio"}
    assert params[("all_attention", 0.5)]["value"] == pytest.approx(2.0, abs=0.01)  # every layer weight is per head
    assert params[("transformer_xl", 0.5)]["value"] < 1.5  # its FFN is not


def test_the_cached_step_floor_counts_what_each_head_adds():
    from experiments.benchmarks.generation import cached_step_bytes
    from lightning_modules.model import MemoryTransformerLM

    d, H, D, N, M = 32, 4, 8, 16, 8
    model = MemoryTransformerLM(vocab_size=300, n_layers=2, d_model=d, n_heads=H, d_head=D, n_persistent=N,
                                d_inner=64, tgt_len=8, mem_len=M, cutoffs=[50, 150], div_value=2.0).eval()
    dense = cached_step_bytes(model, batch=1)
    model.prune_heads({0: [1], 1: [0, 2]})
    # per head: [W_q; W_k; W_v] rows, W_o columns, u and v', persistent K and V, cached keys/values, position rows
    per_head = 3 * D * d + d * D + 2 * D + 2 * N * D + M * 2 * D + (M + 1) * D
    assert dense - cached_step_bytes(model, batch=1) == 4 * 3 * per_head
    assert cached_step_bytes(model, batch=8) > cached_step_bytes(model, batch=1), "the cache grows with the batch"


def test_the_layer_stack_and_one_layer_repeated_run_the_same_number_of_layer_steps(monkeypatch):
    from experiments.benchmarks.generation import layer_stack_fns
    from lightning_modules.model import MemoryTransformerLM

    model = MemoryTransformerLM(vocab_size=300, n_layers=3, d_model=32, n_heads=4, d_head=8, n_persistent=16,
                                d_inner=64, tgt_len=8, mem_len=8, cutoffs=[50, 150], div_value=2.0).eval()
    calls = []
    for i, layer in enumerate(model.layers):
        def spy(h, ring, i=i, original=layer.forward_ring):
            calls.append(i)
            return original(h, ring)

        monkeypatch.setattr(layer, "forward_ring", spy)
    fns = layer_stack_fns(model)
    fns["stack"]()
    assert calls == [0, 1, 2]
    calls.clear()
    fns["one_layer_repeated"]()
    assert calls == [0, 0, 0]


@pytest.mark.slow
def test_the_comparison_against_a_revision_loads_that_commits_model_and_times_both():
    lines = run_benchmark("against_revision", "--rev", "HEAD", "--tokens", "4", "--repeats", "1")
    versions = {(line["version"], line["heads_removed"]) for line in lines if line["metric"] == "generate_ms_per_step"}
    assert versions == {(v, r) for v in ("working tree", "HEAD") for r in (0.0, 0.5)}
    assert {line["heads_removed"] for line in lines if line["metric"] == "generate_speedup_over_revision"} == {0.0, 0.5}


def test_the_comparison_against_a_revision_names_a_bad_revision_in_one_line():
    done = subprocess.run([sys.executable, "-m", "experiments.benchmarks.against_revision", "--rev", "no-such-rev"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"'no-such-rev' is not a commit of {REPO}: pass --rev a commit, tag "
                                                "or branch (git log lists them)"]
