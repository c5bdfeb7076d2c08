"""How the benchmarks print their figures (one JSON line each) and name the hardware they come from."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


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

