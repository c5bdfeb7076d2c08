"""The inference cache (projected memory keys/values reused across segments) and cached generation: equal to the
re-projecting path for every attention core, both layer types, same_length on and off, gated or pruned, through
the Lightning test loop and under 2-process DDP validation; the adaptive-softmax draws equal the full
distribution's."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_modules.model import LAYER_TYPES, MemoryTransformerLM
from lightning_modules.model.transformer_lm import InferenceCache
from lightning_modules.training.language_model import LanguageModel

V = 300
REPO = Path(__file__).resolve().parents[2]


def small_model(**overrides) -> MemoryTransformerLM:
    """A tiny model (three adaptive clusters, dropout off) with random non-trivial weights, in eval mode."""
    kwargs = dict(vocab_size=V, layer_type="all_attention", n_layers=2, d_model=32, n_heads=4, d_head=8,
                  n_persistent=16, d_inner=64, tgt_len=8, mem_len=8, cutoffs=[50, 150], div_value=2.0,
                  dropout=0.0, dropatt=0.0, dropemb=0.0, max_len=32) | overrides
    torch.manual_seed(0)
    model = MemoryTransformerLM(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def segments(model: MemoryTransformerLM, x: torch.Tensor, use_cache: bool) -> list[torch.Tensor]:
    """log-probs of every segment of ``x`` [B, n*T] read in turn through the memory (and the cache)."""
    memory, cache, out = None, None, []
    with torch.no_grad():
        for start in range(0, x.size(1), model.tgt_len):
            result = model(x[:, start : start + model.tgt_len], memory=memory, cache=cache, use_cache=use_cache)
            memory, cache = result.memory, result.cache
            out.append(result.log_probs)
    return out


@pytest.mark.parametrize("same_length", [True, False])
@pytest.mark.parametrize("impl", ["joint", "sdpa", "reference"])
@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_cached_eval_equals_reprojecting_across_segments_gates_and_removals(layer_type, impl, same_length):
    model = small_model(layer_type=layer_type, attn_impl=impl, same_length=same_length).double()
    model.gates_enabled = True  # eval-mode gates: deterministic 0/1, some shut
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.log_alpha.copy_(torch.tensor([3.0, -3.0, 3.0, 3.0]))
    x = torch.randint(0, V, (3, 32))
    for a, b in zip(segments(model, x, False), segments(model, x, True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    # a removal between two segments: the carried cache is sliced to the heads left
    with torch.no_grad():
        plain = model(x[:, :8])
        cached = model(x[:, :8], use_cache=True)
        torch.testing.assert_close(plain.memory[1], cached.memory[1], rtol=1e-10, atol=1e-10)
        model.prune_closed_heads()
        model.prune_heads({0: [0]})
        after_plain = model(x[:, 8:16], memory=plain.memory)
        after_cached = model(x[:, 8:16], memory=cached.memory, cache=cached.cache)
    assert model.heads_per_layer == [2, 3]
    assert after_cached.cache.layers[0].kv.shape == (3, 8, 2 * 2 * 8)
    torch.testing.assert_close(after_plain.log_probs, after_cached.log_probs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_a_layer_with_no_heads_left_and_the_cache_checks(layer_type):
    model = small_model(layer_type=layer_type).double()
    model.prune_heads({1: range(4)})
    x = torch.randint(0, V, (2, 24))
    for a, b in zip(segments(model, x, False), segments(model, x, True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        out = model(x[:, :8], use_cache=True)
        assert isinstance(out.cache, InferenceCache) and out.cache.layers[1] is None
        with pytest.raises(ValueError, match="does not describe"):
            model(x[:1, :8], memory=[m[:1] for m in out.memory], cache=out.cache)
    with pytest.raises(ValueError, match="no-grad evaluation"):
        model(x[:, :8], use_cache=True)  # gradients on
    with torch.no_grad(), pytest.raises(ValueError, match="no-grad evaluation"):
        model.train()(x[:, :8], use_cache=True)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_what_the_cache_saves_is_counted_by_reprojection_macs_per_token(layer_type):
    from torch.utils.flop_counter import FlopCounterMode

    model = small_model(layer_type=layer_type, attn_impl="reference")
    model.prune_heads({0: [1, 2]})
    model.requires_grad_(False)  # FlopCounterMode's module hooks trip over no-grad views of trainable parameters
    B, T = 3, model.tgt_len
    x = torch.randint(0, V, (B, 2 * T))
    with torch.no_grad():
        first = model(x[:, :T], use_cache=True)  # a full memory (mem_len = tgt_len here) and its cache
        flops = {}
        for name, cache in (("reprojecting", None), ("cached", first.cache)):
            with FlopCounterMode(display=False) as counter:
                model(x[:, T:], memory=first.memory, cache=cache)
            flops[name] = counter.get_total_flops()
    saved_macs_per_token = (flops["reprojecting"] - flops["cached"]) / 2 / (B * T)
    assert saved_macs_per_token == pytest.approx(model.reprojection_macs_per_token(B), rel=1e-12)
    assert model.reprojection_macs_per_token(B) > 0


def step_forward_greedy(model: MemoryTransformerLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by stepping ``model(ids[:, -1:], memory=memory)`` and taking the argmax of log_probs."""
    memory, out = None, None
    with torch.no_grad():
        for start in range(0, prompt.size(1), model.tgt_len):
            out = model(prompt[:, start : start + model.tgt_len], memory=memory)
            memory = out.memory
        tokens = []
        for _ in range(n):
            tokens.append(out.log_probs[:, -1].argmax(-1))
            out = model(tokens[-1][:, None], memory=memory)
            memory = out.memory
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("impl", ["joint", "reference"])
@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_greedy_generation_gives_the_tokens_of_stepping_forward(layer_type, impl):
    model = small_model(layer_type=layer_type, attn_impl=impl, same_length=False)
    prompt = torch.randint(0, V, (3, 13))  # one and a half segments
    expected = step_forward_greedy(model, prompt, 20)  # 20 steps: past mem_len, so memory and cache roll over
    tokens = model.generate(prompt, 20, temperature=0)
    assert torch.equal(tokens, expected)
    assert not tokens.is_inference()  # made in inference mode, returned as a tensor the caller may change
    tokens[0, 0] = 0
    assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=False), expected)
    model.prune_heads({0: [1, 3], 1: [2]})
    assert torch.equal(model.generate(prompt[:1], 12, temperature=0), step_forward_greedy(model, prompt[:1], 12))


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_generation_without_memory_and_under_autocast(layer_type):
    no_memory = small_model(layer_type=layer_type, mem_len=0, same_length=False)  # a ring of the token alone
    prompt = torch.randint(0, V, (2, 5))
    for rows in (prompt[:1], prompt):
        assert torch.equal(no_memory.generate(rows, 8, temperature=0), step_forward_greedy(no_memory, rows, 8))
    model = small_model(layer_type=layer_type)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as a bf16-mixed predict loop runs it
        for rows in (prompt[:1], prompt):
            tokens = model.generate(rows, 8, temperature=0)
            assert tokens.shape == (rows.size(0), 8) and bool(((tokens >= 0) & (tokens < V)).all())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_the_ring_step_equals_the_cached_forward_past_the_ring_wrapping_with_gates(layer_type, batch):
    model = small_model(layer_type=layer_type).double()
    model.gates_enabled = True  # eval-mode gates with output scaling: head 1 shut, the others scaled by 4/3
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.log_alpha.copy_(torch.tensor([3.0, -3.0, 3.0, 3.0]))
        memory = [torch.randn(batch, model.mem_len, 32, dtype=torch.double) for _ in range(model.n_layers + 1)]
        cache = model.init_cache(memory)
        rings = model._new_rings(memory)
        for _ in range(2 * model.mem_len + 3):  # the ring (M + 1 = 9 slots) wraps twice
            ids = torch.randint(0, V, (batch, 1))
            out = model(ids, memory=memory, cache=cache)
            memory, cache = out.memory, out.cache
            torch.testing.assert_close(model.softmax.log_probs(model._ring_step(ids, rings)), out.log_probs,
                                       rtol=1e-10, atol=1e-10)
        assert rings[0].steps == 2 * model.mem_len + 3
        model.prune_heads({0: [1]})
        with pytest.raises(ValueError, match="build it again after removing heads"):
            model._ring_step(ids, rings)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_generation_gated_or_with_an_emptied_layer_gives_the_tokens_of_stepping_forward(layer_type):
    model = small_model(layer_type=layer_type)
    prompt = torch.randint(0, V, (2, 11))
    model.gates_enabled = True
    with torch.no_grad():
        model.layers[1].gate.log_alpha.copy_(torch.tensor([-3.0, 3.0, -3.0, 3.0]))
    assert torch.equal(model.generate(prompt, 20, temperature=0), step_forward_greedy(model, prompt, 20))
    model.gates_enabled = False
    model.prune_heads({0: range(4)})  # layer 0 skips its attention
    assert model.heads_per_layer == [0, 4]
    assert torch.equal(model.generate(prompt, 20, temperature=0), step_forward_greedy(model, prompt, 20))


