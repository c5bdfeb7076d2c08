"""Transformer-XL ordered batches: contiguous rows of the token stream, read window by window.

The token stream of a split is cut into ``batch_size * world_size`` contiguous rows of equal length ``row_len``
(the last row is padded). Rank ``r`` owns rows ``[r * batch_size, (r + 1) * batch_size)``: its own contiguous
share of the text. Step ``k`` yields, for every row, the ``tgt_len`` tokens at ``[k * tgt_len, (k + 1) * tgt_len)``
of that row as targets and the token before each as input, so step ``k + 1`` continues step ``k`` in every row and
the model's recurrence memory always holds the text just before the current window.

Every token of the split is a target exactly once per pass; nothing is dropped. Positions past the end of the
split (the tail of the last row, the end of the last window) carry the target ``IGNORE_INDEX`` and must not be
scored; the input before the first token of the split is the end-of-line id, as if the text followed a line break.
All ranks see the same number of steps, as DDP needs.

With ``random_offset``, each training epoch first rotates the whole stream by an offset drawn from
``(seed, epoch)`` (the paper rotates each row; rotating the stream keeps the rank shares disjoint and every token
once per epoch), so window boundaries and memory resets fall on different text each epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

IGNORE_INDEX = -100


class OrderedBatches(IterableDataset):
    """Yields ``(input_ids, target_ids)`` LongTensors ``[batch_size, tgt_len]`` in text order for one rank.

    The batches are gathered from a memmap by index arithmetic, cheaper than handing them to worker processes,
    so the loader is meant for ``num_workers=0`` (it reads the epoch in the main process).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        tgt_len: int,
        *,
        pad_input_id: int,
        rank: int = 0,
        world_size: int = 1,
        random_offset: bool = False,
        seed: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        split_name: str = "split",
    ) -> None:
        if batch_size < 1 or tgt_len < 1:
            raise ValueError(f"batch_size and tgt_len must be positive, got {batch_size} and {tgt_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        rows = batch_size * world_size
        if len(tokens) < rows * tgt_len:
            raise ValueError(
                f"the {split_name} split has {len(tokens):,} tokens, fewer than batch_size {batch_size} x "
                f"{world_size} process(es) x tgt_len {tgt_len} = {rows * tgt_len:,} needed for one full window per "
                "row: lower batch_size or tgt_len"
            )
        self.tokens = tokens
        self.batch_size, self.tgt_len = batch_size, tgt_len
        self.pad_input_id = pad_input_id
        self.rank, self.world_size = rank, world_size
        self.random_offset, self.seed = random_offset, seed
        self.epoch_fn = epoch_fn
        self.row_len = math.ceil(len(tokens) / rows)
        self.num_steps = math.ceil(self.row_len / tgt_len)
        first_row = rank * batch_size
        self._row_starts = (np.arange(first_row, first_row + batch_size) * self.row_len)[:, None]  # [B, 1]

    def __len__(self) -> int:
        return self.num_steps

    def offset(self, epoch: int) -> int:
        """How far the stream is rotated in ``epoch`` (0 unless ``random_offset``)."""
        if not self.random_offset:
            return 0
        return int(np.random.default_rng([self.seed, epoch]).integers(len(self.tokens)))

    def positions(self, step: int) -> np.ndarray:
        """Stream positions of the targets of ``step``, ``[batch_size, tgt_len]`` (may run past the end)."""
        within_row = step * self.tgt_len + np.arange(self.tgt_len)  # [T]
        in_row = within_row < self.row_len
        # past the end of a row: a position whose target and input both fall outside the stream
        return np.where(in_row, self._row_starts + within_row, len(self.tokens) + 1)  # [B, T]

    def batch(self, step: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(input_ids, target_ids)`` of ``step`` with the stream rotated by ``offset``."""
        target_pos = self.positions(step)
        targets = self._gather(target_pos, offset, fill=IGNORE_INDEX)
        inputs = self._gather(target_pos - 1, offset, fill=self.pad_input_id)
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def _gather(self, pos: np.ndarray, offset: int, fill: int) -> np.ndarray:
        n = len(self.tokens)
        valid = (pos >= 0) & (pos < n)
        out = np.full(pos.shape, fill, dtype=np.int64)
        out[valid] = self.tokens[(pos[valid] + offset) % n]
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(self.epoch_fn() if self.epoch_fn is not None else 0)

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from step ``start`` on (``start`` > 0 resumes an interrupted epoch)."""
        offset = self.offset(epoch)
        for step in range(start, self.num_steps):
            yield self.batch(step, offset)


class ResumableLoader(DataLoader):
    """The training DataLoader of :class:`OrderedBatches`, resumable mid-epoch.

    Lightning saves ``state_dict()`` in every checkpoint and hands it back to ``load_state_dict`` on resume before
    iterating. The state is the epoch being read and the Trainer's count of its batches whose step finished
    (``processed``) and whose hooks finished (``completed``), read through ``progress_fn``; counting yields instead
    would be off by the batches Lightning prefetches. The next iteration continues that epoch at its first
    unfinished batch. A checkpoint written at the end of an epoch's last batch (``completed < processed == len``)
    is resumed by Lightning straight into the next epoch's pass, so that pass reads the next epoch from its
    start; one written at the epoch's end is resumed with an empty rest-of-epoch pass first. Either way no token is
    seen twice or skipped; only the recurrence memory starts empty, as at every epoch start.
    """

    def __init__(self, batches: OrderedBatches, progress_fn: Callable[[], tuple[int, int]]) -> None:
        super().__init__(batches, batch_size=None)
        self.batches, self.progress_fn = batches, progress_fn
        self._resume: dict[str, int] | None = None
        self._epoch = 0  # the epoch the current iteration reads

    def state_dict(self) -> dict[str, int]:
        processed, completed = self.progress_fn()
        return {"epoch": self._epoch, "finished_batches": processed, "completed_batches": completed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        resume, self._resume = self._resume, None
        if resume is None:
            epoch, start = (self.batches.epoch_fn() if self.batches.epoch_fn is not None else 0), 0
        elif resume["finished_batches"] >= len(self.batches) > resume.get("completed_batches", len(self.batches)):
            epoch, start = resume["epoch"] + 1, 0  # saved at the end of the epoch's last batch
        else:
            epoch, start = resume["epoch"], resume["finished_batches"]
        self._epoch = epoch
        return self.batches.iterate(epoch, start)
