"""LanguageModel: trains and evaluates a MemoryTransformerLM, carrying its recurrence memory across batches."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import OptimizerCallable
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import SumMetric

from lightning_modules.errors import MissingFileError, UsageError
from lightning_modules.model import MemoryTransformerLM
from lightning_modules.model.adaptive import IGNORE_INDEX
from lightning_modules.model.transformer_lm import InferenceCache
from lightning_modules.training.checkpoint_layout import (
    CHECKPOINT_KEY,
    apply_layout,
    fill_optional_entries,
    layout_record,
    load_dense_weights,
    read_checkpoint,
    recorded_config,
)
from lightning_modules.training.optim import warmup_cosine_factor
from lightning_modules.training.throughput import batch_tokens

log = logging.getLogger(__name__)

Stage = Literal["train", "val", "test"]


class LanguageModel(pl.LightningModule):
    """Wraps a :class:`MemoryTransformerLM` with the training concerns: loss, memory, perplexity, optimisation.

    Consecutive batches of a stage continue the same rows of text (see ``datamodules.batching``), so the memory
    returned by one step is fed to the next. It starts empty at every training epoch and every evaluation.
    Perplexity is ``exp`` of the token-weighted mean NLL over the whole split, summed with torchmetrics (correct
    under DDP); targets equal to -100 are padding and are not scored.

    Args:
        model: The language model (a plain ``nn.Module``).
        optimizer: Builds the optimiser from the parameters, e.g. ``torch.optim.AdamW`` or
            ``lightning_modules.training.optim.Lamb`` with their arguments.
        lr_schedule: ``cosine`` (linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak) or
            ``constant`` (warm-up, then the peak).
        warmup_steps: Optimiser steps of linear warm-up.
        decay_steps: Total steps of the cosine schedule; ``None`` takes the Trainer's estimated total.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        max_new_tokens: Tokens that ``predict`` generates after each prompt.
        temperature: Sampling temperature of ``predict``; 0 takes the most likely token.
        top_k: Sample only among the ``top_k`` most likely tokens (``None``: all).
        gate_lr_factor: Learning rate of the head gates (``log_alpha``) relative to the others
            (docs/method.md §4.3: 10); gates also get no weight decay.
        init_from: A checkpoint whose model weights start this run (e.g. the dense baseline a pruning run
            starts from). Its gates are not loaded: they start at this model's ``gate_init`` (docs/method.md §4.3). A
            ``--ckpt_path`` resume restores its own weights over these (Lightning loads the resume checkpoint
            after ``setup``, so the baseline file must still exist, or pass ``--model.init_from=null``).
        on_nonfinite_loss: What a NaN or infinite training loss does: ``stop`` raises an error naming the step
            (checkpoints already written are the last good ones); ``skip`` drops that batch's update on every
            rank (no backward; Lightning still counts the step, so schedules move on), resets the recurrence
            memory and counts it in ``train/skipped_steps``.
        compile: Compile each layer with ``torch.compile`` (opt-in; its measured effect is in the README's
            Performance section). A physical head removal drops the compiled graphs and the next step recompiles.

    Pruning hooks: ``regularizer`` (set by the ``HeadPruning`` callback) is added to the training loss; every
    checkpoint records the head layout, and ``on_load_checkpoint`` shrinks a freshly built model to it before the
    weights load, so resuming, testing and :meth:`load_from_checkpoint` work on pruned models.
    """

    def __init__(
        self,
        model: MemoryTransformerLM,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        max_new_tokens: int = 50,
        temperature: float = 1.0,
        top_k: int | None = None,
        gate_lr_factor: float = 10.0,
        init_from: str | None = None,
        on_nonfinite_loss: Literal["stop", "skip"] = "stop",
        compile: bool = False,
    ) -> None:
        super().__init__()
        if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1 or (decay_steps is not None and decay_steps < 1):
            raise ValueError(f"invalid schedule: warmup_steps={warmup_steps} must be >= 0, min_lr_ratio="
                             f"{min_lr_ratio} in [0, 1], decay_steps={decay_steps} positive or null")
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.model = model
        self.optimizer_factory = optimizer
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.decay_steps, self.min_lr_ratio = decay_steps, min_lr_ratio
        self._memory: dict[str, list[torch.Tensor] | None] = {"train": None, "val": None, "test": None}
        # evaluation also carries the memory's projected keys/values, so a batch projects only its own tokens
        self._cache: dict[str, InferenceCache | None] = {"val": None, "test": None}
        # NaN must propagate: a diverged batch may not vanish from the perplexity while its tokens still count
        self.nll_sum = torch.nn.ModuleDict({s: SumMetric(nan_strategy="disable") for s in ("val", "test")})
        self.token_count = torch.nn.ModuleDict({s: SumMetric(nan_strategy="disable") for s in ("val", "test")})
        for metric in (*self.nll_sum.values(), *self.token_count.values()):
            metric.set_dtype(torch.float64)
        self._batch_tokens = 0  # input tokens of the batch in flight, for flops_per_batch
        self._test_started = time.perf_counter()
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        if gate_lr_factor <= 0:
            raise ValueError(f"gate_lr_factor must be > 0; got {gate_lr_factor}")
        self.gate_lr_factor, self.init_from = gate_lr_factor, init_from
        self.regularizer: Callable[[], torch.Tensor] | None = None
        if on_nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite_loss must be 'stop' or 'skip'; got {on_nonfinite_loss!r}")
        self.on_nonfinite_loss, self.skipped_steps = on_nonfinite_loss, 0
        if compile:
            model.compile_layers()

    def forward(self, input_ids: torch.Tensor, memory: list[torch.Tensor] | None = None):
        """Log-probabilities of the next token at every position (and the new memory)."""
        return self.model(input_ids, memory=memory)

    def _scored_nll(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Stage) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL and number of scored tokens of one batch, advancing the stage's memory."""
        input_ids, target_ids = batch
        if stage == "train" or self.model.training or torch.is_grad_enabled():
            out = self.model(input_ids, target_ids=target_ids, memory=self._memory[stage])
        else:  # no-grad evaluation: the memory's keys/values come from the cache (docs/performance.md#generation)
            out = self.model(input_ids, target_ids=target_ids, memory=self._memory[stage], cache=self._cache[stage],
                             use_cache=True)
            self._cache[stage] = out.cache
        self._memory[stage] = out.memory
        return out.nll.sum(), (target_ids != IGNORE_INDEX).sum()  # nll is 0 at unscored targets

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll_sum, count = self._scored_nll(batch, "train")
        loss = nll_sum / count.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        if self.regularizer is not None:
            penalty = self.regularizer()
            self.log("train/sparsity_loss", penalty.detach())
            loss = loss + penalty
        return None if self._nonfinite(loss, batch_idx) else loss

    def _nonfinite(self, loss: torch.Tensor, batch_idx: int) -> bool:
        """Whether to skip this step because the loss is NaN or inf on some rank; raises if the policy is stop."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self.trainer.world_size > 1:  # every rank must take the same decision, or DDP would wait forever
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if not bool(bad):
            return False
        where = f"non-finite training loss ({float(loss):.4g} here) at step {self.global_step} (batch {batch_idx})"
        if self.on_nonfinite_loss == "stop":
            raise FloatingPointError(f"{where}; the run stops and the checkpoints on disk are the last good ones. "
                                     "Lower the learning rate, or set model.on_nonfinite_loss=skip to skip such steps")
        log.warning("%s: the step is skipped (on_nonfinite_loss=skip)", where)
        self._memory["train"] = None  # the bad forward may have left non-finite activations in the memory
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        return True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_tokens = batch_tokens(batch)  # from the shape, so no wait for the device

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_tokens = batch_tokens(batch)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_tokens = batch_tokens(batch)

    @property
    def flops_per_batch(self) -> int | None:
        """FLOPs of the batch in flight, read by Lightning's ThroughputMonitor (``TokenThroughput``): 2 x MACs
        per token (at the model's current head layout) x input tokens, x3 in training (forward and backward);
        None in predict, where generation runs a forward per new token."""
        if self._trainer is not None and self.trainer.predicting:
            return None
        passes = 3 if self.training else 1
        return 2 * passes * int(self.model.macs_per_token()["total"]) * self._batch_tokens

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(batch, "test")

    def _accumulate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Stage) -> None:
        nll_sum, count = self._scored_nll(batch, stage)
        self.nll_sum[stage].update(nll_sum)
        self.token_count[stage].update(count)

    def _log_perplexity(self, stage: Stage) -> None:
        tokens = self.token_count[stage].compute()
        mean_nll = self.nll_sum[stage].compute() / tokens.clamp(min=1)
        self.log(f"{stage}/tokens", tokens.float(), sync_dist=False)  # scored tokens, all ranks
        self.log(f"{stage}/loss", mean_nll.float(), sync_dist=False)
        self.log(f"{stage}/ppl", torch.exp(mean_nll).float(), prog_bar=True, sync_dist=False)
        self.nll_sum[stage].reset()
        self.token_count[stage].reset()

    def predict_step(self, prompt_ids: torch.Tensor, batch_idx: int) -> dict[str, str | float]:
        """Continues one prompt (``MemoryTransformerLM.generate``, through its ring caches); decodes it with the
        datamodule's vocabulary and prints it with the generation speed."""
        started = time.perf_counter()
        generated = self.model.generate(prompt_ids, self.max_new_tokens, self.temperature, self.top_k)
        tokens_per_s = generated.numel() / max(time.perf_counter() - started, 1e-9)  # prompt reading included
        vocab = self.trainer.datamodule.vocab
        result = {"prompt": vocab.decode(prompt_ids[0, 1:].tolist()),  # [0] is the end-of-line id before it
                  "continuation": vocab.decode(generated[0].tolist()), "tokens_per_s": round(tokens_per_s, 1)}
        self.print(f"{result['prompt']} >>> {result['continuation']}  ({result['tokens_per_s']} tokens/s)")
        return result

    def on_train_epoch_start(self) -> None:
        self._memory["train"] = None

    def on_validation_epoch_start(self) -> None:
        self._memory["val"] = None
        self._cache["val"] = None

    def on_test_epoch_start(self) -> None:
        self._memory["test"] = None
        self._cache["test"] = None
        self._test_started = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_end(self) -> None:
        tokens = float(self.token_count["test"].compute())  # waits for the device, so the time below is real
        elapsed = time.perf_counter() - self._test_started
        self._log_perplexity("test")
        self.log("test/tokens_per_s", tokens / max(elapsed, 1e-9), sync_dist=False)
        self._log_model_profile("test")

    def _log_model_profile(self, stage: Stage) -> None:
        """Size and cost of the model as evaluated, so a run's metrics describe the model they measured."""
        model = self.model
        profile = {"params_total": model.num_parameters(include_embeddings=True),
                   "params_non_embedding": model.num_parameters(include_embeddings=False),
                   "macs_per_token": model.macs_per_token()["total"], "heads": sum(model.heads_per_layer)}
        profile |= {f"heads/layer_{i}": n for i, n in enumerate(model.heads_per_layer)}
        for name, value in profile.items():
            self.log(f"{stage}/{name}", float(value), sync_dist=False)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_from:
            try:
                loaded = load_dense_weights(self.model, self.init_from)
            except FileNotFoundError as error:
                raise MissingFileError(f"{error}. It is model.init_from, the baseline this run starts from; when "
                                       "resuming with --ckpt_path, pass --model.init_from=null") from error
            log.info("initialised %d weight tensors from %s; gates start at log_alpha=%s", loaded, self.init_from,
                     self.model.config.gate_init)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = layout_record(self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get(CHECKPOINT_KEY)
        apply_layout(self.model, record, source="the checkpoint")
        if "state_dict" in checkpoint:
            MemoryTransformerLM.upgrade_state_dict_(checkpoint["state_dict"], prefix="model.")
            if record is None:
                fill_optional_entries(checkpoint["state_dict"], self.model)
        self.init_from = None  # the loaded weights supersede the baseline (a later fit must not reload it)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = None, **kwargs: Any):
        """Lightning's ``load_from_checkpoint``, always with ``weights_only=True`` (a crafted file is refused with
        a one-line :class:`UsageError` and runs nothing); without a ``model`` argument the model is rebuilt from
        the configuration the checkpoint records (and shrunk to its head layout)."""
        if kwargs.pop("weights_only", None) is False:
            raise UsageError("LanguageModel.load_from_checkpoint loads checkpoints with weights_only=True only")
        checkpoint = read_checkpoint(checkpoint_path)  # its one-line errors (missing, unsafe, truncated) first
        if "model" not in kwargs:
            record = checkpoint.get(CHECKPOINT_KEY)
            if record is None:
                raise UsageError(f"{checkpoint_path} has no headprune model record; pass model=MemoryTransformerLM("
                                 "...) built with the configuration it was trained with")
            kwargs["model"] = MemoryTransformerLM.from_config(recorded_config(record, str(checkpoint_path)))
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, weights_only=True, **kwargs)

    def on_fit_start(self) -> None:
        if self.logger is not None:
            self.logger.log_hyperparams({
                "params/total": self.model.num_parameters(include_embeddings=True),
                "params/non_embedding": self.model.num_parameters(include_embeddings=False),
            })

    def configure_optimizers(self):
        gates = [p for name, p in self.model.named_parameters() if name.endswith("gate.log_alpha")]
        gate_ids = {id(p) for p in gates}
        others = [p for p in self.parameters() if id(p) not in gate_ids]
        optimizer = self.optimizer_factory([{"params": others}, {"params": gates, "weight_decay": 0.0}])
        optimizer.param_groups[1]["lr"] = optimizer.param_groups[0]["lr"] * self.gate_lr_factor
        decay_steps = self.decay_steps or max(1, int(self.trainer.estimated_stepping_batches))
        final_ratio = 1.0 if self.lr_schedule == "constant" else self.min_lr_ratio  # constant: a cosine to 100%
        scheduler = LambdaLR(optimizer, partial(warmup_cosine_factor, warmup_steps=self.warmup_steps,
                                                decay_steps=decay_steps, min_ratio=final_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
