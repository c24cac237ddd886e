"""`LocalSource`: bring your own groups from a folder.

Layout (`root`, one entry per group; by default every subfolder of `root`, and every
`.txt`/`.jsonl`/`.parquet` file directly in `root`, is a group named after it):

    root/
      arxiv/            a folder of documents: *.txt (one document per file),
        a.txt             *.jsonl (one JSON object per line, text in `text_field`),
        b.jsonl           *.parquet (column `text_field`); searched recursively
      code.jsonl        or a single such file
      books/            or pre-split: train/ val/ test/ subfolders (or files named
        train/ val/ test/   train.*, val.* / validation.*, test.*) used as they are

Groups that are not pre-split are split per document: shuffle the document indices with
`split_seed`, the first `val_fraction` go to val, the next `test_fraction` to test, the rest to
train (at least one document each for val and test once a group has >= 3 documents). Only
document counts and indices are held in memory; the text is streamed from the files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from aioli_repro.data.source import SPLITS, DataError, GroupSource

DOC_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val", "validation"),
    "test": ("test",),
}


def file_signature(path: str | Path, head_bytes: int = 1 << 20) -> dict:
    """Size plus sha256 of the first and last `head_bytes`: cheap, and survives copies (unlike mtimes)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(head_bytes))
        if size > head_bytes:
            f.seek(max(head_bytes, size - head_bytes))
            h.update(f.read(head_bytes))
    return {"size": size, "sha256_head_tail": h.hexdigest()[:32]}


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name.startswith("_")


def _list_doc_files(folder: Path) -> list[Path]:
    """All document files under `folder` (recursive, sorted); DataError on unknown file types."""
    files, unknown = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if _is_hidden(p):
                continue
            (files if p.suffix in DOC_SUFFIXES else unknown).append(p)
    if unknown:
        shown = [str(u.relative_to(folder)) for u in unknown[:10]]
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise DataError(
            f"data.source.root: {folder} holds files of unknown type: {shown}{more}; "
            f"allowed: {list(DOC_SUFFIXES)} (one document per .txt file, per .jsonl line, per .parquet row)"
        )
    return sorted(files)


