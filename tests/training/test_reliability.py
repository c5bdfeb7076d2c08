"""Faults: torn checkpoint writes, SIGTERM, non-finite losses, concurrent cache preparation."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from datamodules.wikitext import WikiTextDataModule
from lightning_modules.cli import run as run_cli
from lightning_modules.model import MemoryTransformerLM
from lightning_modules.training.checkpoint_io import AtomicCheckpointIO
from lightning_modules.training.language_model import LanguageModel
from tests.callbacks.test_head_pruning import prune_args
from tests.cli.test_cli import tiny_args
from tests.conftest import write_corpus
from tests.training.test_language_model import batches, tiny_model

REPO = Path(__file__).resolve().parents[2]


def test_a_checkpoint_write_that_dies_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if the process were interrupted mid-write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file is left behind"


def logged_steps(metrics: Path) -> int:
    """How many distinct training steps a CSV log has rows for so far (0 before it exists)."""
    if not metrics.exists():
        return 0
    rows = metrics.read_text().splitlines()
    if not rows:
        return 0
    column = rows[0].split(",").index("step") if "step" in rows[0].split(",") else None
    return 0 if column is None else len({row.split(",")[column] for row in rows[1:] if row.count(",") >= column})


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_cleanly_and_the_run_resumes(wikitext2_dir, wt2_cache_dir, tmp_path,
                                                                      headprune_script):
    checkpoints = tmp_path / "checkpoints"
    args = [*tiny_args(wikitext2_dir, wt2_cache_dir, tmp_path), "--trainer.val_check_interval=1000",
            "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
            f"--trainer.callbacks.init_args.dirpath={checkpoints}", "--trainer.callbacks.init_args.monitor=null",
            "--trainer.callbacks.init_args.every_n_train_steps=1",
            "--trainer.logger=pytorch_lightning.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.log_every_n_steps=1"]
    job = subprocess.Popen([str(headprune_script), "fit", *args, "--trainer.max_steps=100000"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and logged_steps(metrics) < 6:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr[-3000:]
    saved = torch.load(checkpoints / "last.ckpt", weights_only=False)
    step = saved["global_step"]
    assert step >= 5

    resumed = subprocess.run([str(headprune_script), "fit", *args, f"--trainer.max_steps={step + 3}",
                              "--ckpt_path=last"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == step + 3


class FaultyModel(LanguageModel):
    """Returns a NaN loss at the chosen batches (fault injection)."""

    def __init__(self, nan_batches: set[int], **kwargs) -> None:
        super().__init__(tiny_model(), **kwargs)
        self.nan_batches = nan_batches

    def _scored_nll(self, batch, stage):
        nll_sum, count = super()._scored_nll(batch, stage)
        if stage == "train" and self.trainer.fit_loop.epoch_loop.batch_idx in self.nan_batches:
            nll_sum = nll_sum * float("nan")
        return nll_sum, count


def fit(module: LanguageModel, steps: int) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(batches(steps), batch_size=None))
    return trainer


def test_a_nan_loss_stops_the_run_with_a_message_naming_the_step():
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at step 3 \(batch 3\)"):
        fit(FaultyModel({3}), 6)


def test_a_nan_loss_step_is_skipped_when_configured():
    torch.manual_seed(0)
    module = FaultyModel({2}, on_nonfinite_loss="skip")
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[batch_idx] = [p.detach().clone() for p in pl_module.parameters()]

    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Snapshot()])
    trainer.fit(module, train_dataloaders=DataLoader(batches(5), batch_size=None))
    assert module.skipped_steps == 1
    unchanged = all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3], strict=True))
    assert unchanged, "the NaN step changes no weight"
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4], strict=True))
    assert all(torch.isfinite(p).all() for p in module.parameters())


def _prepare(data_dir: str, cache_dir: str, queue) -> None:
    dm = WikiTextDataModule(name="wikitext-2", data_dir=data_dir, cache_dir=cache_dir, batch_size=2, tgt_len=8)
    dm.prepare_data()
    dm.setup("fit")
    queue.put(dm.vocab.sha256)


@pytest.mark.slow
def test_two_processes_preparing_one_cache_at_once_end_with_one_valid_cache(tmp_path):
    data_dir = write_corpus(tmp_path / "text")
    cache = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_prepare, args=(str(data_dir), str(cache), queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert queue.get(timeout=5) == queue.get(timeout=5)
    assert not list(cache.rglob("*.tmp")), "no temporary files left"
    dm = WikiTextDataModule(name="wikitext-2", data_dir=str(data_dir), cache_dir=str(cache), batch_size=2, tgt_len=8)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())


def test_bad_nonfinite_policy_is_rejected():
    with pytest.raises(ValueError, match="on_nonfinite_loss must be 'stop' or 'skip'"):
        LanguageModel(tiny_model(), on_nonfinite_loss="ignore")




class BatchRecorder(pl.Callback):
    """Records the first targets of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(tuple(batch[1][:, 0].tolist()))


