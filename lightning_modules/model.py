"""MemoryTransformerLM: a Transformer-XL style language model with recurrence memory whose layers are either
All-attention layers (persistent memory, no FFN) or Transformer-XL layers (attention + FFN) (PAPER 1.1).

Forward: adaptive embedding -> input dropout -> x sqrt(d) -> layers, each with its own memory -> dropout
-> tied adaptive softmax. No final LayerNorm.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.adaptive import AdaptiveEmbedding, AdaptiveSoftmax, cluster_dims
from lightning_modules.attention import ATTN_IMPLS, RelativeMultiHeadAttention
from lightning_modules.gates import HardConcreteGate
from lightning_modules.layers import AllAttentionLayer, FeedForward, TransformerXLLayer
from lightning_modules.slicing import ParameterSlice

LAYER_TYPES = ("all_attention", "transformer_xl")


@dataclass
class LMOutput:
    """What MemoryTransformerLM.forward returns.

    memory: n_layers + 1 detached tensors [B, mem_len, d]: the inputs of layers 0..L-1 (entry 0 is the
        scaled embedding output) and the output of the last layer, each the last mem_len positions of
        [old memory ; this segment]. Pass it back as `memory` for the next segment.
    nll: per-token negative log-likelihood [B, T] (fp32; 0 where the target is -100), when targets are given.
    log_probs: full log-distribution [B, T, V] (fp32), when no targets are given.
    """

    memory: list[Tensor]
    nll: Tensor | None = None
    log_probs: Tensor | None = None


def _uniform_(t: Tensor, bound: float) -> None:
    nn.init.uniform_(t, -bound, bound)


class MemoryTransformerLM(nn.Module):
    """Language model over segments of T tokens with a recurrence memory of mem_len positions per layer.

    Args:
        vocab_size: number of word types V (ids sorted by frequency, as the adaptive softmax expects).
        layer_type: "all_attention" (PAPER 1.2) or "transformer_xl" (attention + FFN).
        n_layers, d_model, n_heads, d_head: L, d, H and the per-head width D.
        n_persistent: persistent key/value slots per head N (All-attention only).
        d_inner: FFN width (Transformer-XL only).
        tgt_len: segment length the model is trained at (used for FLOP accounting and argument checks).
        mem_len: memory length M; `memory=None` means M zeros, so S = M + T keys of context.
        cutoffs: adaptive softmax/input cluster boundaries, strictly increasing and < vocab_size;
            empty = a plain full softmax tied to a plain embedding.
        div_value: each cluster is div_value times narrower than the previous one.
        dropout: residual dropout (also inside the FFN).
        dropatt: attention-probability dropout, over context and persistent slots alike.
        dropemb: input dropout, on the embedding output and on the position table.
        word_dropout: drops whole word types from the input embedding tables (training only).
        dropout_out: dropout before the softmax; None = 1 - (1 - dropout)**2, the same distribution as the
            official code's two consecutive dropouts (proj_drop, output_drop).
        same_length: each query attends exactly mem_len + 1 context keys (PAPER 1.1); else plain causal.
        max_len: rows of the learned position table P; mem_len + T must not exceed it.
        init_s1: uniform init bound for embeddings, adaptive projections, W_o and P; None = sqrt(1/d).
        init_s2: uniform init bound for W_q/k/v/r, FFN, cluster logits and persistent K/V;
            None = sqrt(1/(d·L)) (PAPER 1.3).
        attn_impl: the attention core: "auto" ("joint" on CPU, "sdpa" elsewhere), "joint" (one softmax over context
            and persistent slots, hand-written backward, fused no-grad kernels), "sdpa" (scaled_dot_product_attention
            with an additive bias) or "reference" (explicit softmax). All compute the same function.
        gate_init: initial log-alpha of every head gate (PAPER 3.2: 2.0 keeps heads open 88% of training steps).
        gate_beta, gate_gamma, gate_zeta: hard-concrete temperature and stretch interval (PAPER 2).
        output_scaling: when gating, multiply a layer's head outputs by heads / open heads (no gradient through
            the factor), so shutting heads keeps the layer's output scale (PAPER 3.3); folded into W_o when
            heads are removed.

    Pruning API (see DESIGN "Contracts"): ``gates_enabled``, ``l0_penalty``, ``expected_open_heads``,
    ``head_keep_mask``, ``prune_heads``, ``heads_per_layer``, ``head_ids``. Gates are off after construction:
    the model is then the dense baseline, bit for bit.
    """

    def __init__(
        self,
        vocab_size: int,
        layer_type: str = "all_attention",
        n_layers: int = 16,
        d_model: int = 512,
        n_heads: int = 8,
        d_head: int = 64,
        n_persistent: int = 2048,
        d_inner: int = 2048,
        tgt_len: int = 192,
        mem_len: int = 192,
        cutoffs: Sequence[int] = (20000, 40000, 200000),
        div_value: float = 4.0,
        dropout: float = 0.1,
        dropatt: float = 0.0,
        dropemb: float = 0.1,
        word_dropout: float = 0.0,
        dropout_out: float | None = None,
        same_length: bool = True,
        max_len: int = 512,
        init_s1: float | None = None,
        init_s2: float | None = None,
        attn_impl: str = "auto",
        gate_init: float = 2.0,
        gate_beta: float = 0.333,
        gate_gamma: float = -0.1,
        gate_zeta: float = 1.1,
        output_scaling: bool = False,
    ) -> None:
        super().__init__()
        # every constructor argument, so a checkpoint can rebuild this model (see LanguageModel.load_from_checkpoint)
        self.config: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config["cutoffs"] = list(cutoffs)
        cutoffs = list(cutoffs)
        if dropout_out is None:
            dropout_out = 1 - (1 - dropout) ** 2
        _check_args(
            vocab_size=vocab_size, layer_type=layer_type, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
            d_head=d_head, n_persistent=n_persistent, d_inner=d_inner, tgt_len=tgt_len, mem_len=mem_len,
            cutoffs=cutoffs, div_value=div_value, dropouts={"dropout": dropout, "dropatt": dropatt,
            "dropemb": dropemb, "word_dropout": word_dropout, "dropout_out": dropout_out},
            same_length=same_length, max_len=max_len, attn_impl=attn_impl,
        )
        self.vocab_size, self.layer_type, self.n_layers, self.d_model = vocab_size, layer_type, n_layers, d_model
        self.tgt_len, self.mem_len, self.max_len = tgt_len, mem_len, max_len

        self.embedding = AdaptiveEmbedding(vocab_size, d_model, cutoffs, div_value, word_dropout)
        self.drop_emb = nn.Dropout(dropemb)
        self.pos_table = nn.Parameter(torch.empty(max_len, d_model))  # learned P; row r <-> distance S-1-r
        def gate() -> HardConcreteGate:
            return HardConcreteGate(n_heads, gate_init, gate_beta, gate_gamma, gate_zeta)

        common = dict(dropout=dropout, dropatt=dropatt, same_length=same_length, attn_impl=attn_impl)
        if layer_type == "all_attention":
            layers = [AllAttentionLayer(d_model, n_heads, d_head, n_persistent, **common, gate=gate())
                      for _ in range(n_layers)]
        else:
            layers = [TransformerXLLayer(d_model, n_heads, d_head, d_inner, **common, gate=gate())
                      for _ in range(n_layers)]
        self.layers = nn.ModuleList(layers)
        self.output_scaling = output_scaling
        self._gates_enabled = False
        self._layers_compiled = False
        self._refresh_requires_grad()
        self.drop_out = nn.Dropout(dropout_out)
        self.softmax = AdaptiveSoftmax(self.embedding)  # tied to the embedding (PAPER 1.4)

        s1 = math.sqrt(1 / d_model) if init_s1 is None else init_s1
        s2 = math.sqrt(1 / (d_model * n_layers)) if init_s2 is None else init_s2
        self._init_weights(s1, s2)

    @torch.no_grad()
    def _init_weights(self, s1: float, s2: float) -> None:
        """PAPER 1.3: U(-s1, s1) for embeddings, adaptive projections, W_o and P; U(-s2, s2) for W_q/k/v/r,
        the cluster logits and persistent K/V (and, our choice, the FFN); biases, u and v' zero; LN 1 / 0."""
        _uniform_(self.pos_table, s1)
        for module in self.modules():
            if isinstance(module, AdaptiveEmbedding):
                for p in module.parameters():  # tables and up-projections
                    _uniform_(p, s1)
            elif isinstance(module, AdaptiveSoftmax):
                if module.shortlist_proj is not None:
                    _uniform_(module.shortlist_proj.weight, s1)
                if module.cluster is not None:
                    _uniform_(module.cluster.weight, s2)
                    nn.init.zeros_(module.cluster.bias)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RelativeMultiHeadAttention):
                for proj in (module.q_proj, module.k_proj, module.v_proj, module.r_proj):
                    _uniform_(proj.weight, s2)
                _uniform_(module.o_proj.weight, s1)
                nn.init.zeros_(module.o_proj.bias)
                nn.init.zeros_(module.content_bias)
                nn.init.zeros_(module.position_bias)
                if module.n_persistent > 0:
                    _uniform_(module.persistent_k, s2)
                    _uniform_(module.persistent_v, s2)
            elif isinstance(module, FeedForward):
                for fc in (module.fc_in, module.fc_out):
                    _uniform_(fc.weight, s2)
                    nn.init.zeros_(fc.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    # ----------------------------------------------------------------------------------------------- forward

    def init_memory(self, batch_size: int, device: torch.device | None = None) -> list[Tensor]:
        """Zero memory of length mem_len for each of the n_layers + 1 stored tensors, [B, mem_len, d] each."""
        p = self.pos_table
        shape = (batch_size, self.mem_len, self.d_model)
        return [torch.zeros(shape, device=device or p.device, dtype=p.dtype) for _ in range(self.n_layers + 1)]

    def forward(
        self, input_ids: Tensor, target_ids: Tensor | None = None, memory: list[Tensor] | None = None
    ) -> LMOutput:
        """Run one segment.

        Args:
            input_ids: [B, T] token ids.
            target_ids: [B, T] next-token ids (-100 = not scored), or None for the full distribution.
            memory: n_layers + 1 tensors [B, M, d] from the previous segment's output, or None for zeros of
                length mem_len.
        Returns:
            LMOutput with `nll` [B, T] (targets given) or `log_probs` [B, T, V], and the next `memory`.
        """
        B, T = input_ids.shape
        if memory is None:
            memory = self.init_memory(B, input_ids.device)
        self._check_memory(memory, B)
        if target_ids is not None and target_ids.shape != input_ids.shape:
            raise ValueError(f"target_ids shape {tuple(target_ids.shape)} must equal input_ids shape {(B, T)}")
        n_ctx = memory[0].size(1) + T  # S
        if n_ctx > self.max_len:
            raise ValueError(
                f"memory length {memory[0].size(1)} + segment length {T} = {n_ctx} exceeds max_len={self.max_len} "
                "rows of the position table; use shorter segments/memory or build the model with a larger max_len"
            )

        h = self.drop_emb(self.embedding(input_ids)) * math.sqrt(self.d_model)  # (B, T, d)
        pos_emb = self.drop_emb(self.pos_table[-n_ctx:])  # (S, d), distances S-1 .. 0
        hiddens = [h]
        for layer, mem in zip(self.layers, memory[:-1], strict=True):
            h = layer(h, mem, pos_emb, head_scale=self._head_scale(layer))  # (B, T, d)
            hiddens.append(h)
        new_memory = self._update_memory(memory, hiddens)

        h = self.drop_out(h)
        if target_ids is None:
            return LMOutput(memory=new_memory, log_probs=self.softmax.log_probs(h))  # (B, T, V)
        return LMOutput(memory=new_memory, nll=self.softmax.nll(h, target_ids))  # (B, T)

    def _check_memory(self, memory: list[Tensor], batch_size: int) -> None:
        """Raise a ValueError unless memory holds n_layers + 1 tensors [B, M, d] with one common M."""
        if len(memory) != self.n_layers + 1:
            raise ValueError(
                f"memory must hold n_layers + 1 = {self.n_layers + 1} tensors (pass the previous output's "
                f"`memory`, or None for zeros); got {len(memory)}"
            )
        shape = memory[0].shape
        for m in memory:
            if m.dim() != 3 or m.shape != shape or shape[0] != batch_size or shape[2] != self.d_model:
                raise ValueError(
                    f"every memory tensor must be [batch={batch_size}, M, d_model={self.d_model}] with one "
                    f"common M; got {tuple(m.shape)}"
                )

    @torch.no_grad()
    def _update_memory(self, memory: list[Tensor], hiddens: list[Tensor]) -> list[Tensor]:
        """Last mem_len positions of [old memory ; hidden], detached, for each stored tensor."""
        new = []
        for m, h in zip(memory, hiddens, strict=True):
            cat = torch.cat([m.to(h.dtype), h], dim=1)  # (B, M+T, d)
            new.append(cat[:, max(0, cat.size(1) - self.mem_len) :].detach())
        return new

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue each row of `prompt_ids` [B, P] by `max_new_tokens` tokens -> [B, max_new_tokens].

        The prompt is read in segments of tgt_len, then one token at a time, all through the recurrence memory.
        `temperature` 0 picks the most likely token; otherwise tokens are sampled from the (top-k) distribution.
        """
        if prompt_ids.dim() != 2 or prompt_ids.size(1) == 0:
            raise ValueError(f"prompt_ids must be [batch, length >= 1]; got {tuple(prompt_ids.shape)}")
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0, top_k >= 1 or None; got "
                             f"{max_new_tokens}, {temperature}, {top_k}")
        memory = None
        for start in range(0, prompt_ids.size(1), self.tgt_len):
            out = self(prompt_ids[:, start : start + self.tgt_len], memory=memory)
            memory = out.memory
        new_tokens = []
        for _ in range(max_new_tokens):
            log_probs = out.log_probs[:, -1]  # (B, V)
            if temperature == 0:
                next_ids = log_probs.argmax(-1)  # (B,)
            else:
                logits = log_probs / temperature
                if top_k is not None and top_k < logits.size(-1):
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_ids = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)  # (B,)
            new_tokens.append(next_ids)
            out = self(next_ids[:, None], memory=memory)
            memory = out.memory
        return torch.stack(new_tokens, 1) if new_tokens else prompt_ids.new_zeros(prompt_ids.size(0), 0)

    # ------------------------------------------------------------------------------------ introspection

    def set_attn_impl(self, impl: str) -> None:
        """Switch every attention module to another core: one of ``ATTN_IMPLS`` (see the constructor)."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}; got {impl!r}")
        for layer in self.layers:
            layer.attn.impl = impl

    def compile_layers(self, **options: Any) -> None:
        """Compile every layer's forward with ``torch.compile`` (lazily, at its first call; ``options`` go to
        torch.compile). Per layer rather than the whole model: the adaptive softmax routes tokens by cluster, which
        gives data-dependent shapes. Parameter names do not change, so checkpoints are the same as without it.
        A later ``prune_heads`` calls ``torch.compiler.reset()``, which is process-wide: other compiled modules in
        the same process recompile too."""
        for layer in self.layers:
            layer.compile(**options)
        self._layers_compiled = True

    @property
    def layers_compiled(self) -> bool:
        """Whether ``compile_layers`` was called."""
        return self._layers_compiled

    # ------------------------------------------------------------------------------------------- pruning API

    @property
    def gates_enabled(self) -> bool:
        """Whether the head gates act. Off: the dense model, bit for bit, and the gates get no gradient."""
        return self._gates_enabled

    @gates_enabled.setter
    def gates_enabled(self, enabled: bool) -> None:
        self._gates_enabled = bool(enabled)
        self._refresh_requires_grad()

    def _refresh_requires_grad(self) -> None:
        """Only parameters that take part in the forward train: gates only when enabled, and nothing of an
        emptied attention sublayer (DDP rejects parameters that never get a gradient)."""
        for layer in self.layers:
            empty = layer.n_heads == 0
            layer.gate.log_alpha.requires_grad_(self._gates_enabled and not empty)
            if empty:  # only ever switched off, so parameters a user froze stay frozen
                norm = layer.norm if isinstance(layer, AllAttentionLayer) else layer.attn_norm
                for p in (*layer.attn.parameters(), *norm.parameters()):
                    p.requires_grad_(False)

    def _head_scale(self, layer: AllAttentionLayer | TransformerXLLayer) -> Tensor | None:
        """Per-head multiplier of one layer: its gates (times the output-scaling factor), or None when ungated."""
        if not self._gates_enabled or layer.n_heads == 0:
            return None
        g = layer.gate()  # (H,) exact 0/1 values
        if self.output_scaling:
            g = g * (layer.n_heads / g.detach().sum().clamp(min=1))
        return g

    def set_gate_temperature(self, beta: float) -> None:
        """Set the hard-concrete temperature of every gate (for annealing it during training)."""
        if beta <= 0:
            raise ValueError(f"gate temperature must be > 0; got {beta}")
        for layer in self.layers:
            layer.gate.beta = beta

    def l0_penalty(self) -> Tensor:
        """Expected number of open gates over all layers, the paper's L0 term (differentiable)."""
        return sum((layer.gate.l0() for layer in self.layers if layer.n_heads > 0), self.pos_table.new_zeros(()))

    def expected_open_heads(self) -> Tensor:
        """Expected number of heads a training forward keeps, sum of sigmoid(log_alpha) (differentiable)."""
        return sum((layer.gate.open_probability().sum() for layer in self.layers if layer.n_heads > 0),
                   self.pos_table.new_zeros(()))

    def head_keep_mask(self) -> list[Tensor]:
        """The gates' deterministic decision, one bool tensor [heads of layer] per layer: True = keep."""
        return [layer.gate.keep_mask() for layer in self.layers]

    @property
    def heads_per_layer(self) -> list[int]:
        """Number of attention heads in each layer."""
        return [layer.attn.n_heads for layer in self.layers]

    @property
    def head_ids(self) -> list[list[int]]:
        """Original index (at construction) of every head still present, per layer."""
        return [layer.attn.head_ids.tolist() for layer in self.layers]

    @property
    def total_heads(self) -> int:
        """Heads the model was built with (the denominator of sparsity)."""
        return self.config["n_heads"] * self.n_layers

    def prune_heads(self, heads: Mapping[int, Sequence[int]]) -> list[ParameterSlice]:
        """Physically remove heads: ``{layer: [head, ...]}``, head numbers indexing the layer's *current* heads.

        Every per-head slice goes: rows of W_q/W_k/W_v/W_r, columns of W_o, u and v', persistent K/V and the
        gate. A layer left with no heads skips its attention sublayer (an All-attention layer becomes the
        identity). With gates and output scaling on, the change of the layer's scaling factor is folded into
        W_o, so in eval mode the pruned model computes what the gated one did when the removed heads are the
        shut ones. Returns the slices made, so optimizer state can follow (``slice_optimizer_state_``).
        """
        plan = {}
        for layer_idx, drop in heads.items():
            if not 0 <= layer_idx < self.n_layers:
                raise ValueError(f"layer {layer_idx} does not exist; the model has layers 0..{self.n_layers - 1}")
            n = self.layers[layer_idx].n_heads
            drop = sorted(set(int(h) for h in drop))
            if drop and (drop[0] < 0 or drop[-1] >= n):
                raise ValueError(f"layer {layer_idx} has heads 0..{n - 1} left; cannot remove {drop}")
            if drop:
                plan[layer_idx] = [h for h in range(n) if h not in drop]
        slices: list[ParameterSlice] = []
        for layer_idx, keep in plan.items():
            layer = self.layers[layer_idx]
            keep_t = torch.tensor(keep, dtype=torch.long)
            slices += layer.select_heads_(keep_t, self._folded_scale(layer, keep_t))
        self._refresh_requires_grad()
        if plan and self._layers_compiled:
            # graphs traced for the old head counts are useless now; dropping them lets the next call recompile
            # from scratch instead of piling up guard failures until torch.compile's recompile limit
            torch.compiler.reset()
        return slices

    def _folded_scale(self, layer: AllAttentionLayer | TransformerXLLayer, keep: Tensor) -> float:
        """Eval-mode output-scaling factor before removal over the factor after, 1.0 when it does not apply."""
        if not (self._gates_enabled and self.output_scaling) or keep.numel() == 0:
            return 1.0
        is_open = layer.gate.keep_mask()
        before = layer.n_heads / max(int(is_open.sum()), 1)
        after = keep.numel() / max(int(is_open[keep.to(is_open.device)].sum()), 1)
        return before / after

    def shut_heads(self) -> dict[int, list[int]]:
        """The heads whose gates are decided shut, ``{layer: [head, ...]}`` (layers with none left out)."""
        shut = {i: (~keep).nonzero().flatten().tolist() for i, keep in enumerate(self.head_keep_mask())}
        return {i: heads for i, heads in shut.items() if heads}

    def prune_closed_heads(self) -> tuple[dict[int, list[int]], list[ParameterSlice]]:
        """Remove every head whose gate is decided shut; returns ``({layer: [removed heads]}, slices)``."""
        closed = self.shut_heads()
        return closed, self.prune_heads(closed)

    def shrink_to(self, heads_per_layer: Sequence[int]) -> None:
        """Remove trailing heads until each layer has ``heads_per_layer[i]`` (to load a pruned checkpoint)."""
        current = self.heads_per_layer
        if len(heads_per_layer) != len(current) or any(
            k > n or k < 0 for k, n in zip(heads_per_layer, current, strict=True)
        ):
            raise ValueError(f"cannot shrink a model with heads per layer {current} to {list(heads_per_layer)}: "
                             "the layout must have one entry per layer, none larger than the model's")
        self.prune_heads({i: range(k, n) for i, (k, n) in enumerate(zip(heads_per_layer, current, strict=True))})

    def parameter_counts(self) -> dict[str, int | list[int]]:
        """Parameter counts: `total` (each tied tensor once), `embeddings` (adaptive input tables and
        projections), `softmax_untied` (shortlist projection, cluster logits, output biases), `position_table`,
        `layers` and `per_layer`."""
        tied = {id(p) for p in self.embedding.parameters()}
        per_layer = [sum(p.numel() for p in layer.parameters()) for layer in self.layers]
        return {
            "total": sum(p.numel() for p in self.parameters()),
            "embeddings": sum(p.numel() for p in self.embedding.parameters()),
            "softmax_untied": sum(p.numel() for p in self.softmax.parameters() if id(p) not in tied),
            "position_table": self.pos_table.numel(),
            "layers": sum(per_layer),
            "per_layer": per_layer,
        }

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """All parameters, or only the layers' (no embeddings, softmax or position table) if not
        include_embeddings."""
        counts = self.parameter_counts()
        return counts["total"] if include_embeddings else counts["layers"]

    def flops_per_token(self) -> dict[str, int | list[int]]:
        """Forward multiply-accumulates (MACs; FLOPs = 2 x MACs) per token at S = mem_len + tgt_len keys.

        Per layer (PAPER 1.5): heads · (4·d·D + 2·(S+N)·D + S·D), plus 2·d·d_inner for a Transformer-XL FFN
        (N = 0 there). The adaptive softmax: `softmax_head` (shortlist + cluster logits, always paid),
        `softmax_tails` (per tail cluster) and `softmax_full` (all clusters, as for full log-probs).
        `total` = layers + softmax_full. Embedding lookups, LayerNorms and W_r·P (once per forward, not per
        token) are not counted.
        """
        S = self.mem_len + self.tgt_len
        per_layer = [layer.flops_per_token(S) for layer in self.layers]
        softmax = self.softmax.flops_per_token()
        return {
            "context_len": S,
            "per_layer": per_layer,
            "layers": sum(per_layer),
            "softmax_head": softmax["head"],
            "softmax_tails": softmax["tails"],
            "softmax_full": softmax["full"],
            "total": sum(per_layer) + softmax["full"],
        }


