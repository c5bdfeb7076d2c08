"""WikiText text -> token ids, cached once on disk.

Text comes through Hugging Face ``datasets`` in both cases: the hub dataset ``Salesforce/wikitext`` (optionally
streamed) or a local folder of ``wiki.{train,valid,test}.tokens`` files read by the ``text`` builder, so the two
paths share every line of the encoder. Tokenisation is the paper's: split each line on whitespace and append one
end-of-line token, blank lines included.

Nothing runs a Python loop per word. A batch of lines is cut into words at the byte level with numpy (a word and
the whitespace after it make one entry, and each line end one entry of whitespace only), Arrow dictionary-encodes
the entries, so each word is hashed once, and the word -> id lookup is a numpy index into the ids of the distinct
entries. Batches are encoded on a few threads at once (both libraries release the GIL).

The cache holds, per dataset source, ``vocab.txt`` and one ``{split}-{vocab hash}.u32`` file of little-endian
uint32 ids per split, each with a JSON manifest written after the data. A file is only ever renamed into place
complete, and it is trusted only while its manifest names the same source files, vocabulary, format version and
content hash, so a cache killed mid-write or made stale by new data is rebuilt rather than used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock

from datamodules.atomic import atomic_file, atomic_write_bytes
from datamodules.vocab import Vocabulary

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

HUB_REPO = "Salesforce/wikitext"
HUB_CONFIGS = {"wikitext-103": "wikitext-103-v1", "wikitext-2": "wikitext-2-v1"}
SPLITS = ("train", "valid", "test")
_HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
CACHE_FORMAT_VERSION = 1
LINES_PER_BATCH = 100_000
TOKEN_DTYPE = np.dtype("<u4")
MAX_WORKERS = 4  # threads that encode batches of lines at once (at most the usable cores)

# The characters str.split() splits on (str.isspace()); a test checks the list against Python's.
WHITESPACE = ("\t\n\v\f\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
              + "\u2028\u2029\u202f\u205f\u3000")
_ASCII_WHITESPACE = np.zeros(256, dtype=bool)
_ASCII_WHITESPACE[[ord(c) for c in WHITESPACE if c.isascii()]] = True
_WIDE_WHITESPACE = np.array([ord(c) for c in WHITESPACE if not c.isascii()])
_WIDE_WHITESPACE_LEADS = np.array(sorted({c.encode()[0] for c in WHITESPACE if not c.isascii()}), dtype=np.uint8)
# The fast test takes a byte for whitespace iff it is <= 0x20, which misreads these characters: the other control
# characters and the whitespace beyond ASCII. A batch holding any of them is cut again with the exact test.
_FAST_MISREADS = [c for c in map(chr, range(0x21)) if c not in WHITESPACE] + [c for c in WHITESPACE if c > " "]
_FAST_MISREAD_PATTERN = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in _FAST_MISREADS) + "]"


def _fast_whitespace(data: np.ndarray) -> np.ndarray:
    """Which bytes of UTF-8 ``data`` are whitespace, exact for text without a misread character."""
    return data <= 0x20


def _exact_whitespace(data: np.ndarray) -> np.ndarray:
    """Which bytes of UTF-8 ``data`` belong to a whitespace character, as ``str.split()`` has it."""
    whitespace = _ASCII_WHITESPACE[data]
    leads = np.flatnonzero(np.isin(data, _WIDE_WHITESPACE_LEADS))
    if len(leads) == 0:
        return whitespace
    last = len(data) - 1  # valid UTF-8: a lead byte is followed by all its continuation bytes
    b0, b1, b2 = (data[np.minimum(leads + k, last)].astype(np.int32) for k in range(3))
    three_bytes = b0 >= 0xE0
    code_points = np.where(three_bytes, ((b0 & 0x0F) << 12) | ((b1 & 0x3F) << 6) | (b2 & 0x3F),
                           ((b0 & 0x1F) << 6) | (b1 & 0x3F))
    hit = np.isin(code_points, _WIDE_WHITESPACE)
    whitespace[leads[hit]] = whitespace[leads[hit] + 1] = True
    whitespace[leads[hit & three_bytes] + 2] = True
    return whitespace


def _entry_starts(whitespace: np.ndarray, line_ends: np.ndarray) -> np.ndarray:
    """Where the entries of a batch start: at every word, and at every line end (that line's end-of-line entry,
    which comes before a word starting at the same byte). The first starts at 0, taking in leading whitespace."""
    starts = np.flatnonzero(whitespace[:-1] > whitespace[1:]) + 1
    if len(whitespace) and not whitespace[0]:
        starts = np.concatenate([[0], starts])
    # a line that starts with a word right after a line that ended with one: no whitespace marks that start
    inner = line_ends[:-1][(line_ends[:-1] > 0) & (line_ends[:-1] < len(whitespace))]
    joined = inner[~whitespace[inner - 1] & ~whitespace[inner]]
    if len(joined):
        starts = np.union1d(starts, joined)
    starts = np.insert(starts, np.searchsorted(starts, line_ends), line_ends)
    starts[0] = 0
    return starts


def _line_entries(lines: pa.Array, is_whitespace: Callable[[np.ndarray], np.ndarray]) -> pa.Array:
    """The lines cut into entries without copying their text: each word with the whitespace after it, and after
    each line's last word one entry of whitespace only (often empty) that stands for the end of the line."""
    offset_type = np.int64 if pa.types.is_large_string(lines.type) else np.int32
    _, offsets_buffer, data_buffer = lines.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[lines.offset:lines.offset + len(lines) + 1]
    base = int(offsets[0])
    data_buffer = data_buffer if data_buffer is not None else pa.py_buffer(b"")
    data = np.frombuffer(data_buffer, dtype=np.uint8)[base:int(offsets[-1])]
    starts = _entry_starts(is_whitespace(data), offsets[1:] - base)
    entry_offsets = np.append(starts, len(data)).astype(offset_type) + offset_type(base)
    return pa.Array.from_buffers(lines.type, len(starts), [None, pa.py_buffer(entry_offsets), data_buffer])


