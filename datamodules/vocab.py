"""Word-level vocabulary: built from the train split's token counts, saved beside the token cache, reloaded.

Layout (docs/method.md §4.1): ``<unk>`` = 0, ``</s>`` (one per line of text) = 1, then every other type by descending
frequency, so the adaptive softmax cutoffs fall on frequency bands. Ties are broken by the token's code points, so
the same text always gives the same ids on every machine.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import pyarrow as pa

from datamodules.atomic import atomic_write_bytes

UNK = "<unk>"
EOS = "</s>"


class Vocabulary:
    """Maps word tokens to ids and back; ``len(vocab)`` is the model's ``vocab_size``."""

    unk_id = 0
    eos_id = 1

    def __init__(self, itos: Sequence[str]) -> None:
        if len(itos) < 2 or itos[0] != UNK or itos[1] != EOS:
            raise ValueError(f"a vocabulary must start with {UNK!r} and {EOS!r}; got {list(itos[:2])}")
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {token: i for i, token in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("a vocabulary must not list a token twice")

    @classmethod
    def from_counts(cls, tokens: Iterable[str], counts: Iterable[int]) -> Vocabulary:
        """Builds the frequency-sorted vocabulary from parallel token/count sequences (any order)."""
        pairs = [(token, count) for token, count in zip(tokens, counts, strict=True) if token not in (UNK, EOS)]
        pairs.sort(key=lambda pair: (-pair[1], pair[0]))
        return cls([UNK, EOS, *(token for token, _ in pairs)])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __getitem__(self, token: str) -> int:
        """The id of ``token`` (``<unk>``'s id for a word outside the vocabulary)."""
        return self.stoi.get(token, self.unk_id)

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        """Token ids of one line of text, split on whitespace, with the end-of-line token appended."""
        ids = [self[token] for token in text.split()]
        return [*ids, self.eos_id] if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids; end-of-line tokens become newlines."""
        lines, words = [], []
        for i in ids:
            if i == self.eos_id:
                lines.append(" ".join(words))
                words = []
            else:
                words.append(self.itos[i])
        return "\n".join([*lines, " ".join(words)])

    @cached_property
    def arrow_tokens(self) -> pa.Array:
        """The tokens as an Arrow array in id order (the value set of the vectorised encoder)."""
        return pa.array(self.itos, type=pa.string())

    @cached_property
    def sha256(self) -> str:
        """Content hash: caches of token ids are keyed by it, and checkpoints can be checked against it."""
        return hashlib.sha256("\n".join(self.itos).encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Writes one token per line, atomically (a reader never sees a half-written file)."""
        atomic_write_bytes(Path(path), ("\n".join(self.itos) + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Reads a vocabulary written by :meth:`save`."""
        text = Path(path).read_text(encoding="utf-8")
        return cls(text.split("\n")[:-1])