@pytest.mark.parametrize("where", ["mid-epoch", "last batch of an epoch", "epoch end"])
def test_resuming_continues_with_the_first_unfinished_batch(tmp_path, where):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(250)]  # 3,250 tokens: 51 batches of 4 x 16
    text_dir = write_corpus(tmp_path / "text", {"train": "\n".join(lines), "valid": "w1 w2\n", "test": "w3 w4\n"})

    def data() -> WikiTextDataModule:
        return WikiTextDataModule(name="wikitext-2", data_dir=str(text_dir), cache_dir=str(tmp_path / "cache"),
                                  batch_size=4, tgt_len=16, random_offset=True)

    def module() -> LanguageModel:
        torch.manual_seed(0)
        return LanguageModel(MemoryTransformerLM(vocab_size=42, n_layers=1, d_model=16, n_heads=2, d_head=8,
                                                 n_persistent=8, tgt_len=16, mem_len=8, cutoffs=[]))

    def trainer(steps: int, recorder: BatchRecorder, extra: list[pl.Callback] = ()) -> pl.Trainer:
        return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, callbacks=[recorder, *extra],
                          default_root_dir=tmp_path)

    straight = BatchRecorder()
    trainer(110, straight).fit(module(), datamodule=data())  # into the third epoch
    per_epoch = 51  # 3,250 tokens in rows of 4 x 16
    step, hook = {"mid-epoch": (5, {"every_n_train_steps": 1}),
                  "last batch of an epoch": (per_epoch, {"every_n_train_steps": 1}),
                  "epoch end": (per_epoch, {"every_n_epochs": 1, "save_on_train_epoch_end": True})}[where]
    first = BatchRecorder()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, filename="s{step}",
                                        auto_insert_metric_name=False, **hook)
    trainer(step, first, [ckpt]).fit(module(), datamodule=data())
    resumed = BatchRecorder()
    trainer(110, resumed).fit(module(), datamodule=data(), ckpt_path=tmp_path / "ck" / f"s{step}.ckpt")
    assert len(straight.seen) == 110 and straight.seen[:51] != straight.seen[51:102], "epochs are rotated"
    assert first.seen + resumed.seen == straight.seen, "the resumed run reads exactly the batches not yet trained"


