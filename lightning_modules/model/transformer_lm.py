"""MemoryTransformerLM: a Transformer-XL style language model with recurrence memory whose layers are either
All-attention layers (persistent memory, no FFN) or Transformer-XL layers (attention + FFN) (docs/method.md §1.1).

Forward: adaptive embedding -> input dropout -> x sqrt(d) -> layers, each with its own memory -> dropout
-> tied adaptive softmax. No final LayerNorm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.model.adaptive import AdaptiveEmbedding, AdaptiveSoftmax
from lightning_modules.model.attention import LayerKVCache, RelativeMultiHeadAttention, RingKVCache, blocked_mask
from lightning_modules.model.config import ATTN_IMPLS, ModelConfig
from lightning_modules.model.export import PretrainedMixin
from lightning_modules.model.gates import HardConcreteGate
from lightning_modules.model.layers import AllAttentionLayer, FeedForward, TransformerXLLayer
from lightning_modules.model.slicing import ParameterSlice

# Building the ring caches (and the transposed softmax head) costs about two steps without them on W1 (6-7 ms against
# 3.5-4.4 ms per re-projecting step, batch 1): 3 new tokens took 0.70-0.75x the time of the previous decode path
# with them and 0.78-0.83x without, so fewer than 4 step without them (docs/performance.md, "Generation"). The
# tokens are the same either way.
RING_MIN_TOKENS = 4


@dataclass
class LMOutput:
    """What MemoryTransformerLM.forward returns.

    memory: n_layers + 1 detached tensors [B, mem_len, d]: the inputs of layers 0..L-1 (entry 0 is the
        scaled embedding output) and the output of the last layer, each the last mem_len positions of
        [old memory ; this segment]. Pass it back as `memory` for the next segment.
    nll: per-token negative log-likelihood [B, T] (fp32; 0 where the target is -100), when targets are given.
    log_probs: full log-distribution [B, T, V] (fp32), when no targets are given.
    cache: the next :class:`InferenceCache`, when the forward used one (pass it back beside `memory`).
    """

    memory: list[Tensor]
    nll: Tensor | None = None
    log_probs: Tensor | None = None
    cache: InferenceCache | None = None


@dataclass(frozen=True)
class InferenceCache:
    """The projected keys/values of every layer's memory positions, for no-grad evaluation (generation steps
    through :class:`RingKVCache` instead, built from the memory after the prompt): a
    forward given one projects only its own segment (see :class:`LayerKVCache`) and returns the next one in
    ``LMOutput.cache``. It goes beside the hidden-state ``memory``, which stays the recurrence state that outside
    code passes back; both describe the same positions. Immutable and explicit, so every stream (or DDP rank)
    carries its own. Build it with ``model(..., use_cache=True)`` or :meth:`MemoryTransformerLM.init_cache`; a
    head removal slices it on its next use; a change of weights calls for a new one.

    layers: one entry per layer, None for a layer with no heads left.
    """

    layers: tuple[LayerKVCache | None, ...]

    @property
    def batch_size(self) -> int | None:
        """Rows of the cached keys/values (None if no layer has heads)."""
        return next((c.kv.size(0) for c in self.layers if c is not None), None)

    @property
    def length(self) -> int | None:
        """Memory positions cached (None if no layer has heads)."""
        return next((c.kv.size(1) for c in self.layers if c is not None), None)


def _uniform_(t: Tensor, bound: float) -> None:
    nn.init.uniform_(t, -bound, bound)


def _keyword_signature() -> inspect.Signature:
    """``MemoryTransformerLM(**settings)`` as an explicit keyword signature generated from ModelConfig's fields,
    so ``inspect.signature``, ``help()`` and the CLI's argument parser (jsonargparse) see every setting with its
    type and default while the fields stay the one list."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in dataclasses.fields(ModelConfig):
        default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=f.type))
    return inspect.Signature(params, return_annotation=None)


