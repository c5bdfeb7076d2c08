"""Speed of physically pruned layer stacks against the dense one, All-attention and Transformer-XL side by side.

For the paper's layer shapes (d 512, 8 heads of 64, N 2048 persistent vectors or d_inner 2048, segment 192 with a
memory of 192), removes 0/25/50/75% of the heads of every layer with ``prune_heads`` and times, in the same run:
  - eval latency: one no-grad forward of the layer stack over a segment with full memory;
  - training step: forward + backward + AdamW step of the same stack.
Each figure is the median over ``--repeats`` timed rounds after ``--warmup`` untimed ones, every pruning level timed
in each round (interleaved), so slow drifts of a shared machine hit them alike. Printed next to each
speed-up is the ideal one, the ratio of the layers' multiply-accumulates (the model's own MAC accounting) and of
their parameters. Only the layer stack is timed: embeddings and the adaptive softmax do not change with pruning.
One JSON line per figure. Not a test: figures vary by machine.

    python -m experiments.benchmarks.pruning_speedup [--layers 2] [--batch 4] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

from experiments.benchmarks.options import apply_machine_options, machine_parser
from experiments.benchmarks.reporting import emit
from experiments.benchmarks.timing import interleaved_medians
from experiments.benchmarks.workloads import PAPER_SHAPES, Workload, build, token_batch
from lightning_modules.model import LAYER_TYPES

REMOVED_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def paper_stack(layer_type: str, removed: float, args: argparse.Namespace, device: torch.device) -> Workload:
    """The paper's layers (``args.layers`` of them) with ``removed`` of each layer's heads physically pruned, on
    random token ids with a full memory."""
    model = build(layer_type, removed, PAPER_SHAPES, n_layers=args.layers).to(device)
    x, y, _ = token_batch(None, args.batch, PAPER_SHAPES["tgt_len"], PAPER_SHAPES["vocab_size"])
    return Workload(model, x.to(device), y.to(device))


def main() -> None:
    parser = machine_parser(__doc__, repeats=7)
    parser.add_argument("--layers", type=int, default=2, help="layers in the timed stack (paper: 16)")
    parser.add_argument("--batch", type=int, default=4, help="rows per segment")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    apply_machine_options(args)
    device = torch.device(args.device)
    workload = (f"paper layer shapes x{args.layers} layers, batch {args.batch}, segment 192 + memory 192, fp32, "
                f"{device.type}, {torch.get_num_threads()} threads")
    for layer_type in LAYER_TYPES:
        stacks = {removed: paper_stack(layer_type, removed, args, device) for removed in REMOVED_FRACTIONS}
        fns = {}
        for removed, stack in stacks.items():
            fns |= {(removed, "eval"): stack.stack_eval, (removed, "train"): stack.stack_train}
        t = interleaved_medians(fns, args.repeats, args.warmup, device)
        dense = stacks[0.0]
        for removed, pruned in list(stacks.items())[1:]:
            common = {"layer_type": layer_type, "heads_removed": removed}
            ideal = round(dense.layer_macs() / pruned.layer_macs(), 3)
            for mode in ("eval", "train"):
                dense_s, pruned_s = t[(0.0, mode)], t[(removed, mode)]
                emit(workload, "eval_speedup" if mode == "eval" else "train_step_speedup", round(dense_s / pruned_s, 3),
                     "x", **common, ideal=ideal, dense_ms=round(1e3 * dense_s, 2), pruned_ms=round(1e3 * pruned_s, 2))
            params = {name: w.model.num_parameters(include_embeddings=False) for name, w in
                      (("dense", dense), ("pruned", pruned))}
            emit(workload, "parameter_ratio", round(params["dense"] / params["pruned"], 3), "x", **common, **params)

if __name__ == "__main__":
    main()
