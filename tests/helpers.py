"""Test-only callbacks that record what every rank holds, for checks across processes."""

import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class LayoutRecorder(Callback):
    """Writes ``rank{r}.json`` into ``folder`` at the end of fit: each layout change (step, heads, head ids,
    checksum of every parameter) and the loss of every training step."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.changes: list[dict] = []
        self.losses: list[float] = []

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        if not self.changes or self.changes[-1]["heads"] != model.heads_per_layer:
            checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
            self.changes.append({"step": trainer.global_step, "heads": model.heads_per_layer,
                                 "head_ids": model.head_ids, "checksum": checksum})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))
        self._record(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)
        self.folder.mkdir(parents=True, exist_ok=True)
        result = {"changes": self.changes, "losses": self.losses, "world_size": trainer.world_size,
                  "finite": bool(torch.isfinite(torch.tensor(self.losses)).all())}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


class DieAt(Callback):
    """Kills this process (no cleanup, like a crashed node) on ``rank`` when training reaches ``step``."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            os._exit(3)
