"""Effect of the opt-in ``torch.compile`` of the layers (``LanguageModel(compile=True)``) on workload W1.

For each layer type, an eager and a compiled copy of the same W1 model are timed side by side (interleaved
medians): the whole model's eval forward and training step, before and after an in-run removal of half the
heads of every layer (AdamW state sliced, as HeadPruning does). Also printed: the seconds the first compiled
calls take (compilation), and the recompilation after the removal, which ``prune_heads`` triggers by dropping
the graphs of the old shapes.

    python -m experiments.benchmarks.compile_effect [--repeats 9] [--threads 2] [--layer-types all_attention]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from experiments.benchmarks.options import apply_machine_options, machine_parser
from experiments.benchmarks.reporting import emit
from experiments.benchmarks.timing import interleaved_medians
from experiments.benchmarks.workloads import W1_NAME as WORKLOAD
from experiments.benchmarks.workloads import Workload, build, local_wikitext2, token_batch


def seconds(fn) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(layer_type: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, extra: dict) -> None:
    """Eager vs compiled, before and after the removal."""
    model = build(layer_type)
    eager = Workload(model, x, y)
    compiled_model = copy.deepcopy(model)
    compiled_model.compile_layers()
    compiled = Workload(compiled_model, x, y)  # its memory comes from a first (compiling) eval forward
    common = dict(layer_type=layer_type, **extra)
    emit(WORKLOAD, "compile_seconds_first_train_step", round(seconds(compiled.model_train), 2), "s", **common)
    for stage in ("dense", "after_removal"):
        if stage == "after_removal":
            eager.remove_heads(0.5)
            compiled.remove_heads(0.5)
            emit(WORKLOAD, "recompile_seconds_after_removal",
                 round(seconds(compiled.model_train) + seconds(compiled.model_eval), 2), "s", **common)
        t = interleaved_medians({"eager/eval": eager.model_eval, "compiled/eval": compiled.model_eval,
                                 "eager/train": eager.model_train, "compiled/train": compiled.model_train},
                                args.repeats)
        for mode in ("eval", "train"):
            emit(WORKLOAD, f"compile_speedup_{mode}", round(t[f"eager/{mode}"] / t[f"compiled/{mode}"], 3), "x",
                 heads=stage, eager_ms=round(1e3 * t[f"eager/{mode}"], 2),
                 compiled_ms=round(1e3 * t[f"compiled/{mode}"], 2), **common)


def main() -> None:
    parser = machine_parser(__doc__, repeats=9)
    parser.add_argument("--layer-types", default="all_attention,transformer_xl")
    args = parser.parse_args()
    machine = apply_machine_options(args)
    x, y, source = token_batch(local_wikitext2())
    extra = {"threads": machine["threads"], "tokens": source, "torch": torch.__version__}
    for layer_type in args.layer_types.split(","):
        compare(layer_type, args, x, y, extra)


if __name__ == "__main__":
    main()
