"""Inference with the memory's keys/values kept (``RingKVCache`` in generation, ``InferenceCache`` in evaluation):
generation and whole-model evaluation speed.

Sections (each timed in interleaved rounds in this one process, medians of ``--repeats``):
  - ``generation``: greedy tokens/s of ``MemoryTransformerLM.generate`` on W1 (All-attention; 4 layers, d 256, 8
    heads x 32, N 1024, memory 64) at batch 1 and 8, dense and with half of every layer's heads removed, three ways:
    ``cached`` (the default: the ring caches), ``reprojecting`` (``use_cache=False``: every step re-projects the
    memory and the position rows) and ``forward_steps`` (stepping ``model(ids[:, -1:], memory=memory)`` and taking
    the argmax of the full log-probabilities). Figures: ``generate_tokens_per_s`` per case,
    ``generate_cache_speedup`` (cached over forward_steps, batch 1: target >= 4) and ``generate_pruned_speedup``
    (50% removed over dense, cached: target >= 1.5); the batch-1 step's memory-traffic floor; and
    ``cached_layers_weight_reads``, the dense step's layers over the same number of passes through one layer, whose
    weights stay in the CPU caches; then cached vs forward_steps again at batch 1 over ``--long-tokens`` (256) per
    call, where the per-call set-up weighs less per token;
  - ``paper``: the same at the paper's layer shapes (16 layers, d 512, 8 heads x 64, N 2048, memory 192, tiny
    vocabulary), batch 1, a few tokens, cached vs reprojecting, dense vs 50% removed;
  - ``eval``: whole-model eval tokens/s on W1 (batch 8, segment 64 + memory 64, targets given) with and without the
    cache (``eval_cache_speedup``, target >= 1.15, beside its MAC ideal: what the cache saves, counted by
    ``reprojection_macs_per_token``; and ``eval_cache_time_ideal``: 1 + the time of that work alone over a cached
    segment's), and the 50%-pruned speed-up with the cache against the
    MAC-accounting ideal (``pruned_eval_speedup_cached``, target >= 0.95 of it; ``macs_per_token`` counts what the
    cached path pays: no memory re-projection).

    python -m experiments.benchmarks.generation [--repeats 7] [--threads 2] [--tokens 32] [--long-tokens 256]
        [--sections ...]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from experiments.benchmarks.options import apply_machine_options, chosen_sections, sectioned_parser
from experiments.benchmarks.reporting import emit
from experiments.benchmarks.throughput import with_targets
from experiments.benchmarks.timing import interleaved_medians
from experiments.benchmarks.workloads import PAPER_SHAPES, W1, W1_BATCH, W1_NAME, build, local_wikitext2, token_batch
from lightning_modules.model import MemoryTransformerLM

MODES = ("cached", "reprojecting", "forward_steps")


def forward_steps(model: MemoryTransformerLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by stepping ``model(ids[:, -1:], memory=memory)`` over the full distribution, in
    inference mode as ``generate`` runs (and Lightning's predict loop), so that the two differ only by their path."""
    with torch.inference_mode():
        out = model(prompt)
        tokens = [out.log_probs[:, -1].argmax(-1)]
        for _ in range(n - 1):  # no step after the last token, as generate
            out = model(tokens[-1][:, None], memory=out.memory)
            tokens.append(out.log_probs[:, -1].argmax(-1))
    return torch.stack(tokens, 1)


def generator_fns(model: MemoryTransformerLM, prompt: torch.Tensor, n: int, modes=MODES) -> dict[str, Callable]:
    """One callable per mode that generates ``n`` greedy tokens after ``prompt`` [B, 1]."""
    fns = {"cached": lambda: model.generate(prompt, n, temperature=0),
           "reprojecting": lambda: model.generate(prompt, n, temperature=0, use_cache=False),
           "forward_steps": lambda: forward_steps(model, prompt, n)}
    return {m: fns[m] for m in modes}


