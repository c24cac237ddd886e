"""`LocalSource`: bring your own groups from a folder.

Layout (`root`, one entry per group; by default every subfolder of `root`, and every
`.txt`/`.jsonl`/`.parquet` file directly in `root`, is a group named after it; other files there
are not groups):

    root/
      arxiv/            a folder of documents, searched recursively:
        a.tex             plain text (extension in `data.source.extensions`: one document per file),
        b.jsonl           *.jsonl (one JSON object per line, text in `text_field`),
        c.parquet         *.parquet (column `text_field`)
      code.jsonl        or a single .txt/.jsonl/.parquet file
      books/            or pre-split: train/ val/ test/ subfolders (or .txt/.jsonl/.parquet files named
        train/ val/ test/   train.*, val.* / validation.*, test.*) used as they are

Only names starting with "." are hidden (".git/", ".DS_Store"; "_notes.txt" is a normal file). Hidden
entries, files of other extensions, empty files and binary-looking ones (a NUL byte in the first KiB)
are skipped, each with its reason in `report()`. A group folder is pre-split when it holds all three
of train, val (or validation) and test, or nothing but some of them (then the missing ones are an
error); its other entries are skipped ("outside train/val/test"). A code folder with src/ and test/
is not pre-split.

Groups that are not pre-split are split per document: shuffle the document indices with
`split_seed`, the first `val_fraction` go to val, the next `test_fraction` to test, the rest to
train (at least one document each for val and test once a group has >= 3 documents). Only
document counts and indices are held in memory; the text is streamed from the files. Each group's
files are listed and counted once, on first use: make a new LocalSource to see later changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aioli_repro.data.doc_files import DocFiles
from aioli_repro.data.listing import (
    DATA_FILE_SUFFIXES,
    OUTSIDE_SPLITS,
    Listing,
    file_signature,
    normalize_extensions,
    skip_reason,
    split_of,
    summarize_skipped,
    walk,
)
from aioli_repro.data.source import SPLITS, DataError, GroupSource, human_count


@dataclass
class GroupReport:
    """What `LocalSource` makes of one group folder (or file)."""

    group: str
    path: Path
    files: list[str]  # files read, relative to `path`
    skipped: list[tuple[str, str]]  # (relative path, reason)
    docs: dict[str, int]  # documents per split; empty when the group cannot be used
    error: str | None = None  # why the group cannot be used


@dataclass
class _Group:
    """One group, listed and counted: per split the files to read and (carved groups) a mask."""

    path: Path
    listing: Listing
    files: dict[str, DocFiles] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    fingerprint: dict | None = None

    def rel(self, p: Path) -> str:
        return str(p.relative_to(self.path)) if self.path.is_dir() else p.name


class LocalSource(GroupSource):
    """Groups of documents from local folders/files (see the module docstring for the layout)."""

    name = "local"

    def __init__(
        self,
        root: str,
        groups: Mapping[str, str] | None = None,
        text_field: str = "text",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 42,
        extensions: Iterable[str] | None = None,
    ) -> None:
        if root is None or not str(root).strip():
            raise DataError("data.source.root: required (a folder with one subfolder or file per group)")
        self.root = Path(str(root)).expanduser().resolve()
        if not self.root.is_dir():
            raise DataError(f"data.source.root: {self.root} does not exist or is not a folder")
        for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= float(v) < 1.0:
                raise DataError(f"data.source.{name}: must be in [0, 1), got {v!r}")
        if float(val_fraction) + float(test_fraction) >= 1.0:
            raise DataError(
                f"data.source.val_fraction + test_fraction must be < 1 (train needs documents), "
                f"got {val_fraction} + {test_fraction}"
            )
        self.text_field = str(text_field)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.extensions = normalize_extensions(extensions)
        self.group_paths: dict[str, Path] = self._resolve_groups(groups)
        self._groups: dict[str, _Group] = {}

    # --- layout -----------------------------------------------------------------------------
    def _resolve_groups(self, groups: Mapping[str, str] | None) -> dict[str, Path]:
        if groups is None:
            found: dict[str, Path] = {}
            for p in sorted(self.root.iterdir()):
                if p.name.startswith(".") or not (p.is_dir() or p.suffix.lower() in DATA_FILE_SUFFIXES):
                    continue
                g = p.name if p.is_dir() else p.stem
                if g in found:
                    raise DataError(f"data.source.root: group {g!r} is both {found[g]} and {p}; keep one")
                found[g] = p
            if not found:
                kinds = list(DATA_FILE_SUFFIXES)
                raise DataError(f"data.source.root: {self.root} has no group subfolders or {kinds} files")
            return found
        out = {}
        for g, rel in dict(groups).items():
            p = (self.root / str(rel)).resolve()
            if not p.exists():
                raise DataError(f"data.source.groups.{g}: {p} does not exist")
            out[str(g)] = p
        if not out:
            raise DataError(
                "data.source.groups: empty mapping; give group -> path, or null for every subfolder"
            )
        return out

    def _list_presplit(self, folder: Path) -> tuple[dict[str, Listing], Listing] | None:
        """Per split, the files of a pre-split group folder, plus the entries outside the splits."""
        entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
        named = {p: split_of(p) for p in entries}
        present = {s for s in named.values() if s is not None}
        if not present or (present != set(SPLITS) and None in named.values()):
            return None  # e.g. a code folder with src/ and test/: not a split layout
        splits, outside = {s: Listing() for s in SPLITS if s in present}, Listing()
        for p, split in named.items():
            if split is None:
                outside.skipped.append((p.name + ("/" if p.is_dir() else ""), OUTSIDE_SPLITS))
            elif p.is_dir():
                walk(p, folder, self.extensions, splits[split])
            elif reason := skip_reason(p, self.extensions):
                splits[split].skipped.append((p.name, reason))
            else:
                splits[split].used.append(p)
        return splits, outside

    def _scan(self, group: str) -> _Group:
        """List one group's files and count its documents; problems go to `.error`, not raised."""
        path = self.group_paths[group]
        listing = Listing()
        if not path.exists():
            return _Group(path, listing, error=f"{path} does not exist")
        if path.is_file():
            if reason := skip_reason(path, self.extensions):
                listing.skipped.append((path.name, reason))
                return _Group(path, listing, error=f"file {path} skipped: {reason}")
            listing.used.append(path)
            return self._fill_counts(_Group(path, listing), {s: [path] for s in SPLITS}, carve=True)
        presplit = self._list_presplit(path)
        if presplit is None:
            walk(path, path, self.extensions, listing)
            return self._fill_counts(_Group(path, listing), {s: listing.used for s in SPLITS}, carve=True)
        splits, outside = presplit
        for part in (*splits.values(), outside):
            listing.used += part.used
            listing.skipped += part.skipped
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            why = (
                f"folder {path} is pre-split (has {sorted(splits)}) but lacks {missing}; provide train, "
                "val (or validation) and test, or none of them to split automatically"
            )
            return _Group(path, listing, error=why)
        return self._fill_counts(_Group(path, listing), {s: splits[s].used for s in SPLITS}, carve=False)

    def _fill_counts(self, g: _Group, split_files: dict[str, list[Path]], carve: bool) -> _Group:
        """Documents per split (and the carve masks), or in `g.error` the reason there are none."""
        n_files = len(g.listing.used) + len(g.listing.skipped)
        if not g.listing.used:
            if n_files == 0:
                g.error = f"folder {g.path} is empty"
            else:
                s = "" if n_files == 1 else "s"
                g.error = (
                    f"folder {g.path}: {n_files} file{s}, all skipped: {summarize_skipped(g.listing.skipped)}"
                )
            return g
        try:
            if carve:  # one list for every split, counted once
                df = DocFiles(split_files["train"], self.text_field)
                g.files = {s: df for s in SPLITS}
                g.masks = self._carve(len(df))
                g.sizes = {s: int(m.sum()) for s, m in g.masks.items()}
            else:
                g.files = {s: DocFiles(split_files[s], self.text_field) for s in SPLITS}
                g.sizes = {s: len(df) for s, df in g.files.items()}
        except (DataError, OSError) as e:
            g.error = str(e)
            return g
        empty = [s for s, n in g.sizes.items() if n == 0]
        if sum(g.sizes.values()) == 0:
            g.error = f"{g.path} has zero documents in its {len(g.listing.used)} file(s)"
        elif empty and not carve:
            g.error = f"split {empty[0]!r} under {g.path} has no documents"
        return g

    def _carve(self, n: int) -> dict[str, np.ndarray]:
        n_val = int(round(n * self.val_fraction))
        n_test = int(round(n * self.test_fraction))
        if n >= 3:
            n_val, n_test = max(1, n_val), max(1, n_test)
        # train keeps at least one document
        while n_val + n_test > n - 1 and (n_val > 0 or n_test > 0):
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        perm = np.random.default_rng(self.split_seed).permutation(n)
        masks = {s: np.zeros(n, dtype=bool) for s in SPLITS}
        masks["val"][perm[:n_val]] = True
        masks["test"][perm[n_val : n_val + n_test]] = True
        masks["train"][perm[n_val + n_test :]] = True
        return masks

    def _group(self, group: str) -> _Group:
        """The scanned group (cached); DataError for an unknown name."""
        if group not in self._groups:
            if group not in self.group_paths:
                raise DataError(
                    f"groups: unknown group {group!r} for source 'local'; allowed: {self.available_groups()}"
                )
            self._groups[group] = self._scan(group)
        return self._groups[group]

    def _usable(self, group: str) -> _Group:
        g = self._group(group)
        if g.error is not None:
            raise DataError(f"data.source: group {group!r}: {g.error}")
        return g

    # --- reports ------------------------------------------------------------------------------
    def report(self, groups: list[str] | None = None) -> list[GroupReport]:
        """Files used and skipped (with reasons) and documents per split of each group (default: all)."""
        out = []
        for name in self.available_groups() if groups is None else groups:
            g = self._group(name)
            docs = {} if g.error else dict(g.sizes)
            files = [g.rel(p) for p in g.listing.used]
            out.append(GroupReport(name, g.path, files, list(g.listing.skipped), docs, g.error))
        return out

    def validate(self, groups: list[str]) -> None:
        """List and count every group (once; cached); one DataError naming all that cannot be used."""
        self.check_groups(groups)
        bad = [(name, err) for name in groups if (err := self._group(name).error) is not None]
        if len(bad) == 1:
            raise DataError(f"data.source: group {bad[0][0]!r}: {bad[0][1]}")
        if bad:
            listed = "; ".join(f"group {name!r}: {why}" for name, why in bad)
            raise DataError(f"data.source: {len(bad)} groups cannot be used: {listed}")

    # --- GroupSource ----------------------------------------------------------------------------
    def available_groups(self) -> list[str]:
        return list(self.group_paths)

    def split_sizes(self, group: str) -> dict[str, int]:
        """Number of documents per split of one group."""
        return dict(self._usable(group).sizes)

    def num_documents(self, group: str, split: str) -> int | None:
        return self.split_sizes(group)[split]

    def documents(self, group: str, split: str) -> Iterator[str]:
        if split not in SPLITS:
            raise DataError(f"split: must be one of {list(SPLITS)}, got {split!r}")
        g = self._usable(group)
        yield from g.files[split].iter_docs(g.masks.get(split))

    def group_fingerprint(self, group: str) -> dict:
        """This group's files (relative names, content signatures) and split settings; not the root."""
        g = self._group(group)
        if g.fingerprint is None:
            g.fingerprint = {
                "source": self.name,
                "group": group,
                "text_field": self.text_field,
                "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction,
                "split_seed": self.split_seed,
                "files": {g.rel(p): file_signature(p) for p in g.listing.used},
                "error": g.error,
            }
        return g.fingerprint

    def fingerprint(self) -> dict:
        return {"source": self.name, "groups": {g: self.group_fingerprint(g) for g in self.group_paths}}


def format_report(
    reports: list[GroupReport], stats: Mapping[str, Mapping[str, Mapping[str, int]]] | None = None
) -> str:
    """A few short lines per group; `stats` (`PackedGroups.stats()`) adds the tokens per split."""
    lines = []
    for r in reports:
        lines.append(f"[data] {r.group} ({r.path}): {len(r.files)} files used, {len(r.skipped)} skipped")
        by_reason: dict[str, list[str]] = {}
        for rel, reason in r.skipped:
            by_reason.setdefault(reason, []).append(rel)
        for reason, rels in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            more = f" and {len(rels) - 3} more" if len(rels) > 3 else ""
            lines.append(f"[data]   skipped {len(rels)}: {reason} ({', '.join(rels[:3])}{more})")
        if r.error:
            lines.append(f"[data]   cannot be used: {r.error}")
            continue
        cells = []
        for s, n in r.docs.items():
            tokens = (stats or {}).get(r.group, {}).get(s, {}).get("tokens")
            cells.append(f"{s} {n} docs" + ("" if tokens is None else f" {human_count(int(tokens))} tokens"))
        lines.append("[data]   " + " | ".join(cells))
    return "\n".join(lines)
