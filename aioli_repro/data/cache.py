"""Tokenise + pack once, memory-map forever.

Layout: one folder per packing setting, holding one entry per group, keyed by that group's own
fingerprint, so a group's cache does not depend on which other groups a run uses:

    cache_dir/<source>-<settings hash>/         tokenizer, context_length, seed, FORMAT_VERSION
      <group>-<entry hash>/                      + `source.group_fingerprint(group)`
        manifest.json                            key inputs + per split: n_docs, n_tokens, n_seq, sha256
        train.bin val.bin test.bin               raw (n_seq, context_length) token ids, uint16 or uint32
        .lock                                    flock'ed while building this entry only
      prepared.json                              `python -m aioli_repro.prepare`: the sha256 it verified per
                                                 file, with size and mtime (then runs skip the re-hash)

`PackedGroups.root` is the settings folder; the run's manifest (`PackedGroups.manifest`) lists each
group's files relative to it, and its `key_hash` hashes the entries' hashes in run order.

Packing one split (EOS after *every* document, fixed windows, seeded document shuffle for train) is
`packing.py`; this module decides where entries live, which files are trusted, and records them.

Crash safety: a .bin is written under a temporary name and `os.replace`d into place, and only then
recorded in its entry's manifest (itself written to a temporary file and renamed). Files that the
manifest does not list are never trusted, so an interrupted build is simply resumed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from aioli_repro.data.packing import pack_split
from aioli_repro.data.source import SPLITS, DataError, GroupSource, human_count
from aioli_repro.data.tokenizer import Tokenizer
from aioli_repro.fileio import atomic_write_json, file_lock

#: bump when the on-disk format or the packing rule changes (invalidates every cache)
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
_BAR_DELAY_S = 2.0  # a progress bar appears only for a group that takes longer than this to pack


@dataclass
class PackedGroups:
    """Packed sequences per group and split, as read-only memmaps of shape (n_seq, context_length)."""

    groups: list[str]
    context_length: int
    vocab_size: int
    eos_id: int
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    manifest: dict = field(repr=False)
    root: Path

    def split(self, split: str) -> dict[str, np.ndarray]:
        """The arrays of one split ('train', 'val' or 'test'), by group."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return getattr(self, split)

    def loss_floor(self, group: str, split: str) -> float | None:
        """The source's known per-token loss floor for this group/split (nats), if it recorded one."""
        v = self.manifest["groups"].get(group, {}).get(split, {}).get("loss_floor")
        return None if v is None else float(v)

    def n_seq(self, group: str, split: str) -> int:
        return int(self.manifest["groups"][group][split]["n_seq"])

    def entry_dir(self, group: str) -> Path:
        """The cache folder holding this group's packed splits."""
        return self.root / self.manifest["entries"][group]

    def stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """{group: {split: {"docs", "tokens" (EOS included, before the remainder is dropped), "seqs"}}}."""
        return {g: _split_stats(self.manifest["groups"][g]) for g in self.groups}


def _split_stats(splits: dict) -> dict[str, dict[str, int]]:
    return {
        s: {"docs": int(e["n_docs"]), "tokens": int(e["n_tokens"]), "seqs": int(e["n_seq"])}
        for s, e in splits.items()
    }


# --- keys and small helpers -----------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32; DataError beyond uint32."""
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 2:
        raise DataError(f"data.tokenizer: vocab_size must be an integer >= 2, got {vocab_size!r}")
    if vocab_size <= 65535:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32 - 1:
        return np.dtype(np.uint32)
    raise DataError(f"data.tokenizer: vocab_size {vocab_size} does not fit the cache's uint32 token ids")


