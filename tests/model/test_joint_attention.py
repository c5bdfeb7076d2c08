"""The fast attention path ("joint") against the reference formula: the hand-written backward, the fused no-grad
forward, gated and pruned models in training and eval, autocast, torch.compile across a head removal."""

import pytest
import torch

import lightning_modules.model.joint_attention as joint_module
from lightning_modules.model import MemoryTransformerLM
from lightning_modules.model.joint_attention import JointAttention, joint_attention
from lightning_modules.training.cpu_allocator import configure_cpu_allocator

H, B, T, S, N, D = 2, 3, 4, 6, 5, 3


def reference_joint(q_content, k, v, position, q, persistent_k=None, persistent_v=None):
    """softmax([q_c k^T + position ; q K_p^T]) @ [v ; V_p], spelled out with autograd ops."""
    context = torch.einsum("hbtd,hbsd->hbts", q_content, k) + position  # (H, B, T, S)
    logits = context.reshape(H, B * T, S)
    if persistent_k is not None:
        logits = torch.cat([logits, torch.bmm(q, persistent_k.mT)], dim=-1)
    probs = logits.softmax(-1)
    out = torch.einsum("hbts,hbsd->hbtd", probs[..., :S].reshape(H, B, T, S), v).reshape(H, B * T, D)
    if persistent_k is not None:
        out = out + torch.bmm(probs[..., S:], persistent_v)
    return out


def joint_inputs(dtype=torch.float64, persistent=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    position = torch.randn(H, B, T, S, generator=gen, dtype=dtype)
    position[..., :, -2:] = float("-inf")  # masked keys, as the causal mask makes them
    inputs = [torch.randn(H, B, T, D, generator=gen, dtype=dtype), torch.randn(H, B, S, D, generator=gen, dtype=dtype),
              torch.randn(H, B, S, D, generator=gen, dtype=dtype), position,
              torch.randn(H, B * T, D, generator=gen, dtype=dtype)]
    if persistent:
        inputs += [torch.randn(H, N, D, generator=gen, dtype=dtype), torch.randn(H, N, D, generator=gen, dtype=dtype)]
    return [t.requires_grad_() for t in inputs]


@pytest.mark.parametrize("persistent", [True, False])
def test_joint_attention_forward_and_gradients_match_the_reference(persistent):
    inputs = joint_inputs(persistent=persistent)
    out = joint_attention(*inputs)
    expected = reference_joint(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(expected, inputs, grad, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["q_content", "k", "v", "position", "q", "persistent_k", "persistent_v"], got, want,
                          strict=False):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert torch.autograd.gradcheck(lambda *a: joint_attention(*a), inputs)


def test_joint_attention_gradients_with_attention_dropout():
    """The backward of the dropped-out softmax (rowsum(dO * O) still gives the softmax term) checked numerically,
    with the same dropout mask on every evaluation."""
    inputs = joint_inputs()

    def fn(*a):
        torch.manual_seed(7)
        return JointAttention.apply(*a, 0.3)

    assert torch.autograd.gradcheck(fn, inputs)
    with torch.no_grad():
        dropped, plain = fn(*inputs), JointAttention.apply(*inputs, 0.0)
    assert not torch.allclose(dropped, plain)


def test_only_the_requested_gradients_are_computed_and_they_are_right():
    inputs = joint_inputs()
    for t in inputs[:3]:
        t.requires_grad_(False)
    out = joint_attention(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs[3:])
    want = torch.autograd.grad(reference_joint(*inputs).sum(), inputs[3:])
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("persistent", [True, False])
def test_no_grad_forward_takes_the_fused_kernels_and_equals_the_reference(monkeypatch, dtype, persistent):
    calls = []
    fused = joint_module._joint_attention_inference
    monkeypatch.setattr(joint_module, "_joint_attention_inference", lambda *a: calls.append(1) or fused(*a))
    inputs = [t.detach() for t in joint_inputs(dtype, persistent)]
    with torch.no_grad():
        out = joint_attention(*inputs)
    assert calls == [1]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, reference_joint(*inputs), rtol=tol, atol=tol)
    joint_attention(*[t.requires_grad_() for t in inputs])  # with gradients: the autograd Function instead
    assert calls == [1]


def test_persistent_keys_must_come_with_values():
    inputs = joint_inputs()
    with pytest.raises(ValueError, match="both persistent_k and persistent_v"):
        joint_attention(*inputs[:6])


def gated_pruned_model(layer_type: str) -> MemoryTransformerLM:
    torch.manual_seed(0)
    model = MemoryTransformerLM(vocab_size=60, layer_type=layer_type, n_layers=2, d_model=16, n_heads=4, d_head=4,
                                n_persistent=8, d_inner=32, tgt_len=5, mem_len=6, cutoffs=[20], div_value=2.0,
                                dropout=0.0, dropemb=0.0, max_len=16, output_scaling=True).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        model.layers[0].gate.log_alpha.copy_(torch.tensor([3.0, -3.0, 0.5, 2.0]))
    model.gates_enabled = True
    model.prune_heads({1: [2]})
    return model


@pytest.mark.parametrize("layer_type", ["all_attention", "transformer_xl"])
def test_gated_and_pruned_model_trains_and_evaluates_the_same_on_joint_and_reference(layer_type):
    model = gated_pruned_model(layer_type)
    x, y = torch.randint(0, 60, (3, 5)), torch.randint(0, 60, (3, 5))
    memory = [torch.randn(3, 6, 16, dtype=torch.float64) for _ in range(3)]
    results = {}
    for impl in ("joint", "reference"):
        model.set_attn_impl(impl)
        model.zero_grad()
        model.train()
        torch.manual_seed(1)  # the same gate samples on both paths
        train_nll = model(x, y, memory=memory).nll
        train_nll.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad():
            eval_nll = model(x, y, memory=memory).nll
        results[impl] = (train_nll.detach(), grads, eval_nll)
    (train_a, grads_a, eval_a), (train_b, grads_b, eval_b) = results["joint"], results["reference"]
    torch.testing.assert_close(train_a, train_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eval_a, eval_b, rtol=1e-10, atol=1e-10)
    assert grads_a.keys() == grads_b.keys() and any("log_alpha" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-8, atol=1e-10, msg=name)


def test_joint_path_under_bfloat16_autocast_stays_close_to_float32():
    torch.manual_seed(0)
    model = MemoryTransformerLM(vocab_size=60, n_layers=2, d_model=32, n_heads=4, d_head=8, n_persistent=16,
                                tgt_len=8, mem_len=8, cutoffs=[20], div_value=2.0, dropout=0.0, dropemb=0.0,
                                max_len=16, attn_impl="joint")
    x, y = torch.randint(0, 60, (2, 8)), torch.randint(0, 60, (2, 8))
    reference = model(x, y).nll
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, y).nll
    low.sum().backward()
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_compiled_layers_match_eager_and_recompile_after_a_head_removal(monkeypatch):
    torch.manual_seed(0)
    eager = MemoryTransformerLM(vocab_size=60, n_layers=2, d_model=16, n_heads=4, d_head=4, n_persistent=8,
                                tgt_len=5, mem_len=6, cutoffs=[20], div_value=2.0, dropout=0.0, dropemb=0.0,
                                max_len=16)
    compiled = MemoryTransformerLM.from_config(eager.config)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_layers()
    assert compiled.layers_compiled and list(compiled.state_dict()) == list(eager.state_dict())
    resets = []
    reset = torch.compiler.reset
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1) or reset())
    x, y = torch.randint(0, 60, (3, 5)), torch.randint(0, 60, (3, 5))

    def train_nll(model):
        model.zero_grad()
        nll = model.train()(x, y).nll
        nll.sum().backward()
        return nll.detach(), model.layers[0].attn.q_proj.weight.grad.clone()

    for removals, removal in enumerate(({}, {0: [1, 2], 1: [0]}, {0: [0]})):
        for model in (eager, compiled):
            model.prune_heads(removal)
        assert len(resets) == removals  # only the compiled model drops its graphs, once per actual removal
        (nll_a, grad_a), (nll_b, grad_b) = train_nll(compiled), train_nll(eager)
        torch.testing.assert_close(nll_a, nll_b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)
    assert len(resets) == 2 and compiled.heads_per_layer == [1, 3]


