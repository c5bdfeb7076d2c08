"""WikiText text -> token ids, cached once on disk.

Text comes through Hugging Face ``datasets`` in both cases: the hub dataset ``Salesforce/wikitext`` (optionally
streamed) or a local folder of ``wiki.{train,valid,test}.tokens`` files read by the ``text`` builder, so the two
paths share every line of the encoder. Tokenisation is the paper's: split each line on whitespace and append one
end-of-line token, blank lines included.

Splitting, counting and the word -> id lookup run as Arrow compute kernels over batches of lines (C++), not as a
Python loop per word: that is what makes WikiText-103 (103M tokens) take minutes rather than an hour on 2 cores.

The cache holds, per dataset source, ``vocab.txt`` and one ``{split}-{vocab hash}.u32`` file of little-endian
uint32 ids per split, each with a JSON manifest written after the data. A file is only ever renamed into place
complete, and it is trusted only while its manifest names the same source files, vocabulary, format version and
content hash, so a cache killed mid-write or made stale by new data is rebuilt rather than used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock

from datamodules.atomic import atomic_file, atomic_write_bytes
from datamodules.vocab import Vocabulary

log = logging.getLogger(__name__)

HUB_REPO = "Salesforce/wikitext"
HUB_CONFIGS = {"wikitext-103": "wikitext-103-v1", "wikitext-2": "wikitext-2-v1"}
SPLITS = ("train", "valid", "test")
_HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
CACHE_FORMAT_VERSION = 1
LINES_PER_BATCH = 100_000
TOKEN_DTYPE = np.dtype("<u4")


def split_words(lines: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Whitespace-splits a batch of lines: (every word in order, number of words on each line)."""
    pieces = pc.utf8_split_whitespace(lines)
    words = pc.list_flatten(pieces)
    line_of_word = pc.list_parent_indices(pieces)
    # Arrow keeps an empty piece for leading/trailing whitespace; str.split() does not.
    nonempty = pc.greater(pc.binary_length(words), 0)
    words_per_line = np.bincount(line_of_word.filter(nonempty).to_numpy(), minlength=len(lines))
    return words.filter(nonempty), words_per_line


def with_end_of_lines(word_ids: np.ndarray, words_per_line: np.ndarray, eos_id: int) -> np.ndarray:
    """The ids of a batch of lines: each line's word ids followed by one end-of-line id."""
    out = np.empty(len(word_ids) + len(words_per_line), dtype=TOKEN_DTYPE)
    line_of_word = np.repeat(np.arange(len(words_per_line)), words_per_line)
    out[np.arange(len(word_ids)) + line_of_word] = word_ids  # word k of line j lands at k + j
    out[np.cumsum(words_per_line + 1) - 1] = eos_id
    return out


def encode_lines(lines: pa.Array, vocab: Vocabulary) -> np.ndarray:
    """Token ids of a batch of lines, one end-of-line id after each line; unknown words map to ``<unk>``."""
    words, words_per_line = split_words(lines)
    ids = pc.index_in(words, value_set=vocab.arrow_tokens).fill_null(vocab.unk_id)
    return with_end_of_lines(ids.to_numpy(zero_copy_only=False), words_per_line, vocab.eos_id)


def build_vocabulary_and_encode(line_batches: Iterable[pa.Array]) -> tuple[Vocabulary, Iterator[np.ndarray]]:
    """One pass over the train split for both its vocabulary and its ids: each word is hashed once.

    Every batch is dictionary-encoded, the batch dictionaries are unified, the frequencies are a bincount of
    the indices, and the ids are the indices remapped to the frequency-sorted vocabulary.
    """
    encoded, words_per_line = [], []
    for lines in line_batches:
        words, per_line = split_words(lines)
        encoded.append(pc.dictionary_encode(words))
        words_per_line.append(per_line)
    if not encoded:
        return Vocabulary.from_counts([], []), iter(())
    unified = pa.chunked_array(encoded).unify_dictionaries()
    dictionary = unified.chunk(0).dictionary
    indices = [chunk.indices.to_numpy(zero_copy_only=False) for chunk in unified.chunks]
    counts = sum(np.bincount(ix, minlength=len(dictionary)) for ix in indices)
    vocab = Vocabulary.from_counts(dictionary.to_pylist(), counts.tolist())
    to_vocab = pc.index_in(dictionary, value_set=vocab.arrow_tokens).to_numpy(zero_copy_only=False)
    ids = (with_end_of_lines(to_vocab[ix], per_line, vocab.eos_id)
           for ix, per_line in zip(indices, words_per_line, strict=True))
    return vocab, ids


