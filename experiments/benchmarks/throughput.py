"""Throughput of the model on workload W1, against the machine's matmul speed and across pruning levels.

W1: vocabulary 33,278 (WikiText-2), adaptive softmax cutoffs [2000, 10000], div_value 4; 4 layers, d_model 256,
8 heads of 32, 1024 persistent vectors (All-attention) or d_inner 1024 (Transformer-XL); segment 64 + memory 64,
batch 8; dropout 0, fp32, AdamW. Tokens are WikiText-2 train text when the local copy is there (else Zipf-drawn
ids), with a full recurrence memory.

Everything in one section is timed in interleaved rounds (median of ``--repeats``), so the ratios compare like
with like on a shared machine. Prints one JSON line per figure, each with the target it answers to:
  - ``matmul_fp32``: a 2048^3 ``torch.mm`` (the machine's reference throughput);
  - ``layer_stack_{eval,train}_efficiency``: the layers' FLOPs by the model's own accounting (x3 for training)
    per second over the matmul's (target >= 0.60); eval = one no-grad forward, train = forward + backward + AdamW;
    for All-attention also with the ``sdpa`` and ``reference`` attention cores, for contrast;
  - ``{eval,train}_tokens_per_s`` of the whole model (embedding, layers, adaptive softmax with targets), and
    ``all_attention_vs_transformer_xl_{eval,train}`` (target >= 1.0);
  - ``layer_stack_eval_speedup`` with 50% / 75% of every layer's heads removed (targets 1.95x / 3.6x),
    ``model_eval_speedup`` at 50% against the MAC-accounting ideal (target >= 95% of it), and
    ``train_step_speedup_after_removal``: the training step of a model that removed half its heads in-run
    (optimizer state sliced, as HeadPruning does) over the same model's step before the removal, against the same
    MAC ideal as the whole-model eval.

    python -m experiments.benchmarks.throughput [--repeats 15] [--threads 2] [--sections efficiency,pruning]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import torch

from experiments.benchmarks.options import apply_machine_options, chosen_sections, sectioned_parser
from experiments.benchmarks.reporting import emit
from experiments.benchmarks.timing import interleaved_medians, matmul_probe
from experiments.benchmarks.workloads import W1, W1_NAME, Workload, build, local_wikitext2, token_batch
from lightning_modules.model import LAYER_TYPES

WORKLOAD = W1_NAME
OTHER_IMPLS = ("sdpa", "reference")  # attention cores timed beside the default one ("auto": "joint" on CPU)


def efficiency(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, extra: dict) -> None:
    """Layer-stack FLOP efficiency against the matmul, and whole-model tokens/s, both layer types."""
    mm, mm_flops = matmul_probe(torch.device("cpu"))
    loads = {lt: Workload(build(lt), x, y) for lt in LAYER_TYPES}
    fns: dict[str, Callable] = {"mm": mm}
    for lt, w in loads.items():
        fns |= {f"{lt}/stack_eval": w.stack_eval, f"{lt}/stack_train": w.stack_train,
                f"{lt}/model_eval": w.model_eval, f"{lt}/model_train": w.model_train}
    others = {impl: Workload(build("all_attention", attn_impl=impl), x, y) for impl in OTHER_IMPLS}
    for impl, w in others.items():  # the slower attention cores, side by side for contrast
        fns |= {f"{impl}/stack_eval": w.stack_eval, f"{impl}/stack_train": w.stack_train}
    t = interleaved_medians(fns, args.repeats)
    peak = mm_flops / t["mm"]
    emit(WORKLOAD, "matmul_fp32", round(peak / 1e9, 1), "GFLOP/s", **extra)
    tokens = x.size(0) * W1["tgt_len"]
    for lt, w in loads.items():
        for mode in ("eval", "train"):
            seconds = t[f"{lt}/stack_{mode}"]
            emit(WORKLOAD, f"layer_stack_{mode}_efficiency", round(w.layer_flops(mode == "train") / seconds / peak, 3),
                 "fraction of matmul FLOP/s", layer_type=lt, ms=round(1e3 * seconds, 2), target=0.60, **extra)
            emit(WORKLOAD, f"{mode}_tokens_per_s", round(tokens / t[f"{lt}/model_{mode}"]), "tokens/s",
                 layer_type=lt, ms=round(1e3 * t[f"{lt}/model_{mode}"], 2), **extra)
    for impl, w in others.items():
        for mode in ("eval", "train"):
            seconds = t[f"{impl}/stack_{mode}"]
            emit(WORKLOAD, f"layer_stack_{mode}_efficiency", round(w.layer_flops(mode == "train") / seconds / peak, 3),
                 "fraction of matmul FLOP/s", layer_type="all_attention", attn_impl=impl, ms=round(1e3 * seconds, 2),
                 **extra)
    for mode in ("eval", "train"):
        ratio = t[f"transformer_xl/model_{mode}"] / t[f"all_attention/model_{mode}"]
        emit(WORKLOAD, f"all_attention_vs_transformer_xl_{mode}", round(ratio, 3), "x (tokens/s ratio)",
             target=1.0, **extra)


def removal_in_run(x: torch.Tensor, y: torch.Tensor, layer_type: str, removed: float) -> Workload:
    """A trained-for-a-few-steps dense model that then removes heads in place, slicing AdamW's moments."""
    w = Workload(build(layer_type), x, y)
    for _ in range(2):
        w.model_train()
    w.remove_heads(removed)
    return w


