"""Training and evaluation speed through Lightning's ThroughputMonitor (TokenThroughput): tokens per second and
FLOPs per second from the model's MACs, x3 when training."""

from __future__ import annotations

import csv

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_modules.model import MemoryTransformerLM
from lightning_modules.training.language_model import LanguageModel
from lightning_modules.training.throughput import TokenThroughput, batch_rows, batch_tokens

VOCAB = 40


def test_batch_counts_read_shapes_of_training_and_prompt_batches():
    ids = torch.zeros(3, 7, dtype=torch.long)
    assert (batch_rows((ids, ids)), batch_tokens((ids, ids))) == (3, 21)
    assert (batch_rows(ids[:1]), batch_tokens(ids[:1])) == (1, 7)


def test_fit_and_test_log_tokens_and_flops_per_second(tmp_path):
    model = MemoryTransformerLM(vocab_size=VOCAB, n_layers=1, d_model=16, n_heads=2, d_head=8, n_persistent=8,
                                tgt_len=8, mem_len=8, cutoffs=[], div_value=1.0, max_len=32)
    module = LanguageModel(model)
    data = DataLoader([(torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8))) for _ in range(6)],
                      batch_size=None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         logger=CSVLogger(tmp_path, name="logs", version=0),
                         callbacks=[TokenThroughput(window_size=3)])
    trainer.fit(module, train_dataloaders=data)
    trainer.test(module, dataloaders=data, verbose=False)
    with (tmp_path / "logs" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    macs = model.macs_per_token()["total"]
    train = [r for r in rows if r.get("train/device/items_per_sec")]
    assert train, "tokens per second are logged once the window is full"
    for row in train:
        tokens_per_s = float(row["train/device/items_per_sec"])
        assert tokens_per_s > 0
        # forward and backward: 3 x 2 x MACs per token
        assert abs(float(row["train/device/flops_per_sec"]) / tokens_per_s - 6 * macs) < 1e-6 * 6 * macs
        assert abs(tokens_per_s / float(row["train/device/samples_per_sec"]) - 8) < 1e-9
    test = [r for r in rows if r.get("test/device/items_per_sec")]
    assert test and abs(float(test[-1]["test/device/flops_per_sec"]) /
                        float(test[-1]["test/device/items_per_sec"]) - 2 * macs) < 1e-6 * 2 * macs
    assert any(r.get("test/tokens_per_s") for r in rows), "the report's test speed is still logged"
    assert not any("train/tokens_per_s" in r for r in rows)