@pytest.mark.slow
def test_sigkill_during_pruning_resumes_with_its_layout_and_multipliers(wikitext2_dir, wt2_cache_dir, tmp_path,
                                                                        headprune_script):
    checkpoints = tmp_path / "checkpoints"
    args = prune_args(wikitext2_dir, wt2_cache_dir, tmp_path, prune_every_n_steps=2,
                      checkpoint={"dirpath": str(checkpoints), "every_n_train_steps": 1, "save_top_k": 1})
    job = subprocess.Popen([str(headprune_script), "fit", *args, "--trainer.max_steps=100000"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def removed_heads() -> bool:
        try:
            return sum(torch.load(checkpoints / "last.ckpt", weights_only=False)["headprune"]["heads_per_layer"]) < 8
        except Exception:
            return False

    deadline = time.time() + 180
    while time.time() < deadline and job.poll() is None and not removed_heads():
        time.sleep(0.5)
    assert job.poll() is None, "the run must still be going when it is killed"
    job.kill()  # SIGKILL: no handler runs
    job.wait(timeout=60)
    saved = torch.load(checkpoints / "last.ckpt", weights_only=False)
    step, layout = saved["global_step"], saved["headprune"]["heads_per_layer"]
    assert sum(layout) < 8, "killed after at least one removal"
    state = next(v for k, v in saved["callbacks"].items() if "HeadPruning" in k)
    assert state["lambda_2"] > 0

    resumed = subprocess.run([str(headprune_script), "fit", *args, f"--trainer.max_steps={step + 2}",
                              f"--ckpt_path={checkpoints / 'last.ckpt'}"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert final["global_step"] == step + 2
    assert all(k <= n for k, n in zip(final["headprune"]["heads_per_layer"], layout, strict=True))


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("override, message", [
    (["--model.model.init_args.layer_type=lstm"], "layer_type must be one of"),
    (["--model.model.init_args.cutoffs=[2000, 40000]"], "every cutoff must be < vocab_size=33278"),
    (["--model.model.init_args.cutoffs=[10000, 2000]"], "strictly increasing"),
    (["--trainer.callbacks+=callbacks.head_pruning.HeadPruning", "--trainer.callbacks.target_sparsity=1.5"],
     r"target_sparsity must be in \(0, 1\)"),
    (["--trainer.callbacks+=callbacks.head_pruning.HeadPruning", "--trainer.callbacks.target_sparsity=0.5",
      "--trainer.callbacks.l0_coefficient=0.01"], "exactly one of l0_coefficient"),
    (["--data.data_dir=/nonexistent/wikitext"], "does not exist"),
])
def test_bad_input_gets_a_clear_error_and_writes_nothing(override, message, wikitext2_dir, wt2_cache_dir, tmp_path,
                                                        capsys):
    root = tmp_path / "run"
    root.mkdir()
    with pytest.raises((ValueError, FileNotFoundError, SystemExit)) as error:
        run_cli(["fit", *tiny_args(wikitext2_dir, wt2_cache_dir, root), "--trainer.max_steps=2", *override])
    text = str(error.value) + capsys.readouterr().err
    assert re.search(message, text), text[-2000:]
    assert files_under(root) == set(), "a rejected run leaves nothing behind"


def test_a_checkpoint_of_another_vocabulary_is_rejected_before_anything_runs(wikitext2_dir, wt2_cache_dir, tmp_path):
    other = LanguageModel(tiny_model())  # vocabulary of 50, not WikiText-2's 33,278
    path = tmp_path / "other.ckpt"
    checkpoint = {"state_dict": other.state_dict()}
    other.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    root = tmp_path / "run"
    root.mkdir()
    for subcommand in ("fit", "test"):
        with pytest.raises(ValueError, match=r"vocab_size: 50 there, 33278 here.*different vocabulary"):
            run_cli([subcommand, *tiny_args(wikitext2_dir, wt2_cache_dir, root), f"--ckpt_path={path}"])
    assert files_under(root) == set()


@pytest.mark.slow
def test_a_rank_that_dies_makes_the_ddp_job_fail_instead_of_hanging(wikitext2_dir, wt2_cache_dir, tmp_path,
                                                                    headprune_script):
    args = [*tiny_args(wikitext2_dir, wt2_cache_dir, tmp_path), "--trainer.strategy=ddp", "--trainer.devices=2",
            "--trainer.max_steps=50", "--trainer.val_check_interval=1000", "--trainer.num_sanity_val_steps=0",
            "--trainer.callbacks+=tests.helpers.DieAt", "--trainer.callbacks.step=3"]
    env = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.time()
    done = subprocess.run([str(headprune_script), "fit", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240, env=env)
    assert done.returncode != 0, "the job must report the failure"
    assert time.time() - started < 200
    assert "error: " not in done.stderr, "the job started (its arguments parsed) and failed for the dead rank"
    # gloo words a dead peer either way, depending on where the survivor was when the socket went
    assert re.search(r"Connection (reset|closed) by peer", done.stderr) or done.returncode == 3, done.stderr[-2000:]
