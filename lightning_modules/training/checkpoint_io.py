"""Checkpoint writes that are whole or absent: a run killed while saving never leaves an unloadable file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from datamodules.atomic import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but local files are written to a temporary file beside the target,
    synced, then renamed over it (``os.replace`` is atomic), so ``last.ckpt`` is always the previous or the
    new checkpoint, never a torn one. Remote (fsspec) paths fall back to Lightning's own write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(Path(path)) as f:
            torch.save(checkpoint, f)
        return None