def _jsonable(obj: object) -> object:
    """JSON round trip, so a key compares equal to the copy read back from a manifest."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(
    source: GroupSource, tokenizer: Tokenizer, context_length: int, seed: int = 0, group: str | None = None
) -> tuple[str, dict]:
    """(16-hex-digit hash, the inputs it hashes).

    Without `group`: the packing settings every group shares (they name the cache root). With a
    group: everything that determines that group's packed arrays (they name its entry)."""
    inputs: dict = {
        "source": source.name,
        "tokenizer": tokenizer.name,
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": int(tokenizer.eos_id),
        "context_length": int(context_length),
        "seed": int(seed),
        "format_version": FORMAT_VERSION,
    }
    if group is not None:
        inputs |= {"group": group, "fingerprint": source.group_fingerprint(group)}
    inputs = _jsonable(inputs)
    return _digest(inputs), inputs


def cache_root(
    source: GroupSource, tokenizer: Tokenizer, context_length: int, cache_dir: str | Path, seed: int = 0
) -> Path:
    """The folder `build_packed` keeps every group's entry in for these settings (`PackedGroups.root`)."""
    digest, _ = cache_key(source, tokenizer, context_length, seed)
    return Path(cache_dir).expanduser() / f"{source.name}-{digest}"


def group_cache_dir(
    source: GroupSource,
    tokenizer: Tokenizer,
    group: str,
    context_length: int,
    cache_dir: str | Path,
    seed: int = 0,
) -> Path:
    """The entry folder of one group's packed splits (it may not exist yet)."""
    digest, _ = cache_key(source, tokenizer, context_length, seed, group=group)
    return cache_root(source, tokenizer, context_length, cache_dir, seed) / f"{group}-{digest}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(entry: Path) -> dict | None:
    path = entry / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable == absent: the build path rewrites it


def _check_group_name(group: str) -> None:
    if not isinstance(group, str) or not group or group.startswith(".") or "/" in group or "\\" in group:
        raise DataError(
            f"groups: {group!r} cannot be a cache folder name (no slashes, not starting with '.')"
        )


def _entry_problem(entry: Path, split: dict, context_length: int, verify_checksums: bool) -> str | None:
    """Why one split's file cannot be used (None if it can)."""
    path = entry / split["file"]
    if not path.exists():
        return f"{path} is missing"
    expected = int(split["n_seq"]) * context_length * np.dtype(split["dtype"]).itemsize
    size = path.stat().st_size
    if size != expected or size != int(split["bytes"]):
        return f"{path} has {size} bytes, the manifest expects {expected}"
    if verify_checksums and not _verified_by_prepare(entry, split, path):
        if _sha256_file(path) != split["sha256"]:
            return f"{path} does not match its sha256 in the manifest"
    return None


# --- files a prepare verified (`python -m aioli_repro.prepare`, aioli_repro/data/prepare.py) -------
#: in the settings folder: per entry folder and file, the sha256 a prepare computed over the whole file,
#: and the file's size and mtime (ns) at that moment
PREPARED_NAME = "prepared.json"


def _verified_by_prepare(entry: Path, split: dict, path: Path) -> bool:
    """Did a prepare hash this very file: the sha256 of the entry's manifest, the same size and mtime?
    Then `verify_checksums` trusts it without hashing it again (a rewritten file has a new mtime)."""
    try:
        prepared = json.loads((entry.parent / PREPARED_NAME).read_text())
        rec = prepared["entries"][entry.name]["files"][split["file"]]
        st = path.stat()
        return (rec["sha256"], rec["bytes"], rec["mtime_ns"]) == (split["sha256"], st.st_size, st.st_mtime_ns)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _complete(manifest: dict | None) -> bool:
    return (
        manifest is not None
        and manifest.get("format_version") == FORMAT_VERSION
        and all(s in manifest.get("splits", {}) for s in SPLITS)
    )


def _usable(entry: Path, manifest: dict | None, key: dict, verify_checksums: bool) -> bool:
    if not _complete(manifest) or manifest.get("key") != key:
        return False
    L = int(manifest["context_length"])
    return all(_entry_problem(entry, manifest["splits"][s], L, verify_checksums) is None for s in SPLITS)


