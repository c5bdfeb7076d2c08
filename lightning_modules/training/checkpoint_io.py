"""Checkpoint IO for the Trainer: writes that are whole or absent (a run killed while saving never leaves an
unloadable file) and reads that never run code from the file (``torch.load(weights_only=True)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from datamodules.atomic import atomic_file
from lightning_modules.training.checkpoint_layout import read_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but local files are written to a temporary file beside the target,
    synced, then renamed over it (``os.replace`` is atomic), so ``last.ckpt`` is always the previous or the
    new checkpoint, never a torn one. Remote (fsspec) paths fall back to Lightning's own write.

    Loading (``--ckpt_path``, resuming) always uses ``weights_only=True``: a checkpoint holds tensors and plain
    Python values only (Lightning's own entries and headprune's layout record are such), so a crafted file is
    refused with a one-line error instead of running code. A request for ``weights_only=False`` is refused too."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(Path(path)) as f:
            torch.save(checkpoint, f)
        return None

    def load_checkpoint(self, path: str | Path, map_location: Any = "cpu",
                        weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint at ``path``, read with the safe loader (local files: :func:`read_checkpoint`)."""
        if weights_only is False:
            raise ValueError("AtomicCheckpointIO loads checkpoints with weights_only=True only")
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_checkpoint(path, map_location=map_location)
