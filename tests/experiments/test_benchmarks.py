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