class MemoryTransformerLM(nn.Module, PretrainedMixin):
    """Language model over segments of T tokens with a recurrence memory of mem_len positions per layer.

    Built from keyword settings, the fields of :class:`ModelConfig` (which documents each one), e.g.
    ``MemoryTransformerLM(vocab_size=33278, layer_type="all_attention", n_layers=4, d_model=256, ...)``, or from a
    config with :meth:`from_config`. ``model.config`` is the validated :class:`ModelConfig`.

    Pruning API (see docs/design.md#the-pruning-api): ``gates_enabled``, ``l0_penalty``, ``expected_open_heads``,
    ``head_keep_mask``, ``prune_heads``, ``heads_per_layer``, ``head_ids``. Gates are off after construction:
    the model is then the dense baseline, bit for bit.

    Export (docs/export.md): ``save_pretrained(dir)``, ``from_pretrained(dir or repo id)`` and ``push_to_hub`` in
    huggingface_hub's conventions (``config.json`` with the head layout, ``model.safetensors``), see
    :class:`~lightning_modules.model.export.PretrainedMixin`.
    """

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.config = config = ModelConfig(**settings)
        self.vocab_size, self.layer_type, self.n_layers = config.vocab_size, config.layer_type, config.n_layers
        self.d_model, self.tgt_len, self.mem_len, self.max_len = (config.d_model, config.tgt_len, config.mem_len,
                                                                  config.max_len)
        d_model, n_heads, d_head = config.d_model, config.n_heads, config.d_head

        self.embedding = AdaptiveEmbedding(config.vocab_size, d_model, config.cutoffs, config.div_value,
                                           config.word_dropout)
        self.drop_emb = nn.Dropout(config.dropemb)
        self.pos_table = nn.Parameter(torch.empty(config.max_len, d_model))  # learned P; row r <-> distance S-1-r

        def gate() -> HardConcreteGate:
            return HardConcreteGate(n_heads, config.gate_init, config.gate_beta, config.gate_gamma, config.gate_zeta)

        common = dict(dropout=config.dropout, dropatt=config.dropatt, same_length=config.same_length,
                      attn_impl=config.attn_impl)
        if config.layer_type == "all_attention":
            layers = [AllAttentionLayer(d_model, n_heads, d_head, config.n_persistent, **common, gate=gate())
                      for _ in range(config.n_layers)]
        else:
            layers = [TransformerXLLayer(d_model, n_heads, d_head, config.d_inner, **common, gate=gate())
                      for _ in range(config.n_layers)]
        self.layers = nn.ModuleList(layers)
        self.output_scaling = config.output_scaling
        self._gates_enabled = False
        self._layers_compiled = False
        self._refresh_requires_grad()
        self.drop_out = nn.Dropout(config.output_dropout)
        self.softmax = AdaptiveSoftmax(self.embedding)  # tied to the embedding (docs/method.md §1.4)

        s1 = math.sqrt(1 / d_model) if config.init_s1 is None else config.init_s1
        s2 = math.sqrt(1 / (d_model * config.n_layers)) if config.init_s2 is None else config.init_s2
        self._init_weights(s1, s2)

    @staticmethod
    def upgrade_state_dict_(state_dict: dict[str, Any], prefix: str = "") -> list[str]:
        """Rename, in place, the entries of a state dict written by earlier versions to today's names (the
        All-attention layer norm was ``layers.<i>.norm``, now ``layers.<i>.attn_norm`` as in Transformer-XL layers);
        returns the new names. ``prefix`` is what precedes the model's own names (``"model."`` in a Lightning
        checkpoint)."""
        legacy = re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.norm\.")
        renamed = []
        for key in [k for k in state_dict if legacy.match(k)]:
            new = legacy.sub(lambda m: f"{prefix}layers.{m.group(1)}.attn_norm.", key)
            state_dict[new] = state_dict.pop(key)
            renamed.append(new)
        return renamed

    @classmethod
    def from_config(cls, config: ModelConfig) -> MemoryTransformerLM:
        """A freshly initialised model with the settings of ``config``."""
        return cls(**config.to_dict())

    @torch.no_grad()
    def _init_weights(self, s1: float, s2: float) -> None:
        """docs/method.md §1.3: U(-s1, s1) for embeddings, adaptive projections, W_o and P; U(-s2, s2) for W_q/k/v/r,
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

    @torch.no_grad()
    def init_cache(self, memory: list[Tensor]) -> InferenceCache:
        """The :class:`InferenceCache` of ``memory`` (n_layers + 1 tensors [B, M, d]): each layer's memory
        projected once through LN and W_k, W_v, and W_r applied to the position table once."""
        self._check_memory(memory, memory[0].size(0))
        pos_table = self.drop_emb(self.pos_table)  # (max_len, d); dropout is off in eval
        return InferenceCache(tuple(layer.new_cache(mem, pos_table, self.mem_len)
                                    for layer, mem in zip(self.layers, memory[:-1], strict=True)))

    def forward(
        self, input_ids: Tensor, target_ids: Tensor | None = None, memory: list[Tensor] | None = None,
        cache: InferenceCache | None = None, use_cache: bool = False,
    ) -> LMOutput:
        """Run one segment.

        Args:
            input_ids: [B, T] token ids.
            target_ids: [B, T] next-token ids (-100 = not scored), or None for the full distribution.
            memory: n_layers + 1 tensors [B, M, d] from the previous segment's output, or None for zeros of
                length mem_len.
            cache: the previous segment's ``LMOutput.cache`` (it must describe ``memory``): the memory's keys and
                values come from it instead of being re-projected. No-grad evaluation only (eval mode, gradients
                off); the result equals the uncached one to float rounding.
            use_cache: build the cache from ``memory`` when ``cache`` is None, and return the next one.
        Returns:
            LMOutput with `nll` [B, T] (targets given) or `log_probs` [B, T, V], the next `memory`, and the next
            `cache` when one was used.
        """
        if target_ids is not None and target_ids.shape != input_ids.shape:
            raise ValueError(f"target_ids shape {tuple(target_ids.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        h, new_memory, new_cache = self._hidden(input_ids, memory, cache, use_cache)
        if target_ids is None:
            return LMOutput(memory=new_memory, log_probs=self.softmax.log_probs(h), cache=new_cache)  # (B, T, V)
        return LMOutput(memory=new_memory, nll=self.softmax.nll(h, target_ids), cache=new_cache)  # (B, T)

    def _hidden(
        self, input_ids: Tensor, memory: list[Tensor] | None, cache: InferenceCache | None, use_cache: bool
    ) -> tuple[Tensor, list[Tensor], InferenceCache | None]:
        """Embedding and layers of one segment: the last hidden state [B, T, d] (after output dropout), the next
        memory and the next cache (None without one). See `forward`."""
        B, T = input_ids.shape
        if memory is None:
            memory = self.init_memory(B, input_ids.device)
        self._check_memory(memory, B)
        n_ctx = memory[0].size(1) + T  # S
        if n_ctx > self.max_len:
            raise ValueError(
                f"memory length {memory[0].size(1)} + segment length {T} = {n_ctx} exceeds max_len={self.max_len} "
                "rows of the position table; use shorter segments/memory or build the model with a larger max_len"
            )
        if cache is not None or use_cache:
            if self.training or torch.is_grad_enabled():
                raise ValueError("the inference cache is for no-grad evaluation: call model.eval() and run under "
                                 "torch.no_grad() (training re-projects the memory, whose keys take gradients)")
            if cache is None:
                cache = self.init_cache(memory)
            elif len(cache.layers) != self.n_layers or cache.batch_size not in (None, B) or cache.length not in (
                    None, memory[0].size(1)):
                raise ValueError(f"the cache (batch {cache.batch_size}, {cache.length} positions, "
                                 f"{len(cache.layers)} layers) does not describe this memory (batch {B}, "
                                 f"{memory[0].size(1)} positions, {self.n_layers} layers)")

        h = self._embed(input_ids)  # (B, T, d)
        blocked = blocked_mask(T, n_ctx - T, self.config.same_length, h.device)  # (T, S), one for every layer
        if cache is None:
            hiddens = [h]
            pos_emb = self.drop_emb(self.pos_table[-n_ctx:])  # (S, d), distances S-1 .. 0
            for layer, mem in zip(self.layers, memory[:-1], strict=True):
                h = layer(h, mem, pos_emb, blocked, head_scale=self._head_scale(layer))  # (B, T, d)
                hiddens.append(h)
        else:
            hiddens, cache = self._through_cache(h, cache, blocked)
        return self.drop_out(hiddens[-1]), self._update_memory(memory, hiddens), cache

    def _embed(self, input_ids: Tensor) -> Tensor:
        """Token ids [B, T] -> the first layer's input [B, T, d]: adaptive embedding, dropout, times sqrt(d)."""
        return self.drop_emb(self.embedding(input_ids)) * math.sqrt(self.d_model)

    def _through_cache(self, h: Tensor, cache: InferenceCache, blocked: Tensor) -> tuple[list[Tensor], InferenceCache]:
        """The layers over the embedded segment ``h`` [B, T, d] with the memory's keys/values from ``cache``: every
        layer's input and the last output (n_layers + 1 tensors [B, T, d]) and the advanced cache."""
        hiddens, entries = [h], []
        for layer, entry in zip(self.layers, cache.layers, strict=True):
            h, entry = layer.forward_cached(h, entry, blocked, head_scale=self._head_scale(layer))  # (B, T, d)
            hiddens.append(h)
            entries.append(entry)
        return hiddens, InferenceCache(tuple(entries))

    def _new_rings(self, memory: list[Tensor]) -> list[RingKVCache | None]:
        """Every layer's :class:`RingKVCache` of ``memory`` (n_layers + 1 tensors [B, M, d])."""
        pos_rows = self.drop_emb(self.pos_table[-(memory[0].size(1) + 1) :])  # (M + 1, d), distances M .. 0
        return [layer.new_ring_cache(mem, pos_rows) for layer, mem in zip(self.layers, memory[:-1], strict=True)]

    def _ring_step(self, input_ids: Tensor, rings: list[RingKVCache | None]) -> Tensor:
        """One generation step (eval mode) through the layers' ring caches, which it advances in place:
        ``input_ids`` [B, 1] -> the last hidden state [B, 1, d]. Call it outside autocast: each ring computes in the
        dtype it holds (its memory's), into buffers of that dtype."""
        h = self._embed(input_ids)  # (B, 1, d)
        for layer, ring in zip(self.layers, rings, strict=True):
            h = layer.forward_ring(h, ring, head_scale=self._head_scale(layer))
        return self.drop_out(h)

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

    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Continue each row of `prompt_ids` [B, P] by `max_new_tokens` tokens -> [B, max_new_tokens].

        The prompt is read in segments of tgt_len through the recurrence memory, then one token at a time: with
        `use_cache` (the default; eval mode only) through every layer's :class:`RingKVCache`, the memory's
        projected keys/values in buffers written in place, so a step costs O(d² + (S+N)·d) per layer; without it,
        or for fewer than ``RING_MIN_TOKENS`` new tokens (too few to pay for building the rings), through
        ``forward``'s path, which re-projects the memory and the position rows at every step.
        `temperature` 0 picks the most likely token; otherwise tokens are sampled (from the `top_k` most likely
        when given), with `generator` if given. The next token is drawn from the adaptive softmax without the full
        vocabulary's distribution wherever the result is exactly the same (see `AdaptiveSoftmax.draw`): greedy,
        top-k and temperature 1 are exact; another temperature without top-k computes the full distribution.
        Greedy tokens are those of stepping ``model(ids[:, -1:], memory=memory)`` and taking the argmax.
        Runs in inference mode (no autograd bookkeeping per op); the tokens returned are an ordinary tensor.
        """
        if prompt_ids.dim() != 2 or 0 in prompt_ids.shape:
            raise ValueError(f"prompt_ids must be [batch >= 1, length >= 1]; got {tuple(prompt_ids.shape)}")
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0, top_k >= 1 or None; got "
                             f"{max_new_tokens}, {temperature}, {top_k}")
        if use_cache and self.training:
            raise ValueError("cached generation is for evaluation: call model.eval(), or pass use_cache=False")
        with torch.inference_mode():
            tokens = self._generate(prompt_ids, max_new_tokens, temperature, top_k, generator, use_cache)
        return tokens.clone()  # outside inference mode: a tensor the caller may change in place

    def _generate(self, prompt_ids: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                  generator: torch.Generator | None, use_cache: bool) -> Tensor:
        """`generate` of checked arguments."""
        memory = None
        for start in range(0, prompt_ids.size(1), self.tgt_len):
            h, memory, _ = self._hidden(prompt_ids[:, start : start + self.tgt_len], memory, None, False)
        rings = self._new_rings(memory) if use_cache and max_new_tokens >= RING_MIN_TOKENS else None
        head_t = self.softmax.transposed_head() if rings is not None else None
        new_tokens = []
        device = prompt_ids.device.type
        # the ring steps (and the draws between them) run outside autocast, in the dtype the rings hold
        no_autocast = rings is not None and torch.is_autocast_enabled(device)
        with torch.autocast(device, enabled=False) if no_autocast else contextlib.nullcontext():
            for step in range(max_new_tokens):
                next_ids = self.softmax.draw(h[:, -1], temperature, top_k, generator, head_t)  # (B,)
                new_tokens.append(next_ids)
                if step + 1 == max_new_tokens:
                    break
                if rings is None:
                    h, memory, _ = self._hidden(next_ids[:, None], memory, None, False)  # (B, 1, d)
                else:
                    h = self._ring_step(next_ids[:, None], rings)  # (B, 1, d)
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
                for p in (*layer.attn.parameters(), *layer.attn_norm.parameters()):
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
        return self.config.n_heads * self.n_layers

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

    def macs_per_token(self) -> dict[str, int | list[int]]:
        """Forward multiply-accumulates (MACs; FLOPs = 2 x MACs) per token at S = mem_len + tgt_len keys.

        Per layer (docs/method.md §1.5): heads · (4·d·D + 2·(S+N)·D + S·D), plus 2·d·d_inner for a Transformer-XL FFN
        (N = 0 there). The adaptive softmax: `softmax_head` (shortlist + cluster logits, always paid),
        `softmax_tails` (per tail cluster) and `softmax_full` (all clusters, as for full log-probs).
        `total` = layers + softmax_full. Embedding lookups, LayerNorms and W_r·P (once per forward, not per
        token) are not counted. The layer figures are what the cached paths (``InferenceCache`` in no-grad
        evaluation, ``RingKVCache`` in generation) pay per token; the re-projecting path also projects the memory
        rows again (`reprojection_macs_per_token`).
        """
        S = self.mem_len + self.tgt_len
        per_layer = [layer.macs_per_token(S) for layer in self.layers]
        softmax = self.softmax.macs_per_token()
        return {
            "context_len": S,
            "per_layer": per_layer,
            "layers": sum(per_layer),
            "softmax_head": softmax["head"],
            "softmax_tails": softmax["tails"],
            "softmax_full": softmax["full"],
            "total": sum(per_layer) + softmax["full"],
        }

    def reprojection_macs_per_token(self, batch_size: int) -> float:
        """MACs per token that evaluating without the inference cache adds to `macs_per_token`, at segments of
        tgt_len after a full memory of mem_len, batch ``batch_size``: every layer's memory rows through W_k, W_v
        again and W_r over the position rows (``RelativeMultiHeadAttention.reprojection_macs_per_token``)."""
        return sum(layer.attn.reprojection_macs_per_token(self.mem_len, self.tgt_len, batch_size)
                   for layer in self.layers)


MemoryTransformerLM.__init__.__signature__ = _keyword_signature()
