"""Tokenizers: a dependency-free byte tokenizer and a thin wrapper around HF `AutoTokenizer`.

The cache (`cache.py`) only needs `encode` / `encode_batch`, `eos_id` and `vocab_size`; it appends
`eos_id` after every document itself, so `encode` never adds special tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aioli_repro.data.hub import offline_if_unreachable
from aioli_repro.data.source import DataError, Document


class Tokenizer(ABC):
    """Text or bytes -> int64 token ids (no special tokens added)."""

    #: identifies the vocabulary in cache keys (an HF hub name or a local path)
    name: str
    #: number of distinct ids, EOS included; ids are in [0, vocab_size)
    vocab_size: int
    eos_id: int

    @abstractmethod
    def encode(self, doc: Document) -> np.ndarray:
        """Token ids of one document as int64, without EOS."""

    def encode_batch(self, docs: Sequence[Document]) -> list[np.ndarray]:
        """Token ids of several documents; override where batching is faster."""
        return [self.encode(d) for d in docs]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
        )


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 and EOS = 256. Works offline and for any language or binary text."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, doc: Document) -> np.ndarray:
        raw = doc if isinstance(doc, bytes) else doc.encode("utf-8")
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Inverse of `encode` for str documents; EOS (and any id > 255) is dropped."""
        arr = np.asarray(ids, dtype=np.int64)
        return bytes(arr[(arr >= 0) & (arr < 256)].astype(np.uint8)).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """`transformers.AutoTokenizer.from_pretrained(name)`; `name` is a hub id or a local directory.

    The paper (and the official code) uses `EleutherAI/pythia-160m` (GPT-NeoX BPE, EOS id 0).
    """

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer  # lazy: transformers is slow to import and optional
        except ImportError as e:  # pragma: no cover - depends on the install
            raise DataError(
                f"data.tokenizer: {name!r} needs the `transformers` package ({e}); install it or use "
                "data.tokenizer=byte"
            ) from e
        tok = _load_hf_tokenizer(AutoTokenizer, name)
        if tok.eos_token_id is None:
            raise DataError(
                f"data.tokenizer: {name!r} has no eos_token; the packer needs one to separate documents"
            )
        self._tok = tok
        self.name = str(name)
        # len() counts added tokens too; tok.vocab_size does not.
        self.vocab_size = int(len(tok))
        self.eos_id = int(tok.eos_token_id)

    @staticmethod
    def _as_text(doc: Document) -> str:
        if isinstance(doc, bytes):
            try:
                return doc.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"data.tokenizer: a bytes document is not valid UTF-8 ({e}); "
                    "use data.tokenizer=byte for raw bytes"
                ) from e
        return doc

    def encode(self, doc: Document) -> np.ndarray:
        return self.encode_batch([doc])[0]

    def encode_batch(self, docs: Sequence[Document]) -> list[np.ndarray]:
        texts = [self._as_text(d) for d in docs]
        # verbose=False: documents are longer than model_max_length by design (they get packed).
        out = self._tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int64) for ids in out]


def _load_hf_tokenizer(auto_tokenizer, name: str):
    """A local folder or a tokenizer already in the HF cache loads without the network (`local_files_only`,
    what HF_HUB_OFFLINE=1 does, for this one call): an offline node does not stall on the hub's retries.
    Anything else is downloaded, or, on an offline node (now in the HF offline mode), fails at once naming
    `make prepare`."""
    try:
        return auto_tokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:  # not cached (OSError), or a broken local folder
        error = e
    if not (name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()):  # a hub name
        if offline_if_unreachable():
            raise DataError(
                f"data.tokenizer: {name!r} is not in the HF cache and the HF hub is unreachable from this "
                'node; run `make prepare ARGS="<the run\'s data/scale/groups overrides>"` once on a node '
                "with network (it downloads the tokenizer and packs the data), or use data.tokenizer=byte"
            )
        try:
            return auto_tokenizer.from_pretrained(name)
        except Exception as e:  # OSError / HTTP errors / offline-mode errors all look different
            error = e
    raise DataError(
        f"data.tokenizer: could not load {name!r} ({type(error).__name__}: {' '.join(str(error).split())}). "
        "If it is a hub name, the HF hub is probably unreachable (or HF_HUB_OFFLINE=1 and it is not cached): "
        "run `make prepare` on a node with network, use data.tokenizer=byte, or point data.tokenizer at a "
        "local directory holding a saved tokenizer"
    ) from error


def build_tokenizer(name: str) -> Tokenizer:
    """ "byte" -> ByteTokenizer; anything else -> HFTokenizer(name) (a hub id or a local path)."""
    if not isinstance(name, str) or not name:
        raise DataError(f"data.tokenizer: need 'byte' or an HF tokenizer name/path, got {name!r}")
    if name == "byte":
        return ByteTokenizer()
    return HFTokenizer(name)
