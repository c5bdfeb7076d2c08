"""HeadPruning: the Lightning callback that trains the head gates and removes shut heads, layer by layer."""

from __future__ import annotations

import csv
import gc
import logging
import weakref
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.trainer.states import TrainerFn

from callbacks.head_map import head_map_image, head_map_rows
from callbacks.preemption import Preemption
from callbacks.schedules import linear_ramp
from lightning_modules.errors import UsageError
from lightning_modules.model import MemoryTransformerLM
from lightning_modules.model.slicing import slice_optimizer_state_

log = logging.getLogger(__name__)


class HeadPruning(Callback):
    """Prunes the attention heads of a :class:`MemoryTransformerLM` while it trains (docs/method.md §2, §3, §4.3).

    At the start of fit the gates are switched on and a sparsity term is added to the loss. It takes one of two
    forms, and exactly one must be chosen:

    * ``l0_coefficient`` (the paper): ``lambda(t) * L0``, the expected number of open gates, with ``lambda``
      ramped linearly from 0 over ``warmup_steps`` after ``start_step`` (sparsity-loss warm-up, docs/method.md §3.1).
    * ``target_sparsity`` (beyond the paper, CoFi-style): ``l1 * (s - t) + l2 * (s - t)**2`` where ``s`` is the
      expected fraction of shut heads, ``t`` the target ramped from 0 over ``warmup_steps``, and the Lagrange
      multipliers ``l1, l2`` rise by gradient ascent (step ``lagrangian_lr``) so that ``s`` is driven to ``t``.
      At the final removal the layout is rounded to exactly ``round(t * heads)`` heads removed, by gate strength.

    Heads whose gates are decided shut (``log_alpha < 0``) are removed physically (weights, persistent memory,
    gates and optimizer state sliced) every ``prune_every_n_steps`` steps and/or after every validation, from
    step ``prune_after_step`` on, and always when training ends; the pruned model is then saved as
    ``pruned.ckpt`` beside the other checkpoints. Under DDP the decision is made on rank 0 and broadcast, every
    rank removes the same heads, and the DDP wrapper is rebuilt around the smaller model in place.

    In validate/test/predict the gates are switched on too, and shut heads are removed before evaluating.

    Args:
        l0_coefficient: Final weight of the L0 term (paper: 0.01, 0.015 or 0.02).
        target_sparsity: Fraction of all heads to remove, in (0, 1).
        warmup_steps: Steps over which the L0 weight (or the target) ramps up from 0.
        start_step: Step at which the ramp starts (the term is 0 before).
        lagrangian_lr: Ascent step of the Lagrange multipliers (target mode).
        temperature_start: If set, the gate temperature starts here and falls linearly to the model's
            ``gate_beta`` over ``temperature_steps`` steps.
        temperature_steps: Length of the temperature annealing.
        prune_every_n_steps: Remove shut heads every this many optimizer steps (None: never mid-epoch).
        prune_on_validation: Remove shut heads after each validation during fit.
        prune_after_step: No removal before this step (the end-of-training removal always happens).
    """

    def __init__(
        self,
        l0_coefficient: float | None = None,
        target_sparsity: float | None = None,
        warmup_steps: int = 0,
        start_step: int = 0,
        lagrangian_lr: float = 0.05,
        temperature_start: float | None = None,
        temperature_steps: int = 0,
        prune_every_n_steps: int | None = None,
        prune_on_validation: bool = True,
        prune_after_step: int = 0,
    ) -> None:
        super().__init__()
        if (l0_coefficient is None) == (target_sparsity is None):
            raise ValueError("HeadPruning needs exactly one of l0_coefficient (the paper's fixed L0 weight) and "
                             f"target_sparsity (a fraction of heads to remove); got l0_coefficient={l0_coefficient},"
                             f" target_sparsity={target_sparsity}. On the command line, switching a recipe's mode "
                             "needs the other set to null, e.g. --trainer.callbacks.target_sparsity=null")
        if l0_coefficient is not None and l0_coefficient < 0:
            raise ValueError(f"l0_coefficient must be >= 0; got {l0_coefficient}")
        if target_sparsity is not None and not 0 < target_sparsity < 1:
            raise ValueError(f"target_sparsity must be in (0, 1), a fraction of heads to remove; got {target_sparsity}")
        for name, value in {"warmup_steps": warmup_steps, "start_step": start_step,
                            "temperature_steps": temperature_steps, "prune_after_step": prune_after_step}.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0; got {value}")
        if prune_every_n_steps is not None and prune_every_n_steps < 1:
            raise ValueError(f"prune_every_n_steps must be >= 1 or null; got {prune_every_n_steps}")
        if lagrangian_lr <= 0 or (temperature_start is not None and temperature_start <= 0):
            raise ValueError(f"lagrangian_lr and temperature_start must be > 0; got {lagrangian_lr}, "
                             f"{temperature_start}")
        self.l0_coefficient, self.target_sparsity = l0_coefficient, target_sparsity
        self.warmup_steps, self.start_step, self.lagrangian_lr = warmup_steps, start_step, lagrangian_lr
        self.temperature_start, self.temperature_steps = temperature_start, temperature_steps
        self.prune_every_n_steps, self.prune_on_validation = prune_every_n_steps, prune_on_validation
        self.prune_after_step = prune_after_step
        self.lambda_1, self.lambda_2 = 0.0, 0.0
        self._model: MemoryTransformerLM | None = None
        self._gap: float | None = None  # expected sparsity - target at the last training step
        self._last_schedule: dict[str, float] = {}  # the weight or target the last penalty used
        self._last_step: int | None = None
        self.rounded_decisions = 0

    # ----------------------------------------------------------------------------------------- schedule

    @property
    def targeted(self) -> bool:
        """Whether the run steers toward ``target_sparsity`` (else it uses the fixed ``l0_coefficient``)."""
        return self.target_sparsity is not None

    def current_target(self, step: int) -> float:
        """Target sparsity at optimizer step ``step`` (target mode)."""
        return self.target_sparsity * linear_ramp(step, self.start_step, self.warmup_steps)

    def current_l0_weight(self, step: int) -> float:
        """Weight of the L0 term at optimizer step ``step`` (coefficient mode, docs/method.md §3.1)."""
        return self.l0_coefficient * linear_ramp(step, self.start_step, self.warmup_steps)

    def current_temperature(self, step: int, final: float) -> float:
        """Gate temperature at ``step``: linear from ``temperature_start`` to ``final``, then ``final``."""
        if self.temperature_start is None or self.temperature_steps == 0:
            return final
        progress = min(step / self.temperature_steps, 1.0)
        return self.temperature_start + (final - self.temperature_start) * progress

    def expected_sparsity(self, model: MemoryTransformerLM) -> torch.Tensor:
        """Expected fraction of all heads (removed ones included) shut in a training forward, differentiable."""
        return 1 - model.expected_open_heads() / model.total_heads

    def penalty(self, model: MemoryTransformerLM, step: int) -> torch.Tensor:
        """The sparsity term added to the loss at ``step``."""
        if not self.targeted:
            weight = self.current_l0_weight(step)
            self._last_schedule = {"prune/l0_weight": weight}
            return weight * model.l0_penalty()
        target = self.current_target(step)
        gap = self.expected_sparsity(model) - target
        self._gap = float(gap.detach())
        self._last_schedule = {"prune/target": target}
        return self.lambda_1 * gap + self.lambda_2 * gap**2

    def _ascend(self, gap: float) -> None:
        """One dual-ascent step of the Lagrange multipliers on the current gap (expected sparsity - target).

        Anti-windup: ``lambda_1`` restarts from 0 when the gap changes sign. The gates move at an almost constant
        rate under Adam whatever the multiplier's size, so a multiplier accumulated on one side of the target would
        keep pushing long after it is crossed and carry every gate past it together.
        """
        if gap * self.lambda_1 < 0:  # the gap changed sign: the target was just crossed
            self.lambda_1 = 0.0
        self.lambda_1 += self.lagrangian_lr * gap
        self.lambda_2 += self.lagrangian_lr * gap**2

    # ----------------------------------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = pruned_model(trainer, pl_module, stage, type(self).__name__)
        self._model = model
        model.gates_enabled = True
        if stage == "fit":
            pl_module.regularizer = lambda: self.penalty(model, trainer.global_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.regularizer = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        model = self._model
        model.set_gate_temperature(self.current_temperature(trainer.global_step, model.config.gate_beta))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        model, step = self._model, trainer.global_step
        stepped = step != self._last_step  # an optimizer step ended with this batch (not mid-accumulation)
        self._last_step = step
        if stepped and self.targeted and self._gap is not None:
            self._ascend(self._gap)
        self._log_step(pl_module, model)
        if (stepped and self.prune_every_n_steps and step >= self.prune_after_step
                and step % self.prune_every_n_steps == 0):
            self.remove_shut_heads(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not _fitting(trainer):
            return
        write_head_map(trainer, self._model)
        if self.prune_on_validation and trainer.global_step >= self.prune_after_step:
            self.remove_shut_heads(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.targeted:
            self._round_to_target(trainer, self._model)
        self.remove_shut_heads(trainer, pl_module, final=True)
        save_pruned(trainer, self._model)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _fitting(trainer):  # `validate` on its own: evaluate the pruned network, physically pruned
            self.remove_shut_heads(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.remove_shut_heads(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.remove_shut_heads(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"lambda_1": self.lambda_1, "lambda_2": self.lambda_2}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lambda_1, self.lambda_2 = state_dict["lambda_1"], state_dict["lambda_2"]

    # ----------------------------------------------------------------------------------------- removal

    def remove_shut_heads(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool = False) -> dict:
        """Remove the heads rank 0's gates decide shut, on every rank; returns ``{layer: [removed heads]}``."""
        model = self._model
        shut = model.shut_heads()
        if self.targeted and not final:
            shut = self._within_budget(model, shut)
        return remove_heads(trainer, pl_module, model, shut, cause="the gates shut",
                            advice="Lower l0_coefficient (or target_sparsity), lengthen warmup_steps, or start "
                                   "removing later (prune_after_step)")

    def _within_budget(self, model: MemoryTransformerLM, shut: dict[int, list[int]]) -> dict[int, list[int]]:
        """In target mode a mid-run removal never takes more heads than the final target allows: the most
        clearly shut heads (lowest log_alpha) go first."""
        budget = self._heads_left_to_remove(model)
        ranked = sorted((float(model.layers[i].gate.log_alpha[h].detach()), i, h)
                        for i, heads in shut.items() for h in heads)
        allowed: dict[int, list[int]] = {}
        for _, i, h in ranked[: max(budget, 0)]:
            allowed.setdefault(i, []).append(h)
        return {i: sorted(heads) for i, heads in allowed.items()}

    def _heads_left_to_remove(self, model: MemoryTransformerLM) -> int:
        """How many of the present heads the target still allows removing (negative if already past it)."""
        already_removed = model.total_heads - sum(model.heads_per_layer)
        return round(self.target_sparsity * model.total_heads) - already_removed

    @torch.no_grad()
    def _round_to_target(self, trainer: pl.Trainer, model: MemoryTransformerLM) -> None:
        """Set the gates so that exactly round(target * heads) heads end up removed: the weakest gates (lowest
        log_alpha) shut, the others open. Logs how many decisions this changed."""
        present = sum(model.heads_per_layer)
        to_remove = min(max(self._heads_left_to_remove(model), 0), present - 1)  # never every head
        ranked = sorted((float(layer.gate.log_alpha[h].detach()), i, h) for i, layer in enumerate(model.layers)
                        for h in range(layer.n_heads))
        keep = model.head_keep_mask()
        changed = 0
        for rank, (_, i, h) in enumerate(ranked):
            shut = rank < to_remove
            if shut == bool(keep[i][h]):  # the gate decides otherwise: move it across its threshold
                gate = model.layers[i].gate
                # a margin both ways: the threshold itself, rounded to float32, may read as either side
                gate.log_alpha[h] = gate.threshold - 1.0 if shut else gate.threshold + 1.0
                changed += 1
        decided_shut = sum(len(heads) for heads in model.shut_heads().values())
        if decided_shut != to_remove:
            raise RuntimeError(f"rounding to the target left {decided_shut} gates shut instead of {to_remove}")
        log.info("target sparsity %.3f: rounding to %d removed heads changed %d gate decisions",
                 self.target_sparsity, model.total_heads - present + to_remove, changed)
        self.rounded_decisions = changed

    # ----------------------------------------------------------------------------------------- reporting

    def _log_step(self, pl_module: pl.LightningModule, model: MemoryTransformerLM) -> None:
        keep = model.head_keep_mask()
        kept = sum(int(k.sum()) for k in keep)
        metrics = {
            "prune/expected_sparsity": float(self.expected_sparsity(model).detach()),
            "prune/sparsity": 1 - kept / model.total_heads,
            "prune/removed": 1 - sum(model.heads_per_layer) / model.total_heads,
            "prune/params": float(model.num_parameters(include_embeddings=False)),
            "prune/temperature": model.layers[0].gate.beta,
        }
        if self.targeted:
            metrics |= {"prune/lambda_1": self.lambda_1, "prune/lambda_2": self.lambda_2}
        metrics |= self._last_schedule
        metrics |= {f"prune/heads/layer_{i}": float(n) for i, n in enumerate(model.heads_per_layer)}
        pl_module.log_dict(metrics)


# ----------------------------------------------------------------------------------------- shared by the removers


def pruned_model(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, who: str) -> MemoryTransformerLM:
    """The MemoryTransformerLM a head-removing callback works on; errors for other modules and, in fit, for
    strategies under which a pruned model cannot be handed back."""
    model = getattr(pl_module, "model", None)
    if not isinstance(model, MemoryTransformerLM):
        raise TypeError(f"{who} works on a LanguageModel wrapping a MemoryTransformerLM; got "
                        f"{type(pl_module).__name__} with model {type(model).__name__}")
    if stage == "fit" and not _supported(trainer.strategy):
        name = type(trainer.strategy).__name__
        method = getattr(trainer.strategy, "_start_method", "n/a")
        raise ValueError(f"{who} removes heads during training under single-device and `ddp` (one process "
                         f"per device, launched by Lightning or torchrun) strategies; {name} (start method "
                         f"{method}) is not supported: spawned processes cannot hand a pruned model back. "
                         "Use --trainer.strategy=ddp")
    return model


def remove_heads(trainer: pl.Trainer, pl_module: pl.LightningModule, model: MemoryTransformerLM,
                 heads: dict[int, list[int]], cause: str = "the removal chose",
                 advice: str = "") -> dict[int, list[int]]:
    """Physically remove rank 0's ``{layer: [heads]}`` on every rank: weights, persistent memory, gates and
    optimizer state are sliced, and the DDP wrapper is rebuilt. Returns the removed heads. Removing every
    remaining head is an error (``cause`` and ``advice`` complete its message)."""
    heads = trainer.strategy.broadcast(heads, src=0)
    if not heads:
        return heads
    left = sum(model.heads_per_layer) - sum(len(h) for h in heads.values())
    if left == 0:
        raise UsageError(f"at step {trainer.global_step} {cause} every remaining head of the model, which would "
                           f"leave no attention at all; nothing was removed or saved. {advice}")
    before = model.heads_per_layer
    slices = model.prune_heads(heads)
    for optimizer in trainer.optimizers:
        slice_optimizer_state_(optimizer, slices)
    _rewrap(trainer, pl_module)
    log.info("step %d: removed heads %s; heads per layer %s -> %s", trainer.global_step, heads, before,
             model.heads_per_layer)
    return heads


def pruned_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where the final pruned model is saved: beside the ModelCheckpoint files, else in the log folder."""
    return Preemption.checkpoint_path(trainer).with_name("pruned.ckpt")


def save_pruned(trainer: pl.Trainer, model: MemoryTransformerLM) -> Path:
    """Write the final head map and save the pruned model as ``pruned.ckpt``; returns its path."""
    write_head_map(trainer, model)
    path = pruned_checkpoint_path(trainer)
    trainer.save_checkpoint(path)
    log.info("pruned model: heads per layer %s (%d of %d), %d non-embedding parameters, saved to %s",
             model.heads_per_layer, sum(model.heads_per_layer), model.total_heads,
             model.num_parameters(include_embeddings=False), path)
    return path


def write_head_map(trainer: pl.Trainer, model: MemoryTransformerLM) -> None:
    """Append this validation's per-head state to ``head_map.csv`` and send the heat map to wandb."""
    folder = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every rank must ask
    if not trainer.is_global_zero:
        return
    rows = head_map_rows(model, trainer.global_step)
    path = Path(folder) / "head_map.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="prune/head_map", images=[head_map_image(model)], step=trainer.global_step,
                             caption=[f"step {trainer.global_step}: rows are layers, columns heads"])


def _rewrap(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Rebuild the DDP wrapper around the smaller module (its buckets were sized for the old shapes)."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and _fitting(trainer):
        # the old wrapper must be gone first: its reducer's autograd hooks would fire with the old shapes
        old = weakref.ref(strategy.model)
        strategy.model = pl_module
        gc.collect()
        if old() is not None:
            raise RuntimeError("the previous DDP wrapper is still referenced after a head removal, so its "
                               "gradient hooks would see the old shapes; training cannot continue safely")
        strategy.configure_ddp()


def _fitting(trainer: pl.Trainer) -> bool:
    """Whether the trainer runs ``fit`` (its validation loops included), as opposed to validate/test/predict."""
    return trainer.state.fn == TrainerFn.FITTING


def _supported(strategy: object) -> bool:
    """Single device, or plain DDP with one launched process per device (not spawn/fork, whose parent process
    reloads the workers' weights into its own, unpruned model; not DeepSpeed or other subclasses)."""
    if isinstance(strategy, SingleDeviceStrategy):
        return True
    return type(strategy) is DDPStrategy and getattr(strategy, "_start_method", "popen") == "popen"
