"""Faults: torn checkpoint writes, SIGTERM, non-finite losses, concurrent cache preparation."""

from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from datamodules.wikitext import WikiTextDataModule
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.language_model import LanguageModel
from tests.conftest import write_corpus
from tests.test_cli import tiny_args
from tests.test_language_model import batches, tiny_model


def test_a_checkpoint_write_that_dies_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if the process were interrupted mid-write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file is left behind"


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_the_run_resumes(wikitext2_dir, wt2_cache_dir, tmp_path):
    script = Path(sys.executable).parent / "headprune"
    if not script.exists():
        pytest.skip("the headprune console script is not installed in this environment")
    checkpoints = tmp_path / "checkpoints"
    args = [*tiny_args(wikitext2_dir, wt2_cache_dir, tmp_path), "--trainer.val_check_interval=1000",
            "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
            f"--trainer.callbacks.init_args.dirpath={checkpoints}", "--trainer.callbacks.init_args.monitor=null",
            "--trainer.callbacks.init_args.every_n_train_steps=1",
            "--trainer.logger=pytorch_lightning.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.log_every_n_steps=1"]
    job = subprocess.Popen([str(script), "fit", *args, "--trainer.max_steps=100000"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 5):
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr[-3000:]
    saved = torch.load(checkpoints / "last.ckpt", weights_only=False)
    step = saved["global_step"]
    assert step >= 5

    resumed = subprocess.run([str(script), "fit", *args, f"--trainer.max_steps={step + 3}", "--ckpt_path=last"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == step + 3


class FaultyModel(LanguageModel):
    """Returns a NaN loss at the chosen batches (fault injection)."""

    def __init__(self, nan_batches: set[int], **kwargs) -> None:
        super().__init__(tiny_model(), **kwargs)
        self.nan_batches = nan_batches

    def _scored_nll(self, batch, stage):
        nll_sum, count = super()._scored_nll(batch, stage)
        if stage == "train" and self.trainer.fit_loop.epoch_loop.batch_idx in self.nan_batches:
            nll_sum = nll_sum * float("nan")
        return nll_sum, count


def fit(module: LanguageModel, steps: int) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(batches(steps), batch_size=None))
    return trainer


def test_a_nan_loss_stops_the_run_with_a_message_naming_the_step():
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at step 3 \(batch 3\)"):
        fit(FaultyModel({3}), 6)


def test_a_nan_loss_step_is_skipped_when_configured():
    torch.manual_seed(0)
    module = FaultyModel({2}, on_nonfinite_loss="skip")
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[batch_idx] = [p.detach().clone() for p in pl_module.parameters()]

    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Snapshot()])
    trainer.fit(module, train_dataloaders=DataLoader(batches(5), batch_size=None))
    assert module.skipped_steps == 1
    unchanged = all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3], strict=True))
    assert unchanged, "the NaN step changes no weight"
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4], strict=True))
    assert all(torch.isfinite(p).all() for p in module.parameters())


def _prepare(data_dir: str, cache_dir: str, queue) -> None:
    dm = WikiTextDataModule(name="wikitext-2", data_dir=data_dir, cache_dir=cache_dir, batch_size=2, tgt_len=8)
    dm.prepare_data()
    dm.setup("fit")
    queue.put(dm.vocab.sha256)


def test_two_processes_preparing_one_cache_at_once_end_with_one_valid_cache(tmp_path):
    data_dir = write_corpus(tmp_path / "text")
    cache = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_prepare, args=(str(data_dir), str(cache), queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert queue.get(timeout=5) == queue.get(timeout=5)
    assert not list(cache.rglob("*.tmp")), "no temporary files left"
    dm = WikiTextDataModule(name="wikitext-2", data_dir=str(data_dir), cache_dir=str(cache), batch_size=2, tgt_len=8)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())


def test_bad_nonfinite_policy_is_rejected():
    with pytest.raises(ValueError, match="on_nonfinite_loss must be 'stop' or 'skip'"):
        LanguageModel(tiny_model(), on_nonfinite_loss="ignore")


