"""Text -> ids: the Arrow encoder against plain Python, the token cache's life cycle, and bad input."""

from __future__ import annotations

import collections
import itertools
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from datamodules import corpus
from datamodules.corpus import CorpusCache, WikiTextSource, build_vocabulary_and_encode, encode_lines
from datamodules.vocab import Vocabulary
from tests.conftest import write_corpus


def python_encode(lines: list[str], vocab: Vocabulary) -> np.ndarray:
    """The reference: str.split() per line, one end-of-line id after each."""
    return np.asarray([i for line in lines for i in vocab.encode(line)], dtype=np.uint32)


TRICKY_LINES = [" = Title = ", "", " ", "a  b\tc ", "\u3000wide\u00a0space\u2009thin ", "a", "  b  b  "]


def test_arrow_encoder_equals_python_split_on_tricky_whitespace():
    vocab, ids = build_vocabulary_and_encode([pa.array(TRICKY_LINES[:3]), pa.array(TRICKY_LINES[3:])])
    python_counts = {}
    for line in TRICKY_LINES:
        for word in line.split():
            python_counts[word] = python_counts.get(word, 0) + 1
    assert vocab.itos == Vocabulary.from_counts(python_counts.keys(), python_counts.values()).itos
    np.testing.assert_array_equal(np.concatenate(list(ids)), python_encode(TRICKY_LINES, vocab))
    np.testing.assert_array_equal(encode_lines(pa.array(TRICKY_LINES), vocab), python_encode(TRICKY_LINES, vocab))


def test_whitespace_is_exactly_what_str_split_splits_on():
    assert set(corpus.WHITESPACE) == {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}


# every whitespace character, control characters that are not whitespace, characters that share a UTF-8 lead byte
# with wide whitespace, a 4-byte character, and the two special tokens written out in the text
ALPHABET = [*corpus.WHITESPACE, " ", " ", " ", "\x00", "\x01", "\x1b", "\x7f", "\u00a9", "\u2019", "\u2013",
            "\u1681", "\u3001", "\U0001f600", "a", "b", "c", "é", "</s>", "<unk>"]


def random_lines(rng: np.random.Generator, count: int, alphabet: list[str]) -> list[str]:
    return ["".join(rng.choice(alphabet, size=rng.integers(0, 12))) for _ in range(count)]


def python_vocabulary(lines: list[str]) -> Vocabulary:
    counts = collections.Counter(word for line in lines for word in line.split())
    return Vocabulary.from_counts(counts.keys(), counts.values())


@pytest.mark.parametrize("alphabet", [ALPHABET, [" ", " ", "a", "b", "é", "\u2019"]], ids=["any", "plain"])
def test_byte_level_encoder_equals_plain_python_on_random_text(alphabet: list[str]):
    rng = np.random.default_rng(0)
    lines = random_lines(rng, 3000, alphabet)
    # many batches (more than are ever in flight), one sliced, one large_string, one empty, one with a null line
    cuts = [0, 1, 2, 250, 500, 500, 1000, 1500, 1800, 2000, 2200, 2400, 2600, 2800, 3000]
    batches = [pa.array(lines[a:b]) for a, b in itertools.pairwise(cuts)]
    batches[3] = pa.array(["x", *lines[cuts[3]:cuts[4]], "y"]).slice(1, cuts[4] - cuts[3])
    batches[4] = batches[4].cast(pa.large_string())
    batches.append(pa.array(["a b", None, " c"]))
    lines += ["a b", "", " c"]
    vocab, ids = build_vocabulary_and_encode(batches)
    assert vocab.itos == python_vocabulary(lines).itos
    np.testing.assert_array_equal(np.concatenate(list(ids)), python_encode(lines, vocab))
    np.testing.assert_array_equal(np.concatenate([encode_lines(b, vocab) for b in batches]),
                                  python_encode(lines, vocab))


@pytest.mark.parametrize("lines", [["ab", "cd", "", "ef"], ["a", "", "", "b "], [""], ["", " ", "\t"], []])
def test_words_touching_across_lines_and_empty_lines(lines: list[str]):
    vocab = python_vocabulary(lines)
    built, ids = build_vocabulary_and_encode([pa.array(lines, type=pa.string())])
    assert built.itos == vocab.itos
    np.testing.assert_array_equal(np.concatenate([np.empty(0, np.uint32), *ids]), python_encode(lines, vocab))
    np.testing.assert_array_equal(encode_lines(pa.array(lines, type=pa.string()), vocab), python_encode(lines, vocab))


