"""What a checkpoint records about its model (configuration and head layout), and how a freshly built model is
matched to it before weights load: checked for compatibility, then shrunk to the checkpoint's heads."""

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_modules.errors import MissingFileError, UsageError, one_line
from lightning_modules.model import MemoryTransformerLM, ModelConfig

CHECKPOINT_KEY = "headprune"
LAYOUT_FORMAT = 1
GATE_SUFFIX = "gate.log_alpha"
# entries a checkpoint written before head gates existed lacks; the model's own values stand in for them
OPTIONAL_SUFFIXES = (GATE_SUFFIX, "attn.head_ids")


def layout_record(model: MemoryTransformerLM) -> dict[str, Any]:
    """The checkpoint entry for ``model``: its constructor configuration, head layout and gating switch."""
    return {
        "format": LAYOUT_FORMAT,
        "model_config": model.config.to_dict(),
        "heads_per_layer": model.heads_per_layer,
        "head_ids": model.head_ids,
        "gates_enabled": model.gates_enabled,
    }


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file safely (``torch.load(weights_only=True)``: tensors and plain Python values only, so a
    crafted file cannot run code), with a one-line :class:`UsageError` when it is missing, unsafe or unreadable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist; check the path (e.g. .../checkpoints/last.ckpt)")
    try:
        # mmap leaves tensor data on disk until used, so reading only the layout record stays cheap
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except RuntimeError as error:
        if "_use_new_zipfile_serialization" not in str(error):
            raise _unreadable(path, error) from error
    except Exception as error:
        raise _unreadable(path, error) from error
    try:  # a file in torch's legacy (pre-zip) format cannot be memory-mapped; the same safe loader reads it whole
        with warnings.catch_warnings():  # torch's note on the pickle protocol: the error below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> UsageError:
    """The one-line error for a checkpoint the safe loader refused (``UnpicklingError``) or could not read."""
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"Python objects ({found.group(1)}) that loading would run as code" if found else (
            "pickled instructions that the safe loader refuses")
        return UsageError(f"checkpoint {path} is unsafe: it holds {what}, and only tensors and plain values are "
                          "loaded; use a checkpoint written by headprune")
    first_line = one_line(str(error).split(". ")[0])[:200]
    return UsageError(f"checkpoint {path} cannot be read ({type(error).__name__}: {first_line}); it is truncated or "
                      "not a checkpoint: use a complete .ckpt written by headprune (e.g. .../checkpoints/last.ckpt)")


def recorded_config(record: dict[str, Any], source: str) -> ModelConfig:
    """The model configuration a layout record holds, validated; a one-line error names what does not fit."""
    try:
        return ModelConfig.from_dict(record["model_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{source} records a model configuration this version cannot build ({error})") from error


def check_compatible(model: MemoryTransformerLM, record: dict[str, Any], source: str) -> None:
    """Raise a UsageError (a ValueError) naming every shape-defining setting where ``record`` and ``model`` disagree."""
    if record.get("format") != LAYOUT_FORMAT:
        raise UsageError(f"{source} has headprune layout format {record.get('format')!r}; this version reads "
                         f"format {LAYOUT_FORMAT}")
    saved, ours = recorded_config(record, source).shape_entries(), model.config.shape_entries()
    diffs = [f"{key}: {saved[key]!r} there, {ours.get(key)!r} here" for key in saved if saved[key] != ours.get(key)]
    if diffs:
        hint = (" (a different vocabulary: use the data settings the checkpoint was trained with)"
                if saved["vocab_size"] != ours["vocab_size"] else "")
        raise UsageError(f"{source} does not fit this model: " + "; ".join(diffs) + hint)


def apply_layout(model: MemoryTransformerLM, record: dict[str, Any] | None, source: str) -> None:
    """Make ``model`` take the checkpoint's shapes: check compatibility, remove heads down to its layout and
    restore its gating switch. A checkpoint without a record (not written by headprune) is left to the strict
    state-dict load."""
    if record is None:
        return
    check_compatible(model, record, source)
    layout, current = list(record["heads_per_layer"]), model.heads_per_layer
    if any(k > n for k, n in zip(layout, current, strict=True)):
        raise UsageError(
            f"{source} has heads per layer {layout} but the model in memory has only {current}: removed heads "
            "cannot grow back. Load it into a freshly built model (`headprune test --ckpt_path ...`, or "
            "LanguageModel.load_from_checkpoint)"
        )
    model.shrink_to(layout)
    model.gates_enabled = record["gates_enabled"]


def load_dense_weights(model: MemoryTransformerLM, path: str | Path) -> int:
    """Load the model weights of checkpoint ``path`` into ``model`` (shrunk to its layout first), leaving the
    gates as they are; returns the number of tensors loaded."""
    checkpoint = read_checkpoint(path)
    record = checkpoint.get(CHECKPOINT_KEY)
    if record is not None:
        check_compatible(model, record, f"init_from checkpoint {path}")
        model.shrink_to(record["heads_per_layer"])
    state = {key.removeprefix("model."): value for key, value in checkpoint.get("state_dict", {}).items()
             if key.startswith("model.") and not key.endswith(GATE_SUFFIX)}
    MemoryTransformerLM.upgrade_state_dict_(state)
    ours = {key for key in model.state_dict() if not key.endswith(OPTIONAL_SUFFIXES) or key in state}
    missing, unexpected = sorted(ours - state.keys()), sorted(state.keys() - ours)
    if missing or unexpected:
        raise UsageError(f"init_from checkpoint {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; is it a headprune LanguageModel checkpoint of this config?")
    for key, value in model.state_dict().items():
        if key in state and state[key].shape != value.shape:
            raise UsageError(f"init_from checkpoint {path}: {key} has shape {tuple(state[key].shape)}, the model "
                             f"{tuple(value.shape)}; build the model with the checkpoint's configuration")
    model.load_state_dict(state, strict=False)
    return len(state)


def fill_optional_entries(state_dict: dict[str, Any], model: MemoryTransformerLM, prefix: str = "model.") -> list[str]:
    """Add the model's own gates and head ids to a state dict that predates them (a baseline trained before head
    gates existed), so a strict load works; returns the keys added."""
    added = []
    for key, value in model.state_dict().items():
        if key.endswith(OPTIONAL_SUFFIXES) and prefix + key not in state_dict:
            state_dict[prefix + key] = value.clone()
            added.append(prefix + key)
    return added