def cached_step_bytes(model: MemoryTransformerLM, batch: int) -> int:
    """Bytes a cached greedy step must read at the least, at ``batch`` rows: per layer its weights (the fused
    [W_q; W_k; W_v], W_o, the persistent slots or FFN, norms, biases) and the keys/values and position rows of its
    S = M + 1 keys, counted on the inference cache (a ring holds the same, plus one u·k per key and head); then the
    adaptive softmax's head (shortlist and cluster weights, their projection). Tail clusters, embedding rows and
    activations are left out, so this is a lower bound."""
    with torch.no_grad():
        cache = model.init_cache(model.init_memory(batch, torch.device("cpu")))
    elements = 0
    for layer, entry in zip(model.layers, cache.layers, strict=True):
        if entry is None:
            continue
        elements += sum(p.numel() for name, p in layer.named_parameters() if "r_proj" not in name
                        and "gate" not in name)  # the fused projection has as many weights as q/k/v_proj
        elements += entry.kv.numel() + (entry.kv.size(1) + 1) * entry.r.size(1)
    head = model.softmax
    elements += head.out_weights[0].numel() + head.bounds[1]  # shortlist weights and biases
    for module in (head.shortlist_proj, head.cluster):
        elements += 0 if module is None else sum(p.numel() for p in module.parameters())
    return 4 * elements  # fp32


