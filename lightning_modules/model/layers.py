"""Pre-norm Transformer layers with recurrence memory: All-attention (no FFN) and Transformer-XL (with FFN).

Both take the layer input h [B, T, d], the layer's memory [B, M, d] (earlier inputs of this layer, not yet
normalised), the position-table rows [S, d] and the mask [T, S] the model built for every layer; the same
LayerNorm normalises h and the memory (docs/method.md §1.2). ``forward_cached`` is the no-grad evaluation path
that takes the memory's projected keys/values from a :class:`LayerKVCache` instead, and ``forward_ring`` the
generation step over a :class:`RingKVCache`.
Each has a :class:`HardConcreteGate` over its heads (used only when the model switches gating on) and a
``select_heads_`` that removes heads physically; a layer with no heads left skips its attention sublayer.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_modules.model.attention import LayerKVCache, RelativeMultiHeadAttention, RingKVCache
from lightning_modules.model.gates import HardConcreteGate
from lightning_modules.model.slicing import ParameterSlice, slice_parameter_


class GatedHeadsMixin:
    """The attention sublayer, head gate and physical head removal shared by both layer types (``self.attn_norm``,
    ``self.attn``, ``self.drop`` and ``self.gate``)."""

    attn_norm: nn.LayerNorm
    attn: RelativeMultiHeadAttention
    drop: nn.Dropout
    gate: HardConcreteGate

    @property
    def n_heads(self) -> int:
        """Heads left in this layer."""
        return self.attn.n_heads

    def select_heads_(self, keep: Tensor, out_scale: float = 1.0) -> list[ParameterSlice]:
        """Keep only heads ``keep`` (indices of the current heads): attention weights and gates alike."""
        slices = self.attn.select_heads_(keep, out_scale)
        slices.append(slice_parameter_(self.gate.log_alpha, 0, keep))
        return slices

    def new_cache(self, mem: Tensor, pos_table: Tensor, mem_len: int) -> LayerKVCache | None:
        """The inference cache of this layer for its memory ``mem`` [B, M, d] (not normalised) and the position
        table [max_len, d]; None when the layer has no heads left (its attention sublayer is skipped)."""
        if self.attn.n_heads == 0:
            return None
        return self.attn.new_cache(self.attn_norm(mem), pos_table, mem_len)

    def _attention(
        self, h: Tensor, mem: Tensor | None, pos_emb: Tensor, blocked: Tensor | None, head_scale: Tensor | None
    ) -> Tensor:
        """h + Drop(Attn(LN(h), LN(mem))); h itself when no heads are left."""
        if self.attn.n_heads == 0:
            return h
        m = None if mem is None else self.attn_norm(mem)
        return h + self.drop(self.attn(self.attn_norm(h), m, pos_emb, blocked, head_scale=head_scale))

    def _cached_attention(
        self, h: Tensor, cache: LayerKVCache | None, blocked: Tensor, head_scale: Tensor | None
    ) -> tuple[Tensor, LayerKVCache | None]:
        """h + Drop(Attn(LN(h), cached memory)) and the advanced cache; h itself when no heads are left."""
        if self.attn.n_heads == 0:
            return h, cache
        if cache is None:
            raise ValueError("this layer has heads but its cache entry is None: build the cache after removing heads")
        out, cache = self.attn.forward_cached(self.attn_norm(h), cache, blocked, head_scale)
        return h + self.drop(out), cache

    def new_ring_cache(self, mem: Tensor, pos_rows: Tensor) -> RingKVCache | None:
        """The :class:`RingKVCache` of this layer's memory ``mem`` [B, M, d] (not normalised) and the position rows
        [M + 1, d] of a step; None when the layer has no heads left."""
        return None if self.attn.n_heads == 0 else self.attn.new_ring_cache(self.attn_norm(mem), pos_rows)

    def _ring_attention(self, h: Tensor, ring: RingKVCache | None, head_scale: Tensor | None) -> Tensor:
        """h + Attn(LN(h), ring) for one token per row (eval mode: no dropout); h when no heads are left."""
        if self.attn.n_heads == 0:
            return h
        return h + self.attn.forward_ring(self.attn_norm(h), ring, head_scale)


class AllAttentionLayer(GatedHeadsMixin, nn.Module):
    """All-attention layer: h + Drop(Attn(LN(h), LN(mem))), where the attention has persistent key/value
    slots per head that stand in for the feed-forward sublayer (docs/method.md §1.2)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        n_persistent: int,
        dropout: float = 0.1,
        dropatt: float = 0.0,
        same_length: bool = True,
        attn_impl: str = "auto",
        gate: HardConcreteGate | None = None,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = RelativeMultiHeadAttention(
            d_model, n_heads, d_head, n_persistent=n_persistent, dropatt=dropatt,
            same_length=same_length, impl=attn_impl,
        )
        self.drop = nn.Dropout(dropout)
        self.gate = gate if gate is not None else HardConcreteGate(n_heads)

    def forward(
        self, h: Tensor, mem: Tensor | None, pos_emb: Tensor, blocked: Tensor | None = None,
        head_scale: Tensor | None = None,
    ) -> Tensor:
        """h [B, T, d], mem [B, M, d] or None, pos_emb [S, d], blocked [T, S] (None: built here) -> [B, T, d]."""
        return self._attention(h, mem, pos_emb, blocked, head_scale)

    def forward_cached(
        self, h: Tensor, cache: LayerKVCache | None, blocked: Tensor, head_scale: Tensor | None = None
    ) -> tuple[Tensor, LayerKVCache | None]:
        """`forward` with the memory's keys/values from ``cache`` (no-grad evaluation): -> [B, T, d], next cache."""
        return self._cached_attention(h, cache, blocked, head_scale)

    def forward_ring(self, h: Tensor, ring: RingKVCache | None, head_scale: Tensor | None = None) -> Tensor:
        """One generation step (eval mode): h [B, 1, d] -> [B, 1, d], ``ring`` advanced in place."""
        return self._ring_attention(h, ring, head_scale)

    def macs_per_token(self, context_len: int) -> int:
        """Forward multiply-accumulates per token (the attention's; LN and residual are not counted)."""
        return self.attn.macs_per_token(context_len)


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear(d, d_inner) -> ReLU -> Dropout -> Linear(d_inner, d)."""

    def __init__(self, d_model: int, d_inner: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_inner)
        self.fc_out = nn.Linear(d_inner, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, d] -> [B, T, d]."""
        return self.fc_out(self.drop(self.fc_in(x).relu()))


