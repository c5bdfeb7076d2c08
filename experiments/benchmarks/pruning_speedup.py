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

    python experiments/benchmarks/pruning_speedup.py [--layers 2] [--batch 4] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
from common import emit, run_stack
from timing import interleaved_medians

from lightning_modules.model import MemoryTransformerLM
from lightning_modules.training.cpu_allocator import ALLOCATOR_MODES, configure_cpu_allocator

PAPER_SHAPES = dict(d_model=512, n_heads=8, d_head=64, n_persistent=2048, d_inner=2048, tgt_len=192, mem_len=192,
                    cutoffs=[], div_value=1.0, dropout=0.0, dropemb=0.0, dropatt=0.0, max_len=512)
REMOVED_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def build(layer_type: str, n_layers: int, removed: float, device: torch.device) -> MemoryTransformerLM:
    """The paper's layers with ``removed`` of each layer's heads physically pruned (vocabulary kept tiny)."""
    torch.manual_seed(0)
    model = MemoryTransformerLM(vocab_size=64, layer_type=layer_type, n_layers=n_layers, **PAPER_SHAPES)
    drop = round(removed * PAPER_SHAPES["n_heads"])
    if drop:
        model.prune_heads({i: list(range(drop)) for i in range(n_layers)})
    return model.to(device)


class Stack:
    """One pruned stack with its optimizer and inputs: callables for an eval forward and a training step."""

    def __init__(self, layer_type: str, removed: float, args: argparse.Namespace, device: torch.device) -> None:
        self.model = build(layer_type, args.layers, removed, device)
        d, T, M = PAPER_SHAPES["d_model"], PAPER_SHAPES["tgt_len"], PAPER_SHAPES["mem_len"]
        gen = torch.Generator(device="cpu").manual_seed(1)
        self.h = torch.randn(args.batch, T, d, generator=gen).to(device)
        self.memory = [torch.randn(args.batch, M, d, generator=gen).to(device) for _ in range(args.layers)]
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4,
                                           fused=True)
        self.macs = self.model.macs_per_token()["layers"]
        self.params = self.model.num_parameters(include_embeddings=False)

    def eval_step(self) -> None:
        with torch.no_grad():
            run_stack(self.model.eval(), self.h, self.memory)

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        run_stack(self.model, self.h, self.memory).square().mean().backward()
        self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="layers in the timed stack (paper: 16)")
    parser.add_argument("--batch", type=int, default=4, help="rows per segment")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-allocator", choices=ALLOCATOR_MODES, default="retain")
    args = parser.parse_args()
    configure_cpu_allocator(args.cpu_allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    workload = (f"paper layer shapes x{args.layers} layers, batch {args.batch}, segment 192 + memory 192, fp32, "
                f"{device.type}, {torch.get_num_threads()} threads")
    for layer_type in ("all_attention", "transformer_xl"):
        stacks = {removed: Stack(layer_type, removed, args, device) for removed in REMOVED_FRACTIONS}
        fns = {}
        for removed, stack in stacks.items():
            fns |= {(removed, "eval"): stack.eval_step, (removed, "train"): stack.train_step}
        t = interleaved_medians(fns, args.repeats, args.warmup, device)
        dense = stacks[0.0]
        for removed, pruned in list(stacks.items())[1:]:
            common = {"layer_type": layer_type, "heads_removed": removed}
            ideal = round(dense.macs / pruned.macs, 3)
            for mode in ("eval", "train"):
                dense_s, pruned_s = t[(0.0, mode)], t[(removed, mode)]
                emit(workload, "eval_speedup" if mode == "eval" else "train_step_speedup", round(dense_s / pruned_s, 3),
                     "x", **common, ideal=ideal, dense_ms=round(1e3 * dense_s, 2), pruned_ms=round(1e3 * pruned_s, 2))
            emit(workload, "parameter_ratio", round(dense.params / pruned.params, 3), "x", **common,
                 dense=dense.params, pruned=pruned.params)

if __name__ == "__main__":
    main()
