"""Shared by the benchmark scripts: what hardware the figures come from, how they are printed, and the layer
stack run on its own."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from lightning_modules.model import MemoryTransformerLM


def hardware() -> str:
    """CPU model and the cores this process may use (plus the GPU when one is used)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def emit(workload: str, metric: str, value: float, unit: str, **extra: object) -> None:
    """Print one figure as a JSON line."""
    print(json.dumps({"workload": workload, "metric": metric, "value": value, "unit": unit, **extra,
                      "hardware": hardware()}), flush=True)


def run_stack(model: MemoryTransformerLM, h: torch.Tensor, memory: list[torch.Tensor]) -> torch.Tensor:
    """The layer stack alone over input ``h`` [B, T, d], each layer over its memory, as the model's forward runs
    it (embedding and adaptive softmax left out: pruning does not change them)."""
    pos_emb = model.pos_table[-(memory[0].size(1) + h.size(1)):]
    for layer, mem in zip(model.layers, memory, strict=False):
        h = layer(h, mem, pos_emb)
    return h
