"""In-place slicing of parameters and of their optimizer state, the mechanics of physical head removal.

Parameters are sliced in place (``param.data`` replaced), so every holder of the ``Parameter`` object (the
optimizer's param groups, the module tree) stays valid; only tensors that mirror a parameter's shape (optimizer
moments, DDP buckets) must follow, and :func:`slice_optimizer_state_` does that for the optimizer.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# how the optimizer-state entries of Adam-style optimizers scale with the gradient
MOMENT_POWERS = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}


@dataclass(frozen=True)
class ParameterSlice:
    """Record that ``param`` kept only the entries ``index`` along dimension ``dim``."""

    param: nn.Parameter
    dim: int
    index: Tensor
    old_shape: torch.Size
    scale: float = 1.0  # the kept values were multiplied by this


@torch.no_grad()
def slice_parameter_(param: nn.Parameter, dim: int, index: Tensor, scale: float = 1.0) -> ParameterSlice:
    """Keep ``index`` (long) of ``param`` along ``dim``, in place, optionally multiplying the kept values."""
    old_shape = param.shape
    index = index.to(param.device)
    kept = param.data.index_select(dim, index)
    param.data = kept * scale if scale != 1.0 else kept.clone()
    param.grad = None
    return ParameterSlice(param, dim, index, old_shape, scale)


@torch.no_grad()
def slice_optimizer_state_(optimizer: torch.optim.Optimizer, slices: Iterable[ParameterSlice]) -> int:
    """Slice every state tensor that has the old shape of a sliced parameter (Adam/LAMB moments...) the same way.

    Scalars such as the step count are kept. The surviving entries keep their state exactly: resetting it would
    let stale moments push removed weights around or restart bias correction. When the kept values were scaled
    by c (a folded factor), gradients with respect to them shrink by 1/c, so the Adam/LAMB moments are carried
    over as ``exp_avg / c`` and ``exp_avg_sq / c**2``. Returns how many tensors were sliced.
    """
    sliced = 0
    for s in slices:
        state = optimizer.state.get(s.param)
        if not state:
            continue
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == s.old_shape and value.dim() > 0:
                kept = value.index_select(s.dim, s.index.to(value.device))
                power = MOMENT_POWERS.get(key, 0) if s.scale != 1.0 else 0
                state[key] = kept / s.scale**power if power else kept.clone()
                sliced += 1
    return sliced
