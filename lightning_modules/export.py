"""Turn a trained or pruned headprune checkpoint into a standalone export folder (docs/export.md):

    python -m lightning_modules.export CKPT OUT [--test_ppl PPL] [--command "how it was trained"]

OUT gets ``config.json`` (model settings and head layout), ``model.safetensors`` (weights at their pruned shapes),
a model card ``README.md`` and, when the run's resolved Lightning config is found beside the checkpoint,
``training_config.yaml``. Load it with ``MemoryTransformerLM.from_pretrained(OUT)``: plain PyTorch, no Lightning.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lightning_modules.errors import UsageError, exit_with, one_line
from lightning_modules.model import MemoryTransformerLM
from lightning_modules.training.checkpoint_layout import (
    CHECKPOINT_KEY,
    apply_layout,
    read_checkpoint,
    recorded_config,
)

TRAINING_CONFIG = "training_config.yaml"


def model_from_checkpoint(path: str | Path) -> MemoryTransformerLM:
    """The MemoryTransformerLM of a headprune checkpoint, at its head layout, in eval mode (read safely)."""
    source = f"checkpoint {path}"
    checkpoint = read_checkpoint(path)
    record = checkpoint.get(CHECKPOINT_KEY)
    if record is None:
        raise UsageError(f"{source} has no headprune model record; export checkpoints written by `headprune fit`")
    model = MemoryTransformerLM.from_config(recorded_config(record, source))
    apply_layout(model, record, source)
    state = {key.removeprefix("model."): value for key, value in checkpoint.get("state_dict", {}).items()
             if key.startswith("model.")}
    MemoryTransformerLM.upgrade_state_dict_(state)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(f"{source}: its weights do not match its model record ({one_line(error)[:300]})") from error
    return model.eval()


def run_config(checkpoint: Path) -> Path | None:
    """The resolved config Lightning saved for the run that wrote ``checkpoint`` (``config.yaml`` in the run's
    log folder), if there is one."""
    run = checkpoint.parent.parent
    found = [run / "config.yaml", *sorted(run.glob("*/version_*/config.yaml")), *sorted(run.glob("*/config.yaml"))]
    return next((path for path in found if path.is_file()), None)


def export_checkpoint(checkpoint: str | Path, out: str | Path, test_ppl: float | None = None,
                      command: str | None = None) -> Path:
    """Write the export folder ``out`` for ``checkpoint`` (see the module docstring); returns ``out``.

    ``test_ppl`` and ``command`` fill the model card; without ``command`` the card names the copied
    ``training_config.yaml`` (``headprune fit --config training_config.yaml``) when the run's config is found."""
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    model = model_from_checkpoint(checkpoint)
    if out.exists() and not out.is_dir():
        raise UsageError(f"export folder {out} is a file; name a folder")
    out.mkdir(parents=True, exist_ok=True)
    config = run_config(checkpoint)
    if config is not None:
        shutil.copyfile(config, out / TRAINING_CONFIG)
        command = command or f"headprune fit --config {TRAINING_CONFIG}"
    (out / "README.md").unlink(missing_ok=True)  # save_pretrained keeps an existing card; this one is new
    model.save_pretrained(out, model_card_kwargs={"test_ppl": test_ppl, "command": command})
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_modules.export``: user errors end with one line and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m lightning_modules.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by headprune fit (e.g. pruned.ckpt)")
    parser.add_argument("out", type=Path, help="the export folder (created; its files are replaced)")
    parser.add_argument("--test_ppl", type=float, default=None, help="test perplexity for the model card")
    parser.add_argument("--command", default=None, help="how the model was trained, for the model card")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.test_ppl, args.command)
    except UsageError as error:
        exit_with(error, prog="headprune export")
    print(f"exported {args.checkpoint} to {out} (config.json, model.safetensors, README.md)")


if __name__ == "__main__":
    main()
