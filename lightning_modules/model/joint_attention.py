"""One softmax over context keys and persistent slots (the "joint" attention core), with a hand-written backward.

Why by hand: ``F.scaled_dot_product_attention`` needs the persistent keys/values copied into every batch element
and a dense ``[B, H, T, S+N]`` bias (the position term is not a plain dot product), and it cannot return the
bias gradient the position term needs. On CPU that path, and the plain autograd path (whose softmax backward alone
costs more than a matmul here), reach a third of the machine's matmul throughput. This core:
  - keeps the persistent keys and values as one ``[H, N, D]`` tensor and folds the batch into the query rows, so
    every persistent product is one batched matmul per head, with no per-batch copies;
  - in training, writes all logits once into a single ``[H, B*T, S+N]`` buffer that the softmax overwrites in
    place, and in its backward uses the flash-attention identity rowsum(dP * P) = rowsum(dO * O), so the softmax
    gradient is two in-place passes;
  - without gradients, runs context and persistent slots through torch's fused CPU flash kernel and merges the two
    by their log-sum-exp, so no ``[.., S+N]`` tensor is materialised at all.

Layout (head-major, batch folded into rows): H heads, B batch, T queries, S context keys, N persistent slots, D
head width. The position logits ``[H, B, T, S]`` (scaled, -inf where masked) come from autograd code, so their
gradient flows back to the position term the usual way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.model.precision import softmax_dtype


def _bmm_into(target: Tensor, a: Tensor, b: Tensor) -> None:
    """target[...] = a @ b (batched), written in place when the dtypes allow, else through a copy."""
    if target.dtype == a.dtype:
        torch.bmm(a, b, out=target)
    else:
        target.copy_(torch.bmm(a, b))


def _softmax_grad(grad_kept: Tensor, probs: Tensor, kept: Tensor, row: Tensor, dropout_p: float) -> Tensor:
    """Gradient of the logits from that of the (dropped-out) probabilities, in place in ``grad_kept``."""
    grad = grad_kept.to(probs.dtype)
    if dropout_p > 0:
        return grad.mul_(kept).addcmul_(probs, row, value=-1)
    return grad.sub_(row).mul_(probs)


def _joint_softmax(content: Tensor, q: Tensor, persistent_k: Tensor | None) -> Tensor:
    """softmax over [content ; q K_p^T] in float32 at least: eager writes both into one buffer that the softmax
    overwrites in place; under torch.compile (whose Inductor cannot lower the ``out=`` writes into views) it is
    the plain cat and softmax, which Inductor fuses itself."""
    dtype = softmax_dtype(content.dtype)
    if torch.compiler.is_compiling():
        parts = [content] if persistent_k is None else [content, torch.bmm(q, persistent_k.mT)]
        return torch.cat([p.to(dtype) for p in parts], dim=-1).softmax(dim=-1)
    H, BT, S = content.shape
    N = 0 if persistent_k is None else persistent_k.size(1)
    logits = content.new_empty((H, BT, S + N), dtype=dtype)
    logits[..., :S].copy_(content)
    if N:
        _bmm_into(logits[..., S:], q, persistent_k.mT)
    return torch.softmax(logits, dim=-1, out=logits)


class JointAttention(torch.autograd.Function):
    """softmax([q_c k^T + position ; q K_p^T]) @ [v ; V_p], forward and backward (see ``joint_attention``)."""

    @staticmethod
    def forward(ctx, q_content: Tensor, k: Tensor, v: Tensor, position: Tensor, q: Tensor,
                persistent_k: Tensor | None, persistent_v: Tensor | None, dropout_p: float) -> Tensor:
        H, B, T, S = position.shape
        D = v.size(-1)
        N = 0 if persistent_k is None else persistent_k.size(1)
        dtype = v.dtype
        rows = (H * B, T)  # (head, batch) pairs x queries: the context matmuls' batch
        with torch.autocast(v.device.type, enabled=False):
            content = torch.baddbmm(position.reshape(*rows, S).to(dtype), q_content.reshape(*rows, D),
                                    k.reshape(H * B, S, D).mT)  # (H*B, T, S)
            probs = _joint_softmax(content.view(H, B * T, S), q, persistent_k)  # (H, B*T, S+N)
            kept = probs
            if dropout_p > 0:
                keep = torch.empty_like(probs).bernoulli_(1 - dropout_p)
                kept = probs * keep.div_(1 - dropout_p)
            kept = kept.to(dtype)
            out = torch.bmm(kept[..., :S].view(*rows, S), v.reshape(H * B, S, D)).view(H, B * T, D)
            if N:
                out = torch.baddbmm(out, kept[..., S:], persistent_v)  # (H, B*T, D)
        ctx.shape = (H, B, T, S, N, D)
        ctx.dropout_p = dropout_p
        ctx.save_for_backward(q_content, k, v, q, persistent_k, persistent_v, probs,
                              kept if dropout_p > 0 else None, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q_content, k, v, q, persistent_k, persistent_v, probs, kept, out = ctx.saved_tensors
        H, B, T, S, N, D = ctx.shape
        rows = (H * B, T)
        needs = ctx.needs_input_grad
        dtype = v.dtype
        grad_out = grad_out.contiguous()
        if kept is None:
            kept = probs.to(dtype)
        grads: list[Tensor | None] = [None] * 8
        with torch.autocast(v.device.type, enabled=False):
            # rowsum(dP_kept * P_kept) = rowsum(dO * O): the softmax-gradient term, from [.., D]-sized tensors
            row = (grad_out.to(probs.dtype) * out.to(probs.dtype)).sum(-1, keepdim=True)  # (H, B*T, 1)
            grad_out_rows = grad_out.view(*rows, D)
            if needs[2]:
                grads[2] = torch.bmm(kept[..., :S].view(*rows, S).mT, grad_out_rows).view(H, B, S, D)
            if N and needs[6]:
                grads[6] = torch.bmm(kept[..., S:].mT, grad_out)  # (H, N, D)
            if needs[0] or needs[1] or needs[3]:
                grad_context = _softmax_grad(  # dL/d(context logits), (H*B, T, S)
                    torch.bmm(grad_out_rows, v.reshape(H * B, S, D).mT), probs[..., :S].view(*rows, S),
                    kept[..., :S].view(*rows, S), row.view(*rows, 1), ctx.dropout_p)
                if needs[3]:
                    grads[3] = grad_context.view(H, B, T, S)
                grad_context = grad_context.to(dtype)
                if needs[0]:
                    grads[0] = torch.bmm(grad_context, k.reshape(H * B, S, D)).view(H, B, T, D)
                if needs[1]:
                    grads[1] = torch.bmm(grad_context.mT, q_content.reshape(*rows, D)).view(H, B, S, D)
            if N and (needs[4] or needs[5]):
                grad_persistent = _softmax_grad(
                    torch.bmm(grad_out, persistent_v.mT), probs[..., S:], kept[..., S:], row, ctx.dropout_p
                ).to(dtype)  # (H, B*T, N)
                if needs[4]:
                    grads[4] = torch.bmm(grad_persistent, persistent_k)  # (H, B*T, D)
                if needs[5]:  # as (q^T dS)^T: MKL is much slower at dS^T q with this shape
                    grads[5] = torch.bmm(q.mT, grad_persistent).mT  # (H, N, D)
        return tuple(grads)


def _has_cpu_flash(q: Tensor) -> bool:
    """Whether torch's fused CPU flash-attention op (with its log-sum-exp output) can take ``q``."""
    return q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _flash(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """softmax(q k^T + bias) v and its log-sum-exp per query, by torch's fused CPU kernel (the one behind
    ``F.scaled_dot_product_attention`` on CPU, called as its aten op because the public function does not return
    the log-sum-exp). q [X, Y, L, D], k/v [X, Y, S, D], bias [X, Y, L, S] -> [X, Y, L, D], [X, Y, L]."""
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    # the aten op, unlike F.scaled_dot_product_attention, assumes unit stride along the head width
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=1.0)