def _check_args(
    *,
    vocab_size: int,
    layer_type: str,
    n_layers: int,
    d_model: int,
    n_heads: int,
    d_head: int,
    n_persistent: int,
    d_inner: int,
    tgt_len: int,
    mem_len: int,
    cutoffs: list[int],
    div_value: float,
    dropouts: dict[str, float],
    same_length: bool,
    max_len: int,
    attn_impl: str,
) -> None:
    """Raise a ValueError that says what is wrong with the constructor arguments and how to fix it."""
    if layer_type not in LAYER_TYPES:
        raise ValueError(f"layer_type must be one of {LAYER_TYPES}; got {layer_type!r}")
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}; got {attn_impl!r}")
    sizes = {"vocab_size": vocab_size, "n_layers": n_layers, "d_model": d_model, "n_heads": n_heads,
             "d_head": d_head, "tgt_len": tgt_len, "max_len": max_len}
    if layer_type == "all_attention":
        sizes["n_persistent"] = n_persistent
    else:
        sizes["d_inner"] = d_inner
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if not isinstance(mem_len, int) or mem_len < 0:
        raise ValueError(f"mem_len must be a non-negative integer; got {mem_len!r}")
    if same_length and mem_len == 0:
        raise ValueError("same_length=True with mem_len=0 lets each token see only itself; "
                         "set same_length=False or mem_len > 0")
    if tgt_len + mem_len > max_len:
        raise ValueError(f"tgt_len + mem_len = {tgt_len + mem_len} exceeds max_len={max_len}, the number of "
                         "position-table rows; raise max_len or shorten tgt_len/mem_len")
    for name, p in dropouts.items():
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1); got {p!r}")
    if any(not isinstance(c, int) for c in cutoffs):
        raise ValueError(f"cutoffs must be integers; got {cutoffs!r}")
    if any(b <= a for a, b in pairwise([0, *cutoffs])):
        raise ValueError(f"cutoffs must be positive and strictly increasing; got {cutoffs!r}")
    if cutoffs and cutoffs[-1] >= vocab_size:
        raise ValueError(f"every cutoff must be < vocab_size={vocab_size}; got {cutoffs!r} "
                         "(drop the cutoffs at or above the vocabulary size)")
    if div_value < 1:
        raise ValueError(f"div_value must be >= 1 (1 = every cluster at full width); got {div_value!r}")
    dims = cluster_dims(d_model, len(cutoffs) + 1, div_value)
    if dims[-1] < 1:
        raise ValueError(f"div_value={div_value} with {len(cutoffs)} cutoffs makes the last cluster's width "
                         f"d_model // div_value**{len(cutoffs)} = 0; use fewer cutoffs or a smaller div_value")
