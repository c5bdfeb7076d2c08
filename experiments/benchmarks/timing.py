"""Timing helpers shared by the speed benchmarks: interleaved medians and the machine's matmul throughput."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | None) -> None:
    """Wait for queued GPU work, so wall time covers it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                        device: torch.device | None = None) -> dict[str, float]:
    """Median seconds of each function, timed in rounds (one call of each per round) so that slow drifts of a
    shared machine hit every candidate alike; ``warmup`` untimed rounds first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_probe(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048) -> tuple[Callable, int]:
    """A large square ``torch.mm`` and its FLOPs: the machine's matmul throughput, timed beside the model."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2 * size**3