def with_targets(macs: dict) -> int:
    """MACs per token of a forward with targets: the layers and the adaptive softmax's head. A tail cluster is
    paid only by the tokens whose target is in it (18% on WikiText-2), so it is left out; this makes the ideal
    slightly higher than the work really done."""
    return macs["layers"] + macs["softmax_head"]


def pruning(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, extra: dict) -> None:
    """Speed-ups of physically pruned models over the dense one, against the MAC-accounting ideal."""
    for lt in LAYER_TYPES:
        dense = Workload(build(lt), x, y)
        pruned = {r: Workload(build(lt, r), x, y) for r in (0.5, 0.75)}
        before = Workload(copy.deepcopy(dense.model), x, y)
        for _ in range(2):
            before.model_train()
        after = removal_in_run(x, y, lt, 0.5)
        fns: dict[str, Callable] = {"dense/stack": dense.stack_eval, "dense/model": dense.model_eval,
                                    "before/train": before.model_train, "after/train": after.model_train}
        for r, w in pruned.items():
            fns |= {f"{r}/stack": w.stack_eval, f"{r}/model": w.model_eval}
        t = interleaved_medians(fns, args.repeats)
        macs_dense, targets = dense.model.macs_per_token(), {0.5: 1.95, 0.75: 3.6}
        for r, w in pruned.items():
            macs = w.model.macs_per_token()
            common = dict(layer_type=lt, heads_removed=r, **extra)
            target = {"target": targets[r]} if lt == "all_attention" else {}  # Transformer-XL: for contrast
            emit(WORKLOAD, "layer_stack_eval_speedup", round(t["dense/stack"] / t[f"{r}/stack"], 3), "x",
                 ideal=round(macs_dense["layers"] / macs["layers"], 3), **target,
                 dense_ms=round(1e3 * t["dense/stack"], 2), pruned_ms=round(1e3 * t[f"{r}/stack"], 2), **common)
            if r == 0.5:
                ideal = with_targets(macs_dense) / with_targets(macs)
                speedup = t["dense/model"] / t[f"{r}/model"]
                emit(WORKLOAD, "model_eval_speedup", round(speedup, 3), "x", ideal=round(ideal, 3),
                     fraction_of_ideal=round(speedup / ideal, 3), **({"target": "0.95 of ideal"} if target else {}),
                     dense_ms=round(1e3 * t["dense/model"], 2), pruned_ms=round(1e3 * t[f"{r}/model"], 2), **common)
        ideal_train = with_targets(macs_dense) / with_targets(after.model.macs_per_token())
        speedup = t["before/train"] / t["after/train"]
        emit(WORKLOAD, "train_step_speedup_after_removal", round(speedup, 3), "x", ideal=round(ideal_train, 3),
             fraction_of_ideal=round(speedup / ideal_train, 3), before_ms=round(1e3 * t["before/train"], 2),
             after_ms=round(1e3 * t["after/train"], 2), layer_type=lt, heads_removed=0.5, **extra)


SECTIONS = {"efficiency": efficiency, "pruning": pruning}


def main() -> None:
    parser = sectioned_parser(__doc__, SECTIONS, repeats=15)
    parser.add_argument("--data", type=Path, default=local_wikitext2(),
                        help="WikiText-2 folder (default: $WIKITEXT_DIR; else Zipf-drawn ids)")
    args = parser.parse_args()
    extra = apply_machine_options(args)
    x, y, source = token_batch(args.data)
    extra["tokens"] = source
    for section in chosen_sections(args, SECTIONS):
        section(args, x, y, extra)


if __name__ == "__main__":
    main()