def test_the_transposed_head_draws_the_same_tokens():
    model = small_model().double()
    h = torch.randn(64, 32, dtype=torch.double) * 3
    head_t = model.softmax.transposed_head()
    assert head_t[1].shape == (32, 50) and head_t[1].is_contiguous()  # [d_0, c1]: the shortlist is d wide
    with torch.no_grad():
        torch.testing.assert_close(model.softmax._head_log_probs(h, head_t), model.softmax._head_log_probs(h),
                                   rtol=1e-12, atol=1e-12)
        for temperature, top_k in [(0.0, None), (1.0, None), (1.3, 5), (0.7, None)]:
            draws = [model.softmax.draw(h[:1], temperature, top_k, torch.Generator().manual_seed(3), t)
                     for t in (head_t, None)]
            assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, None), (1.3, 5), (1.0, 200)])
def test_sampled_generation_with_and_without_the_cache_is_equal_under_a_fixed_generator(temperature, top_k):
    model = small_model(layer_type="transformer_xl").double()
    for prompt in (torch.randint(0, V, (4, 6)), torch.randint(0, V, (1, 6))):
        draws = [model.generate(prompt, 15, temperature, top_k, torch.Generator().manual_seed(7), use_cache=c)
                 for c in (True, False)]
        assert torch.equal(draws[0], draws[1])


