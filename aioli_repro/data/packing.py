"""One split of one group's documents, packed into a raw file of fixed-length token windows.

Every document is encoded with EOS appended (the official code has no separator; see
docs/deviations.md), the stream is cut into non-overlapping windows of `context_length` tokens, and
the remainder is dropped. Training documents are first shuffled at the document level, seeded by the
seed and the group name; val/test keep the source's order. The file is written under a temporary
name and `os.replace`d into place, so a reader never sees a partial file. Where files live and
which ones are trusted is `cache.py`'s job.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from aioli_repro.data.source import DataError, GroupSource
from aioli_repro.data.tokenizer import Tokenizer

_ENCODE_BATCH = 64  # documents per tokenizer call (HF fast tokenizers batch in Rust)
_FLUSH_TOKENS = 1 << 20  # tokens buffered before a write


class _TokenWriter:
    """Buffered append of token arrays to a raw file."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.f = open(path, "wb")
        self.dtype = dtype
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buf.append(tokens)
        self.buffered += len(tokens)
        if self.buffered >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            np.concatenate(self.buf).astype(self.dtype, copy=False).tofile(self.f)
            self.written += self.buffered
            self.buf, self.buffered = [], 0

    def close(self) -> None:
        self.flush()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _batched(it: Iterator, n: int) -> Iterator[list]:
    batch: list = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_stream(
    source: GroupSource, tokenizer: Tokenizer, group: str, split: str, on_docs: Callable[[int], object]
) -> Iterator[np.ndarray]:
    """Token ids of each document with EOS appended, range-checked, in source order."""
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    vocab = int(tokenizer.vocab_size)
    for docs in _batched(iter(source.documents(group, split)), _ENCODE_BATCH):
        try:
            encoded = tokenizer.encode_batch(docs)
        except DataError as e:
            raise DataError(f"group {group!r} split {split!r}: {e}") from e
        for ids in encoded:
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise DataError(
                    f"group {group!r} split {split!r}: tokenizer {tokenizer.name!r} produced ids in "
                    f"[{int(ids.min())}, {int(ids.max())}], outside its vocab_size {vocab}"
                )
            yield np.concatenate([ids, eos])
        on_docs(len(docs))


def _group_seed(seed: int, group: str) -> list[int]:
    # one independent stream per group, stable across Python runs (str hash() is salted)
    return [int(seed), int.from_bytes(hashlib.sha256(group.encode()).digest()[:8], "little")]


def _write_shuffled(
    stage: Path, tmp: Path, lengths: array, n_seq: int, L: int, seed: list[int], dtype: np.dtype
) -> None:
    """Copy the first n_seq * L tokens of the staged documents, taken in a seeded random order."""
    lens = np.frombuffer(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    staged = np.memmap(stage, dtype=dtype, mode="r", shape=(int(lens.sum()),))
    keep = n_seq * L
    out = _TokenWriter(tmp, dtype)
    for d in np.random.default_rng(seed).permutation(len(lens)):
        take = min(int(lens[d]), keep - (out.written + out.buffered))
        out.add(np.asarray(staged[starts[d] : starts[d] + take]))
        if out.written + out.buffered >= keep:
            break
    out.close()
    del staged


def pack_split(
    source: GroupSource,
    tokenizer: Tokenizer,
    group: str,
    split: str,
    context_length: int,
    seed: int,
    entry: Path,
    dtype: np.dtype,
    on_docs: Callable[[int], object],
) -> dict:
    """Write `<entry>/<split>.bin` and return its size record (the cache adds the checksum)."""
    final = entry / f"{split}.bin"
    tmp = entry / f"{split}.bin.tmp-{os.getpid()}"
    stage = entry / f"{split}.stage.tmp-{os.getpid()}"
    try:
        # train: tokens in source order to a staging file, remembering document lengths only, so a
        # large group never sits in RAM; then copied out in shuffled document order
        lengths = array("q")
        w = _TokenWriter(stage if split == "train" else tmp, dtype)
        for toks in _encode_stream(source, tokenizer, group, split, on_docs):
            w.add(toks)
            lengths.append(len(toks))
        w.close()
        n_docs, n_tokens = len(lengths), w.written
        n_seq = n_tokens // context_length
        if n_seq == 0:
            raise DataError(
                f"group {group!r} split {split!r} has {n_tokens} tokens ({n_docs} documents, one EOS each), "
                f"fewer than one sequence of context_length={context_length}; use a smaller "
                "train.context_length or give the group more data"
            )
        if split == "train":
            _write_shuffled(stage, tmp, lengths, n_seq, context_length, _group_seed(seed, group), dtype)
        else:
            os.truncate(tmp, n_seq * context_length * dtype.itemsize)  # drop the partial last window
        os.replace(tmp, final)
    finally:
        for p in (tmp, stage):
            if p.exists():
                p.unlink()
    return {
        "file": final.name,
        "n_docs": int(n_docs),
        "n_tokens": int(n_tokens),  # EOS included, before dropping the remainder
        "n_seq": int(n_seq),
        "dtype": dtype.name,
        "bytes": int(final.stat().st_size),
    }