class TransformerXLLayer(GatedHeadsMixin, nn.Module):
    """Transformer-XL layer, pre-norm: h + Drop(Attn(LN1(h), LN1(mem))), then h + Drop(FF(LN2(h)))."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        d_inner: int,
        dropout: float = 0.1,
        dropatt: float = 0.0,
        same_length: bool = True,
        attn_impl: str = "auto",
        gate: HardConcreteGate | None = None,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = RelativeMultiHeadAttention(
            d_model, n_heads, d_head, n_persistent=0, dropatt=dropatt, same_length=same_length, impl=attn_impl
        )
        self.ff_norm = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_inner, dropout)
        self.drop = nn.Dropout(dropout)
        self.gate = gate if gate is not None else HardConcreteGate(n_heads)

    def forward(
        self, h: Tensor, mem: Tensor | None, pos_emb: Tensor, blocked: Tensor | None = None,
        head_scale: Tensor | None = None,
    ) -> Tensor:
        """h [B, T, d], mem [B, M, d] or None, pos_emb [S, d], blocked [T, S] (None: built here) -> [B, T, d]."""
        h = self._attention(h, mem, pos_emb, blocked, head_scale)
        return h + self.drop(self.ff(self.ff_norm(h)))

    def forward_cached(
        self, h: Tensor, cache: LayerKVCache | None, blocked: Tensor, head_scale: Tensor | None = None
    ) -> tuple[Tensor, LayerKVCache | None]:
        """`forward` with the memory's keys/values from ``cache`` (no-grad evaluation): -> [B, T, d], next cache."""
        h, cache = self._cached_attention(h, cache, blocked, head_scale)
        return h + self.drop(self.ff(self.ff_norm(h))), cache

    def forward_ring(self, h: Tensor, ring: RingKVCache | None, head_scale: Tensor | None = None) -> Tensor:
        """One generation step (eval mode): h [B, 1, d] -> [B, 1, d], ``ring`` advanced in place."""
        h = self._ring_attention(h, ring, head_scale)
        return h + self.ff(self.ff_norm(h))

    def macs_per_token(self, context_len: int) -> int:
        """Forward multiply-accumulates per token: attention plus the two FF matmuls (2·d·d_inner)."""
        return self.attn.macs_per_token(context_len) + 2 * self.ff.fc_in.in_features * self.ff.fc_in.out_features
