"""Preemption: on SIGTERM (what SLURM and most schedulers send before killing a job) save a checkpoint and exit."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class Preemption(Callback):
    """Lightning turns SIGTERM into a ``SIGTERMException`` at the end of the current batch, on every rank; this
    callback then saves ``last.ckpt`` in the checkpoint folder, so ``--ckpt_path last`` resumes from there, and the
    process exits with status 0. The headprune CLI adds it to every run."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        log.info("SIGTERM at step %d: saved %s; resume with --ckpt_path last (or that path)", trainer.global_step,
                 path)

    @staticmethod
    def checkpoint_path(trainer: pl.Trainer) -> Path:
        """``last.ckpt`` beside the ModelCheckpoint files, else in the log folder's ``checkpoints``."""
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath) / "last.ckpt"
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"
