"""Training and evaluation speed through Lightning's ThroughputMonitor, counted in tokens."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.callbacks import ThroughputMonitor


def _input_ids(batch: Any) -> torch.Tensor:
    """The input ids of a batch: ``(input_ids, target_ids)`` in fit/validate/test, the prompt ids in predict."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def batch_rows(batch: Any) -> int:
    """Rows (samples) of a batch."""
    return int(_input_ids(batch).shape[0])


def batch_tokens(batch: Any) -> int:
    """Input tokens of a batch, padding included (read from the shape: no wait for the device)."""
    return _input_ids(batch).numel()


class TokenThroughput(ThroughputMonitor):
    """Lightning's :class:`~pytorch_lightning.callbacks.ThroughputMonitor` for the language model's batches.

    Logs, per stage (``train``, ``validate``, ``test``), ``<stage>/device/items_per_sec`` (tokens per second),
    ``samples_per_sec`` (rows), ``batches_per_sec`` and ``flops_per_sec`` (from the module's ``flops_per_batch``,
    2 x MACs per token x tokens, x3 when training), plus ``mfu`` on devices whose peak FLOP/s Lightning knows.
    Rates are over the last ``window_size`` batches, so they appear once that many batches were seen.
    """

    def __init__(self, window_size: int = 20, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=batch_rows, length_fn=batch_tokens, window_size=window_size, **kwargs)