# --- progress -------------------------------------------------------------------------------------
def _progress_bar(source: GroupSource, group: str, splits: list[str], progress: bool) -> tqdm | None:
    """A documents bar for an interactive terminal, when the source knows how many there are."""
    if not progress or not sys.stderr.isatty():
        return None  # a bar in a log file is noise; the summary line says it all
    counts = [source.num_documents(group, s) for s in splits]
    if any(n is None for n in counts):
        return None
    total = int(sum(counts))
    return tqdm(total=total, desc=f"[data] pack {group}", unit="doc", delay=_BAR_DELAY_S, leave=False)


def packed_line(group: str, splits: dict, seconds: float) -> str:
    """'[data] packed code: train 812 docs 1.9M tokens | val 43 docs 98.1k tokens | ... (3.1 s)'."""
    cells = [
        f"{s} {st['docs']} docs {human_count(st['tokens'])} tokens" for s, st in _split_stats(splits).items()
    ]
    return f"[data] packed {group}: {' | '.join(cells)} ({seconds:.1f} s)"


# --- one group's entry ----------------------------------------------------------------------------
@dataclass
class _Job:
    """What every group's entry of one `build_packed` call shares."""

    source: GroupSource
    tokenizer: Tokenizer
    context_length: int
    seed: int
    root: Path
    dtype: np.dtype
    progress: bool
    verify_checksums: bool
    rebuild_on_mismatch: bool


def _new_manifest(job: _Job, group: str, digest: str, key: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "source": job.source.name,
        "group": group,
        "key_hash": digest,
        "key": key,
        "context_length": job.context_length,
        "seed": job.seed,
        "tokenizer": {
            "name": job.tokenizer.name,
            "vocab_size": int(job.tokenizer.vocab_size),
            "eos_id": int(job.tokenizer.eos_id),
        },
        "dtype": job.dtype.name,
        "splits": {},
    }


def _splits_to_pack(job: _Job, entry: Path, manifest: dict) -> list[str]:
    """Splits without a sound file; a recorded file that is damaged is an error unless rebuilding."""
    todo = []
    for s in SPLITS:
        rec = manifest["splits"].get(s)
        if rec is not None:
            problem = _entry_problem(entry, rec, job.context_length, job.verify_checksums)
            if problem is None:
                continue
            if not job.rebuild_on_mismatch:
                raise DataError(
                    f"cache: {problem} (cache {entry}); delete it or pass rebuild_on_mismatch=True"
                )
        todo.append(s)
    return todo


def _split_record(job: _Job, group: str, split: str, entry: Path, on_docs: Callable[[int], object]) -> dict:
    """Pack one split and return its manifest record: sizes, checksum and the source's loss floor."""
    rec = pack_split(
        job.source, job.tokenizer, group, split, job.context_length, job.seed, entry, job.dtype, on_docs
    )
    floor = job.source.loss_floor(group, split)
    rec["sha256"] = _sha256_file(entry / rec["file"])
    rec["loss_floor"] = None if floor is None else float(floor)
    return rec


def _build_entry(job: _Job, group: str, entry: Path, manifest: dict) -> None:
    """Pack the missing splits of one group into `entry`, recording each in the manifest as it lands."""
    todo = _splits_to_pack(job, entry, manifest)
    if not todo:
        return
    t0 = time.perf_counter()
    bar = _progress_bar(job.source, group, todo, job.progress)
    on_docs = bar.update if bar is not None else (lambda n: None)
    try:
        for s in todo:
            manifest["splits"][s] = _split_record(job, group, s, entry, on_docs)
            manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            # record each finished file at once: an interrupted build resumes where it stopped
            atomic_write_json(entry / MANIFEST_NAME, manifest, indent=1)
    finally:
        if bar is not None:
            bar.close()
    if job.progress:
        print(packed_line(group, manifest["splits"], time.perf_counter() - t0), file=sys.stderr, flush=True)