def test_text_with_only_ascii_spacing_takes_the_fast_path(monkeypatch):
    def fail(data):
        raise AssertionError("plain text was cut again with the exact whitespace test")

    monkeypatch.setattr(corpus, "_exact_whitespace", fail)
    lines = [" = Title = ", "", " a  b\tc \r", "d\ne\x0bf\x0cg\x1ch\x1fi", "caf\u00e9 \u2019s"]
    vocab, ids = build_vocabulary_and_encode([pa.array(lines)])
    assert vocab.itos == python_vocabulary(lines).itos
    np.testing.assert_array_equal(np.concatenate(list(ids)), python_encode(lines, vocab))


def test_threaded_map_keeps_order_and_raises_what_a_batch_raised():
    assert list(corpus._map_in_threads(lambda x: x * x, range(100))) == [x * x for x in range(100)]

    def fails_on_7(x: int) -> int:
        if x == 7:
            raise ValueError("batch 7")
        return x

    with pytest.raises(ValueError, match="batch 7"):
        list(corpus._map_in_threads(fails_on_7, range(100)))


def test_arrow_encoder_equals_python_on_real_wikitext(wt2, wikitext2_dir: Path):
    for split in ("train", "valid"):  # train ids come from the one-pass builder, valid from encode_lines
        lines = (wikitext2_dir / f"wiki.{split}.tokens").read_text(encoding="utf-8").split("\n")[:-1]
        expected = python_encode(lines, wt2.vocab)
        np.testing.assert_array_equal(encode_lines(pa.array(lines), wt2.vocab), expected)
        np.testing.assert_array_equal(np.asarray(wt2._split_tokens(split)), expected)


def test_streaming_and_materialised_paths_give_identical_ids(wt2, wikitext2_dir: Path, tmp_path: Path):
    streamed = CorpusCache(WikiTextSource("wikitext-2", wikitext2_dir, streaming=True), tmp_path)
    vocab = streamed.prepare()
    assert vocab.itos == wt2.vocab.itos
    _, tokens = streamed.load()
    for split in corpus.SPLITS:
        np.testing.assert_array_equal(np.asarray(tokens[split]), np.asarray(wt2._split_tokens(split)))


def prepared(synthetic_dir: Path, root: Path) -> tuple[CorpusCache, Vocabulary]:
    cache = CorpusCache(WikiTextSource("wikitext-2", synthetic_dir), root)
    return cache, cache.prepare()


def test_cache_is_reused_without_reencoding(synthetic_dir: Path, tmp_path: Path, monkeypatch):
    cache, vocab = prepared(synthetic_dir, tmp_path)
    paths = [cache.tokens_path(s, vocab) for s in corpus.SPLITS]
    inodes = [p.stat().st_ino for p in paths]

    def fail(*args, **kwargs):
        raise AssertionError("a valid cache was encoded again")

    monkeypatch.setattr(corpus, "encode_lines", fail)
    monkeypatch.setattr(corpus, "build_vocabulary_and_encode", fail)
    again = CorpusCache(WikiTextSource("wikitext-2", synthetic_dir), tmp_path)
    assert again.prepare().itos == vocab.itos
    assert [p.stat().st_ino for p in paths] == inodes


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "drop_manifest", "garble_manifest", "old_format"])
def test_damaged_cache_is_detected_and_rebuilt(synthetic_dir: Path, tmp_path: Path, damage: str):
    cache, vocab = prepared(synthetic_dir, tmp_path)
    path = cache.tokens_path("train", vocab)
    manifest = path.with_name(path.name + ".json")
    good = path.read_bytes()
    if damage == "flip_byte":
        path.write_bytes(good[:4] + bytes([good[4] ^ 0xFF]) + good[5:])
    elif damage == "truncate":
        path.write_bytes(good[:-4])
    elif damage == "drop_manifest":
        manifest.unlink()
    elif damage == "garble_manifest":
        manifest.write_text("{not json")
    else:
        manifest.write_text(manifest.read_text().replace('"format": 1', '"format": 0'))
    if damage in ("truncate", "drop_manifest", "garble_manifest", "old_format"):
        with pytest.raises(FileNotFoundError, match="prepare_data"):
            cache.load()
    cache.prepare()
    assert path.read_bytes() == good
    _, tokens = cache.load()
    assert bytes(np.asarray(tokens["train"]).data) == good


