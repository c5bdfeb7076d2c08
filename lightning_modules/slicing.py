"""In-place slicing of parameters and of their optimizer state, the mechanics of physical head removal.

Parameters are sliced in place (``param.data`` replaced), so every holder of the ``Parameter`` object (the
optimizer's param groups, the module tree) stays valid; only tensors that mirror a parameter's shape (optimizer
moments, DDP buckets) must follow, and :func:`slice_optimizer_state_` does that for the optimizer.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParameterSlice:
    """Record that ``param`` kept only the entries ``index`` along dimension ``dim``."""

    param: nn.Parameter
    dim: int
    index: Tensor
    old_shape: torch.Size


@torch.no_grad()
def slice_parameter_(param: nn.Parameter, dim: int, index: Tensor, scale: float = 1.0) -> ParameterSlice:
    """Keep ``index`` (long) of ``param`` along ``dim``, in place, optionally multiplying the kept values."""
    old_shape = param.shape
    index = index.to(param.device)
    kept = param.data.index_select(dim, index)
    param.data = kept * scale if scale != 1.0 else kept.clone()
    param.grad = None
    return ParameterSlice(param, dim, index, old_shape)


@torch.no_grad()
def slice_optimizer_state_(optimizer: torch.optim.Optimizer, slices: Iterable[ParameterSlice]) -> int:
    """Slice every state tensor that has the old shape of a sliced parameter (Adam/LAMB moments...) the same way.

    Scalars such as the step count are kept. The surviving entries keep their state exactly: resetting it would
    let stale moments push removed weights around or restart bias correction. Returns how many tensors were
    sliced.
    """
    sliced = 0
    for s in slices:
        state = optimizer.state.get(s.param)
        if not state:
            continue
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == s.old_shape and value.dim() > 0:
                state[key] = value.index_select(s.dim, s.index.to(value.device)).clone()
                sliced += 1
    return sliced