def read_bandwidth(repeats: int = 7, megabytes: int = 256) -> float:
    """Bytes/s this process reads from memory at its thread count: the median time of summing a tensor far larger
    than the caches."""
    data = torch.ones(megabytes * 2**20 // 4)
    seconds = interleaved_medians({"sum": data.sum}, repeats)["sum"]
    return data.numel() * 4 / seconds


def layer_stack_fns(model: MemoryTransformerLM) -> dict[str, Callable]:
    """Two ways to run a batch-1 generation step's layers (``forward_ring``): ``stack``, every layer once (each reads
    its own weights), and ``one_layer_repeated``, the first layer n_layers times (the same ops and shapes, but its
    weights stay in the CPU caches after the first pass). Their difference is what reading the stack's weights from
    memory costs."""
    with torch.no_grad():
        rings = model._new_rings(model.init_memory(1, torch.device("cpu")))
    h = torch.randn(1, 1, model.d_model, generator=torch.Generator().manual_seed(0))

    def stack() -> None:
        with torch.no_grad():
            for layer, ring in zip(model.layers, rings, strict=True):
                layer.forward_ring(h, ring)

    def one_layer_repeated() -> None:
        with torch.no_grad():
            for _ in model.layers:
                model.layers[0].forward_ring(h, rings[0])

    return {"stack": stack, "one_layer_repeated": one_layer_repeated}


def generation(args: argparse.Namespace, extra: dict) -> None:
    """W1 generation tokens/s: batch 1 and 8, dense and 50% removed, cached / reprojecting / forward steps."""
    models = {r: build("all_attention", r).eval() for r in (0.0, 0.5)}
    prompts = {b: torch.randint(0, W1["vocab_size"], (b, 1), generator=torch.Generator().manual_seed(0))
               for b in (1, W1_BATCH)}
    fns = {}
    for r, model in models.items():
        for b, prompt in prompts.items():
            fns |= {(r, b, m): fn for m, fn in generator_fns(model, prompt, args.tokens).items()}
    for (r, b, _), fn in fns.items():  # the contract, checked on the timed workload itself
        if b == 1 and not torch.equal(fn(), fns[(r, b, "forward_steps")]()):
            raise SystemExit(f"greedy tokens differ from forward steps at heads_removed={r}")
    t = interleaved_medians(fns, args.repeats)
    for (r, b, m), seconds in t.items():
        emit(W1_NAME, "generate_tokens_per_s", round(b * args.tokens / seconds, 1), "tokens/s", mode=m, batch=b,
             tokens=args.tokens, heads_removed=r, ms_per_step=round(1e3 * seconds / args.tokens, 3), **extra)
    bandwidth = read_bandwidth()
    emit(W1_NAME, "read_bandwidth", round(bandwidth / 1e9, 2), "GB/s", **extra)
    for r, model in models.items():
        step_bytes = cached_step_bytes(model, 1)
        floor = step_bytes / bandwidth  # seconds: a cached step cannot read its weights faster than this
        emit(W1_NAME, "cached_step_floor", round(1e3 * floor, 3), "ms", batch=1, heads_removed=r,
             mb_read=round(step_bytes / 2**20, 2), **extra)
        emit(W1_NAME, "cached_step_over_floor", round(t[(r, 1, "cached")] / args.tokens / floor, 2), "x", batch=1,
             heads_removed=r, **extra)
    layers = interleaved_medians(layer_stack_fns(models[0.0]), 10 * args.repeats)
    for mode, seconds in layers.items():
        emit(W1_NAME, "cached_layers_ms", round(1e3 * seconds, 3), "ms", batch=1, heads_removed=0.0, mode=mode,
             **extra)
    emit(W1_NAME, "cached_layers_weight_reads", round(layers["stack"] / layers["one_layer_repeated"], 2), "x",
         batch=1, heads_removed=0.0, over="one_layer_repeated", **extra)
    for b in prompts:
        emit(W1_NAME, "generate_cache_speedup", round(t[(0.0, b, "forward_steps")] / t[(0.0, b, "cached")], 2), "x",
             batch=b, tokens=args.tokens, over="forward_steps", **({"target": 4.0} if b == 1 else {}), **extra)
        emit(W1_NAME, "generate_cache_speedup", round(t[(0.0, b, "reprojecting")] / t[(0.0, b, "cached")], 2), "x",
             batch=b, tokens=args.tokens, over="reprojecting", **extra)
        for m in ("cached", "reprojecting"):
            emit(W1_NAME, "generate_pruned_speedup", round(t[(0.0, b, m)] / t[(0.5, b, m)], 2), "x", batch=b,
                 tokens=args.tokens, mode=m, heads_removed=0.5, **({"target": 1.5} if m == "cached" else {}), **extra)
    long_generation(args, models, prompts[1], extra)


def long_generation(args: argparse.Namespace, models: dict[float, MemoryTransformerLM], prompt: torch.Tensor,
                    extra: dict) -> None:
    """Batch 1, ``--long-tokens`` per call, cached against forward steps: the per-token figures once the per-call
    set-up (the prompt, building the rings and the transposed head) is spread over a long continuation."""
    n = args.long_tokens
    fns = {(r, m): fn for r, model in models.items()
           for m, fn in generator_fns(model, prompt, n, ("cached", "forward_steps")).items()}
    t = interleaved_medians(fns, max(3, args.repeats // 2), warmup=1)
    for (r, m), seconds in t.items():
        emit(W1_NAME, "generate_tokens_per_s", round(n / seconds, 1), "tokens/s", mode=m, batch=1, tokens=n,
             heads_removed=r, ms_per_step=round(1e3 * seconds / n, 3), **extra)
    emit(W1_NAME, "generate_cache_speedup", round(t[(0.0, "forward_steps")] / t[(0.0, "cached")], 2), "x", batch=1,
         tokens=n, over="forward_steps", target=4.0, **extra)
    emit(W1_NAME, "generate_pruned_speedup", round(t[(0.0, "cached")] / t[(0.5, "cached")], 2), "x", batch=1,
         tokens=n, mode="cached", heads_removed=0.5, target=1.5, **extra)


def paper(args: argparse.Namespace, extra: dict) -> None:
    """Generation at the paper's layer shapes (16 layers), batch 1, a few tokens: cached vs reprojecting."""
    n = max(2, args.tokens // 4)
    models = {r: build("all_attention", r, shapes=PAPER_SHAPES, n_layers=16).eval() for r in (0.0, 0.5)}
    prompt = torch.zeros(1, 1, dtype=torch.long)
    fns = {(r, m): fn for r, model in models.items()
           for m, fn in generator_fns(model, prompt, n, ("cached", "reprojecting")).items()}
    t = interleaved_medians(fns, max(3, args.repeats // 2), warmup=1)
    for (r, m), seconds in t.items():
        emit("paper-16L", "generate_tokens_per_s", round(n / seconds, 1), "tokens/s", mode=m, batch=1,
             heads_removed=r, ms_per_step=round(1e3 * seconds / n, 2), **extra)
    emit("paper-16L", "generate_cache_speedup", round(t[(0.0, "reprojecting")] / t[(0.0, "cached")], 2), "x",
         batch=1, over="reprojecting", **extra)
    emit("paper-16L", "generate_pruned_speedup", round(t[(0.0, "cached")] / t[(0.5, "cached")], 2), "x", batch=1,
         mode="cached", heads_removed=0.5, **extra)


def evaluation(args: argparse.Namespace, extra: dict) -> None:
    """Whole-model eval tokens/s on W1 with and without the cache, dense and 50% removed."""
    x, y, source = token_batch(args.data)
    T = W1["tgt_len"]
    runs: dict[str, Callable] = {}
    macs = {}
    for r in (0.0, 0.5):
        model = build("all_attention", r).eval()
        with torch.no_grad():
            first = model(x[:, :T], y[:, :T], use_cache=True)  # fills memory and cache

        def plain(model=model, first=first) -> None:
            with torch.no_grad():
                model(x[:, T:], y[:, T:], memory=first.memory)

        def cached(model=model, first=first) -> None:
            with torch.no_grad():
                model(x[:, T:], y[:, T:], memory=first.memory, cache=first.cache)

        runs |= {f"{r}/reprojecting": plain, f"{r}/cached": cached}
        macs[r] = with_targets(model.macs_per_token())
        if r == 0.0:
            cache_ideal = (macs[r] + model.reprojection_macs_per_token(x.size(0))) / macs[r]
            runs["0.0/reprojection_work"] = reprojection_work(model, first.memory)
    t = interleaved_medians(runs, args.repeats)
    work = t.pop("0.0/reprojection_work")  # seconds
    tokens = x.size(0) * T
    for name, seconds in t.items():
        r, mode = name.split("/")
        emit(W1_NAME, "eval_tokens_per_s", round(tokens / seconds), "tokens/s", mode=mode, heads_removed=float(r),
             ms=round(1e3 * seconds, 2), tokens_source=source, **extra)
    cache_speedup = t["0.0/reprojecting"] / t["0.0/cached"]
    emit(W1_NAME, "eval_cache_speedup", round(cache_speedup, 3), "x", target=1.15, ideal=round(cache_ideal, 3),
         fraction_of_ideal=round(cache_speedup / cache_ideal, 3), **extra)
    emit(W1_NAME, "eval_cache_time_ideal", round(1 + work / t["0.0/cached"], 3), "x",
         reprojection_ms=round(1e3 * work, 2), over="cached", **extra)
    ideal = macs[0.0] / macs[0.5]
    speedup = t["0.0/cached"] / t["0.5/cached"]
    emit(W1_NAME, "pruned_eval_speedup_cached", round(speedup, 3), "x", ideal=round(ideal, 3),
         fraction_of_ideal=round(speedup / ideal, 3), target="0.95 of ideal", heads_removed=0.5, **extra)


def reprojection_work(model: MemoryTransformerLM, memory: list[torch.Tensor]) -> Callable[[], None]:
    """Building the inference cache of ``memory`` (``init_cache``): every layer's memory through its LayerNorm and
    [W_k; W_v], W_r over the position table, the persistent values scaled. At W1 (max_len = M + T) that is what the
    re-projecting path does on top of the cached one in an eval segment, so its time over a cached segment's is the
    most the cache can save in time (``eval_cache_time_ideal``), as ``reprojection_macs_per_token`` is by MAC
    count."""

    def run() -> None:
        with torch.no_grad():
            model.init_cache(memory)

    return run


SECTIONS = {"generation": generation, "paper": paper, "eval": evaluation}


def main() -> None:
    parser = sectioned_parser(__doc__, SECTIONS, repeats=7)
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per timed call (W1)")
    parser.add_argument("--long-tokens", type=int, default=256,
                        help="tokens per call of the long batch-1 generation (W1, cached vs forward steps)")
    parser.add_argument("--data", type=Path, default=local_wikitext2(), help="WikiText-2 folder for the eval tokens")
    args = parser.parse_args()
    extra = apply_machine_options(args)
    for section in chosen_sections(args, SECTIONS):
        section(args, extra)


if __name__ == "__main__":
    main()
