"""User errors through the installed ``headprune`` script: one line ``headprune: error: ...`` on stderr, exit status
2, no traceback, nothing written under the run's root; ``HEADPRUNE_DEBUG=1`` shows the traceback; bugs keep theirs.

The cases that fail before any data is read run by default; those that need the vocabulary (a model is built) are
marked slow."""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lightning_modules import cli
from lightning_modules.model import MemoryTransformerLM
from lightning_modules.training.language_model import LanguageModel

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "experiments" / "wt2" / "all_attention_small.yaml"
M = "--model.model.init_args."


class Payload:
    """Unpickling it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny(data_dir: Path, cache: Path, root: Path) -> list[str]:
    return [f"--config={RECIPE}", f"--data.data_dir={data_dir}", f"--data.cache_dir={cache}", "--data.batch_size=2",
            "--data.tgt_len=8", f"{M}n_layers=1", f"{M}d_model=16", f"{M}n_heads=2", f"{M}d_head=8",
            f"{M}n_persistent=8", f"{M}tgt_len=8", f"{M}mem_len=8", "--trainer.accelerator=cpu",
            "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}"]


@pytest.fixture
def headprune(headprune_script: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Runs the console script with ``args`` in ``root`` (created), extra environment variables as keywords."""

    def run_script(args: list[str], root: Path, **env: str) -> subprocess.CompletedProcess:
        root.mkdir(parents=True, exist_ok=True)
        return subprocess.run([str(headprune_script), *args], capture_output=True, text=True, timeout=300, cwd=root,
                              env=os.environ | env)

    return run_script


def assert_user_error(done: subprocess.CompletedProcess, root: Path, message: str) -> str:
    """Exit 2, exactly one error line (containing ``message``), no traceback, an empty root; returns the line."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("headprune: error: "), done.stderr[-3000:]
    assert message in lines[0], lines[0]
    assert [p for p in root.rglob("*")] == [], "a rejected command writes nothing"
    return lines[0]


def crafted_checkpoint(tmp_path: Path) -> Path:
    module = LanguageModel(MemoryTransformerLM(vocab_size=33278, n_layers=1, d_model=16, n_heads=2, d_head=8,
                                               n_persistent=8, tgt_len=8, mem_len=8, cutoffs=[2000, 10000]))
    checkpoint = {"state_dict": module.state_dict(), "payload": Payload(tmp_path / "ran")}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    return tmp_path / "crafted.ckpt"


# --------------------------------------------------------------------------- fast: no data is read


def test_a_missing_ckpt_path_is_one_line(tmp_path, headprune):
    root = tmp_path / "run"
    done = headprune(["test", *tiny(tmp_path / "data", tmp_path / "cache", root),
                      f"--ckpt_path={tmp_path / 'missing.ckpt'}"], root)
    assert_user_error(done, root, "missing.ckpt does not exist")


def test_a_crafted_checkpoint_runs_nothing_and_is_one_line(tmp_path, headprune):
    path, root = crafted_checkpoint(tmp_path), tmp_path / "run"
    done = headprune(["test", *tiny(tmp_path / "data", tmp_path / "cache", root), f"--ckpt_path={path}"], root)
    assert_user_error(done, root, "is unsafe: it holds Python objects (io.open)")
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_an_unreadable_config_file_is_one_line_and_debug_shows_the_traceback(tmp_path, headprune):
    root = tmp_path / "run"
    done = headprune(["fit", f"--config={tmp_path / 'nope.yaml'}"], root)
    assert_user_error(done, root, "nope.yaml")
    debug = headprune(["fit", f"--config={tmp_path / 'nope.yaml'}"], root, HEADPRUNE_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args, exit_on_error=True):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "run", broken)
    with pytest.raises(KeyError):
        cli.main(["fit"])


def test_lightning_false_alarms_are_silenced_and_real_warnings_stay():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli.silence_false_alarms()
        warnings.warn("The dirpath has changed from 'a' to 'b', therefore `best_model_score`, `kth_best_model_path`",
                      UserWarning, stacklevel=1)
        warnings.warn("Your `IterableDataset` has `__len__` defined. In combination with ...", UserWarning,
                      stacklevel=1)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a real problem"]
    tip = logging.LogRecord("pytorch_lightning.utilities.rank_zero", logging.INFO, __file__, 1,
                            "💡 Tip: For seamless cloud logging ...", None, None)
    news = logging.LogRecord("pytorch_lightning.utilities.rank_zero", logging.INFO, __file__, 1,
                             "GPU available: False, used: False", None, None)
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert not logger.filter(tip) and logger.filter(news)


# --------------------------------------------------------------------------- slow: one subprocess each


def other_shape_checkpoint(tmp_path: Path) -> Path:
    module = LanguageModel(MemoryTransformerLM(vocab_size=33278, n_layers=1, d_model=32, n_heads=2, d_head=8,
                                               n_persistent=8, tgt_len=8, mem_len=8, cutoffs=[2000, 10000]))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "other.ckpt")
    return tmp_path / "other.ckpt"


def truncated_checkpoint(tmp_path: Path) -> Path:
    data = other_shape_checkpoint(tmp_path).read_bytes()
    (tmp_path / "torn.ckpt").write_bytes(data[: len(data) // 3])
    return tmp_path / "torn.ckpt"


CASES = {
    "missing data folder": (["fit", "--data.data_dir=/nonexistent/wikitext"], "does not exist"),
    "truncated checkpoint": (["test", "--ckpt_path={torn}"], "truncated or not a checkpoint"),
    "checkpoint of another shape": (["test", "--ckpt_path={other}"], "does not fit this model: d_model: 32 there"),
    "unknown layer type": (["fit", f"{M}layer_type=lstm"], "layer_type must be one of"),
    "negative dropout": (["fit", f"{M}dropout=-0.1"], "dropout must be in [0, 1); got -0.1"),
    "missing init_from": (["fit", "--model.init_from={tmp}/baseline.ckpt"], "--model.init_from: checkpoint"),
    "init_from of another shape": (["fit", "--model.init_from={other}"], "--model.init_from checkpoint"),
    "pruning every head": (["fit", "--trainer.callbacks+=callbacks.head_pruning.HeadPruning",
                            "--trainer.callbacks.target_sparsity=1.0"], "target_sparsity must be in (0, 1)"),
    "unknown option": (["fit", "--trainer.max_stepz=3"], "unrecognized arguments: --trainer.max_stepz=3"),
    "unsafe loading asked for": (["fit", "--weights_only=false"], "--weights_only=false is refused"),
    "cutoff beyond the vocabulary": (["fit", f"{M}cutoffs=[2000, 40000]"], "every cutoff must be < vocab_size"),
    "bad batch size": (["fit", "--data.batch_size=0"], "batch_size must be a positive integer"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_with_exit_status_2_and_writes_nothing(case, tmp_path, wikitext2_dir, wt2_cache_dir,
                                                                   headprune):
    (subcommand, *override), message = CASES[case]
    paths = {"tmp": tmp_path, "other": other_shape_checkpoint(tmp_path), "torn": truncated_checkpoint(tmp_path)}
    override = [arg.format(**paths) for arg in override]
    root = tmp_path / "run"
    done = headprune([subcommand, *tiny(wikitext2_dir, wt2_cache_dir, root), *override], root)
    assert_user_error(done, root, message)
