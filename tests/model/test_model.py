"""Tests of the plain-PyTorch model: attention paths, memory, adaptive softmax, accounting, arguments."""

import copy
import math

import pytest
import torch

from lightning_modules.model import LAYER_TYPES, MemoryTransformerLM
from lightning_modules.model.adaptive import AdaptiveEmbedding, AdaptiveSoftmax
from lightning_modules.model.attention import (
    RelativeMultiHeadAttention,
    attention_mask,
    blocked_mask,
    rel_shift,
    relative_index,
)

V = 300  # vocabulary of the small test models


def small_model(**overrides) -> MemoryTransformerLM:
    """A tiny model with three adaptive clusters, every dropout off."""
    kwargs = dict(
        vocab_size=V, layer_type="all_attention", n_layers=2, d_model=32, n_heads=4, d_head=8,
        n_persistent=16, d_inner=64, tgt_len=8, mem_len=8, cutoffs=[50, 150], div_value=2.0,
        dropout=0.0, dropatt=0.0, dropemb=0.0, max_len=32,
    )
    kwargs.update(overrides)
    return MemoryTransformerLM(**kwargs)


def randomize_(module: torch.nn.Module, std: float = 0.3) -> None:
    """Give every parameter (biases u, v', o_proj bias included) non-trivial random values."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


# ------------------------------------------------------------------------------------------ attention parts


def test_same_length_mask_gives_every_query_mem_len_plus_one_keys():
    T, M = 5, 7
    allowed = attention_mask(T, M, same_length=True)
    assert allowed.shape == (T, M + T)
    assert (allowed.sum(1) == M + 1).all()
    for i in range(T):
        assert allowed[i].nonzero().squeeze(1).tolist() == list(range(i, M + i + 1))
    causal = attention_mask(T, M, same_length=False)
    assert causal.sum(1).tolist() == [M + 1 + i for i in range(T)]


def test_a_mask_first_built_in_inference_mode_serves_a_later_training_step():
    model = small_model()
    x = torch.randint(0, model.config.vocab_size, (2, model.tgt_len))
    blocked_mask.cache_clear()
    with torch.inference_mode():  # as Lightning validates
        model.eval()(x, x)
    assert blocked_mask(model.tgt_len, model.mem_len, model.config.same_length, x.device).equal(
        ~attention_mask(model.tgt_len, model.mem_len, model.config.same_length))
    model.train()(x, x).nll.mean().backward()  # the cached mask is saved for backward by masked_fill


def test_rel_shift_picks_the_row_of_each_relative_distance():
    T, S = 4, 9
    x = torch.randn(2, 3, T, S)
    allowed = attention_mask(T, S - T, same_length=False)
    expected = x.gather(-1, relative_index(T, S).expand(2, 3, T, S))
    assert torch.equal(rel_shift(x)[..., allowed], expected[..., allowed])
    # row r of the position slice encodes distance S-1-r: query i (absolute S-T+i) to key j
    for i in range(T):
        for j in range(S - T + i + 1):
            assert S - 1 - relative_index(T, S)[i, j].item() == (S - T + i) - j


@pytest.mark.parametrize("seg", [6, 1])  # 1: the one-query core of generation steps
@pytest.mark.parametrize("impl", ["joint", "sdpa", "reference"])
def test_head_scale_none_is_bit_identical_and_zero_equals_slicing_the_head_out(impl, seg):
    torch.manual_seed(0)
    d, H, D, N = 16, 3, 4, 5
    attn = RelativeMultiHeadAttention(d, H, D, n_persistent=N, impl=impl).double().eval()
    randomize_(attn)
    B = 1 if seg == 1 else 2
    x, mem, pos = torch.randn(B, seg, d).double(), torch.randn(B, 4, d).double(), torch.randn(4 + seg, d).double()
    base = attn(x, mem, pos)
    assert torch.equal(base, attn(x, mem, pos, head_scale=None))
    assert torch.equal(base, attn(x, mem, pos, head_scale=torch.ones(H, dtype=torch.double)))

    # head-major layout: dropping head 1's slices by hand gives the same output as scaling it by 0
    keep = [0, 2]
    rows = torch.cat([torch.arange(H * D)[attn.head_slice(h)] for h in keep])
    small = RelativeMultiHeadAttention(d, len(keep), D, n_persistent=N, impl=impl).double().eval()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "r_proj"):
            getattr(small, name).weight.copy_(getattr(attn, name).weight[rows])
        small.o_proj.weight.copy_(attn.o_proj.weight[:, rows])
        small.o_proj.bias.copy_(attn.o_proj.bias)
        for name in ("content_bias", "position_bias", "persistent_k", "persistent_v"):
            getattr(small, name).copy_(getattr(attn, name)[keep])
    gated = attn(x, mem, pos, head_scale=torch.tensor([1.0, 0.0, 1.0], dtype=torch.double))
    torch.testing.assert_close(small(x, mem, pos), gated, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(gated, base)


# ------------------------------------------------------------------------------------------- model paths


@pytest.mark.parametrize("seg", [8, 1])  # 1 (at batch 1): every fast impl takes the one-query core
@pytest.mark.parametrize("fast", ["joint", "sdpa"])
@pytest.mark.parametrize("same_length", [True, False])
@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_fast_paths_equal_reference_path_forward_and_gradients(layer_type, same_length, fast, seg):
    torch.manual_seed(0)
    model = small_model(layer_type=layer_type, same_length=same_length).double()
    randomize_(model, std=0.1)
    B = 1 if seg == 1 else 3
    x, y = torch.randint(0, V, (B, seg)), torch.randint(0, V, (B, seg))
    memory = [torch.randn(B, 8, 32, dtype=torch.double) for _ in range(3)]

    results = {}
    for impl in (fast, "reference"):
        model.set_attn_impl(impl)
        model.zero_grad()
        out = model(x, target_ids=y, memory=memory)
        full = model(x, memory=memory)
        (out.nll.sum() + full.log_probs[..., :5].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (out.nll, full.log_probs, out.memory, grads)

    (nll_a, lp_a, mem_a, g_a), (nll_b, lp_b, mem_b, g_b) = results[fast], results["reference"]
    torch.testing.assert_close(nll_a, nll_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lp_a, lp_b, rtol=1e-10, atol=1e-10)
    for a, b in zip(mem_a, mem_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert g_a.keys() == g_b.keys() and len(g_a) == len([p for p in model.parameters() if p.requires_grad])
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("impl", ["joint", "sdpa", "reference"])
@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_changing_future_tokens_leaves_earlier_predictions_unchanged(layer_type, impl):
    torch.manual_seed(0)
    # double precision: in float32, GEMMs over a different number of rows per cluster round differently
    model = small_model(layer_type=layer_type, attn_impl=impl).double().eval()
    randomize_(model, std=0.1)
    memory = model(torch.randint(0, V, (2, 8))).memory  # a real, non-zero memory
    x = torch.randint(0, V, (2, 8))
    x2 = x.clone()
    x2[:, 5:] = (x[:, 5:] + 1 + torch.randint(0, V - 1, (2, 3))) % V
    a, b = model(x, memory=memory).log_probs, model(x2, memory=memory).log_probs
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_memory_holds_layer_inputs_and_changes_the_output(layer_type):
    torch.manual_seed(0)
    model = small_model(layer_type=layer_type, mem_len=6).eval()
    randomize_(model, std=0.1)
    x = torch.randint(0, V, (2, 8))
    out = model(x)
    assert len(out.memory) == model.n_layers + 1
    for m in out.memory:
        assert m.shape == (2, 6, 32) and not m.requires_grad
    # entry 0 = the scaled embedding output (the input of layer 0), last mem_len positions of the segment
    torch.testing.assert_close(out.memory[0], model.embedding(x)[:, -6:] * math.sqrt(32))

    y = torch.randint(0, V, (2, 8))
    with_a = model(y, memory=out.memory).log_probs
    with_b = model(y, memory=model(torch.randint(0, V, (2, 8))).memory).log_probs
    assert not torch.allclose(with_a, with_b, atol=1e-4)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_two_segments_with_memory_equal_one_long_pass(layer_type):
    """Recurrence is exact: with a causal mask, segment 2 attending to the memory of segment 1 gives the
    same predictions as one pass over both (memory length = segment length, so nothing is cut)."""
    torch.manual_seed(0)
    model = small_model(layer_type=layer_type, same_length=False).double().eval()
    randomize_(model, std=0.1)
    x = torch.randint(0, V, (2, 16))
    empty = [torch.zeros(2, 0, 32, dtype=torch.double) for _ in range(3)]
    first = model(x[:, :8], memory=empty)
    second = model(x[:, 8:], memory=first.memory).log_probs
    whole = model(x, memory=empty).log_probs
    torch.testing.assert_close(second, whole[:, 8:], rtol=1e-10, atol=1e-10)


def test_copying_the_previous_segment_is_learnable_only_with_memory():
    """Targets of segment 2 are the tokens of segment 1: a tiny model learns it from the memory, and
    cannot do better than chance (log 16) when the memory is reset to zeros."""

    def train(use_memory: bool) -> float:
        torch.manual_seed(0)
        model = MemoryTransformerLM(
            vocab_size=16, n_layers=1, d_model=32, n_heads=2, d_head=16, n_persistent=8, tgt_len=4,
            mem_len=4, cutoffs=[], dropout=0.0, dropemb=0.0, max_len=8,
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        for _ in range(40):
            first, second = torch.randint(0, 16, (32, 4)), torch.randint(0, 16, (32, 4))
            with torch.no_grad():
                memory = model(first).memory
            loss = model(second, target_ids=first, memory=memory if use_memory else None).nll.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    assert train(use_memory=True) < 0.1
    assert train(use_memory=False) > 0.9 * math.log(16)


def test_dense_training_step_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = small_model(dropout=0.1, dropatt=0.1, dropemb=0.1, word_dropout=0.1).train()
    x, y = torch.randint(0, V, (4, 8)), torch.randint(0, V, (4, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(x, target_ids=y).nll.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------------------- adaptive softmax


@pytest.mark.parametrize("cutoffs", [[], [50, 150]])
def test_nll_equals_gathered_log_probs_which_sum_to_one(cutoffs):
    torch.manual_seed(0)
    model = small_model(cutoffs=cutoffs).double().eval()
    randomize_(model, std=0.1)
    x = torch.randint(0, V, (3, 8))
    y = torch.tensor([0, 49, 50, 149, 150, V - 1, 7, 200]).repeat(3, 1)  # every cluster, both edges
    log_probs = model(x).log_probs
    assert log_probs.shape == (3, 8, V)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 8, dtype=torch.double))
    nll = model(x, target_ids=y).nll
    torch.testing.assert_close(nll, -log_probs.gather(-1, y[..., None]).squeeze(-1), rtol=1e-12, atol=1e-12)


def test_ignored_targets_score_exactly_zero_and_get_no_gradient():
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(V, 16, [50, 150], div_value=2.0)
    softmax = AdaptiveSoftmax(emb)
    h = torch.randn(2, 5, 16, requires_grad=True)
    y = torch.tensor([[3, -100, 160, -100, 60], [-100, -100, -100, -100, -100]])
    nll = softmax.nll(h, y)
    assert (nll[y == -100] == 0).all() and (nll[y != -100] > 0).all()
    nll.sum().backward()
    assert (h.grad[y == -100] == 0).all() and (h.grad[y != -100].abs().sum(-1) > 0).all()


def test_tail_clusters_are_computed_only_for_the_tokens_that_need_them(monkeypatch):
    emb = AdaptiveEmbedding(V, 16, [50, 150], div_value=2.0)
    softmax = AdaptiveSoftmax(emb)
    calls = []
    original = softmax._tail_log_probs

    def spy(h, i):
        calls.append((i, h.size(0)))
        return original(h, i)

    monkeypatch.setattr(softmax, "_tail_log_probs", spy)
    h = torch.randn(1, 6, 16)
    softmax.nll(h, torch.tensor([[1, 2, 3, -100, 4, 5]]))
    assert calls == [(1, 0), (2, 0)]  # empty clusters run on zero rows (keeps every weight in the graph)
    calls.clear()
    softmax.nll(h, torch.tensor([[1, 200, 3, 299, 4, 5]]))
    assert calls == [(1, 0), (2, 2)]


def test_a_few_tokens_embed_as_in_a_batch_through_their_clusters_alone():
    emb = AdaptiveEmbedding(V, 16, [50, 150], div_value=2.0)
    edges = torch.tensor([[0, 49, 50, 149, 150, V - 1]])
    batched = emb(edges)  # (1, 6, 16), training mode: every cluster's rows gathered and scattered back
    emb.eval()
    for ids in (edges, edges.view(3, 2), edges[:, 2:4], torch.tensor([[160, 3, 170], [5, 4, 0]])):
        # routed on the host: the same rows through the same ops, bit for bit
        assert torch.equal(emb(ids), emb.train()(ids)), ids
        emb.eval()
    for j, token in enumerate(edges[0].tolist()):
        own = sum(token >= b for b in emb.bounds[1:-1])
        others_nan = copy.deepcopy(emb)
        with torch.no_grad():
            for i in set(range(len(emb.embs))) - {own}:  # any read of another cluster would give NaN
                others_nan.embs[i].weight.fill_(float("nan"))
                others_nan.projs[i].weight.fill_(float("nan"))
        alone = others_nan(torch.tensor([[token]]))
        assert torch.equal(alone, emb(torch.tensor([[token]]))), "no other cluster contributes"
        torch.testing.assert_close(alone, batched[:, j : j + 1])
        assert torch.equal(alone, emb.train()(torch.tensor([[token]]))), "the batched path on one row, bit for bit"
        emb.eval()
    assert torch.equal(emb(torch.tensor([[V]])), torch.zeros(1, 1, 16)), "out of range: the batched path's zeros"


def test_softmax_is_tied_to_the_embedding_and_counts_it_once():
    model = small_model().double()
    emb, softmax = model.embedding, model.softmax
    for table, out_weight in zip(emb.embs, softmax.out_weights, strict=True):
        assert out_weight is table.weight  # output weights = embedding tables
    for proj, down in zip(list(emb.projs)[1:], softmax.tail_projs, strict=True):
        assert down is proj.weight  # tail down-projections = input up-projections (used transposed)
    assert softmax.shortlist_proj is not None and softmax.shortlist_proj.weight is not emb.projs[0].weight
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("softmax.out_weights") or n.startswith("softmax.tail_projs") for n in names)
    # a shortlist word never seen as input still gets a gradient through the tied output weight
    x = torch.full((1, 4), 5)
    y = torch.tensor([[6, 7, 8, 9]])
    model(x, target_ids=y).nll.sum().backward()
    assert emb.embs[0].weight.grad[7].abs().sum() > 0


def test_word_dropout_drops_whole_word_types_and_rescales():
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(20, 8, [5, 10], div_value=2.0, word_dropout=0.5)
    ids = torch.tensor([[1, 1, 7, 7, 12, 12, 3, 3, 1, 7]])
    clean = emb.eval()(ids)
    dropped = emb.train()(ids)
    ratio = (dropped / clean).mean(-1).squeeze(0)  # per position: 0 (dropped) or 2 (kept, 1/(1-p))
    assert all(math.isclose(r, 0.0, abs_tol=1e-6) or math.isclose(r, 2.0, rel_tol=1e-5) for r in ratio.tolist())
    for word in ids.unique():
        assert len({round(r, 4) for r in ratio[ids[0] == word].tolist()}) == 1  # same fate for one word


# ------------------------------------------------------------------------------------------ accounting

PAPER = dict(
    vocab_size=267735, n_layers=16, d_model=512, n_heads=8, d_head=64, n_persistent=2048, d_inner=2048,
    tgt_len=192, mem_len=192, cutoffs=[20000, 40000, 200000], div_value=4.0, max_len=512,
)


def test_paper_config_parameter_counts():
    with torch.device("meta"):  # shapes only: no memory, no time
        all_att = MemoryTransformerLM(layer_type="all_attention", **PAPER)
        txl = MemoryTransformerLM(layer_type="transformer_xl", **PAPER)
    counts = all_att.parameter_counts()
    # docs/method.md §1.5: 3,410,440 per All-attention layer = 4·512² (q, k, v, r) + 512² + 512 (W_o, b_o)
    # + 2·8·2048·64 (persistent K, V) + 2·8·64 (u, v') + 2·512 (LN) + 8 (head gates)
    assert counts["per_layer"] == [3_410_440] * 16
    assert all_att.num_parameters(include_embeddings=False) == 16 * 3_410_440 == counts["layers"]
    assert counts["embeddings"] == 18_810_040  # 20000·512 + 20000·128 + 160000·32 + 67735·8 + 512·(512+128+32+8)
    assert counts["softmax_untied"] == 531_418  # shortlist proj 512² + cluster 3·512+3 + output biases 267735
    assert counts["position_table"] == 512 * 512
    # docs/method.md §1.5: 74.17M
    assert counts["total"] == all_att.num_parameters(include_embeddings=True) == 74_170_514 + 16 * 8
    # docs/method.md §1.5 counts the nnlib TXL layer as 3,412,992 = 4·512² + (512² + 512) + (2·512·2048 + 2048 + 512)
    # + 2·2·512 (two LNs). Ours also has per-layer u and v' (2·8·64 = 1,024), which nnlib shares across layers,
    # and the 8 head gates.
    assert txl.parameter_counts()["per_layer"] == [3_412_992 + 1_024 + 8] * 16


def test_paper_config_macs_per_token():
    with torch.device("meta"):
        all_att = MemoryTransformerLM(layer_type="all_attention", **PAPER)
        txl = MemoryTransformerLM(layer_type="transformer_xl", **PAPER)
    macs = all_att.macs_per_token()
    # docs/method.md §1.5 at S = 384, N = 2048: 8 heads · 466,944 = 3,735,552 MACs per token per layer
    assert macs["context_len"] == 384
    assert macs["per_layer"] == [8 * 466_944] * 16 and macs["layers"] == 16 * 3_735_552
    # TXL: attention 8 · (4·512·64 + 3·384·64) = 1,638,400 + FF 2·512·2048 = 2,097,152: the same total
    assert txl.macs_per_token()["per_layer"] == [1_638_400 + 2_097_152] * 16
    # adaptive softmax head: shortlist proj 512² + 20000·512 + 3 cluster logits·512
    assert macs["softmax_head"] == 512 * 512 + 20000 * 512 + 3 * 512
    assert macs["softmax_tails"] == [20000 * 128 + 512 * 128, 160000 * 32 + 512 * 32, 67735 * 8 + 512 * 8]
    assert macs["total"] == macs["layers"] + macs["softmax_full"]


# ------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(layer_type="lstm"), r"layer_type must be one of \('all_attention', 'transformer_xl'\); got 'lstm'"),
        (dict(attn_impl="flash"), r"attn_impl must be one of"),
        (dict(n_heads=0), r"n_heads must be a positive integer; got 0"),
        (dict(d_model=-4), r"d_model must be a positive integer"),
        (dict(n_persistent=0), r"n_persistent must be a positive integer"),
        (dict(layer_type="transformer_xl", d_inner=0), r"d_inner must be a positive integer"),
        (dict(mem_len=-1), r"mem_len must be a non-negative integer"),
        (dict(mem_len=0), r"same_length=True with mem_len=0"),
        (dict(cutoffs=[150, 50]), r"cutoffs must be positive and strictly increasing"),
        (dict(cutoffs=[50, 50]), r"strictly increasing"),
        (dict(cutoffs=[50, V]), r"every cutoff must be < vocab_size=300"),
        (dict(tgt_len=30, mem_len=8), r"tgt_len \+ mem_len = 38 exceeds max_len=32"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropatt=-0.1), r"dropatt must be in \[0, 1\)"),
        (dict(div_value=0.5), r"div_value must be >= 1"),
        (dict(d_model=8, div_value=4.0), r"last cluster's width"),
    ],
)
def test_bad_arguments_raise_helpful_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_model(**overrides)


def test_bad_forward_inputs_raise_helpful_value_errors():
    model = small_model()
    x = torch.randint(0, V, (2, 8))
    with pytest.raises(ValueError, match=r"memory must hold n_layers \+ 1 = 3 tensors"):
        model(x, memory=model.init_memory(2)[:2])
    with pytest.raises(ValueError, match=r"\[batch=2, M, d_model=32\]"):
        model(x, memory=model.init_memory(3))
    with pytest.raises(ValueError, match=r"exceeds max_len=32"):
        model(torch.randint(0, V, (2, 30)))
    with pytest.raises(ValueError, match=r"target_ids shape"):
        model(x, target_ids=x[:, :4])


def test_every_parameter_gets_a_gradient_when_tail_clusters_are_empty():
    """DDP (without find_unused_parameters) hangs if a rank's batch leaves a parameter out of the graph."""
    model = MemoryTransformerLM(vocab_size=100, n_layers=1, d_model=16, n_heads=2, d_head=8, n_persistent=4,
                                tgt_len=4, mem_len=4, cutoffs=[20, 50], div_value=2.0, dropout=0.0, dropemb=0.0)
    ids = torch.randint(0, 20, (2, 4))  # shortlist words only: both tail clusters are empty
    model(ids, target_ids=ids).nll.sum().backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters left out of the backward pass: {missing}"


