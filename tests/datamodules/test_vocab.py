"""The word-level vocabulary: layout, frequency order, round trips."""

from pathlib import Path

import pytest

from datamodules.vocab import EOS, UNK, Vocabulary


def test_from_counts_puts_unk_and_eos_first_then_sorts_by_frequency_then_text():
    vocab = Vocabulary.from_counts(["b", "a", "<unk>", "c", "d"], [2, 5, 9, 2, 1])
    assert vocab.itos == [UNK, EOS, "a", "b", "c", "d"]
    assert (vocab.unk_id, vocab.eos_id) == (0, 1)
    assert vocab["a"] == 2 and vocab["never-seen"] == vocab.unk_id


def test_encode_decode_round_trip():
    vocab = Vocabulary.from_counts(["the", "cat", "sat"], [3, 2, 1])
    ids = vocab.encode(" the cat  sat ") + vocab.encode("") + vocab.encode("the dog")
    assert ids == [2, 3, 4, 1, 1, 2, 0, 1]
    assert vocab.decode(ids) == "the cat sat\n\nthe <unk>\n"


def test_save_load_keeps_tokens_and_hash(tmp_path: Path):
    vocab = Vocabulary.from_counts(["x", "y", "with space?"], [1, 2, 3])
    vocab.save(tmp_path / "vocab.txt")
    loaded = Vocabulary.load(tmp_path / "vocab.txt")
    assert loaded.itos == vocab.itos
    assert loaded.sha256 == vocab.sha256
    assert Vocabulary.from_counts(["x", "y"], [1, 3]).sha256 != vocab.sha256


def test_rejects_malformed_vocabulary():
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["the", EOS])
    with pytest.raises(ValueError, match="twice"):
        Vocabulary([UNK, EOS, "a", "a"])