class _DocFiles:
    """Documents of a list of files, addressed by a global index (file order, then position in file)."""

    def __init__(self, files: list[Path], text_field: str) -> None:
        self.files = files
        self.text_field = text_field
        self._counts: list[int] | None = None

    def counts(self) -> list[int]:
        if self._counts is None:
            self._counts = [self._count(p) for p in self.files]
        return self._counts

    def __len__(self) -> int:
        return int(sum(self.counts()))

    def _count(self, p: Path) -> int:
        if p.suffix == ".txt":
            return 1
        if p.suffix == ".jsonl":
            with open(p, "rb") as f:
                return sum(1 for line in f if line.strip())
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(p).metadata.num_rows)

    def _iter_file(self, p: Path) -> Iterator[str]:
        if p.suffix == ".txt":
            yield p.read_text(encoding="utf-8", errors="replace")
        elif p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}:{lineno}: not valid JSON ({e})") from e
                    if not isinstance(obj, dict) or self.text_field not in obj:
                        keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
                        raise DataError(
                            f"{p}:{lineno}: no field {self.text_field!r} (data.source.text_field); "
                            f"found {keys}"
                        )
                    yield str(obj[self.text_field])
        else:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(p)
            if self.text_field not in pf.schema_arrow.names:
                raise DataError(
                    f"{p}: no column {self.text_field!r} (data.source.text_field); "
                    f"found {pf.schema_arrow.names}"
                )
            for batch in pf.iter_batches(batch_size=1024, columns=[self.text_field]):
                for t in batch.column(0).to_pylist():
                    yield "" if t is None else str(t)

    def iter_docs(self, keep: np.ndarray | None = None) -> Iterator[str]:
        """Documents in file order; with `keep` (a bool mask over global indices) only those."""
        i = 0
        for p in self.files:
            for doc in self._iter_file(p):
                if keep is None or keep[i]:
                    yield doc
                i += 1


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
    ) -> None:
        if root is None or not str(root).strip():
            raise DataError("data.source.root: required (a folder with one subfolder or file per group)")
        self.root = Path(str(root)).expanduser().resolve()
        if not self.root.is_dir():
            raise DataError(f"data.source.root: {self.root} does not exist or is not a folder")
        for field, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= float(v) < 1.0:
                raise DataError(f"data.source.{field}: must be in [0, 1), got {v!r}")
        if float(val_fraction) + float(test_fraction) >= 1.0:
            raise DataError(
                f"data.source.val_fraction + test_fraction must be < 1 (train needs documents), "
                f"got {val_fraction} + {test_fraction}"
            )
        self.text_field = str(text_field)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.group_paths: dict[str, Path] = self._resolve_groups(groups)
        # per group: split -> _DocFiles, plus (for carved groups) split -> bool mask over documents
        self._files: dict[str, dict[str, _DocFiles]] = {}
        self._masks: dict[str, dict[str, np.ndarray]] = {}

    # --- layout -----------------------------------------------------------------------------
    def _resolve_groups(self, groups: Mapping[str, str] | None) -> dict[str, Path]:
        if groups is None:
            found: dict[str, Path] = {}
            for p in sorted(self.root.iterdir()):
                if _is_hidden(p):
                    continue
                if p.is_dir() or p.suffix in DOC_SUFFIXES:
                    g = p.name if p.is_dir() else p.stem
                    if g in found:
                        raise DataError(f"data.source.root: group {g!r} is both {found[g]} and {p}; keep one")
                    found[g] = p
            if not found:
                raise DataError(
                    f"data.source.root: {self.root} has no group subfolders or {list(DOC_SUFFIXES)} files"
                )
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

    def _presplit_files(self, folder: Path) -> dict[str, list[Path]] | None:
        """train/val/test subfolders or files, if the group folder is laid out that way."""
        found: dict[str, list[Path]] = {}
        for split, aliases in _SPLIT_ALIASES.items():
            for p in sorted(folder.iterdir()):
                stem = p.name if p.is_dir() else p.name.split(".")[0]
                if stem in aliases and (p.is_dir() or p.suffix in DOC_SUFFIXES):
                    found.setdefault(split, []).extend(_list_doc_files(p) if p.is_dir() else [p])
        if not found:
            return None
        missing = [s for s in SPLITS if s not in found]
        if missing:
            raise DataError(
                f"data.source: group folder {folder} is pre-split (has {sorted(found)}) but lacks {missing}; "
                "provide train, val (or validation) and test, or none of them to split automatically"
            )
        return found

    def _setup(self, group: str) -> None:
        if group in self._files:
            return
        if group not in self.group_paths:
            raise DataError(
                f"groups: unknown group {group!r} for source 'local'; allowed: {self.available_groups()}"
            )
        path = self.group_paths[group]
        if not path.exists():
            raise DataError(f"data.source: group {group!r}: {path} does not exist")
        presplit = self._presplit_files(path) if path.is_dir() else None
        if presplit is not None:
            files = {s: _DocFiles(presplit[s], self.text_field) for s in SPLITS}
            for s, df in files.items():
                if len(df) == 0:
                    raise DataError(f"data.source: group {group!r} split {s!r} under {path} has no documents")
            self._files[group] = files
            return
        if path.is_dir():
            doc_files = _list_doc_files(path)
            if not doc_files:
                raise DataError(
                    f"data.source: group {group!r}: folder {path} is empty (no {list(DOC_SUFFIXES)} files)"
                )
        elif path.suffix in DOC_SUFFIXES:
            doc_files = [path]
        else:
            raise DataError(
                f"data.source: group {group!r}: {path} is not a folder or one of {list(DOC_SUFFIXES)}"
            )
        df = _DocFiles(doc_files, self.text_field)
        n = len(df)
        if n == 0:
            raise DataError(f"data.source: group {group!r} ({path}) has zero documents")
        self._files[group] = {s: df for s in SPLITS}
        self._masks[group] = self._carve(n)

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

    # --- GroupSource ----------------------------------------------------------------------------
    def available_groups(self) -> list[str]:
        return list(self.group_paths)

    def split_sizes(self, group: str) -> dict[str, int]:
        """Number of documents per split of one group."""
        self._setup(group)
        if group in self._masks:
            return {s: int(m.sum()) for s, m in self._masks[group].items()}
        return {s: len(df) for s, df in self._files[group].items()}

    def documents(self, group: str, split: str) -> Iterator[str]:
        if split not in SPLITS:
            raise DataError(f"split: must be one of {list(SPLITS)}, got {split!r}")
        self._setup(group)
        mask = self._masks.get(group, {}).get(split)
        yield from self._files[group][split].iter_docs(mask)

    def fingerprint(self) -> dict:
        groups = {}
        for g, p in self.group_paths.items():
            files = _list_doc_files(p) if p.is_dir() else [p]
            groups[g] = {
                # relative to root: moving or copying the data keeps the cache valid (content is hashed)
                "path": os.path.relpath(p, self.root),
                "files": {str(f.relative_to(p)) if p.is_dir() else f.name: file_signature(f) for f in files},
            }
        return {
            "source": self.name,
            "text_field": self.text_field,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "split_seed": self.split_seed,
            "groups": groups,
        }
