"""LanguageModel: trains and evaluates a MemoryTransformerLM, carrying its recurrence memory across batches."""

from __future__ import annotations

import time
from functools import partial
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import OptimizerCallable
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import SumMetric

from lightning_modules.adaptive import IGNORE_INDEX
from lightning_modules.model import MemoryTransformerLM
from lightning_modules.optim import warmup_cosine_factor

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
            ``lightning_modules.optim.Lamb`` with their arguments.
        lr_schedule: ``cosine`` (linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak) or
            ``constant`` (warm-up, then the peak).
        warmup_steps: Optimiser steps of linear warm-up.
        decay_steps: Total steps of the cosine schedule; ``None`` takes the Trainer's estimated total.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        max_new_tokens: Tokens that ``predict`` generates after each prompt.
        temperature: Sampling temperature of ``predict``; 0 takes the most likely token.
        top_k: Sample only among the ``top_k`` most likely tokens (``None``: all).
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
        # NaN must propagate: a diverged batch may not vanish from the perplexity while its tokens still count
        self.nll_sum = torch.nn.ModuleDict({s: SumMetric(nan_strategy="disable") for s in ("val", "test")})
        self.token_count = torch.nn.ModuleDict({s: SumMetric(nan_strategy="disable") for s in ("val", "test")})
        for metric in (*self.nll_sum.values(), *self.token_count.values()):
            metric.set_dtype(torch.float64)
        self._last_batch_end: float | None = None
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k

    def forward(self, input_ids: torch.Tensor, memory: list[torch.Tensor] | None = None):
        """Log-probabilities of the next token at every position (and the new memory)."""
        return self.model(input_ids, memory=memory)

    def _scored_nll(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Stage) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL and number of scored tokens of one batch, advancing the stage's memory."""
        input_ids, target_ids = batch
        out = self.model(input_ids, target_ids=target_ids, memory=self._memory[stage])
        self._memory[stage] = out.memory
        return out.nll.sum(), (target_ids != IGNORE_INDEX).sum()  # nll is 0 at unscored targets

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll_sum, count = self._scored_nll(batch, "train")
        loss = nll_sum / count.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_train_epoch_end(self) -> None:
        self._last_batch_end = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # int() waits for the device, so the interval between two batch ends is the real step time on a GPU too
        tokens = int((batch[1] != IGNORE_INDEX).sum()) * self.trainer.world_size
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self.log("train/tokens_per_s", tokens / max(now - self._last_batch_end, 1e-9))
        self._last_batch_end = now

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

    def predict_step(self, prompt_ids: torch.Tensor, batch_idx: int) -> dict[str, str]:
        """Continues one prompt; decodes it with the datamodule's vocabulary and prints it."""
        generated = self.model.generate(prompt_ids, self.max_new_tokens, self.temperature, self.top_k)
        vocab = self.trainer.datamodule.vocab
        result = {"prompt": vocab.decode(prompt_ids[0, 1:].tolist()),  # [0] is the end-of-line id before it
                  "continuation": vocab.decode(generated[0].tolist())}
        self.print(f"{result['prompt']} >>> {result['continuation']}")
        return result

    def on_train_epoch_start(self) -> None:
        self._memory["train"] = None

    def on_validation_epoch_start(self) -> None:
        self._memory["val"] = None

    def on_test_epoch_start(self) -> None:
        self._memory["test"] = None

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def on_fit_start(self) -> None:
        if self.logger is not None:
            self.logger.log_hyperparams({
                "params/total": self.model.num_parameters(include_embeddings=True),
                "params/non_embedding": self.model.num_parameters(include_embeddings=False),
            })

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        decay_steps = self.decay_steps or max(1, int(self.trainer.estimated_stepping_batches))
        final_ratio = 1.0 if self.lr_schedule == "constant" else self.min_lr_ratio  # constant: a cosine to 100%
        scheduler = LambdaLR(optimizer, partial(warmup_cosine_factor, warmup_steps=self.warmup_steps,
                                                decay_steps=decay_steps, min_ratio=final_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