def test_adaptive_softmax_draws_equal_the_full_distribution():
    model = small_model().double()
    h = torch.randn(64, 32, dtype=torch.double) * 3
    full = model.softmax.log_probs(h[:, None])[:, 0]  # (64, V)
    with torch.no_grad():
        assert torch.equal(model.softmax.draw(h, 0.0), full.argmax(-1))

    # one row at a time, also with the tails made likely enough to hold some of the answers
    tilted = copy.deepcopy(model)
    with torch.no_grad():
        tilted.softmax.cluster.bias += 6.0
    for m in (model, tilted):
        best = m.softmax.log_probs(h[:, None])[:, 0].argmax(-1)
        with torch.no_grad():
            one_row = torch.cat([m.softmax.draw(h[j : j + 1], 0.0) for j in range(h.size(0))])
        assert torch.equal(one_row, best)
    assert (one_row >= model.softmax.bounds[1]).any() and (one_row < model.softmax.bounds[1]).any()
    with torch.no_grad():
        # top-k: only the k most likely words of the full distribution are ever drawn; top-1 is greedy
        assert torch.equal(model.softmax.draw(h, 1.0, 1), full.argmax(-1))
        top = full.topk(3, -1).indices
        drawn = torch.stack([model.softmax.draw(h, 2.0, 3, torch.Generator().manual_seed(s))
                             for s in range(20)], 1)  # (64, 20)
        assert (drawn[..., None] == top[:, None]).any(-1).all()
        # temperature 1: cluster then word has the full distribution's frequencies
        i = int(full[:, model.softmax.bounds[1] :].exp().sum(-1).argmax())  # the row most likely to reach a tail
        words = model.softmax.draw(h[i : i + 1].expand(40000, -1), 1.0, None,
                                torch.Generator().manual_seed(0))
    freq = torch.bincount(words, minlength=V).double() / words.numel()
    torch.testing.assert_close(freq, full[i].exp(), rtol=0, atol=0.01)
    tail_mass = float(full[i, model.softmax.bounds[1] :].exp().sum())
    assert float(freq[model.softmax.bounds[1] :].sum()) == pytest.approx(tail_mass, abs=0.01) and tail_mass > 0.05


