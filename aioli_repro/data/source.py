"""The one interface every data source implements: named groups of documents per split.

A source only yields documents. Tokenising, packing and caching live in `cache.py`, so a
new source (a cluster's own corpus, say) is one small class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

# SlimPajama-6B group names, in the paper's order. `meta.redpajama_set_name` values map onto these.
SLIMPAJAMA_GROUPS: tuple[str, ...] = (
    "arxiv",
    "book",
    "c4",
    "commoncrawl",
    "github",
    "stackexchange",
    "wikipedia",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")

# A document is text (tokenised by the configured tokenizer) or raw bytes (byte-level ids 0..255).
Document = str | bytes


class DataError(ValueError):
    """Bad data or a bad data config; the message names the field and what is allowed."""


class GroupSource(ABC):
    """Named groups of documents, each with train/val/test splits."""

    #: short name used in cache keys and manifests
    name: str = "source"

    @abstractmethod
    def available_groups(self) -> list[str]:
        """All group names this source can provide."""

    @abstractmethod
    def documents(self, group: str, split: str) -> Iterator[Document]:
        """Yield the documents of one group and split, in a deterministic order."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """Everything that determines the documents (paths, sizes, seeds, file stats). Keys the cache."""

    def loss_floor(self, group: str, split: str) -> float | None:
        """Known lower bound on the per-token loss (nats) for this group/split, if the source knows it."""
        return None

    def check_groups(self, groups: list[str]) -> None:
        """Raise a DataError naming the bad group and the allowed ones."""
        allowed = self.available_groups()
        for g in groups:
            if g not in allowed:
                raise DataError(f"groups: unknown group {g!r} for source {self.name!r}; allowed: {allowed}")
        if len(set(groups)) != len(groups):
            raise DataError(f"groups: duplicate group names in {groups}")