def _ensure_entry(job: _Job, group: str) -> tuple[Path, dict]:
    """This group's entry folder and manifest, packing whatever is missing (under the entry's lock)."""
    digest, key = cache_key(job.source, job.tokenizer, job.context_length, job.seed, group=group)
    entry = job.root / f"{group}-{digest}"
    manifest = _read_manifest(entry)
    if _usable(entry, manifest, key, job.verify_checksums):
        return entry, manifest  # fast path: no lock, no document read
    entry.mkdir(parents=True, exist_ok=True)
    with file_lock(entry / ".lock"):
        manifest = _read_manifest(entry)  # another process may have finished it while we waited
        if manifest is None or manifest.get("key") != key or manifest.get("format_version") != FORMAT_VERSION:
            manifest = _new_manifest(job, group, digest, key)
        # leftovers of an interrupted build (we hold the lock, so nobody else is writing them)
        for p in entry.glob("*.tmp-*"):
            p.unlink(missing_ok=True)
        _build_entry(job, group, entry, manifest)
    return entry, manifest


# --- public API -----------------------------------------------------------------------------------
def _run_manifest(root: Path, entries: dict[str, tuple[Path, dict]]) -> dict:
    """The manifest of one run: its groups' entries, files relative to `root`, and one key hash."""
    first = next(iter(entries.values()))[1]
    return {
        "format_version": FORMAT_VERSION,
        "source": first["source"],
        # identifies the exact data of the run (checkpoints store it): the entries' hashes in run order
        "key_hash": _digest([m["key_hash"] for _, m in entries.values()]),
        "context_length": int(first["context_length"]),
        "seed": first["seed"],
        "tokenizer": first["tokenizer"],
        "dtype": first["dtype"],
        "entries": {g: e.name for g, (e, _) in entries.items()},
        "groups": {g: _relative_splits(e.name, m["splits"]) for g, (e, m) in entries.items()},
    }


def _relative_splits(entry_name: str, splits: dict) -> dict:
    """An entry's split records with their files relative to the settings folder."""
    return {s: {**splits[s], "file": f"{entry_name}/{splits[s]['file']}"} for s in SPLITS}


def _open(root: Path, manifest: dict) -> PackedGroups:
    L = int(manifest["context_length"])
    arrays: dict[str, dict[str, np.ndarray]] = {s: {} for s in SPLITS}
    for g, splits in manifest["groups"].items():
        for s in SPLITS:
            e = splits[s]
            arrays[s][g] = np.memmap(
                root / e["file"], dtype=np.dtype(e["dtype"]), mode="r", shape=(e["n_seq"], L)
            )
    tok = manifest["tokenizer"]
    return PackedGroups(
        groups=list(manifest["groups"]),
        context_length=L,
        vocab_size=int(tok["vocab_size"]),
        eos_id=int(tok["eos_id"]),
        train=arrays["train"],
        val=arrays["val"],
        test=arrays["test"],
        manifest=manifest,
        root=root,
    )


def check_pack_args(groups: Sequence[str], context_length: object, verb: str) -> list[str]:
    """The groups (at least one, each a valid folder name) and the context length of a pack or prepare."""
    groups = list(groups)
    if not groups:
        raise DataError(f"groups: need at least one group to {verb}")
    for g in groups:
        _check_group_name(g)
    if not isinstance(context_length, (int, np.integer)) or context_length < 1:
        raise DataError(f"train.context_length: must be an integer >= 1, got {context_length!r}")
    return groups


