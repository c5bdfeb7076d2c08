"""ModelConfig: every setting of a MemoryTransformerLM, typed and validated once.

It is the one list of the model's hyperparameters: the model is built from it, checkpoints and exports store
``to_dict()``, and a checkpoint fits a model when their ``shape_entries()`` agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from lightning_modules.model.adaptive import cluster_dims

LAYER_TYPES = ("all_attention", "transformer_xl")
ATTN_IMPLS = ("auto", "joint", "sdpa", "reference")


def _shape(default: Any) -> Any:
    """A field that fixes parameter shapes: a checkpoint with another value cannot load into the model."""
    return field(default=default, metadata={"shape": True})


@dataclass(frozen=True)
class ModelConfig:
    """Settings of a :class:`MemoryTransformerLM`, each documented under Args.

    Shape-defining fields are marked; the rest (dropouts, gate settings, the attention core) may differ between a
    checkpoint and the model it loads into. ``n_persistent`` fixes shapes for All-attention layers only and
    ``d_inner`` for Transformer-XL layers only (``shape_entries`` knows which).

    Args:
        vocab_size: number of word types V (ids sorted by frequency, as the adaptive softmax expects).
        layer_type: "all_attention" (docs/method.md §1.2) or "transformer_xl" (attention + FFN).
        n_layers, d_model, n_heads, d_head: L, d, H and the per-head width D.
        n_persistent: persistent key/value slots per head N (All-attention only).
        d_inner: FFN width (Transformer-XL only).
        tgt_len: segment length the model is trained at (used for MAC accounting and argument checks).
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
        same_length: each query attends exactly mem_len + 1 context keys (docs/method.md §1.1); else plain causal.
        max_len: rows of the learned position table P; mem_len + T must not exceed it.
        init_s1: uniform init bound for embeddings, adaptive projections, W_o and P; None = sqrt(1/d).
        init_s2: uniform init bound for W_q/k/v/r, FFN, cluster logits and persistent K/V;
            None = sqrt(1/(d·L)) (docs/method.md §1.3).
        attn_impl: the attention core: "auto" ("joint" on CPU, "sdpa" elsewhere), "joint" (one softmax over context
            and persistent slots, hand-written backward, fused no-grad kernels), "sdpa" (scaled_dot_product_attention
            with an additive bias) or "reference" (explicit softmax). All compute the same function.
        gate_init: initial log-alpha of every head gate (docs/method.md §3.2: 2.0 keeps heads open 88% of
            training steps).
        gate_beta, gate_gamma, gate_zeta: hard-concrete temperature and stretch interval (docs/method.md §2).
        output_scaling: when gating, multiply a layer's head outputs by heads / open heads (no gradient through
            the factor), so shutting heads keeps the layer's output scale (docs/method.md §3.3); folded into W_o
            when heads are removed.
    """

    vocab_size: int = field(metadata={"shape": True})
    layer_type: str = _shape("all_attention")
    n_layers: int = _shape(16)
    d_model: int = _shape(512)
    n_heads: int = _shape(8)
    d_head: int = _shape(64)
    n_persistent: int = 2048
    d_inner: int = 2048
    tgt_len: int = 192
    mem_len: int = 192
    cutoffs: tuple[int, ...] = _shape((20000, 40000, 200000))
    div_value: float = _shape(4.0)
    dropout: float = 0.1
    dropatt: float = 0.0
    dropemb: float = 0.1
    word_dropout: float = 0.0
    dropout_out: float | None = None
    same_length: bool = True
    max_len: int = _shape(512)
    init_s1: float | None = None
    init_s2: float | None = None
    attn_impl: str = "auto"
    gate_init: float = 2.0
    gate_beta: float = 0.333
    gate_gamma: float = -0.1
    gate_zeta: float = 1.1
    output_scaling: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "cutoffs", tuple(self.cutoffs))
        self._validate()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every setting's name, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> ModelConfig:
        """A config from a stored ``to_dict()``; unknown names are an error that lists them."""
        unknown = sorted(set(settings) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown model settings {unknown}; the known ones are {list(cls.field_names())}")
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready settings (cutoffs as a list)."""
        settings = dataclasses.asdict(self)
        settings["cutoffs"] = list(self.cutoffs)
        return settings

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def output_dropout(self) -> float:
        """Dropout before the softmax: ``dropout_out``, or 1 - (1 - dropout)**2 when unset (the distribution of
        the official code's two consecutive dropouts)."""
        return 1 - (1 - self.dropout) ** 2 if self.dropout_out is None else self.dropout_out

    def shape_entries(self) -> dict[str, Any]:
        """The settings that fix parameter shapes, with the width of this layer type's head-owned part."""
        entries = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("shape")}
        entries["cutoffs"] = list(self.cutoffs)
        width = "n_persistent" if self.layer_type == "all_attention" else "d_inner"
        entries[width] = getattr(self, width)
        return entries

    def _validate(self) -> None:
        """Raise a ValueError that says what is wrong and how to fix it."""
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {LAYER_TYPES}; got {self.layer_type!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}; got {self.attn_impl!r}")
        sizes = ["vocab_size", "n_layers", "d_model", "n_heads", "d_head", "tgt_len", "max_len",
                 "n_persistent" if self.layer_type == "all_attention" else "d_inner"]
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.mem_len, int) or self.mem_len < 0:
            raise ValueError(f"mem_len must be a non-negative integer; got {self.mem_len!r}")
        if self.same_length and self.mem_len == 0:
            raise ValueError("same_length=True with mem_len=0 lets each token see only itself; "
                             "set same_length=False or mem_len > 0")
        if self.tgt_len + self.mem_len > self.max_len:
            raise ValueError(f"tgt_len + mem_len = {self.tgt_len + self.mem_len} exceeds max_len={self.max_len}, "
                             "the number of position-table rows; raise max_len or shorten tgt_len/mem_len")
        dropouts = {"dropout": self.dropout, "dropatt": self.dropatt, "dropemb": self.dropemb,
                    "word_dropout": self.word_dropout, "dropout_out": self.output_dropout}
        for name, p in dropouts.items():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {p!r}")
        cutoffs = self.cutoffs
        if any(not isinstance(c, int) for c in cutoffs):
            raise ValueError(f"cutoffs must be integers; got {list(cutoffs)!r}")
        if any(b <= a for a, b in pairwise([0, *cutoffs])):
            raise ValueError(f"cutoffs must be positive and strictly increasing; got {list(cutoffs)!r}")
        if cutoffs and cutoffs[-1] >= self.vocab_size:
            raise ValueError(f"every cutoff must be < vocab_size={self.vocab_size}; got {list(cutoffs)!r} "
                             "(drop the cutoffs at or above the vocabulary size)")
        if self.div_value < 1:
            raise ValueError(f"div_value must be >= 1 (1 = every cluster at full width); got {self.div_value!r}")
        if cluster_dims(self.d_model, len(cutoffs) + 1, self.div_value)[-1] < 1:
            raise ValueError(f"div_value={self.div_value} with {len(cutoffs)} cutoffs makes the last cluster's "
                             f"width d_model // div_value**{len(cutoffs)} = 0; use fewer cutoffs or a smaller "
                             "div_value")