def test_greedy_generation_through_memory_equals_argmax_of_one_full_pass():
    torch.manual_seed(0)
    model = MemoryTransformerLM(vocab_size=40, n_layers=2, d_model=16, n_heads=2, d_head=8, n_persistent=4,
                                tgt_len=3, mem_len=12, cutoffs=[10], div_value=2.0, dropout=0.0, dropemb=0.0).eval()
    prompt = torch.randint(0, 40, (2, 5))
    generated = model.generate(prompt, max_new_tokens=4, temperature=0)
    assert generated.shape == (2, 4)
    # one pass over prompt + continuation sees the same context at every position (memory of zeros, same_length)
    full = torch.cat([prompt, generated[:, :-1]], dim=1)
    with torch.no_grad():
        expected = model(full).log_probs[:, prompt.size(1) - 1 :].argmax(-1)
    assert torch.equal(generated, expected)


def test_sampled_generation_respects_top_k_and_seed():
    model = MemoryTransformerLM(vocab_size=40, n_layers=1, d_model=16, n_heads=2, d_head=8, n_persistent=4,
                                tgt_len=4, mem_len=4, cutoffs=[], div_value=1.0, dropout=0.0, dropemb=0.0).eval()
    prompt = torch.randint(0, 40, (3, 2))
    first = model.generate(prompt, 6, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, model.generate(prompt, 6, temperature=0)), "top-1 sampling is greedy"
    a = model.generate(prompt, 6, temperature=2.0, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 6, temperature=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    for empty in (prompt[:, :0], prompt[:0]):
        with pytest.raises(ValueError, match="prompt_ids"):
            model.generate(empty, 3)
