"""The language model in plain PyTorch (no Lightning): configuration, attention, layers, adaptive input/softmax,
head gates, slicing for head removal, and the MemoryTransformerLM that composes them."""

from lightning_modules.model.config import ATTN_IMPLS, LAYER_TYPES, ModelConfig
from lightning_modules.model.transformer_lm import LMOutput, MemoryTransformerLM

__all__ = ["ATTN_IMPLS", "LAYER_TYPES", "LMOutput", "MemoryTransformerLM", "ModelConfig"]
