"""Dtype helpers shared by the attention cores and the softmax: logits and softmaxes run in float32 at least,
also under bf16/fp16 autocast."""

import torch
from torch import Tensor


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a softmax over ``dtype`` logits runs in: float32, or ``dtype`` itself when wider."""
    return torch.promote_types(dtype, torch.float32)


def at_least_fp32(x: Tensor) -> Tensor:
    """x in float32, or as is if already float32 or wider (the Python check skips a dispatch when no cast is
    needed)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in ``dtype``; the Python check skips a dispatch in the common (no-autocast) case."""
    return x if x.dtype == dtype else x.to(dtype)