def _plain_strings(lines: pa.Array) -> pa.Array:
    """``lines`` as a string or large-string array without nulls (a null line counts as an empty one)."""
    if not (pa.types.is_string(lines.type) or pa.types.is_large_string(lines.type)):
        lines = lines.cast(pa.large_string())
    return lines.fill_null("") if lines.null_count else lines


def dictionary_encode_lines(lines: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A batch of lines as dictionary-encoded entries: (the distinct entries, the index of each entry in order).

    The entries are each word with the whitespace after it and, after each line's words, one entry of whitespace
    only for the line end; :func:`entry_words` turns them into ``str.split()``'s words, and line ends into ``""``.
    Cutting at bytes and hashing each entry once is what keeps the encoder free of per-word Python.
    """
    lines = _plain_strings(lines)
    if len(lines) == 0:
        return pa.array([], type=lines.type), np.empty(0, dtype=np.int32)
    encoded = pc.dictionary_encode(_line_entries(lines, _fast_whitespace))
    if pc.any(pc.match_substring_regex(encoded.dictionary, _FAST_MISREAD_PATTERN)).as_py():
        encoded = pc.dictionary_encode(_line_entries(lines, _exact_whitespace))
    return encoded.dictionary, encoded.indices.to_numpy(zero_copy_only=False)


def entry_words(entries: pa.Array) -> pa.Array:
    """The word of each entry of :func:`dictionary_encode_lines`: ``""`` for a line end."""
    return pc.utf8_trim(entries, characters=WHITESPACE)


def _word_ids(words: pa.Array, vocab: Vocabulary) -> np.ndarray:
    """The id of each word (``<unk>``'s if unknown); the empty word, a line end, gets the end-of-line id."""
    ids = pc.index_in(words, value_set=vocab.arrow_tokens).fill_null(vocab.unk_id)
    ids = ids.to_numpy(zero_copy_only=False).astype(TOKEN_DTYPE)
    ids[pc.binary_length(words).to_numpy(zero_copy_only=False) == 0] = vocab.eos_id
    return ids


def encode_lines(lines: pa.Array, vocab: Vocabulary) -> np.ndarray:
    """Token ids of a batch of lines, one end-of-line id after each line; unknown words map to ``<unk>``."""
    entries, indices = dictionary_encode_lines(lines)
    return _word_ids(entry_words(entries), vocab)[indices]


def _count_entries(lines: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """:func:`dictionary_encode_lines`, plus how often each distinct entry occurs."""
    entries, indices = dictionary_encode_lines(lines)
    return entries, indices, np.bincount(indices, minlength=len(entries))


def build_vocabulary_and_encode(line_batches: Iterable[pa.Array]) -> tuple[Vocabulary, Iterator[np.ndarray]]:
    """One pass over the train split for both its vocabulary and its ids: each word is hashed once.

    Each batch is dictionary-encoded on its own (a few at a time, on threads); the batch dictionaries are merged
    into the distinct words, whose summed counts give the vocabulary, and a batch's ids are its indices looked up
    in the ids of its dictionary's words.
    """
    batches = list(_map_in_threads(_count_entries, line_batches))
    if not batches:
        return Vocabulary.from_counts([], []), iter(())
    all_entries = pa.concat_arrays([entries.cast(pa.large_string()) for entries, _, _ in batches])
    merged = pc.dictionary_encode(entry_words(all_entries))
    words, word_of_entry = merged.dictionary, merged.indices.to_numpy(zero_copy_only=False)
    # float weights are exact for counts below 2**53
    counts = np.bincount(word_of_entry, weights=np.concatenate([c for _, _, c in batches]), minlength=len(words))
    is_word = pc.binary_length(words).to_numpy(zero_copy_only=False) > 0  # the rest is "", the line end
    vocab = Vocabulary.from_counts(words.filter(pa.array(is_word)).to_pylist(),
                                   counts[is_word].astype(np.int64).tolist())
    ids_of_entries = _word_ids(words, vocab)[word_of_entry]
    batch_ends = np.cumsum([len(entries) for entries, _, _ in batches])[:-1]
    tables = zip(np.split(ids_of_entries, batch_ends), (indices for _, indices, _ in batches), strict=True)
    return vocab, _map_in_threads(_look_up, tables)


def _look_up(table_and_indices: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    table, indices = table_and_indices
    return table[indices]


def _worker_count() -> int:
    """The cores this process may use, up to ``MAX_WORKERS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def _map_in_threads(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``map(fn, items)`` on a few threads, in order, with at most a few items in flight (memory stays flat).

    Threads pay off because the per-batch work is Arrow and numpy kernels, which release the GIL.
    """
    workers = _worker_count()
    if workers == 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="headprune-encode")
    try:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
                "pass data_dir= (or set WIKITEXT_DIR to) a local folder holding wiki.train.tokens, wiki.valid.tokens "
                "and wiki.test.tokens"
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
            vocab, built = self._prepare_vocabulary()
            for split in SPLITS:
                if split == "train" and built:
                    continue  # written and hashed just now, in the vocabulary's pass: no need to read it back
                path = self.tokens_path(split, vocab)
                if not self._is_valid(path, self._tokens_manifest(split, vocab), verify_content=True):
                    log.info("encoding the %s %s split into %s", self.source.name, split, path)
                    self._write_ids(path, split, vocab, _map_in_threads(partial(encode_lines, vocab=vocab),
                                                                        self.source.line_batches(split)))
        return vocab

    def prepare_vocabulary(self) -> Vocabulary:
        """The cached vocabulary, built from the train split first if it is missing or stale (the train ids
        are cached in the same pass)."""
        return self._prepare_vocabulary()[0]

    def _prepare_vocabulary(self) -> tuple[Vocabulary, bool]:
        """:meth:`prepare_vocabulary`, and whether it built the vocabulary (and the train ids) just now."""
        with self._locked():
            vocab = self._valid_vocab()
            if vocab is not None:
                return vocab, False
            log.info("building the %s vocabulary and train ids from its train split", self.source.name)
            vocab, train_ids = build_vocabulary_and_encode(self.source.line_batches("train"))
            self._write_ids(self.tokens_path("train", vocab), "train", vocab, train_ids)
            vocab.save(self.vocab_path)
            self._write_manifest(self.vocab_path, self._vocab_manifest(vocab))
            return vocab, True

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
