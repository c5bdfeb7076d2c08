"""Transformer-XL relative-position multi-head attention with recurrence memory and, for All-attention,
per-head persistent key/value slots (docs/method.md §1.1, §1.2).

Notation: B batch, T segment (query) length, M memory length, S = M + T keys from context, H heads, D = d_head,
N persistent slots per head.
"""

import math

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


_BLOCKED_KEYS: dict[tuple[int, int, bool, torch.device], Tensor] = {}


def blocked_keys(q_len: int, n_mem: int, same_length: bool, device: torch.device) -> Tensor:
    """The negation of `attention_mask` (True = masked), made once per shape and device: every layer of every
    step asks for the same one. Read-only. Built outside inference mode, so that a mask first made during
    validation can still be saved for a later training backward; never kept when it is not a plain tensor (a fake
    tensor while torch.compile or torch.export traces)."""
    if torch.compiler.is_compiling():
        return ~attention_mask(q_len, n_mem, same_length, device)
    key = (q_len, n_mem, same_length, device)
    blocked = _BLOCKED_KEYS.get(key)
    if blocked is None:
        with torch.inference_mode(False):
            blocked = ~attention_mask(q_len, n_mem, same_length, device)
        if type(blocked) is torch.Tensor:
            if len(_BLOCKED_KEYS) >= 16:  # a handful of shapes in practice (training, eval, generation)
                _BLOCKED_KEYS.clear()
            _BLOCKED_KEYS[key] = blocked
    return blocked


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

    `impl` picks the attention core, all computing the same function: "joint" (one softmax over context and
    persistent slots with a hand-written backward, see `joint_attention`; the fastest on CPU), "sdpa"
    (F.scaled_dot_product_attention with an additive float bias, for fused GPU kernels), "reference" (explicit
    einsum and autograd softmax, the plain formula the others are tested against) or "auto" ("joint" on CPU,
    "sdpa" on other devices).
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
        self, x: Tensor, mem: Tensor | None, pos_emb: Tensor, head_scale: Tensor | None = None
    ) -> Tensor:
        """Attend from the segment to [memory; segment] (+ persistent slots).

        Args:
            x: normalised segment, [B, T, d_model].
            mem: normalised memory, [B, M, d_model], or None for no memory (M = 0).
            pos_emb: position-table rows for distances S-1 .. 0, [S, d_model] with S = M + T.
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
        H = self.n_heads
        q = self.q_proj(x)  # (B, T, H*D)
        kv = F.linear(c, torch.cat([self.k_proj.weight, self.v_proj.weight]))  # (B, S, 2*H*D), one matmul
        r = self.r_proj(pos_emb).view(S, H, self.d_head).transpose(0, 1)  # (H, S, D)
        blocked = blocked_keys(T, S - T, self.same_length, x.device)  # (T, S), True = masked
        impl = resolve_impl(self.impl, x.device)
        if impl == "joint":
            o = self._attend_joint(q, kv, r, blocked)  # (H, B, T, D)
            if head_scale is not None:
                o = o * head_scale.view(H, 1, 1, 1)
            o = o.permute(1, 2, 0, 3).reshape(*x.shape[:2], H * self.d_head)  # (B, T, H*D)
        else:
            q = rearrange(q, "b t (h d) -> b h t d", h=H)
            k, v = rearrange(kv, "b s (two h d) -> two b h s d", two=2, h=H)  # (B, H, S, D) each
            attend = self._attend_sdpa if impl == "sdpa" else self._attend_reference
            o = attend(q, k, v, r, blocked)  # (B, H, T, D)
            if head_scale is not None:
                o = o * head_scale.view(H, 1, 1)
            o = rearrange(o, "b h t d -> b t (h d)")
        out = self.o_proj(o)  # (B, T, d)
        if head_scale is None:
            return out
        return out * head_scale.detach().ne(0).any().to(out.dtype)  # a 0-dim factor: no host sync

    def _attend_joint(self, q: Tensor, kv: Tensor, r: Tensor, blocked: Tensor) -> Tensor:
        """The "joint" path, head-major: position logits (relative shift as a view, the mask) by autograd, then
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
            persistent_k = as_dtype(self.persistent_k, dtype)  # logit q·K_n: the stored sqrt(D) cancels 1/sqrt(D)
            persistent_v = as_dtype(self.persistent_v * self.n_persistent**0.5, dtype)
        dropout_p = self.dropatt if self.training else 0.0
        o = joint_attention(q_content, k, v, position, q.view(H, B * T, D), persistent_k, persistent_v, dropout_p)
        return o.view(H, B, T, D)

    def _attend_sdpa(self, q: Tensor, k: Tensor, v: Tensor, r: Tensor, blocked: Tensor) -> Tensor:
        """Fast path: position term, u·k and the causal mask go in as one additive bias."""
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

    def _attend_reference(self, q: Tensor, k: Tensor, v: Tensor, r: Tensor, blocked: Tensor) -> Tensor:
        """Plain path: explicit logits, gathered relative positions, fp32 softmax over all slots."""
        B, H, T, _ = q.shape
        S = k.size(2)
        content = torch.einsum("bhtd,bhsd->bhts", q + self.content_bias[:, None], k)  # (B, H, T, S)
        pos_rows = torch.einsum("bhtd,hsd->bhts", q + self.position_bias[:, None], r)  # (B, H, T, rows)
        index = relative_index(T, S, q.device).expand(B, H, T, S)
        position = pos_rows.gather(-1, index)  # (B, H, T, S)
        logits = at_least_fp32((content + position) / math.sqrt(self.d_head))
        logits = logits.masked_fill(blocked, float("-inf"))
        if self.n_persistent > 0:
            persistent = torch.einsum("bhtd,hnd->bhtn", q, self.persistent_k.to(q.dtype))  # (B, H, T, N)
            logits = torch.cat([logits, at_least_fp32(persistent)], dim=-1)  # (B, H, T, S+N)
        probs = F.dropout(logits.softmax(dim=-1), self.dropatt, self.training).to(v.dtype)
        o = torch.einsum("bhts,bhsd->bhtd", probs[..., :S], v)  # (B, H, T, D)
        if self.n_persistent > 0:
            pv = (self.persistent_v * self.n_persistent**0.5).to(v.dtype)  # (H, N, D)
            o = o + torch.einsum("bhtn,hnd->bhtd", probs[..., S:], pv)
        return o

    def macs_per_token(self, context_len: int) -> int:
        """Forward multiply-accumulates per token at S = context_len keys (docs/method.md §1.5 convention).

        Per head: 4·d·D (q, k, v and o projections, one row each per token) + (S+N)·D (content and
        persistent logits) + S·D (position logits) + (S+N)·D (weighted sum of values). W_r acts on the
        position table once per forward, independent of the batch, and is not counted per token; nor is
        the re-projection of the M memory rows that each segment repeats (+ M/T · 2·d·D per head).
        """
        S, N, D = context_len, self.n_persistent, self.d_head
        return self.n_heads * (4 * self.d_model * D + (S + N) * D + S * D + (S + N) * D)
