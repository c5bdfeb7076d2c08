"""Hard-concrete (L0) head gates (Louizos et al., 2018) in the form the paper's code uses (docs/method.md §2).

Written here because no maintained library offers a hard-concrete gate with a straight-through 0/1 output and
the paper's L0 term; the whole thing is a few tensor expressions.
"""

import math

import torch
from torch import Tensor, nn

EPS = 1e-6


class HardConcreteGate(nn.Module):
    """One stochastic 0/1 gate per attention head of a layer, parameterised by ``log_alpha`` [n_heads].

    Training: draws u ~ U(eps, 1 - eps) once per forward and head, s = sigmoid((logit(u) + log_alpha) / beta),
    stretches it to (gamma, zeta), clips to [eps, 1] and thresholds at 0.5: the forward value is exactly 0 or 1,
    the gradient is the stretched sample's (straight-through). So P(gate open) = sigmoid(log_alpha - beta * t)
    and, in evaluation (s = sigmoid(log_alpha), no noise), the gate is open iff log_alpha >= t, where t is the
    logit of (0.5 - gamma) / (zeta - gamma): t = 0 for the paper's gamma = -0.1, zeta = 1.1, giving
    P(open) = sigmoid(log_alpha) and "keep iff log_alpha >= 0".

    Args:
        n_heads: Heads of the layer.
        init: Initial log_alpha; 2.0 keeps each head open 88% of training steps at the start (docs/method.md §3.2).
        beta: Temperature of the concrete distribution; lower is closer to a Bernoulli.
        gamma, zeta: Stretch interval, gamma < 0 < 1 < zeta.
    """

    def __init__(self, n_heads: int, init: float = 2.0, beta: float = 0.333, gamma: float = -0.1,
                 zeta: float = 1.1) -> None:
        super().__init__()
        if not (beta > 0 and gamma < 0 and zeta > 1):
            raise ValueError(f"hard-concrete gate needs beta > 0, gamma < 0 and zeta > 1; "
                             f"got beta={beta}, gamma={gamma}, zeta={zeta}")
        self.init, self.beta, self.gamma, self.zeta = init, beta, gamma, zeta
        self.log_alpha = nn.Parameter(torch.full((n_heads,), float(init)))
        # the stretched gate reaches 0.5 where the unstretched one reaches s*; its logit is the log_alpha at which
        # the eval gate opens (0 for the paper's gamma + zeta = 1)
        s_star = (0.5 - gamma) / (zeta - gamma)
        self.threshold = math.log(s_star / (1 - s_star))

    @property
    def n_heads(self) -> int:
        """Number of gated heads."""
        return self.log_alpha.numel()

    def forward(self) -> Tensor:
        """Gate values [n_heads], each exactly 0.0 or 1.0 (random in training, deterministic in eval)."""
        log_alpha = self.log_alpha
        if self.training:
            u = torch.rand_like(log_alpha).clamp(EPS, 1 - EPS)
            s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / self.beta)
        else:
            s = torch.sigmoid(log_alpha)
        stretched = (s * (self.zeta - self.gamma) + self.gamma).clamp(EPS, 1.0)
        hard = (stretched >= 0.5).to(stretched.dtype)
        return hard + (stretched - stretched.detach())  # exactly 0 or 1 forward, the stretched gradient back

    def l0(self) -> Tensor:
        """Expected number of non-zero stretched gates, sum_h P(s_bar_h > 0), differentiable (docs/method.md §2)."""
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return torch.sigmoid(self.log_alpha - shift).clamp(EPS, 1 - EPS).sum()

    def open_probability(self) -> Tensor:
        """P(gate open) in training for each head, sigmoid(log_alpha - beta * threshold) [n_heads], differentiable."""
        return torch.sigmoid(self.log_alpha - self.beta * self.threshold)

    def keep_mask(self) -> Tensor:
        """The deterministic decision, bool [n_heads]: True = keep (log_alpha >= threshold, 0 by default); the
        same decision as the eval forward."""
        return self.forward_eval_open()

    def forward_eval_open(self) -> Tensor:
        """Whether each eval-mode gate is open, computed exactly as ``forward`` does in eval."""
        stretched = (torch.sigmoid(self.log_alpha.detach()) * (self.zeta - self.gamma) + self.gamma).clamp(EPS, 1.0)
        return stretched >= 0.5

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, beta={self.beta}, gamma={self.gamma}, zeta={self.zeta}"