def test_a_write_killed_midway_leaves_no_usable_file(synthetic_dir: Path, tmp_path: Path, monkeypatch):
    cache = CorpusCache(WikiTextSource("wikitext-2", synthetic_dir), tmp_path)
    real_encode = corpus.encode_lines
    calls = {"n": 0}

    def dies_in_valid_split(lines, vocab):
        calls["n"] += 1  # train is encoded with the vocabulary; valid is the first split encoded on its own
        if calls["n"] == 1:
            raise KeyboardInterrupt  # stands in for a kill during the valid split
        return real_encode(lines, vocab)

    monkeypatch.setattr(corpus, "encode_lines", dies_in_valid_split)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare()
    vocab = Vocabulary.load(cache.vocab_path)
    assert cache.tokens_path("train", vocab).exists()
    assert not cache.tokens_path("valid", vocab).exists()
    assert not list(cache.dir.glob(".*.tmp")), "temporary files must be cleaned up"
    monkeypatch.setattr(corpus, "encode_lines", real_encode)
    cache.prepare()
    assert len(cache.load()[1]["valid"]) > 0


def test_changed_source_text_makes_the_cache_stale(synthetic_dir: Path, tmp_path: Path):
    cache, vocab = prepared(synthetic_dir, tmp_path)
    write_corpus(synthetic_dir, {"test": " the cat sat on the mat again and again . \n"})
    cache.prepare()
    _, tokens = cache.load()
    assert vocab.decode(tokens["test"].tolist()) == "the cat sat on the mat <unk> and <unk> .\n"


def test_new_train_text_rebuilds_the_vocabulary(synthetic_dir: Path, tmp_path: Path):
    cache, vocab = prepared(synthetic_dir, tmp_path)
    write_corpus(synthetic_dir, {"train": " zebra zebra zebra the \n"})
    new_vocab = cache.prepare()
    assert new_vocab.itos[:4] == ["<unk>", "</s>", "zebra", "the"]
    assert cache.tokens_path("valid", new_vocab) != cache.tokens_path("valid", vocab)


def test_missing_data_dir(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*data_dir"):
        CorpusCache(WikiTextSource("wikitext-2", tmp_path / "nowhere"), tmp_path).prepare()


def test_empty_data_dir(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no WikiText files"):
        CorpusCache(WikiTextSource("wikitext-2", tmp_path / "empty"), tmp_path).prepare()


def test_missing_split_file(synthetic_dir: Path, tmp_path: Path):
    (synthetic_dir / "wiki.valid.tokens").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing wiki\.valid\.tokens"):
        CorpusCache(WikiTextSource("wikitext-2", synthetic_dir), tmp_path).prepare()


def test_empty_split_file(synthetic_dir: Path, tmp_path: Path):
    (synthetic_dir / "wiki.test.tokens").write_text("")
    with pytest.raises(ValueError, match=r"wiki\.test\.tokens is empty"):
        CorpusCache(WikiTextSource("wikitext-2", synthetic_dir), tmp_path).prepare()


@pytest.mark.parametrize("streaming", [False, True])
def test_non_utf8_file(synthetic_dir: Path, tmp_path: Path, streaming: bool):
    (synthetic_dir / "wiki.valid.tokens").write_bytes(b" caf\xe9 au lait \n")
    with pytest.raises(ValueError, match=r"wiki\.valid\.tokens is not UTF-8"):
        CorpusCache(WikiTextSource("wikitext-2", synthetic_dir, streaming), tmp_path).prepare()


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match=r"unknown dataset name 'wikitext-3'.*wikitext-103, wikitext-2"):
        WikiTextSource("wikitext-3")


def test_unreachable_hub_says_to_pass_a_local_data_dir(tmp_path: Path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = CorpusCache(WikiTextSource("wikitext-2", None, hf_cache_dir=tmp_path / "hf"), tmp_path)
    with pytest.raises(ConnectionError, match=r"could not reach the Hugging Face hub.*pass data_dir="):
        cache.prepare()


def _prepare_in_another_process(data_dir: str, root: str) -> int:
    cache = CorpusCache(WikiTextSource("wikitext-2", Path(data_dir)), Path(root))
    return len(cache.prepare())


def test_concurrent_preparations_end_with_one_valid_cache(wikitext2_dir: Path, tmp_path: Path):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        sizes = pool.starmap(_prepare_in_another_process, [(str(wikitext2_dir), str(tmp_path))] * 2)
    assert sizes == [33278, 33278]
    cache = CorpusCache(WikiTextSource("wikitext-2", wikitext2_dir), tmp_path)
    assert all(cache._is_valid(cache.tokens_path(s, cache.load()[0]),
                               cache._tokens_manifest(s, cache.load()[0]), verify_content=True) for s in corpus.SPLITS)
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file is left behind"
