"""Shared fixtures: the real WikiText-2 copy (prepared once per session) and small synthetic corpora."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from datamodules.wikitext import DATA_DIR_ENV, WikiTextDataModule

REPO = Path(__file__).resolve().parents[1]
# the Makefile exports WIKITEXT_DIR when a local copy exists (the datamodule reads the same variable)
WIKITEXT2_DIR = Path(os.environ.get(DATA_DIR_ENV) or REPO.parent / "shared" / "data" / "wikitext-2")


@pytest.fixture(scope="session")
def wikitext2_dir() -> Path:
    """The real WikiText-2 folder; CI must have it, elsewhere its tests are skipped with the reason."""
    if not (WIKITEXT2_DIR / "wiki.train.tokens").is_file():
        message = f"WikiText-2 copy not found at {WIKITEXT2_DIR} (set WIKITEXT_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return WIKITEXT2_DIR


@pytest.fixture(scope="session")
def headprune_script() -> Path:
    """The installed ``headprune`` console script, for tests that launch it as a user would; skipped without it."""
    script = Path(sys.executable).parent / "headprune"
    if not script.exists():
        pytest.skip("the headprune console script is not installed in this environment")
    return script


@pytest.fixture(scope="session")
def wt2_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wt2-cache")


@pytest.fixture(scope="session")
def wt2(wikitext2_dir: Path, wt2_cache_dir: Path) -> WikiTextDataModule:
    """WikiText-2 prepared once for the session: batch 8, tgt_len 64."""
    dm = WikiTextDataModule(name="wikitext-2", data_dir=str(wikitext2_dir), cache_dir=str(wt2_cache_dir),
                            batch_size=8, tgt_len=64)
    dm.prepare_data()
    dm.setup("fit")
    return dm


SYNTHETIC_SPLITS = {
    "train": " = Heading = \n\n the cat sat on the mat . \n a dog ,  and\tthe cat . \n\n the end \n",
    "valid": " = Other = \n the bird sat . \n\n the mat \n",
    "test": " the unseen zebra sat . \n the cat \n",
}


def write_corpus(folder: Path, splits: dict[str, str] = SYNTHETIC_SPLITS) -> Path:
    """Writes ``wiki.{split}.tokens`` files with the given texts into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in splits.items():
        (folder / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def synthetic_dir(tmp_path: Path) -> Path:
    """A tiny WikiText-format corpus (tabs, double spaces and blank lines included)."""
    return write_corpus(tmp_path / "text")
