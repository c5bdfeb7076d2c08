"""WikiTextDataModule on the real WikiText-2 copy, and under a real Lightning Trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datamodules.batching import IGNORE_INDEX
from datamodules.wikitext import WikiTextDataModule


def test_wikitext2_vocabulary_and_split_sizes(wt2):
    assert wt2.vocab_size == 33278
    assert (wt2.num_tokens("train"), wt2.num_tokens("valid"), wt2.num_tokens("test")) == (2088628, 217646, 245569)
    assert wt2.vocab.itos[:4] == ["<unk>", "</s>", "the", ","]


def test_contract_batch_shapes_and_shift(wt2):
    x, y = next(iter(wt2.train_dataloader()))
    assert x.dtype == y.dtype == torch.long
    assert x.shape == y.shape == (8, 64)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_consecutive_training_batches_continue_every_row(wt2):
    loader = iter(wt2.train_dataloader())
    previous = next(loader)
    for _ in range(5):
        current = next(loader)
        assert torch.equal(previous[1][:, -1], current[0][:, 0])
        previous = current


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluation_scores_every_token_of_the_split_exactly_once(wt2, split: str):
    stream = np.asarray(wt2._split_tokens(split))
    targets = torch.stack([y for _, y in wt2.val_dataloader()]) if split == "valid" else \
        torch.stack([y for _, y in wt2.test_dataloader()])
    assert int((targets != IGNORE_INDEX).sum()) == wt2.num_tokens(split)
    per_row = targets.permute(1, 0, 2).reshape(8, -1)
    np.testing.assert_array_equal(np.concatenate([r[r != IGNORE_INDEX].numpy() for r in per_row]), stream)


def test_two_ranks_get_disjoint_shares_covering_the_stream(wt2):
    rows = []
    for rank in range(2):
        targets = torch.stack([y for _, y in wt2.batches("valid", rank=rank, world_size=2)])
        rows.extend(r[r != IGNORE_INDEX].numpy() for r in targets.permute(1, 0, 2).reshape(8, -1))
    np.testing.assert_array_equal(np.concatenate(rows), np.asarray(wt2._split_tokens("valid")))


def test_attributes_before_setup_explain_what_to_call():
    dm = WikiTextDataModule(name="wikitext-2", data_dir="unused")
    with pytest.raises(RuntimeError, match=r"call prepare_data\(\) and then setup\(\)"):
        _ = dm.vocab


def test_vocab_size_is_known_before_setup_for_sizing_the_model(synthetic_dir: Path, tmp_path: Path):
    dm = WikiTextDataModule(name="wikitext-2", data_dir=str(synthetic_dir), cache_dir=str(tmp_path))
    assert dm.vocab_size == 15
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size == len(dm.vocab) == 15


def test_setup_without_prepare_explains_what_to_call(synthetic_dir: Path, tmp_path: Path):
    dm = WikiTextDataModule(name="wikitext-2", data_dir=str(synthetic_dir), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"call prepare_data\(\)"):
        dm.setup("fit")


def test_batch_too_large_for_the_split(synthetic_dir: Path, tmp_path: Path):
    dm = WikiTextDataModule(name="wikitext-2", data_dir=str(synthetic_dir), cache_dir=str(tmp_path),
                            batch_size=2, tgt_len=64)
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"train split has 25 tokens.*lower batch_size or tgt_len"):
        dm.train_dataloader()


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"tgt_len": -3}, {"eval_batch_size": 0}])
def test_non_positive_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="must be a positive integer"):
        WikiTextDataModule(name="wikitext-2", data_dir="unused", **bad)


class RecordingModel(pl.LightningModule):
    """A one-layer bigram LM that records the first training batch of every epoch."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.logits = torch.nn.Embedding(vocab_size, vocab_size)
        self.first_batches: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.records(batch_idx):
            self.first_batches.append(y.clone())
        return torch.nn.functional.cross_entropy(self.logits(x).flatten(0, 1), y.flatten(),
                                                 ignore_index=IGNORE_INDEX)

    def records(self, batch_idx: int) -> bool:
        return batch_idx == 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_epochs_rotate_the_training_stream(synthetic_dir: Path, tmp_path: Path):
    dm = WikiTextDataModule(name="wikitext-2", data_dir=str(synthetic_dir), cache_dir=str(tmp_path / "cache"),
                            batch_size=2, tgt_len=4, seed=1)
    model = RecordingModel(vocab_size=32)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert len(model.first_batches) == 3
    expected = [dm.batches("train").batch(0, dm.batches("train").offset(epoch))[1] for epoch in range(3)]
    for seen, want in zip(model.first_batches, expected, strict=True):
        assert torch.equal(seen, want)
    assert not torch.equal(model.first_batches[0], model.first_batches[1])


class RankRecordingModel(RecordingModel):
    """Saves every training target batch this rank sees to ``{folder}/rank{r}.pt``."""

    def __init__(self, vocab_size: int, folder: str) -> None:
        super().__init__(vocab_size)
        self.folder = folder

    def records(self, batch_idx: int) -> bool:
        return True

    def on_train_end(self) -> None:
        torch.save(torch.stack(self.first_batches), Path(self.folder) / f"rank{self.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_train_on_their_own_contiguous_shares(synthetic_dir: Path, tmp_path: Path):
    dm = WikiTextDataModule(name="wikitext-2", data_dir=str(synthetic_dir), cache_dir=str(tmp_path / "cache"),
                            batch_size=2, tgt_len=3, random_offset=False)
    model = RankRecordingModel(vocab_size=32, folder=str(tmp_path))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    dm.setup("fit")
    rows = []
    for rank in range(2):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(seen, torch.stack([y for _, y in dm.batches("train", rank=rank, world_size=2)]))
        rows.extend(r[r != IGNORE_INDEX].numpy() for r in seen.permute(1, 0, 2).reshape(2, -1))
    np.testing.assert_array_equal(np.concatenate(rows), np.asarray(dm._split_tokens("train")))
