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

    def group_fingerprint(self, group: str) -> dict:
        """Everything that determines one group's documents; keys that group's cache entry.

        Override it so a group's cache does not depend on the others (LocalSource does); the default,
        the whole source's fingerprint plus the group name, is always safe."""
        return {"source_fingerprint": self.fingerprint(), "group": group}

    def num_documents(self, group: str, split: str) -> int | None:
        """Documents in one group/split if known without reading them (for progress bars), else None."""
        return None

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

    def validate(self, groups: list[str]) -> None:
        """Check that every group can be packed, before anything is: one DataError naming all bad ones.

        Cheap (no tokenising) and safe to call more than once; the default checks the names only."""
        self.check_groups(groups)


def human_count(n: int) -> str:
    """1234 -> '1.2k', 1_900_000 -> '1.9M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
