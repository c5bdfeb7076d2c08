"""Transformer-XL ordered batches: contiguity, rank shares, full coverage, epoch offsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.batching import IGNORE_INDEX, OrderedBatches

EOS = 1


def all_batches(batches: OrderedBatches, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step of one pass, stacked: [steps, B, T] inputs and targets."""
    pairs = [batches.batch(step, offset) for step in range(len(batches))]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def rows_text(targets: torch.Tensor) -> list[np.ndarray]:
    """Each row's scored targets in reading order, from [steps, B, T] targets."""
    per_row = targets.permute(1, 0, 2).reshape(targets.shape[1], -1)
    return [row[row != IGNORE_INDEX].numpy() for row in per_row]


@pytest.mark.parametrize(("n", "batch_size", "tgt_len", "world_size"), [(1000, 4, 7, 1), (1003, 3, 5, 2),
                                                                          (64, 2, 8, 4), (97, 1, 97, 1)])
def test_ranks_are_disjoint_contiguous_shares_that_cover_the_stream(n, batch_size, tgt_len, world_size):
    tokens = np.arange(10, 10 + n, dtype=np.uint32)
    text = []
    for rank in range(world_size):
        batches = OrderedBatches(tokens, batch_size, tgt_len, pad_input_id=EOS, rank=rank, world_size=world_size)
        assert len(batches) == len(OrderedBatches(tokens, batch_size, tgt_len, pad_input_id=EOS, rank=0,
                                                  world_size=world_size)), "every rank runs the same steps"
        _, targets = all_batches(batches)
        assert targets.shape[1:] == (batch_size, tgt_len)
        text.extend(rows_text(targets))
    np.testing.assert_array_equal(np.concatenate(text), tokens)


def test_inputs_are_targets_shifted_by_one_within_and_across_steps():
    tokens = np.random.default_rng(0).integers(2, 50, size=500).astype(np.uint32)
    inputs, targets = all_batches(OrderedBatches(tokens, 4, 16, pad_input_id=EOS))
    # wherever the next position is scored, its input is this position's target (padding has pad inputs)
    scored_next = targets[:, :, 1:] != IGNORE_INDEX
    assert torch.equal(targets[:, :, :-1][scored_next], inputs[:, :, 1:][scored_next])
    # the target of the last position of step k is the input of the first position of step k + 1, in every row
    carried = targets[1:, :, 0] != IGNORE_INDEX
    assert torch.equal(targets[:-1, :, -1][carried], inputs[1:, :, 0][carried])
    assert int(scored_next.sum()) > 400
    assert inputs[0, 0, 0] == EOS, "the split's first token is predicted after an end-of-line"


def test_random_offset_rotates_each_epoch_and_still_covers_every_token_once():
    tokens = np.arange(2, 402, dtype=np.uint32)
    epoch = {"now": 0}
    batches = OrderedBatches(tokens, 4, 10, pad_input_id=EOS, random_offset=True, seed=3,
                             epoch_fn=lambda: epoch["now"])
    passes = []
    for now in range(3):
        epoch["now"] = now
        targets = torch.stack([y for _, y in batches])
        passes.append(targets)
        scored = targets[targets != IGNORE_INDEX].numpy()
        np.testing.assert_array_equal(np.sort(scored), tokens)
        # rotation keeps the text contiguous: a row is a run of consecutive tokens modulo the wrap
        row = rows_text(targets)[1]
        assert set(np.diff(row.astype(np.int64)).tolist()) <= {1, -(len(tokens) - 1)}
    assert not torch.equal(passes[0], passes[1]) and not torch.equal(passes[1], passes[2])
    epoch["now"] = 1
    assert torch.equal(torch.stack([y for _, y in batches]), passes[1]), "an epoch's offset is reproducible"
    assert batches.offset(1) == OrderedBatches(tokens, 4, 10, pad_input_id=EOS, random_offset=True,
                                               seed=3).offset(1)


def test_without_random_offset_every_pass_is_identical():
    tokens = np.arange(2, 302, dtype=np.uint32)
    batches = OrderedBatches(tokens, 2, 16, pad_input_id=EOS, epoch_fn=lambda: 5)
    assert batches.offset(5) == 0
    assert torch.equal(torch.stack([y for _, y in batches]), all_batches(batches)[1])


def test_split_too_small_for_the_batch_shape_is_rejected_with_the_fix():
    tokens = np.arange(100, dtype=np.uint32)
    with pytest.raises(ValueError, match=r"valid split has 100 tokens.*lower batch_size or tgt_len"):
        OrderedBatches(tokens, 4, 32, pad_input_id=EOS, split_name="valid")
    with pytest.raises(ValueError, match="outside world_size"):
        OrderedBatches(tokens, 1, 4, pad_input_id=EOS, rank=2, world_size=2)
