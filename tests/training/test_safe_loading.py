"""Every way a checkpoint or an export is read uses the safe loader: a crafted pickle runs nothing and is refused
with a one-line error, while the checkpoints headprune itself writes (Lightning's entries, the HeadPruning and
ModelCheckpoint states, the layout record) load under ``weights_only=True``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from callbacks.head_pruning import HeadPruning
from lightning_modules.errors import UsageError
from lightning_modules.export import export_checkpoint, model_from_checkpoint
from lightning_modules.model import MemoryTransformerLM
from lightning_modules.training.checkpoint_io import AtomicCheckpointIO
from lightning_modules.training.checkpoint_layout import read_checkpoint
from lightning_modules.training.language_model import LanguageModel

VOCAB = 50


def tiny_model(**overrides) -> MemoryTransformerLM:
    config = dict(vocab_size=VOCAB, n_layers=2, d_model=16, n_heads=2, d_head=8, n_persistent=8, tgt_len=8,
                  mem_len=8, cutoffs=[], div_value=1.0, max_len=32, dropout=0.0, dropemb=0.0)
    return MemoryTransformerLM(**(config | overrides))


class Payload:
    """Unpickling it creates ``marker``: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint that would load fine (real weights and layout record) but also carries the payload."""
    module = LanguageModel(tiny_model())
    checkpoint = {"state_dict": module.state_dict(), "pytorch-lightning_version": pl.__version__,
                  "hyper_parameters": {}, "payload": Payload(tmp_path / "ran")}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path, tmp_path / "ran"


def assert_refused(error: BaseException, marker: Path) -> None:
    assert not marker.exists(), "the payload ran"
    message = str(error)
    assert "\n" not in message and "is unsafe" in message and "(io.open)" in message, message


def test_read_checkpoint_refuses_a_crafted_pickle(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(UsageError) as error:
        read_checkpoint(path)
    assert_refused(error.value, marker)


def test_read_checkpoint_refuses_a_crafted_pickle_in_the_legacy_format(tmp_path):
    path, marker = tmp_path / "legacy.ckpt", tmp_path / "ran"
    with path.open("wb") as f:
        pickle.dump({"state_dict": {}, "payload": Payload(marker)}, f)
    with pytest.raises(UsageError, match="is unsafe") as error:
        read_checkpoint(path)
    assert not marker.exists() and "\n" not in str(error.value)


def test_the_trainers_checkpoint_io_refuses_a_crafted_pickle(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(UsageError) as error:
        AtomicCheckpointIO().load_checkpoint(path)
    assert_refused(error.value, marker)
    with pytest.raises(ValueError, match="weights_only=True only"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)


def test_a_trainer_given_a_crafted_ckpt_path_runs_nothing(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path / "root", plugins=[AtomicCheckpointIO()])
    data = DataLoader([(torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8)))], batch_size=None)
    with pytest.raises(UsageError) as error:
        trainer.validate(LanguageModel(tiny_model()), dataloaders=data, ckpt_path=str(path), verbose=False)
    assert_refused(error.value, marker)


@pytest.mark.parametrize("with_model", [False, True])
def test_load_from_checkpoint_refuses_a_crafted_pickle(tmp_path, with_model):
    path, marker = crafted_checkpoint(tmp_path)
    kwargs = {"model": tiny_model()} if with_model else {}
    with pytest.raises(UsageError) as error:
        LanguageModel.load_from_checkpoint(path, **kwargs)
    assert_refused(error.value, marker)
    with pytest.raises(UsageError, match="weights_only=True only"):
        LanguageModel.load_from_checkpoint(path, weights_only=False)


def test_init_from_refuses_a_crafted_pickle(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(UsageError) as error:
        LanguageModel(tiny_model(), init_from=str(path)).setup("fit")
    assert_refused(error.value, marker)


def test_the_export_command_refuses_a_crafted_pickle(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    for export in (lambda: model_from_checkpoint(path), lambda: export_checkpoint(path, tmp_path / "export")):
        with pytest.raises(UsageError) as error:
            export()
        assert_refused(error.value, marker)
    assert not (tmp_path / "export").exists()


def test_from_pretrained_never_unpickles_a_weights_file(tmp_path):
    """A folder with only a pickled ``pytorch_model.bin`` beside the config is refused: exports are safetensors."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "export")
    (tmp_path / "export" / "model.safetensors").unlink()
    torch.save({"payload": Payload(tmp_path / "ran")}, tmp_path / "export" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"model\.safetensors does not match config\.json") as error:
        MemoryTransformerLM.from_pretrained(tmp_path / "export")
    assert not (tmp_path / "ran").exists() and "\n" not in str(error.value)


def test_a_truncated_checkpoint_is_one_clear_line(tmp_path):
    module = LanguageModel(tiny_model())
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "torn.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match=r"cannot be read .* truncated or not a checkpoint") as error:
        read_checkpoint(tmp_path / "torn.ckpt")
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_the_checkpoints_a_pruning_fit_writes_load_safely_and_resume(tmp_path):
    """A real fit with ModelCheckpoint and HeadPruning (heads removed mid-run): every checkpoint it wrote loads
    with plain ``torch.load(weights_only=True)``, and a resume through the safe IO restores the callback state."""
    data = DataLoader([(torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8))) for _ in range(8)],
                      batch_size=None)

    def trainer(steps: int) -> pl.Trainer:
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2),
                     HeadPruning(target_sparsity=0.5, warmup_steps=1, prune_after_step=1, prune_every_n_steps=1,
                                 prune_on_validation=False, lagrangian_lr=1.0)]
        return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                          callbacks=callbacks, plugins=[AtomicCheckpointIO()])

    first = trainer(4)
    first.fit(LanguageModel(tiny_model(), gate_lr_factor=100.0), train_dataloaders=data)
    written = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert written
    for path in written:
        checkpoint = torch.load(path, weights_only=True)
        assert {"state_dict", "loops", "callbacks", "optimizer_states", "headprune"} <= checkpoint.keys()
        assert any("HeadPruning" in key for key in checkpoint["callbacks"])
        assert any("ModelCheckpoint" in key for key in checkpoint["callbacks"])
        json.dumps(checkpoint["headprune"])  # the layout record is plain data
    last = tmp_path / "ckpt" / "last.ckpt"
    layout = torch.load(last, weights_only=True)["headprune"]["heads_per_layer"]
    resumed = trainer(6)
    module = LanguageModel(tiny_model(), gate_lr_factor=100.0)
    resumed.fit(module, train_dataloaders=data, ckpt_path=str(last))
    assert resumed.global_step == 6
    assert all(k <= n for k, n in zip(module.model.heads_per_layer, layout, strict=True))