@dataclass(frozen=True)
class WikiTextSource:
    """Where one WikiText variant's text comes from: a local folder of ``wiki.*.tokens`` files, or the hub."""

    name: str
    data_dir: Path | None = None
    streaming: bool = False
    hf_cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.name not in HUB_CONFIGS:
            raise ValueError(f"unknown dataset name {self.name!r}: choose one of {', '.join(HUB_CONFIGS)}")

    @property
    def cache_key(self) -> str:
        """Folder name of this source's cache: the dataset, and which local folder (by path) or the hub."""
        if self.data_dir is None:
            return f"{self.name}-hub"
        path_hash = hashlib.sha1(str(self.data_dir.resolve()).encode()).hexdigest()[:10]
        return f"{self.name}-local-{path_hash}"

    def split_file(self, split: str) -> Path:
        """The local file of ``split`` (only for a local source)."""
        assert self.data_dir is not None
        return self.data_dir / f"wiki.{split}.tokens"

    def check(self) -> None:
        """Fails early, naming the problem and the fix, if a local folder cannot supply all three splits."""
        if self.data_dir is None:
            return
        fix = "pass data_dir= the folder holding wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens"
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"data_dir {str(self.data_dir)!r} does not exist: {fix} (or data_dir=None "
                                    "to download from the Hugging Face hub)")
        missing = [f"wiki.{s}.tokens" for s in SPLITS if not self.split_file(s).is_file()]
        if len(missing) == len(SPLITS):
            raise FileNotFoundError(f"data_dir {str(self.data_dir)!r} holds no WikiText files: {fix}")
        if missing:
            raise FileNotFoundError(f"data_dir {str(self.data_dir)!r} is missing {', '.join(missing)}: {fix}")
        for split in SPLITS:
            if self.split_file(split).stat().st_size == 0:
                raise ValueError(f"{self.split_file(split)} is empty: re-copy the WikiText {split} split")

    def fingerprint(self, split: str) -> str:
        """Identifies the text of ``split``; a cache built from other text carries another fingerprint."""
        if self.data_dir is None:
            return f"hub:{HUB_REPO}:{HUB_CONFIGS[self.name]}:{_HUB_SPLITS[split]}"
        stat = self.split_file(split).stat()
        return f"file:{stat.st_size}:{stat.st_mtime_ns}"

    def line_batches(self, split: str) -> Iterator[pa.Array]:
        """The lines of ``split`` in order, as Arrow string arrays of up to ``LINES_PER_BATCH`` lines."""
        try:  # datasets may meet bad bytes while loading (materialised) or while iterating (streaming)
            dataset = self._load(split)
            for table in dataset.with_format("arrow").iter(batch_size=LINES_PER_BATCH):
                yield table.column("text").combine_chunks()
        except Exception as error:
            if _caused_by(error, UnicodeDecodeError):
                where = self.split_file(split) if self.data_dir is not None else f"the hub's {split} split"
                raise ValueError(f"{where} is not UTF-8 text: re-copy the WikiText file") from error
            raise

    def _load(self, split: str):  # -> datasets.Dataset | datasets.IterableDataset
        import datasets

        cache_dir = None if self.hf_cache_dir is None else str(self.hf_cache_dir)
        if self.data_dir is not None:
            files = {split: str(self.split_file(split))}
            return datasets.load_dataset("text", data_files=files, split=split, streaming=self.streaming,
                                         cache_dir=cache_dir)
        config = HUB_CONFIGS[self.name]
        try:
            return datasets.load_dataset(HUB_REPO, config, split=_HUB_SPLITS[split], streaming=self.streaming,
                                         cache_dir=cache_dir)
        except (ConnectionError, OSError) as error:
            raise ConnectionError(
                f"could not reach the Hugging Face hub for {HUB_REPO} ({config}): {error}. Without network access, "
                "pass data_dir= a local folder holding wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens"
            ) from error


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``error`` or anything in its cause/context chain is a ``kind``."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class CorpusCache:
    """The on-disk vocabulary and token-id files of one WikiText source under ``root``."""

    def __init__(self, source: WikiTextSource, root: Path) -> None:
        self.source = source
        self.dir = Path(root).expanduser() / source.cache_key
        self._lock_depth = 0  # the lock is taken per use (a FileLock cannot be pickled to spawned processes)

    @property
    def vocab_path(self) -> Path:
        return self.dir / "vocab.txt"

    def tokens_path(self, split: str, vocab: Vocabulary) -> Path:
        """File of ``split``'s ids under ``vocab``: keyed by dataset source, split and vocabulary hash."""
        return self.dir / f"{split}-{vocab.sha256[:16]}.u32"

    def prepare(self) -> Vocabulary:
        """Builds whatever is missing or stale (vocabulary, then each split's ids) and returns the vocabulary."""
        with self._locked():
            vocab = self.prepare_vocabulary()
            for split in SPLITS:
                path = self.tokens_path(split, vocab)
                if not self._is_valid(path, self._tokens_manifest(split, vocab), verify_content=True):
                    log.info("encoding the %s %s split into %s", self.source.name, split, path)
                    self._write_ids(path, split, vocab, map(partial(encode_lines, vocab=vocab),
                                                            self.source.line_batches(split)))
        return vocab

    def prepare_vocabulary(self) -> Vocabulary:
        """The cached vocabulary, built from the train split first if it is missing or stale (the train ids
        are cached in the same pass)."""
        with self._locked():
            vocab = self._valid_vocab()
            if vocab is None:
                log.info("building the %s vocabulary and train ids from its train split", self.source.name)
                vocab, train_ids = build_vocabulary_and_encode(self.source.line_batches("train"))
                self._write_ids(self.tokens_path("train", vocab), "train", vocab, train_ids)
                vocab.save(self.vocab_path)
                self._write_manifest(self.vocab_path, self._vocab_manifest(vocab))
        return vocab

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Checks the source, then holds this cache's inter-process lock (re-entrant within a process).

        Processes building the same cache (DDP ranks reading ``vocab_size``, sweep agents) take turns: the first
        builds, the others wait and then find it valid.
        """
        self.source.check()
        if self._lock_depth == 0:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.dir) + ".lock")
        else:
            lock = nullcontext()
        self._lock_depth += 1
        try:
            with lock:
                yield
        finally:
            self._lock_depth -= 1

    def load(self) -> tuple[Vocabulary, dict[str, np.memmap]]:
        """Opens a prepared cache: the vocabulary and a read-only memmap of each split's ids."""
        vocab = self._valid_vocab()
        if vocab is None:
            raise FileNotFoundError(f"no prepared vocabulary in {self.dir}: call prepare_data() before setup()")
        tokens = {}
        for split in SPLITS:
            path = self.tokens_path(split, vocab)
            if not self._is_valid(path, self._tokens_manifest(split, vocab), verify_content=False):
                raise FileNotFoundError(f"no prepared {split} token cache at {path}: call prepare_data() first")
            tokens[split] = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        return vocab, tokens

    def _valid_vocab(self) -> Vocabulary | None:
        manifest = _read_manifest(self._manifest_path(self.vocab_path))
        if manifest is None or not self.vocab_path.is_file():
            return None
        vocab = Vocabulary.load(self.vocab_path)
        return vocab if manifest == self._vocab_manifest(vocab) else None

    def _vocab_manifest(self, vocab: Vocabulary) -> dict:
        return {"format": CACHE_FORMAT_VERSION, "dataset": self.source.name,
                "source": self.source.fingerprint("train"), "size": len(vocab), "sha256": vocab.sha256}

    def _tokens_manifest(self, split: str, vocab: Vocabulary) -> dict:
        return {"format": CACHE_FORMAT_VERSION, "dataset": self.source.name, "split": split,
                "source": self.source.fingerprint(split), "vocab_sha256": vocab.sha256}

    @staticmethod
    def _manifest_path(path: Path) -> Path:
        return path.with_name(path.name + ".json")

    def _is_valid(self, path: Path, expected: dict, verify_content: bool) -> bool:
        manifest = _read_manifest(self._manifest_path(path))
        if manifest is None or not path.is_file():
            return False
        if any(manifest.get(key) != value for key, value in expected.items()):
            return False
        if path.stat().st_size != manifest["num_tokens"] * TOKEN_DTYPE.itemsize:
            return False
        return not verify_content or _file_sha256(path) == manifest["sha256"]

    def _write_manifest(self, path: Path, manifest: dict) -> None:
        atomic_write_bytes(self._manifest_path(path), json.dumps(manifest, indent=1).encode())

    def _write_ids(self, path: Path, split: str, vocab: Vocabulary, chunks: Iterable[np.ndarray]) -> None:
        self._manifest_path(path).unlink(missing_ok=True)
        digest, num_tokens = hashlib.sha256(), 0
        with atomic_file(path) as f:
            for ids in chunks:
                digest.update(ids.data)
                f.write(ids.data)
                num_tokens += len(ids)
            if num_tokens == 0:
                raise ValueError(f"the {self.source.name} {split} split has no text")
        manifest = self._tokens_manifest(split, vocab) | {"num_tokens": num_tokens, "sha256": digest.hexdigest()}
        self._write_manifest(path, manifest)