def _joint_attention_inference(q_content: Tensor, k: Tensor, v: Tensor, position: Tensor, q: Tensor,
                               persistent_k: Tensor | None, persistent_v: Tensor | None) -> Tensor:
    """No-grad forward with fused kernels: context and persistent slots each through the CPU flash kernel (so
    neither materialises its probabilities), merged by log-sum-exp weights, which is exactly the joint softmax."""
    H, B, T, _ = position.shape
    out, lse = _flash(q_content, k, v, position)  # (H, B, T, D), (H, B, T)
    out, lse = out.reshape(H, B * T, -1), lse.reshape(H, B * T)
    if persistent_k is None:
        return out
    out_p, lse_p = _flash(q[None], persistent_k[None], persistent_v[None])  # (1, H, B*T, D), (1, H, B*T)
    # the context's share of the joint softmax mass: e^lse / (e^lse + e^lse_p) = sigmoid(lse - lse_p)
    context_share = torch.sigmoid(lse - lse_p[0]).unsqueeze(-1)  # (H, B*T, 1)
    if context_share.dtype != out.dtype:
        context_share = context_share.to(out.dtype)
    return torch.lerp(out_p[0], out, context_share)


def joint_attention(q_content: Tensor, k: Tensor, v: Tensor, position: Tensor, q: Tensor,
                    persistent_k: Tensor | None = None, persistent_v: Tensor | None = None,
                    dropout_p: float = 0.0) -> Tensor:
    """Attention with one softmax over context keys and persistent slots.

    The logit of query i against context key j is q_content_i · k_j + position[i, j]; against persistent slot n
    it is q_i · persistent_k_n. Scaling is the caller's (fold it into q_content, position and persistent_k).

    Args:
        q_content: [H, B, T, D] queries for the context keys.
        k, v: [H, B, S, D] context keys and values.
        position: [H, B, T, S] additive logit term (the relative-position logits), -inf where masked. Every
            query must keep at least one context key (the causal mask always leaves it itself); the fused no-grad
            kernel gives a fully masked row no defined meaning.
        q: [H, B*T, D] queries for the persistent keys.
        persistent_k, persistent_v: [H, N, D] persistent keys and values shared by the batch, or None (N = 0).
        dropout_p: dropout on the attention probabilities (pass 0 in eval).
    Returns:
        [H, B*T, D] attention output.
    """
    if (persistent_k is None) != (persistent_v is None):
        raise ValueError("pass both persistent_k and persistent_v, or neither")
    inputs = (q_content, k, v, position, q, persistent_k, persistent_v)
    grad_needed = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if not grad_needed and dropout_p == 0 and _has_cpu_flash(q):
        return _joint_attention_inference(*inputs)
    return JointAttention.apply(*inputs, dropout_p)