def build_packed(
    source: GroupSource,
    tokenizer: Tokenizer,
    groups: list[str],
    context_length: int,
    cache_dir: str | Path,
    seed: int = 0,
    progress: bool = True,
    verify_checksums: bool = False,
    rebuild_on_mismatch: bool = False,
) -> PackedGroups:
    """Pack the given groups (train/val/test) into the cache, reusing whatever is already there.

    Every group is validated (`source.validate`) before anything is written. A file whose size (or,
    with `verify_checksums`, sha256) disagrees with its manifest raises a DataError naming it, or is
    rebuilt when `rebuild_on_mismatch` is set. With `progress`, one line per group actually packed
    goes to stderr (nothing when the cache is reused).
    """
    groups = check_pack_args(groups, context_length, "pack")
    dtype = token_dtype(int(tokenizer.vocab_size))
    if not 0 <= int(tokenizer.eos_id) < int(tokenizer.vocab_size):
        raise DataError(f"data.tokenizer: eos_id {tokenizer.eos_id} is outside [0, {tokenizer.vocab_size})")
    source.validate(groups)  # every group, before any packing
    root = cache_root(source, tokenizer, int(context_length), cache_dir, seed)
    job = _Job(
        source=source,
        tokenizer=tokenizer,
        context_length=int(context_length),
        seed=int(seed),
        root=root,
        dtype=dtype,
        progress=bool(progress),
        verify_checksums=bool(verify_checksums),
        rebuild_on_mismatch=bool(rebuild_on_mismatch),
    )
    entries = {g: _ensure_entry(job, g) for g in groups}
    return _open(root, _run_manifest(root, entries))


def _entries_in(root: Path) -> dict[str, list[tuple[Path, dict]]]:
    """Finished entries (manifest readable, this format, every split) under a settings folder, by group."""
    found: dict[str, list[tuple[Path, dict]]] = {}
    for entry in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _read_manifest(entry)
        if _complete(m):
            found.setdefault(m["group"], []).append((entry, m))
    return found


def _pick_entries(root: Path, groups: list[str] | None) -> dict[str, tuple[Path, dict]]:
    """One finished entry per requested group of a settings folder (all groups by default)."""
    found = _entries_in(root)
    if not found:
        raise DataError(
            f"cache: no readable {MANIFEST_NAME} in {root} or its entry folders; it is not a finished "
            "cache (rebuild it)"
        )
    groups = sorted(found) if groups is None else list(groups)
    missing = [g for g in groups if g not in found]
    if missing:
        raise DataError(
            f"cache: {root} has no finished entry (a folder with a readable {MANIFEST_NAME} and every "
            f"split) for group(s) {missing}; it has {sorted(found)}; rebuild it with build_packed"
        )
    several = {g: [e.name for e, _ in found[g]] for g in groups if len(found[g]) > 1}
    if several:
        raise DataError(
            f"cache: {root} holds several versions of {several}; pass one entry folder to load_packed, "
            "or use build_packed, which picks the one matching the data"
        )
    return {g: found[g][0] for g in groups}


def load_packed(
    root: str | Path, groups: list[str] | None = None, verify_checksums: bool = False
) -> PackedGroups:
    """Open an existing cache: a settings folder (`PackedGroups.root`) or one group's entry folder.

    From a settings folder: the given groups (default: every group it holds, by name), each of
    which must have exactly one finished entry there."""
    root = Path(root).expanduser()
    manifest = _read_manifest(root)
    if manifest is not None and manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"cache: {root} has format_version {manifest.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; rebuild it"
        )
    if manifest is not None:  # one group's entry
        if not _complete(manifest) or (groups is not None and list(groups) != [manifest["group"]]):
            raise DataError(f"cache: {root} is an unfinished entry or not one of {groups}; rebuild it")
        root, entries = root.parent, {manifest["group"]: (root, manifest)}
    elif (root / MANIFEST_NAME).exists() or not root.is_dir():
        raise DataError(
            f"cache: no readable {MANIFEST_NAME} in {root}; it is not a finished cache (rebuild it)"
        )
    else:
        entries = _pick_entries(root, groups)
    for entry, m in entries.values():
        for s in SPLITS:
            problem = _entry_problem(entry, m["splits"][s], int(m["context_length"]), verify_checksums)
            if problem is not None:
                raise DataError(f"cache: {problem}; rebuild it (build_packed(..., rebuild_on_mismatch=True))")
    return _open(root, _run_manifest(root, entries))
