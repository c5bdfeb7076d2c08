"""Data-preparation throughput on WikiText-103-sized text, against a plain Python encoder in the same run.

Builds a corpus of WikiText-2's train split repeated to about 100M tokens (the size of WikiText-103 train), then
times, each from a cold cache:
  - ``prepare``: the datamodule's whole preparation (``CorpusCache.prepare``: text through ``datasets``, vocabulary,
    token-id caches of all three splits), materialised and streaming;
  - its parts on their own: the one-pass vocabulary + train ids, and encoding with a given vocabulary;
  - the baseline: ``collections.Counter`` over ``line.split()`` for the vocabulary and a per-word dict lookup for the
    ids, reading the same file.
Prints one JSON line per figure (workload, metric, value, unit, hardware). Not a test: figures vary by machine.

    python -m experiments.benchmarks.data_prep [--repeat 48] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import tempfile
import time
from array import array
from pathlib import Path

import numpy as np

from datamodules.corpus import SPLITS, CorpusCache, WikiTextSource, build_vocabulary_and_encode, encode_lines
from datamodules.vocab import EOS, Vocabulary
from experiments.benchmarks.reporting import emit as emit_figure
from experiments.benchmarks.workloads import local_wikitext2


def build_corpus(source_dir: Path, target: Path, repeat: int) -> None:
    """Writes ``wiki.{train,valid,test}.tokens`` with the train text repeated ``repeat`` times."""
    target.mkdir(parents=True, exist_ok=True)
    train = (source_dir / "wiki.train.tokens").read_bytes()
    with open(target / "wiki.train.tokens", "wb") as f:
        for _ in range(repeat):
            f.write(train)
    for split in ("valid", "test"):
        shutil.copyfile(source_dir / f"wiki.{split}.tokens", target / f"wiki.{split}.tokens")


def python_vocabulary(path: Path) -> Vocabulary:
    """The baseline vocabulary build: a Counter over str.split() of every line."""
    counts: collections.Counter[str] = collections.Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            counts.update(line.split())
    return Vocabulary.from_counts(counts.keys(), counts.values())


def python_encode(path: Path, vocab: Vocabulary) -> np.ndarray:
    """The baseline encoder: a dict lookup per word, one end-of-line id per line."""
    stoi, unk, eos = vocab.stoi, vocab.unk_id, vocab.eos_id
    ids = array("I")
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids.extend([stoi.get(word, unk) for word in line.split()])
            ids.append(eos)
    return np.frombuffer(ids, dtype=np.uint32)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wikitext2", type=Path, default=local_wikitext2(),
                        help="WikiText-2 folder (default: $WIKITEXT_DIR)")
    parser.add_argument("--repeat", type=int, default=48, help="times the train text is repeated (48: ~100M)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="headprune-bench-"))
    text_dir = workdir / "text"
    build_corpus(args.wikitext2, text_dir, args.repeat)
    train_file = text_dir / "wiki.train.tokens"

    def emit(metric: str, value: float, unit: str) -> None:
        emit_figure(f"wikitext-2 train x{args.repeat}", metric, round(value, 3), unit)

    results = {}
    for streaming in (False, True):
        mode = "streaming" if streaming else "materialised"
        cache = CorpusCache(WikiTextSource("wikitext-2", text_dir, streaming, workdir / f"hf-{mode}"),
                            workdir / f"cache-{mode}")
        vocab, seconds = timed(cache.prepare)
        _, tokens = cache.load()
        total = sum(len(tokens[s]) for s in SPLITS)
        results[mode] = (vocab, tokens, seconds)
        emit(f"prepare_{mode}_seconds", seconds, "s")
        emit(f"prepare_{mode}_tokens_per_s", total / seconds, "tokens/s")
    vocab, tokens, _ = results["materialised"]
    train_tokens = len(tokens["train"])
    emit("train_tokens", train_tokens, "tokens")

    # the parts alone, on the Arrow text that datasets has already materialised
    source = WikiTextSource("wikitext-2", text_dir, False, workdir / "hf-materialised")

    def one_pass():
        built, ids = build_vocabulary_and_encode(source.line_batches("train"))
        return built, np.concatenate(list(ids))

    (built, one_pass_ids), one_pass_seconds = timed(one_pass)
    assert built.itos == vocab.itos and np.array_equal(one_pass_ids, np.asarray(tokens["train"]))
    emit("vocab_and_train_ids_one_pass_tokens_per_s", train_tokens / one_pass_seconds, "tokens/s")
    encoded, encode_seconds = timed(lambda: np.concatenate([encode_lines(b, vocab)
                                                            for b in source.line_batches("train")]))
    assert np.array_equal(encoded, np.asarray(tokens["train"]))
    emit("encode_with_vocab_tokens_per_s", train_tokens / encode_seconds, "tokens/s")

    baseline_vocab, baseline_vocab_seconds = timed(python_vocabulary, train_file)
    assert baseline_vocab.itos[2:] == [t for t in vocab.itos[2:] if t != EOS]
    emit("python_vocab_build_tokens_per_s", train_tokens / baseline_vocab_seconds, "tokens/s")
    baseline_ids, baseline_encode_seconds = timed(python_encode, train_file, vocab)
    assert np.array_equal(baseline_ids, np.asarray(tokens["train"]))
    emit("python_encode_tokens_per_s", train_tokens / baseline_encode_seconds, "tokens/s")

    baseline_seconds = baseline_vocab_seconds + baseline_encode_seconds
    emit("python_train_seconds", baseline_seconds, "s")
    emit("speedup_one_pass_vs_python_vocab_and_encode", baseline_seconds / one_pass_seconds, "x")
    for mode, (_, _, seconds) in results.items():
        # prepare also encodes valid and test (about 0.2% more text): a conservative ratio
        emit(f"speedup_prepare_{mode}_vs_python_train", baseline_seconds / seconds, "x")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
