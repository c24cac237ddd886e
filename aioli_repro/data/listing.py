"""Which files of a group folder hold documents, and which are skipped and why.

Only names starting with "." are hidden. Hidden entries, files of other extensions, empty files and
binary-looking ones (a NUL byte in the first KiB) are skipped, each with its reason. Files are taken
in path order, which numbers the documents. `LocalSource` (local.py) builds groups from these
listings; SlimPajama's files are fingerprinted with `file_signature`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aioli_repro.data.source import DataError

#: extensions with a structure (one document per line / row); always accepted
STRUCTURED_SUFFIXES: tuple[str, ...] = (".jsonl", ".parquet")
#: the default of `data.source.extensions` (keep in step with conf/data/local.yaml); "" = no extension
DEFAULT_TEXT_EXTENSIONS: tuple[str, ...] = (
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".java",
    ".kt", ".scala", ".js", ".ts", ".go", ".rs", ".rb", ".php", ".sh", ".sql", ".r", ".jl", ".lua",
    ".hs", ".ml", ".swift", ".html", ".css", ".xml", ".yaml", ".yml", ".toml", ".cfg", ".ini", "",
)  # fmt: skip
#: files that can be a whole group (directly in root) or a split of one (train.jsonl, test.txt)
DATA_FILE_SUFFIXES: tuple[str, ...] = (".txt", *STRUCTURED_SUFFIXES)
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val", "validation"),
    "test": ("test",),
}
_BINARY_PROBE = 1024  # bytes read to tell text from binary
_HIDDEN = "hidden (name starts with '.')"
OUTSIDE_SPLITS = "outside train/val/test of a pre-split group"


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


def normalize_extensions(value: Iterable[str] | None) -> frozenset[str]:
    """`data.source.extensions` as lower-case ".ext" strings ("" = files without an extension)."""
    if value is None:
        return frozenset(DEFAULT_TEXT_EXTENSIONS)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise DataError(f"data.source.extensions: must be a list like ['.txt', '.md'], got {value!r}")
    out = set()
    for e in value:
        ext = e.strip().lower() if isinstance(e, str) else None
        if ext and not ext.startswith("."):
            ext = "." + ext
        if ext is None or any(c in ext for c in "/\\ *") or ext.count(".") > 1:
            raise DataError(
                f"data.source.extensions: {e!r} is not an extension; write them like '.txt' "
                "(only the last one counts: '.gz', not '.tar.gz'; '' for files without one)"
            )
        out.add(ext)
    return frozenset(out)


def skip_reason(p: Path, extensions: frozenset[str]) -> str | None:
    """Why a (non-hidden) file is not read as documents, or None if it is."""
    ext = p.suffix.lower()
    if ext not in extensions and ext not in STRUCTURED_SUFFIXES:
        return f"extension {ext or '(none)'} not in data.source.extensions"
    try:
        if p.stat().st_size == 0:
            return "empty file"
        if ext != ".parquet":
            with open(p, "rb") as f:
                if b"\0" in f.read(_BINARY_PROBE):
                    return "binary (NUL byte in the first KiB)"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


@dataclass
class Listing:
    """Files to read, and those skipped as (path relative to the group, reason)."""

    used: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def walk(folder: Path, base: Path, extensions: frozenset[str], out: Listing) -> None:
    """Add every file under `folder` to `out`, sorted by path (that order numbers the documents)."""
    used, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        d = Path(dirpath)
        skipped += [(d / n, _HIDDEN) for n in dirnames if n.startswith(".")]
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        for name in filenames:
            p = d / name
            reason = _HIDDEN if name.startswith(".") else skip_reason(p, extensions)
            if reason is None:
                used.append(p)
            else:
                skipped.append((p, reason))
    out.used += sorted(used)
    # report paths relative to the group (`base`), folders with a trailing slash
    out.skipped += [(str(p.relative_to(base)) + ("/" if p.is_dir() else ""), r) for p, r in sorted(skipped)]


def split_of(p: Path) -> str | None:
    """The split an entry of a group folder names (train/, val.jsonl, ...), if any."""
    if p.is_dir():
        stem = p.name
    elif p.suffix.lower() in DATA_FILE_SUFFIXES:
        stem = p.name.split(".")[0]
    else:
        return None
    return next((s for s, aliases in _SPLIT_ALIASES.items() if stem in aliases), None)


def summarize_skipped(skipped: list[tuple[str, str]]) -> str:
    """'extension .png not in data.source.extensions (3: a.png, b.png, ...); empty file (1: c.txt)'."""
    by_reason: dict[str, list[str]] = {}
    for rel, reason in skipped:
        by_reason.setdefault(reason, []).append(rel)
    parts = []
    for reason, rels in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        parts.append(f"{reason} ({len(rels)}: {', '.join(rels[:2])}{', ...' if len(rels) > 2 else ''})")
    return "; ".join(parts)
