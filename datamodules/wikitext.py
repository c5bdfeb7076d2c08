"""WikiTextDataModule: WikiText-103 (or WikiText-2) as ordered, memory-friendly language-modelling batches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from datamodules.batching import OrderedBatches, ResumableLoader
from datamodules.corpus import SPLITS, CorpusCache, WikiTextSource
from datamodules.vocab import Vocabulary

DATA_DIR_ENV = "WIKITEXT_DIR"  # a local copy of the dataset's wiki.*.tokens files, used when data_dir is None


class WikiTextDataModule(pl.LightningDataModule):
    """WikiText as Transformer-XL batches: every rank reads its own contiguous share of the token stream.

    ``prepare_data`` (one process) builds the vocabulary from the train split and encodes each split once into a
    uint32 cache; ``setup`` (every process) memory-maps that cache. Batches are ``(input_ids, target_ids)``
    LongTensors ``[batch_size, tgt_len]``; consecutive batches continue the same rows of text, and targets past the
    end of a split are ``-100`` (see :mod:`datamodules.batching`).

    Args:
        name: ``wikitext-103`` or ``wikitext-2``.
        data_dir: Folder with ``wiki.{train,valid,test}.tokens``; ``None`` takes the folder named by the
            ``WIKITEXT_DIR`` environment variable when it is set, else downloads from the Hugging Face hub
            (``Salesforce/wikitext``).
        cache_dir: Where the vocabulary and token-id caches (and the ``datasets`` cache) are kept.
        batch_size: Rows per training batch on each process (the global batch is this times the world size).
        tgt_len: Tokens per row in each training batch (the segment length).
        eval_batch_size: Rows per validation/test batch on each process; defaults to ``batch_size``.
        eval_tgt_len: Segment length for validation/test; defaults to ``tgt_len``.
        streaming: Read the text with ``datasets`` streaming instead of materialising it as Arrow first.
        random_offset: Rotate the training stream by a seeded random offset each epoch, as the paper does.
        seed: Seed of those offsets (the same on every rank, so the rank shares stay disjoint).
        predict_prompts: Texts to continue in ``predict`` (whitespace-tokenised like the corpus).
    """

    def __init__(
        self,
        name: Literal["wikitext-103", "wikitext-2"] = "wikitext-103",
        data_dir: str | None = None,
        cache_dir: str = "~/.cache/headprune",
        batch_size: int = 24,
        tgt_len: int = 192,
        eval_batch_size: int | None = None,
        eval_tgt_len: int | None = None,
        streaming: bool = False,
        random_offset: bool = True,
        seed: int = 87245,
        predict_prompts: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for arg, value in {"batch_size": batch_size, "tgt_len": tgt_len, "eval_batch_size": eval_batch_size,
                           "eval_tgt_len": eval_tgt_len}.items():
            if value is not None and value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value}")
        cache_root = Path(cache_dir).expanduser()
        data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
        source = WikiTextSource(name, None if data_dir is None else Path(data_dir).expanduser(), streaming,
                                hf_cache_dir=cache_root / "hf-datasets")
        self.cache = CorpusCache(source, cache_root)
        self.batch_size, self.tgt_len = batch_size, tgt_len
        self.eval_batch_size = eval_batch_size or batch_size
        self.eval_tgt_len = eval_tgt_len or tgt_len
        self.random_offset, self.seed = random_offset, seed
        self.predict_prompts = list(predict_prompts or [])
        self._vocab: Vocabulary | None = None
        self._tokens: dict[str, np.ndarray] = {}

    def prepare_data(self) -> None:
        """Builds the vocabulary and token caches if they are missing or stale (once, on one process)."""
        self.cache.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Opens the prepared caches on this process."""
        if self._vocab is None:
            self._vocab, self._tokens = self.cache.load()

    @property
    def vocab(self) -> Vocabulary:
        """The word-level vocabulary (token <-> id) of the train split."""
        if self._vocab is None:
            raise RuntimeError("the data is not loaded yet: call prepare_data() and then setup() first")
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Number of vocabulary entries, end-of-line and ``<unk>`` included (the model's ``vocab_size``).

        Available before ``setup``, so the CLI can size the model at instantiation: it loads the cached
        vocabulary, or first builds it (with the train ids, which come from the same pass over the train split).
        """
        if self._vocab is None:
            return len(self.cache.prepare_vocabulary())
        return len(self._vocab)

    def num_tokens(self, split: str) -> int:
        """Tokens in ``split`` (``train``, ``valid`` or ``test``), one end-of-line token per line included."""
        return len(self._split_tokens(split))

    def batches(self, split: str, rank: int | None = None, world_size: int | None = None) -> OrderedBatches:
        """The ordered batches of ``split`` for one process (by default this process of the running Trainer)."""
        if rank is None or world_size is None:
            rank, world_size = self._distributed_position()
        training = split == "train"
        return OrderedBatches(
            self._split_tokens(split),
            self.batch_size if training else self.eval_batch_size,
            self.tgt_len if training else self.eval_tgt_len,
            pad_input_id=self.vocab.eos_id,
            rank=rank,
            world_size=world_size,
            random_offset=self.random_offset and training,
            seed=self.seed,
            epoch_fn=self._current_epoch if training else None,
            split_name=split,
        )

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.batches("train"), self._training_position)

    def _training_position(self) -> tuple[int, int]:
        """How many batches of the current training epoch have finished their step, and their hooks (for
        resuming mid-epoch)."""
        if self.trainer is None:
            return 0, 0
        current = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return current.processed, current.completed

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.batches("valid"), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.batches("test"), batch_size=None)

    def predict_dataloader(self) -> DataLoader:
        """One prompt per batch, ``[1, length]``, each read as the start of a line (after an end-of-line id)."""
        if not self.predict_prompts:
            raise ValueError("no prompts to continue: pass --data.predict_prompts='[\"The game\", ...]'")
        prompts = [torch.tensor([[self.vocab.eos_id, *self.vocab.encode(p, add_eos=False)]])
                   for p in self.predict_prompts]
        return DataLoader(prompts, batch_size=None)

    def _split_tokens(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        _ = self.vocab  # raises the not-loaded error
        return self._tokens[split]

    def _distributed_position(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _current_epoch(self) -> int:
        return 0 if self.trainer is None else self.trainer.current_epoch