def test_cpu_allocator_modes():
    assert configure_cpu_allocator("default") is False
    assert isinstance(configure_cpu_allocator("retain"), bool)
    with pytest.raises(ValueError, match="must be one of"):
        configure_cpu_allocator("jemalloc")


@pytest.mark.parametrize("impl", ["joint", "sdpa", "reference"])
def test_training_after_an_inference_mode_forward_of_the_same_shape(impl):
    """Lightning validates under torch.inference_mode; the causal mask made then is reused by later training
    steps of the same shape and must be a normal tensor that autograd can save."""
    model = MemoryTransformerLM(vocab_size=60, n_layers=1, d_model=16, n_heads=2, d_head=8, n_persistent=8,
                                tgt_len=3, mem_len=7, cutoffs=[], dropout=0.0, dropemb=0.0, max_len=16,
                                attn_impl=impl)
    x, y = torch.randint(0, 60, (2, 3)), torch.randint(0, 60, (2, 3))
    with torch.inference_mode():
        model.eval()(x, y)
    model.train()(x, y).nll.mean().backward()
    assert model.layers[0].attn.q_proj.weight.grad is not None


def test_the_fused_no_grad_path_accepts_inputs_strided_along_the_head_width():
    inputs = [t.detach() for t in joint_inputs()]
    strided = [t.mT.contiguous().mT if t.dim() >= 2 and t.size(-1) > 1 and i != 3 else t
               for i, t in enumerate(inputs)]
    assert any(t.stride(-1) != 1 for t in strided)
    with torch.no_grad():
        torch.testing.assert_close(joint_attention(*strided), reference_joint(*inputs), rtol=1e-12, atol=1e-12)