class Segments(torch.utils.data.Dataset):
    """Consecutive [B, T] (inputs, targets) batches of one token stream, already batched (batch_size=None)."""

    def __init__(self, n: int, batch: int = 2, tgt_len: int = 8, seed: int = 0) -> None:
        ids = torch.randint(0, V, (batch, n * tgt_len + 1), generator=torch.Generator().manual_seed(seed))
        self.items = [(ids[:, s : s + tgt_len], ids[:, s + 1 : s + tgt_len + 1]) for s in range(0, n * tgt_len,
                                                                                               tgt_len)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def reprojected_mean_nll(model: MemoryTransformerLM, data: Segments) -> float:
    """Token-mean NLL over the batches in order, carrying the hidden-state memory only."""
    memory, total, count = None, 0.0, 0
    with torch.no_grad():
        for x, y in data:
            out = model(x, target_ids=y, memory=memory)
            memory = out.memory
            total, count = total + float(out.nll.sum()), count + y.numel()
    return total / count


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_the_lightning_test_and_validation_loops_use_the_cache_and_score_the_same(layer_type, monkeypatch):
    model = small_model(layer_type=layer_type).double()
    model.prune_heads({0: [2]})
    data = Segments(5)
    expected = reprojected_mean_nll(model, data)
    calls = []
    forward = MemoryTransformerLM.forward

    def recording(self, *args, **kwargs):
        calls.append(kwargs.get("cache") is not None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MemoryTransformerLM, "forward", recording)
    lm = LanguageModel(model)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False)
    loader = DataLoader(data, batch_size=None)
    for _ in range(2):  # two epochs: the cache restarts with the memory
        (val,) = trainer.validate(lm, loader, verbose=False)
        assert val["val/loss"] == pytest.approx(expected, rel=1e-6)
    (test,) = trainer.test(lm, loader, verbose=False)
    assert test["test/loss"] == pytest.approx(expected, rel=1e-6)
    assert calls == [False, True, True, True, True] * 3, "the first batch builds the cache, the others carry it"


DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader
    from tests.model.test_inference_cache import Segments, small_model
    from lightning_modules.training.language_model import LanguageModel

    class Reprojecting(LanguageModel):
        def _scored_nll(self, batch, stage):
            x, y = batch
            out = self.model(x, target_ids=y, memory=self._memory[stage])
            self._memory[stage] = out.memory
            return out.nll.sum(), (y != -100).sum()

    cls = Reprojecting if sys.argv[1] == "reprojecting" else LanguageModel
    model = small_model(layer_type="all_attention").double()
    model.prune_heads({1: [0, 3]})
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    (result,) = trainer.validate(cls(model), DataLoader(Segments(6), batch_size=None), verbose=False)
    if trainer.global_rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(result, f)
""")


@pytest.mark.slow
def test_two_process_ddp_validation_with_the_cache_equals_reprojecting(tmp_path):
    script = tmp_path / "ddp_validate.py"
    script.write_text(DDP_SCRIPT)
    env = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results = {}
    for mode in ("cached", "reprojecting"):
        out = tmp_path / f"{mode}.json"
        done = subprocess.run([sys.executable, str(script), mode, str(out)], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = json.loads(out.read_text())
    assert results["cached"]["val/loss"] == pytest.approx(results["reprojecting"]["val/loss"], rel=1e-6)
    assert results["cached"]["val/tokens"] == results["reprojecting"]["val/tokens"] > 0


@pytest.mark.slow
def test_the_generation_benchmark_runs_and_prints_its_figures(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.benchmarks.generation", "--repeats", "1", "--tokens", "2",
                           "--long-tokens", "5", "--sections", "generation,eval", "--data", str(tmp_path / "no-data")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = [json.loads(line) for line in done.stdout.splitlines()]
    metrics = {f["metric"] for f in figures}
    assert {f.get("tokens") for f in figures if f["metric"] == "generate_cache_speedup"} == {2, 5}
    assert {"generate_tokens_per_s", "generate_cache_speedup", "generate_pruned_speedup", "eval_tokens_per_s",
            "eval_cache_speedup", "eval_cache_time_ideal", "pruned_eval_speedup_cached", "read_bandwidth",
            "cached_step_floor", "cached_step_over_floor"} <= metrics
