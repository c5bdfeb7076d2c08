"""Transformer-XL relative-position multi-head attention with recurrence memory and, for All-attention,
per-head persistent key/value slots (docs/method.md §1.1, §1.2).

Read top-down: the mask and relative-position helpers; :class:`RelativeMultiHeadAttention`, whose
``_attend_reference`` is the formula written out, followed by the two fast cores tested equal to it (``sdpa`` and
``joint``); then :class:`LayerKVCache`, the projected memory keys/values that no-grad evaluation reuses from one
segment to the next instead of re-projecting the memory, and :class:`RingKVCache`, the same for generation, in
buffers a step writes in place.

Notation: B batch, T segment (query) length, M memory length, S = M + T keys from context, H heads, D = d_head,
N persistent slots per head.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lightning_modules.model.config import ATTN_IMPLS
from lightning_modules.model.joint_attention import joint_attention
from lightning_modules.model.precision import as_dtype, at_least_fp32
from lightning_modules.model.slicing import ParameterSlice, slice_parameter_


def resolve_impl(impl: str, device: torch.device) -> str:
    """The attention core that ``impl`` names on ``device``: "auto" is "joint" on CPU and "sdpa" elsewhere."""
    if impl != "auto":
        return impl
    return "joint" if device.type == "cpu" else "sdpa"


def attention_mask(q_len: int, n_mem: int, same_length: bool, device: torch.device | None = None) -> Tensor:
    """Which context keys each query may attend: bool [T, S], True = allowed (docs/method.md §1.1).

    Keys are [memory; segment], so query i sits at absolute position n_mem + i and may attend key j when
    j <= n_mem + i (causal). With `same_length` it also needs j >= i, so every query sees exactly n_mem + 1
    keys (tril(diag=M) XOR tril(diag=-1) in the official code).
    """
    i = torch.arange(q_len, device=device)[:, None]  # (T, 1)
    j = torch.arange(n_mem + q_len, device=device)[None, :]  # (1, S)
    allowed = j <= i + n_mem
    if same_length:
        allowed = allowed & (j >= i)
    return allowed  # (T, S)


@functools.lru_cache(maxsize=16)
def blocked_mask(q_len: int, n_mem: int, same_length: bool, device: torch.device | None = None) -> Tensor:
    """The keys each query may not attend, bool [T, S], True = masked: ``~attention_mask``. The model builds it
    once per forward and hands it to every layer, as it does the position rows. Kept for the shapes last used
    (treat it as read-only): a generation step would otherwise spend six of its dispatches building it. Built
    outside inference mode, so a mask first made by an inference-mode validation can be saved for backward."""
    with torch.inference_mode(False):
        return ~attention_mask(q_len, n_mem, same_length, device)


def rel_shift(x: Tensor) -> Tensor:
    """Align position logits to keys with the Transformer-XL pad-and-reshape trick.

    In: x[..., i, r] = logit of query i against position row r (row r = relative distance S-1-r).
    Out: y[..., i, j] = x[..., i, j + T - 1 - i], i.e. the row for distance (S - T + i) - j. Entries for keys
    in the future of query i (j > S - T + i) hold junk and must be masked.
    """
    return rel_shift_padded(F.pad(x, (1, 0)))  # (..., T, S+1) -> (..., T, S)


def rel_shift_padded(x: Tensor) -> Tensor:
    """`rel_shift` of logits whose zero pad column is already in place: x [..., T, S+1] with x[..., 0] = 0 ->
    the same [..., T, S] as rel_shift(x[..., 1:]), as a view (no copy)."""
    *lead, T, S1 = x.shape
    return x.view(*lead, S1, T)[..., 1:, :].reshape(*lead, T, S1 - 1)


def relative_index(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """Position-table row used by query i and key j: j + T - 1 - i, clamped into range. Long [T, S]."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return (j + q_len - 1 - i).clamp(0, k_len - 1)


