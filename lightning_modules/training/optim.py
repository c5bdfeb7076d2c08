"""Optimisation pieces the paper's recipes need: the LAMB optimiser and the warm-up + cosine learning-rate factor."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim import Optimizer


class Lamb(Optimizer):
    """LAMB as in NVIDIA's Transformer-XL recipe, which the paper uses (docs/method.md §4.2).

    Adam moments without bias correction; per parameter tensor the step ``m / (sqrt(v) + eps) + wd * w`` is scaled
    by the trust ratio ``clamp(||w||, 0, 10) / ||step||`` (1 when either norm is 0). torch ships no LAMB and the
    maintained libraries that do (timm, apex) bring heavy or GPU-only dependencies, hence this small one.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid LAMB settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one update; ``closure`` re-evaluates the loss, as for any torch optimiser."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                weight_norm = p.norm().clamp(0, 10)
                update_norm = update.norm()
                trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm,
                                    torch.ones_like(weight_norm))
                p.sub_(group["lr"] * trust * update)
        return loss


def warmup_cosine_factor(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up from 0 over ``warmup_steps``, then cosine down to ``min_ratio``
    at ``decay_steps`` (total steps, warm-up included), constant afterwards."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
