"""HeadRemoval: the baseline pruning methods, random and importance-score head removal, then fine-tuning.

Both remove a fixed budget of heads, ``round(target_sparsity * total heads)``, once at the start of training and
let the remaining model fine-tune for the rest of the run, with the same physical removal (weights, persistent
memory, optimizer state, DDP) and the same ``pruned.ckpt`` as :class:`callbacks.head_pruning.HeadPruning`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from callbacks.head_pruning import pruned_model, remove_heads, save_pruned
from lightning_modules.model import MemoryTransformerLM
from lightning_modules.model.adaptive import IGNORE_INDEX

log = logging.getLogger(__name__)

Method = Literal["random", "importance"]


def head_budget(model: MemoryTransformerLM, target_sparsity: float) -> int:
    """How many of the present heads to remove so that ``round(target_sparsity * total heads)`` are gone
    (heads removed before count; never every head)."""
    already_removed = model.total_heads - sum(model.heads_per_layer)
    wanted = round(target_sparsity * model.total_heads) - already_removed
    return min(max(wanted, 0), sum(model.heads_per_layer) - 1)


def random_heads(heads_per_layer: Sequence[int], budget: int, seed: int) -> dict[int, list[int]]:
    """``budget`` heads drawn uniformly without replacement over all layers, reproducibly for ``seed``:
    ``{layer: [current head indices]}``."""
    flat = [(i, h) for i, n in enumerate(heads_per_layer) for h in range(n)]
    order = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed)).tolist()
    return _as_plan(flat[k] for k in order[:budget])


def least_important_heads(scores: Sequence[Tensor], budget: int) -> dict[int, list[int]]:
    """The ``budget`` heads with the lowest scores, ranked globally across layers (ties: earlier layer and head
    first): ``{layer: [current head indices]}``."""
    ranked = sorted((float(s), i, h) for i, layer in enumerate(scores) for h, s in enumerate(layer.tolist()))
    return _as_plan((i, h) for _, i, h in ranked[:budget])


def _as_plan(heads: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    plan: dict[int, list[int]] = {}
    for i, h in heads:
        plan.setdefault(i, []).append(h)
    return {i: sorted(hs) for i, hs in sorted(plan.items())}


def head_importance(model: MemoryTransformerLM, batches: Iterable[tuple[Tensor, Tensor]],
                    normalize: bool = True) -> list[Tensor]:
    """Head importance after Michel et al. (2019): ``I_h = sum over batches |dL/d xi_h|``.

    ``xi`` is a mask of ones multiplying each head's output (it stands in for the head gates through a forward
    hook on every layer's gate module, so the forward is the dense model's), ``L`` the mean next-token NLL of a
    batch. The batches are read in order with the recurrence memory carried across them, in eval mode (no
    dropout), and the model's parameters get no gradient. With ``normalize`` each layer's scores are divided by
    their L2 norm, as Michel et al. do before ranking heads across layers. Returns one tensor [heads] per layer
    (empty for a layer with no heads left)."""
    masks = [torch.ones(layer.n_heads, device=model.pos_table.device, requires_grad=True) for layer in model.layers]
    scores = [torch.zeros(layer.n_heads, device=model.pos_table.device) for layer in model.layers]
    hooks = [layer.gate.register_forward_hook(lambda _module, _args, out, mask=mask: mask.to(out.dtype))
             for layer, mask in zip(model.layers, masks, strict=True)]
    was_enabled, was_training = model.gates_enabled, model.training
    model.gates_enabled = True
    model.eval()
    try:
        memory = None
        for input_ids, target_ids in batches:
            device = model.pos_table.device
            input_ids, target_ids = input_ids.to(device), target_ids.to(device)
            out = model(input_ids, target_ids=target_ids, memory=memory)
            memory = out.memory
            loss = out.nll.sum() / (target_ids != IGNORE_INDEX).sum().clamp(min=1)
            present = [k for k, mask in enumerate(masks) if mask.numel()]
            grads = torch.autograd.grad(loss, [masks[k] for k in present], allow_unused=True)
            for k, grad in zip(present, grads, strict=True):
                if grad is not None:
                    scores[k] += grad.abs()
    finally:
        for hook in hooks:
            hook.remove()
        model.gates_enabled = was_enabled
        model.train(was_training)
    if normalize:
        scores = [s / s.norm().clamp(min=1e-12) if s.numel() else s for s in scores]
    return scores


class HeadRemoval(Callback):
    """Removes a fixed budget of attention heads at the start of training, then the model fine-tunes.

    * ``method="random"``: ``round(target_sparsity * total heads)`` heads drawn uniformly over all layers with
      ``seed``.
    * ``method="importance"``: the heads with the lowest importance (:func:`head_importance`, Michel et al.
      2019) over the first ``score_batches`` training batches, ranked globally across layers.

    The heads are removed physically (weights, persistent memory, gates and optimizer state sliced, the DDP
    wrapper rebuilt; rank 0 decides and broadcasts), as :class:`~callbacks.head_pruning.HeadPruning` does. The
    gates stay off, so the fine-tuning is of the plain remaining network. At the end of fit the model is saved as
    ``pruned.ckpt`` beside the other checkpoints. A resumed run (its model already pruned) removes nothing more.

    Args:
        method: ``random`` or ``importance``.
        target_sparsity: Fraction of all heads to remove, in (0, 1).
        seed: Seed of the random draw (``random``).
        score_batches: Training batches the importance scores are accumulated over (``importance``).
        normalize: Divide each layer's importance scores by their L2 norm before the global ranking.
    """

    def __init__(self, method: Method = "random", target_sparsity: float = 0.5, seed: int = 0,
                 score_batches: int = 50, normalize: bool = True) -> None:
        super().__init__()
        if method not in ("random", "importance"):
            raise ValueError(f"method must be random or importance; got {method!r}")
        if not 0 < target_sparsity < 1:
            raise ValueError(f"target_sparsity must be in (0, 1), a fraction of heads to remove; got {target_sparsity}")
        if score_batches < 1:
            raise ValueError(f"score_batches must be >= 1; got {score_batches}")
        self.method, self.target_sparsity, self.seed = method, target_sparsity, seed
        self.score_batches, self.normalize = score_batches, normalize
        self.scores: list[Tensor] | None = None  # the importance scores the removal used
        self._model: MemoryTransformerLM | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._model = pruned_model(trainer, pl_module, stage, type(self).__name__)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._model
        budget = head_budget(model, self.target_sparsity)
        if budget == 0:
            return
        if self.method == "random":
            plan = random_heads(model.heads_per_layer, budget, self.seed)
        else:
            self.scores = head_importance(model, islice(_training_batches(trainer), self.score_batches),
                                          self.normalize)
            log.info("head importance per layer: %s", [[round(float(v), 4) for v in s] for s in self.scores])
            plan = least_important_heads(self.scores, budget)
        remove_heads(trainer, pl_module, model, plan, advice="Lower target_sparsity")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save_pruned(trainer, self._model)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target_sparsity": self.target_sparsity, "seed": self.seed}


def _training_batches(trainer: pl.Trainer) -> Iterable[tuple[Tensor, Tensor]]:
    """A fresh pass over the training data from its start (the fit loop's own iterator is left alone)."""
    datamodule = getattr(trainer, "datamodule", None)
    loader = datamodule.train_dataloader() if datamodule is not None else trainer.train_dataloader
    return iter(loader)