class RelativeMultiHeadAttention(nn.Module):
    """Relative-position multi-head attention over [memory; segment] with optional persistent memory.

    Context logit (query i, key j), per head: ((q_i + u)·k_j + (q_i + v)·r_{i-j}) / sqrt(D), with
    r = W_r P[-S:] and causal masking. With `n_persistent` = N > 0 (All-attention) every head also has N
    learned keys K and values V that join the same softmax: logit q_i·K_n (no u, no position term; the
    stored-key x sqrt(D) and the 1/sqrt(D) cancel) and value sqrt(N)·V_n. Persistent slots are never masked.

    Head-major layout, so heads can be sliced out later: rows h*D:(h+1)*D of q/k/v/r_proj.weight, columns
    h*D:(h+1)*D of o_proj.weight, content_bias[h], position_bias[h], persistent_k[h], persistent_v[h] all
    belong to head h (see `head_slice`). `n_heads` is an attribute so a pruned module can carry fewer heads.

    `impl` picks the attention core, all computing the same function: "reference" (`_attend_reference`: explicit
    einsum and autograd softmax, the plain formula the others are tested against), "sdpa"
    (F.scaled_dot_product_attention with an additive float bias, for fused GPU kernels), "joint" (one softmax over
    context and persistent slots with a hand-written backward, see `joint_attention`; the fastest on CPU) or
    "auto" ("joint" on CPU, "sdpa" on other devices). Except for "reference", a single query (one token at
    batch 1) takes `_attend_one_query`, the same formula without mask or shift.

    `forward` projects [memory; segment] afresh (training, and whenever gradients are on); `forward_cached` takes
    the memory's keys/values from a :class:`LayerKVCache` (no-grad evaluation); `forward_ring` is a generation
    step over a :class:`RingKVCache`.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        n_persistent: int = 0,
        dropatt: float = 0.0,
        same_length: bool = True,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if impl not in ATTN_IMPLS:
            raise ValueError(f"impl must be one of {ATTN_IMPLS}; got {impl!r}")
        self.d_model, self.n_heads, self.d_head, self.n_persistent = d_model, n_heads, d_head, n_persistent
        self.dropatt, self.same_length, self.impl = dropatt, same_length, impl
        inner = n_heads * d_head
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.r_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model)
        self.content_bias = nn.Parameter(torch.zeros(n_heads, d_head))  # u
        self.position_bias = nn.Parameter(torch.zeros(n_heads, d_head))  # v'
        if n_persistent > 0:
            self.persistent_k = nn.Parameter(torch.empty(n_heads, n_persistent, d_head))
            self.persistent_v = nn.Parameter(torch.empty(n_heads, n_persistent, d_head))
            bound = 1.0 / math.sqrt(d_model)  # module default; MemoryTransformerLM re-inits per docs/method.md §1.3
            nn.init.uniform_(self.persistent_k, -bound, bound)
            nn.init.uniform_(self.persistent_v, -bound, bound)
        else:
            self.register_parameter("persistent_k", None)
            self.register_parameter("persistent_v", None)
        # original index of each head, so a pruned layer can say which heads survived
        self.register_buffer("head_ids", torch.arange(n_heads))

    def head_slice(self, head: int) -> slice:
        """Rows of q/k/v/r_proj.weight (and columns of o_proj.weight) that belong to `head`."""
        return slice(head * self.d_head, (head + 1) * self.d_head)

    @torch.no_grad()
    def select_heads_(self, keep: Tensor, out_scale: float = 1.0) -> list[ParameterSlice]:
        """Keep only heads ``keep`` (long indices of the current heads), in place; the rest are removed from every
        per-head weight, bias and persistent memory. ``out_scale`` multiplies the kept columns of W_o (to fold a
        constant factor on the head outputs into it). Returns the slices, for the optimizer state."""
        keep = keep.to(self.head_ids.device)
        rows = (keep[:, None] * self.d_head + torch.arange(self.d_head, device=keep.device)).flatten()
        slices = [slice_parameter_(proj.weight, 0, rows) for proj in (self.q_proj, self.k_proj, self.v_proj,
                                                                     self.r_proj)]
        slices.append(slice_parameter_(self.o_proj.weight, 1, rows, scale=out_scale))
        per_head = [self.content_bias, self.position_bias]
        if self.n_persistent > 0:
            per_head += [self.persistent_k, self.persistent_v]
        slices += [slice_parameter_(p, 0, keep) for p in per_head]
        self.head_ids = self.head_ids[keep]
        self.n_heads = keep.numel()
        return slices

    def forward(
        self, x: Tensor, mem: Tensor | None, pos_emb: Tensor, blocked: Tensor | None = None,
        head_scale: Tensor | None = None,
    ) -> Tensor:
        """Attend from the segment to [memory; segment] (+ persistent slots).

        Args:
            x: normalised segment, [B, T, d_model].
            mem: normalised memory, [B, M, d_model], or None for no memory (M = 0).
            pos_emb: position-table rows for distances S-1 .. 0, [S, d_model] with S = M + T.
            blocked: the keys each query may not attend, bool [T, S] (`blocked_mask`); None builds it here
                from this module's `same_length` (the model passes the one it built for every layer).
            head_scale: optional per-head multiplier [n_heads] on each head's output before o_proj
                (the hook for head gates); None skips it. When every entry is 0 the whole output is 0, the
                output bias included: a layer whose heads are all shut contributes nothing, like a pruned one.
        Returns:
            [B, T, d_model]
        """
        T = x.size(1)
        c = x if mem is None else torch.cat([mem, x], dim=1)  # (B, S, d)
        S = c.size(1)
        if pos_emb.size(0) != S:
            raise ValueError(f"pos_emb has {pos_emb.size(0)} rows but memory + segment is {S} positions")
        if blocked is None:
            blocked = blocked_mask(T, S - T, self.same_length, x.device)  # (T, S)
        q = self.q_proj(x)  # (B, T, H*D)
        kv = F.linear(c, torch.cat([self.k_proj.weight, self.v_proj.weight]))  # (B, S, 2*H*D), one matmul
        r = self.r_proj(pos_emb)  # (S, H*D)
        return self._attend(q, kv, r, blocked, head_scale)

    def _attend(self, q: Tensor, kv: Tensor, r: Tensor, blocked: Tensor, head_scale: Tensor | None,
                persistent: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Projected queries q [B, T, H*D], keys/values kv [B, S, 2*H*D] and position rows r [S, H*D] through the
        chosen core (the one-query core for a single query), the head scale and W_o -> [B, T, d_model]. ``persistent``:
        `persistent_slots`, when the caller holds them already (the inference cache)."""
        H, D = self.n_heads, self.d_head
        B, T = q.shape[:2]
        if blocked.shape != (T, kv.size(1)):
            raise ValueError(f"blocked is {tuple(blocked.shape)}, needs [T, S] = {[T, kv.size(1)]}")
        r = r.view(-1, H, D).transpose(0, 1)  # (H, S, D)
        impl = resolve_impl(self.impl, q.device)
        if B * T == 1 and impl != "reference":  # one query in all: one token at batch 1
            o = self._attend_one_query(q, kv, r, persistent)  # (H, B, 1, D)
            o = o.permute(1, 2, 0, 3)  # (B, 1, H, D)
        elif impl == "joint":
            o = self._attend_joint(q, kv, r, blocked, persistent)  # (H, B, T, D)
            o = o.permute(1, 2, 0, 3)  # (B, T, H, D)
        else:
            q = rearrange(q, "b t (h d) -> b h t d", h=H)
            k, v = rearrange(kv, "b s (two h d) -> two b h s d", two=2, h=H)  # (B, H, S, D) each
            attend = self._attend_sdpa if impl == "sdpa" else self._attend_reference
            o = attend(q, k, v, r, blocked).transpose(1, 2)  # (B, T, H, D)
        return self._merge_heads(o, head_scale)

    def _merge_heads(self, o: Tensor, head_scale: Tensor | None, w_o_t: Tensor | None = None) -> Tensor:
        """Head outputs o [B, T, H, D] through the head scale and W_o -> [B, T, d_model]. ``w_o_t``: W_o transposed
        (contiguous [H*D, d_model]), for a single row."""
        B, T, H, D = o.shape
        if head_scale is not None:
            o = o * head_scale.view(H, 1)
        if w_o_t is None:
            out = self.o_proj(o.reshape(B, T, H * D))  # (B, T, d)
        else:
            out = torch.addmm(self.o_proj.bias, o.reshape(B * T, H * D), w_o_t).view(B, T, -1)  # (B, T, d)
        if head_scale is None:
            return out
        return out * head_scale.detach().ne(0).any().to(out.dtype)  # a 0-dim factor: no host sync

    # -------------------------------------------------------------------------- the formula, written out

    def _attend_reference(self, q: Tensor, k: Tensor, v: Tensor, r: Tensor, blocked: Tensor) -> Tensor:
        """The plain formula, which the fast cores below are tested against: explicit logits, gathered relative
        positions, fp32 softmax over context and persistent slots. q [B, H, T, D], k/v [B, H, S, D],
        r [H, S, D], blocked [T, S] -> [B, H, T, D]."""
        B, H, T, _ = q.shape
        S = k.size(2)
        content = torch.einsum("bhtd,bhsd->bhts", q + self.content_bias[:, None], k)  # (B, H, T, S): (q+u)·k
        pos_rows = torch.einsum("bhtd,hsd->bhts", q + self.position_bias[:, None], r)  # (B, H, T, S rows): (q+v)·r
        index = relative_index(T, S, q.device).expand(B, H, T, S)  # row of distance i - j for query i, key j
        position = pos_rows.gather(-1, index)  # (B, H, T, S)
        logits = at_least_fp32((content + position) / math.sqrt(self.d_head))  # (B, H, T, S)
        logits = logits.masked_fill(blocked, float("-inf"))  # causal (and same-length) mask
        if self.n_persistent > 0:
            persistent = torch.einsum("bhtd,hnd->bhtn", q, self.persistent_k.to(q.dtype))  # (B, H, T, N): q·K
            logits = torch.cat([logits, at_least_fp32(persistent)], dim=-1)  # (B, H, T, S+N)
        probs = F.dropout(logits.softmax(dim=-1), self.dropatt, self.training).to(v.dtype)  # one softmax
        o = torch.einsum("bhts,bhsd->bhtd", probs[..., :S], v)  # (B, H, T, D)
        if self.n_persistent > 0:
            pv = (self.persistent_v * self.n_persistent**0.5).to(v.dtype)  # (H, N, D): sqrt(N)·V
            o = o + torch.einsum("bhtn,hnd->bhtd", probs[..., S:], pv)
        return o

    # -------------------------------------------------------------------- fast cores, the same function

    def _attend_sdpa(self, q: Tensor, k: Tensor, v: Tensor, r: Tensor, blocked: Tensor) -> Tensor:
        """Fused-kernel core (GPU): the position term, u·k and the causal mask go into
        F.scaled_dot_product_attention as one additive bias. Shapes as `_attend_reference`."""
        scale = self.d_head**-0.5
        pos = rel_shift(torch.einsum("bhtd,hsd->bhts", q + self.position_bias[:, None], r))  # (B, H, T, S)
        content = torch.einsum("hd,bhsd->bhs", self.content_bias, k)  # (B, H, S): the u·k_j part
        bias = ((pos + content[:, :, None]) * scale).masked_fill(blocked, float("-inf"))  # (B, H, T, S)
        if self.n_persistent > 0:
            B = q.size(0)
            # SDPA divides every logit by sqrt(D); the stored key times sqrt(D) undoes it (docs/method.md §1.2)
            pk = (self.persistent_k * self.d_head**0.5).to(k.dtype).expand(B, -1, -1, -1)  # (B, H, N, D)
            pv = (self.persistent_v * self.n_persistent**0.5).to(v.dtype).expand(B, -1, -1, -1)
            k, v = torch.cat([k, pk], dim=2), torch.cat([v, pv], dim=2)  # (B, H, S+N, D)
            bias = F.pad(bias, (0, self.n_persistent))  # persistent slots: zero bias, never masked
        dropout_p = self.dropatt if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p, scale=scale
        )  # (B, H, T, D)

    def _attend_joint(self, q: Tensor, kv: Tensor, r: Tensor, blocked: Tensor,
                      persistent: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The CPU core, head-major: position logits (relative shift as a view, the mask) by autograd, then
        `joint_attention` (content logits and one softmax over context and persistent slots, the persistent
        keys/values shared by the batch). q [B, T, H*D], kv [B, S, 2*H*D], r [H, S, D] -> [H, B, T, D]."""
        H, D = self.n_heads, self.d_head
        B, T = q.shape[:2]
        S = kv.size(1)
        scale = D**-0.5
        # plain view/permute rather than einops here: this path runs per layer and step, where every dispatch counts
        q = q.view(B, T, H, D).permute(2, 0, 1, 3).contiguous()  # (H, B, T, D)
        k, v = kv.view(B, S, 2, H, D).permute(2, 3, 0, 1, 4).contiguous()  # (H, B, S, D) each
        dtype = q.dtype
        q_scaled = q * scale
        # position logits against [0; r]: the leading zero column is the pad of rel_shift, computed for free
        r_padded = as_dtype(F.pad(r, (0, 0, 1, 0)), dtype)  # (H, S+1, D)
        q_pos = (q_scaled + as_dtype(self.position_bias * scale, dtype).view(H, 1, 1, D)).view(H, B * T, D)
        pos = rel_shift_padded(torch.bmm(q_pos, r_padded.mT).view(H * B, T, S + 1))  # (H*B, T, S), a view
        position = at_least_fp32(pos.view(H, B, T, S)).masked_fill(blocked, float("-inf"))  # (H, B, T, S)
        q_content = q_scaled + as_dtype(self.content_bias * scale, dtype).view(H, 1, 1, D)
        persistent_k = persistent_v = None
        if self.n_persistent > 0:
            persistent_k, persistent_v = self.persistent_slots(dtype) if persistent is None else persistent
        dropout_p = self.dropatt if self.training else 0.0
        o = joint_attention(q_content, k, v, position, q.view(H, B * T, D), persistent_k, persistent_v, dropout_p)
        return o.view(H, B, T, D)

    def _attend_one_query(self, q: Tensor, kv: Tensor, r: Tensor,
                          persistent: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The core for a single query in all (batch 1, one token, as stepping `forward`): the same function as
        `_attend_reference`, written as a few matmuls over views of the projections. With T = 1 the mask keeps every
        key under both `same_length` settings (the query sees its S - 1 memory positions and itself) and the
        relative shift is the identity (key j takes position row j), so neither is applied, and the fused kernels'
        set-up is skipped. Content and position logits are one baddbmm, the two weighted sums another. Against the
        fused kernel, its first form (five bmm) took a W1 batch-1 cached step from 2.86 to 2.59 ms (dense) and 2.04
        to 1.64 ms (half the heads removed); at batch 8 the fused kernel is as fast or faster, so it serves a single
        query only (docs/performance.md, "Generation").
        q [1, 1, H*D], kv [1, S, 2*H*D], r [H, S, D] -> [H, 1, 1, D]."""
        H, D = self.n_heads, self.d_head
        S = kv.size(1)
        dtype, scale = q.dtype, D**-0.5
        q = q.view(H, 1, D)
        kv = kv.view(S, 2, H, D)
        k, v = kv[:, 0].permute(1, 2, 0), kv[:, 1].transpose(0, 1)  # (H, D, S) and (H, S, D), views
        q_content = (q + as_dtype(self.content_bias, dtype)[:, None]) * scale  # (H, 1, D): (q + u) / sqrt(D)
        q_position = (q + as_dtype(self.position_bias, dtype)[:, None]) * scale  # (H, 1, D): (q + v) / sqrt(D)
        logits = at_least_fp32(torch.baddbmm(torch.bmm(q_position, as_dtype(r, dtype).mT), q_content, k))  # (H, 1, S)
        if self.n_persistent > 0:
            persistent_k, persistent_v = self.persistent_slots(dtype) if persistent is None else persistent
            logits = torch.cat([logits, at_least_fp32(torch.bmm(q, persistent_k.mT))], -1)  # + (H, 1, N): q·K_n
        probs = F.dropout(logits.softmax(-1), self.dropatt, self.training).to(dtype)  # (H, 1, S+N)
        if self.n_persistent > 0:
            o = torch.baddbmm(torch.bmm(probs[..., S:], persistent_v), probs[..., :S], v)  # p·V + p·sqrt(N)V
        else:
            o = torch.bmm(probs, v)  # (H, 1, D)
        return o[:, None]  # (H, 1, 1, D)

    def persistent_slots(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The persistent keys and values as the joint core takes them, [H, N, D] each: K as stored (the logit is
        q·K_n: the stored sqrt(D) cancels the 1/sqrt(D)) and sqrt(N)·V."""
        return as_dtype(self.persistent_k, dtype), as_dtype(self.persistent_v * self.n_persistent**0.5, dtype)

    # -------------------------------------------------------------------------- the inference cache

    @torch.no_grad()
    def new_cache(self, mem: Tensor, pos_table: Tensor, mem_len: int) -> LayerKVCache:
        """The inference cache of this module for the normalised memory ``mem`` [B, M, d_model]: its keys/values
        projected once, W_r applied to the whole position table ``pos_table`` [max_len, d_model] once, and the
        fused [W_q; W_k; W_v] of each step, and the scaled persistent slots. ``mem_len``: how many positions the
        cache keeps."""
        w_qkv = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (3*H*D, d)
        kv = F.linear(mem, w_qkv[self.n_heads * self.d_head :])  # (B, M, 2*H*D)
        # detached: a head removal replaces the parameters' data, and the cache must keep what it was built with
        persistent = tuple(t.detach() for t in self.persistent_slots(kv.dtype)) if self.n_persistent > 0 else None
        return LayerKVCache(kv=kv, r=self.r_proj(pos_table), w_qkv=w_qkv, head_ids=self.head_ids, mem_len=mem_len,
                            persistent=persistent)

    def forward_cached(
        self, x: Tensor, cache: LayerKVCache, blocked: Tensor, head_scale: Tensor | None = None
    ) -> tuple[Tensor, LayerKVCache]:
        """`forward` over [cached memory; segment] without re-projecting the memory: only the segment's rows go
        through [W_q; W_k; W_v] (one matmul), the memory's keys/values and W_r·P come from ``cache``.

        x: normalised segment [B, T, d_model]; cache: from `new_cache` or an earlier call (sliced here to the
        heads left if some were removed since); blocked: [T, S] with S = M + T. Returns the output
        [B, T, d_model] and the cache advanced by this segment (the last mem_len positions of
        [memory; segment], as the model's memory is).
        """
        cache = cache.for_heads(self.head_ids)
        inner = self.n_heads * self.d_head
        qkv = F.linear(x, cache.w_qkv)  # (B, T, 3*H*D)
        kv = torch.cat([cache.kv, qkv[..., inner:]], dim=1)  # (B, S, 2*H*D)
        r = cache.r[cache.r.size(0) - kv.size(1) :]  # (S, H*D): the rows of distances S-1 .. 0
        out = self._attend(qkv[..., :inner], kv, r, blocked, head_scale, cache.persistent)
        return out, cache.advanced(kv)

    @torch.no_grad()
    def new_ring_cache(self, mem: Tensor, pos_rows: Tensor) -> RingKVCache:
        """The :class:`RingKVCache` of the normalised memory ``mem`` [B, M, d_model], for `forward_ring`: the
        memory's keys/values in slots 0..M-1 (oldest first), the persistent slots as the steps read them, and W_r
        applied to ``pos_rows`` [M + 1, d_model], the position-table rows of distances M .. 0."""
        H, D, N = self.n_heads, self.d_head, self.n_persistent
        (B, M), S, dtype = mem.shape[:2], mem.size(1) + 1, mem.dtype
        if pos_rows.size(0) != S:
            raise ValueError(f"pos_rows has {pos_rows.size(0)} rows; the ring needs M + 1 = {S}")
        scale = D**-0.5
        w_q, w_k, w_v = (as_dtype(p, dtype).view(H, D, -1) for p in (self.q_proj.weight, self.k_proj.weight,
                                                                      self.v_proj.weight))
        w_uk = torch.einsum("hd,hdi->hi", as_dtype(self.content_bias, dtype), w_k)[:, None]  # (H, 1, d): u_h^T W_k
        # one projection per step: per head [W_q; 0] (the zero row gets the bias 1), [W_k; u^T W_k] / sqrt(D), W_v;
        # transposed: at batch 1 it is a product of one row, which MKL runs faster with the outputs contiguous
        w_step = torch.cat([torch.cat([w_q, torch.zeros_like(w_uk)], 1).view(-1, w_q.size(-1)),
                            (torch.cat([w_k, w_uk], 1) * scale).view(-1, w_q.size(-1)), w_v.reshape(H * D, -1)])
        step_bias = mem.new_zeros(w_step.size(0))
        step_bias[D : H * (D + 1) : D + 1] = 1  # the query's appended 1, per head
        w_step_t = w_step.t().contiguous()  # (d, H*(D+1) + H*(D+1) + H*D)
        kv = mem @ w_step_t[:, H * (D + 1) :]  # (B, M, H*(D+1) + H*D): [k; u·k] / sqrt(D), v
        # one stream: the persistent slots are copied in front of the context ones, so that one product covers both;
        # for B rows they would be copied and read B times, so they stay apart, shared by the rows
        P = N if B == 1 else 0
        keys, values = mem.new_empty(H, B, D + 1, P + S), mem.new_empty(H, B, P + S, D)  # slot P + M written first
        persistent = None
        if N > 0:
            persistent_k, persistent_v = self.persistent_slots(dtype)  # K_n, sqrt(N)·V_n
            if P > 0:
                keys[:, 0, :D, :P], keys[:, 0, D, :P], values[:, 0, :P] = persistent_k.mT, 0, persistent_v
            else:  # K transposed for the product with the queries
                persistent = (persistent_k.mT.contiguous(), persistent_v)
        keys[..., P : P + M] = kv[..., : H * (D + 1)].view(B, M, H, D + 1).permute(2, 0, 3, 1)
        values[:, :, P : P + M] = kv[..., H * (D + 1) :].view(B, M, H, D).permute(2, 0, 1, 3)
        r = as_dtype(self.r_proj(pos_rows), dtype).view(S, H, D).permute(1, 2, 0)  # (H, D, S)
        positions = torch.cat([r, torch.einsum("hd,hds->hs", as_dtype(self.position_bias, dtype), r)[:, None]], 1)
        return RingKVCache(keys=keys, values=values, positions=(positions * scale).repeat(1, 1, 2),
                           w_step_t=w_step_t, step_bias=step_bias,
                           w_o_t=as_dtype(self.o_proj.weight.t().contiguous(), dtype), persistent=persistent,
                           head_ids=self.head_ids)

    def forward_ring(self, x: Tensor, ring: RingKVCache, head_scale: Tensor | None = None) -> Tensor:
        """One generation step: the normalised tokens x [B, 1, d_model] attend to the ring's memory positions, their
        own and the persistent slots; their keys and values are written into the ring over the oldest position's.
        The same function as `forward_cached` of one token (tested equal), without concatenating, slicing or
        re-laying out the keys/values. The step's one projection gives, per head, the query with a 1 appended
        (q, 1), the key with its u-term (k, u·k) / sqrt(D) and the value, so that (q, 1)·(k, u·k) / sqrt(D) is the
        content logit (q + u)·k / sqrt(D), and against the position rows (r, v'·r) / sqrt(D) the position logit
        (q + v')·r / sqrt(D); for one stream the persistent slots in the ring hold (K_n, 0), for B rows they are
        apart and meet the query q alone. -> [B, 1, d_model]."""
        if ring.head_ids is not self.head_ids:  # select_heads_ replaces head_ids: a removal since it was built
            raise ValueError(f"the ring cache holds heads {ring.head_ids.tolist()}, the module "
                             f"{self.head_ids.tolist()}: build it again after removing heads")
        H, D, N = self.n_heads, self.d_head, self.n_persistent
        B, S = x.size(0), ring.positions.size(-1) // 2
        P = ring.keys.size(-1) - S  # persistent slots held in the ring (one stream), else 0
        x = as_dtype(x, ring.w_step_t.dtype)  # the ring's dtype (its memory's)
        torch.addmm(ring.step_bias, x.view(B, -1), ring.w_step_t, out=ring.projected)  # (B, 2*H*(D+1) + H*D)
        slot = P + (S - 1 + ring.steps) % S  # the oldest position's slot (the free one at the first step)
        ring.keys.select(-1, slot).copy_(ring.new_keys)
        ring.values.select(-2, slot).copy_(ring.new_values)
        q = ring.queries  # (H, B, D+1): (q, 1)
        q_rows = q.view(H * B, 1, D + 1) if B == 1 else q.reshape(H * B, 1, D + 1)
        logits = torch.bmm(q_rows, ring.key_rows, out=ring.logits)  # (H*B, 1, P + S)
        # the window of the doubled rows that puts each slot's distance at the slot starts at -steps mod S
        window = ring.positions.narrow(-1, -ring.steps % S, S)
        ring.context_logits.add_(torch.bmm(q, window, out=ring.position_logits))
        if ring.persistent is None:  # all slots in the ring
            probs = as_dtype(at_least_fp32(logits).softmax(-1), x.dtype)  # (H*B, 1, P + S)
            o = torch.bmm(probs, ring.value_rows, out=ring.head_outputs)  # (H*B, 1, D)
        else:  # the persistent slots shared by the rows
            persistent_k, persistent_v = ring.persistent
            logits = torch.cat([torch.bmm(q[..., :D], persistent_k), logits.view(H, B, S)], -1)  # (H, B, N + S)
            probs = as_dtype(at_least_fp32(logits).softmax(-1), x.dtype)
            o = torch.bmm(probs[..., :N], persistent_v, out=ring.head_outputs.view(H, B, D))  # (H, B, D)
            o.view(H * B, 1, D).baddbmm_(probs[..., N:].reshape(H * B, 1, S), ring.value_rows)
        ring.steps += 1
        return self._merge_heads(o.view(H, B, 1, D).permute(1, 2, 0, 3), head_scale, ring.w_o_t)

    def macs_per_token(self, context_len: int) -> int:
        """Forward multiply-accumulates per token at S = context_len keys (docs/method.md §1.5 convention).

        Per head: 4·d·D (q, k, v and o projections, one row each per token) + (S+N)·D (content and
        persistent logits) + S·D (position logits) + (S+N)·D (weighted sum of values). This is exactly what
        the cached paths (`forward_cached` in no-grad evaluation, `forward_ring` in generation) pay. The
        re-projecting path (`forward`, always used in training) also projects the M memory rows again each segment
        (+ M/T · 2·d·D per head and token) and W_r over the S position rows (once per forward, independent of
        the batch); `reprojection_macs_per_token` counts those.
        """
        S, N, D = context_len, self.n_persistent, self.d_head
        return self.n_heads * (4 * self.d_model * D + (S + N) * D + S * D + (S + N) * D)

    def reprojection_macs_per_token(self, mem_len: int, tgt_len: int, batch_size: int) -> float:
        """What the re-projecting path (`forward`) pays per token on top of `macs_per_token`: the M memory rows
        through W_k and W_v again each segment (M/T · 2·d·D per head) and W_r over the S = M + T position rows once
        per forward, shared by its B·T tokens (S·d·D / (B·T) per head)."""
        D, d, S = self.d_head, self.d_model, mem_len + tgt_len
        return self.n_heads * d * D * (2 * mem_len / tgt_len + S / (batch_size * tgt_len))


@dataclass(frozen=True)
class LayerKVCache:
    """One attention module's inference cache: the projected keys/values of its memory positions and what stays
    fixed while the weights do (W_r·P for the whole position table, the fused [W_q; W_k; W_v]).

    In no-grad evaluation the memory's keys and values at one segment equal those computed at the one before, so
    a step projects only its own T rows: O(d² + (S+N)·d) per token instead of re-projecting all M memory rows
    and the position table. Immutable: `advanced` returns the next cache, so several streams (or DDP ranks) each
    carry their own. Valid for the weights it was built with; a head removal is followed by `for_heads`.

    kv: [B, M, 2*H*D], [W_k LN(mem) | W_v LN(mem)], head-major within each half, as the projections lay them out.
    r: [max_len, H*D], W_r applied to every row of the position table.
    w_qkv: [3*H*D, d_model], [W_q; W_k; W_v].
    head_ids: [H], the original ids of the heads these tensors hold.
    mem_len: positions kept (the model's mem_len).
    persistent: the `persistent_slots` (K, sqrt(N)·V), [H, N, D] each, or None without persistent slots. Scaling
        sqrt(N)·V afresh each step reads and writes H·N·D values, about as much memory traffic as the step's
        whole attention over them; held here, the layers of a W1 generation step (batch 1, one thread, shared
        cores, when generation stepped through this cache) took 46.8 ms instead of 51.3 (docs/performance.md,
        "Generation").
    """

    kv: Tensor
    r: Tensor
    w_qkv: Tensor
    head_ids: Tensor
    mem_len: int
    persistent: tuple[Tensor, Tensor] | None = None

    def advanced(self, kv: Tensor) -> LayerKVCache:
        """The cache after a segment: the last mem_len rows of ``kv`` [B, M+T, 2*H*D] = [cached; segment's]."""
        return dataclasses.replace(self, kv=kv[:, max(0, kv.size(1) - self.mem_len) :])

    def for_heads(self, head_ids: Tensor) -> LayerKVCache:
        """This cache for a module holding heads ``head_ids`` (original ids, a subset of this cache's): itself
        when they are the same, else the cache with the removed heads' rows sliced out."""
        if head_ids is self.head_ids or torch.equal(head_ids, self.head_ids.to(head_ids.device)):
            return self if head_ids is self.head_ids else dataclasses.replace(self, head_ids=head_ids)
        match = head_ids.to(self.head_ids.device)[:, None] == self.head_ids[None, :]  # (H_new, H_old)
        if not bool(match.any(1).all()):
            raise ValueError(f"the cache holds heads {self.head_ids.tolist()}; the module has {head_ids.tolist()}")
        keep = match.int().argmax(1)  # position of each kept head in the cache
        H, D = self.head_ids.numel(), self.r.size(1) // self.head_ids.numel()
        B, M = self.kv.shape[:2]
        return LayerKVCache(
            kv=self.kv.view(B, M, 2, H, D)[:, :, :, keep].reshape(B, M, -1),
            r=self.r.view(-1, H, D)[:, keep].reshape(self.r.size(0), -1),
            w_qkv=self.w_qkv.view(3, H, D, -1)[:, keep].reshape(3 * keep.numel() * D, -1),
            head_ids=head_ids, mem_len=self.mem_len,
            persistent=None if self.persistent is None else tuple(t[keep] for t in self.persistent),
        )


@dataclass(eq=False)
class RingKVCache:
    """One attention module's keys and values while generating, one token per row and step, in buffers written in
    place: a step writes its tokens' keys and values over the oldest memory position's, so nothing is concatenated,
    sliced or laid out anew (as :class:`LayerKVCache` steps do). Built by `RelativeMultiHeadAttention.new_ring_cache`
    from the memory after the prompt, and private to the generation that built it (mutable, unlike the inference
    cache). Measured against stepping through the inference cache in docs/performance.md, "Generation".

    With S = M + 1 context slots (the memory and the token of the step) in ring order, B rows and N persistent
    slots, of which P are held in the ring (N for one stream, whose one product then covers both kinds, else 0):
    keys: [H, B, D + 1, P + S], the persistent keys (K_n, 0), then the context keys with their u-term,
        (k_j, u·k_j) / sqrt(D): against a step's (q, 1) they give q·K_n and (q + u)·k_j / sqrt(D), the logits of
        `_attend_reference`.
    values: [H, B, P + S, D], sqrt(N)·V_n, then the context values.
    positions: [H, D + 1, 2S], (r, v'·r) / sqrt(D) with r = W_r·P for distances S-1 .. 0, twice: at step t the
        slots' distances are the window starting at -t mod S.
    w_step_t, step_bias: the step's one projection, transposed ([d_model, 2*H*(D+1) + H*D]), and its bias: per head
        [W_q; 0] with bias 1 (the query and its appended 1), then per head [W_k; u^T W_k] / sqrt(D), then W_v.
    w_o_t: [H*D, d_model], W_o transposed.
    persistent: (K_n transposed [H, D, N], sqrt(N)·V_n [H, N, D]) shared by the rows, or None (none, or in the
        ring).
    head_ids: the original ids of the heads held; steps: tokens written so far.
    The step's buffers and the views of them it reads (`projected`, `queries`, `logits`, ...) are made once.
    """

    keys: Tensor
    values: Tensor
    positions: Tensor
    w_step_t: Tensor
    step_bias: Tensor
    w_o_t: Tensor
    persistent: tuple[Tensor, Tensor] | None
    head_ids: Tensor
    steps: int = 0

    def __post_init__(self) -> None:
        """The step's output buffers and the views of them and of the slots that every step reads, made once: a
        batch-1 step is bound by the count of its small ops (docs/performance.md, "Generation")."""
        H, B, D1, PS = self.keys.shape
        D, S = D1 - 1, self.positions.size(-1) // 2
        P, Q = PS - S, H * D1
        self.projected = self.keys.new_empty(B, self.w_step_t.size(1))  # [(q, 1) | (k, u·k) / sqrt(D) | v] per head
        self.queries = self.projected[:, :Q].view(B, H, D1).transpose(0, 1)  # (H, B, D+1)
        self.new_keys = self.projected[:, Q : 2 * Q].view(B, H, D1).transpose(0, 1)  # (H, B, D+1)
        self.new_values = self.projected[:, 2 * Q :].view(B, H, D).transpose(0, 1)  # (H, B, D)
        self.key_rows, self.value_rows = self.keys.view(H * B, D1, PS), self.values.view(H * B, PS, D)
        self.logits = self.keys.new_empty(H * B, 1, PS)
        self.context_logits = self.logits.view(H, B, PS)[..., P:]  # (H, B, S)
        self.position_logits = self.keys.new_empty(H, B, S)
        self.head_outputs = self.keys.new_empty(H * B, 1, D)
