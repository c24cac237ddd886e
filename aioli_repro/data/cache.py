"""Tokenise + pack once, memory-map forever.

Layout of one cache entry (`root = cache_dir / "<source>-<key hash>"`):

    root/manifest.json        key inputs + per group/split: n_docs, n_tokens, n_seq, dtype, bytes, sha256
    root/<group>/<split>.bin  raw (n_seq, context_length) array of token ids, uint16 or uint32
    root/.lock                flock'ed while building, so processes sharing a cache do not collide

Packing, per group and split: encode every document, append EOS after *every* document (the
official code has no separator; see docs/deviations.md), concatenate, and cut into non-overlapping
windows of `context_length` tokens, dropping the remainder. Training documents are first shuffled
at the document level (seeded by `seed` and the group name); val/test keep the source's order.

Crash safety: a .bin is written under a temporary name and `os.replace`d into place, and only then
recorded in the manifest (itself written to a temporary file and renamed). Files that the manifest
does not list are never trusted, so an interrupted build is simply resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from aioli_repro.data.source import SPLITS, DataError, GroupSource
from aioli_repro.data.tokenizer import Tokenizer

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None

#: bump when the on-disk format or the packing rule changes (invalidates every cache)
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_ENCODE_BATCH = 64  # documents per tokenizer call (HF fast tokenizers batch in Rust)
_FLUSH_TOKENS = 1 << 20  # tokens buffered before a write


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


def cache_key(
    source: GroupSource, tokenizer: Tokenizer, context_length: int, seed: int = 0
) -> tuple[str, dict]:
    """(16-hex-digit hash, the inputs it hashes): everything that determines the packed arrays."""
    inputs = _jsonable(
        {
            "fingerprint": source.fingerprint(),
            "tokenizer": tokenizer.name,
            "vocab_size": int(tokenizer.vocab_size),
            "eos_id": int(tokenizer.eos_id),
            "context_length": int(context_length),
            "seed": int(seed),
            "format_version": FORMAT_VERSION,
        }
    )
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return digest, inputs


def cache_root(
    source: GroupSource, tokenizer: Tokenizer, context_length: int, cache_dir: str | Path, seed: int = 0
) -> Path:
    """Where `build_packed` keeps the arrays for these inputs."""
    digest, _ = cache_key(source, tokenizer, context_length, seed)
    return Path(cache_dir).expanduser() / f"{source.name}-{digest}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable == absent: the build path rewrites it


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive flock for the duration of a build (released if the process dies)."""
    with open(path, "a+") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _check_group_name(group: str) -> None:
    if not isinstance(group, str) or not group or group.startswith(".") or "/" in group or "\\" in group:
        raise DataError(
            f"groups: {group!r} cannot be a cache folder name (no slashes, not starting with '.')"
        )


def _entry_problem(root: Path, entry: dict, context_length: int, verify_checksums: bool) -> str | None:
    """Why a manifest entry's file cannot be used (None if it can)."""
    path = root / entry["file"]
    if not path.exists():
        return f"{path} is missing"
    expected = int(entry["n_seq"]) * context_length * np.dtype(entry["dtype"]).itemsize
    size = path.stat().st_size
    if size != expected or size != int(entry["bytes"]):
        return f"{path} has {size} bytes, the manifest expects {expected}"
    if verify_checksums and _sha256_file(path) != entry["sha256"]:
        return f"{path} does not match its sha256 in the manifest"
    return None


# --- packing --------------------------------------------------------------------------------------
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
    source: GroupSource, tokenizer: Tokenizer, group: str, split: str, progress: bool
) -> Iterator[np.ndarray]:
    """Token ids of each document with EOS appended, range-checked, in source order."""
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    vocab = int(tokenizer.vocab_size)
    bar = tqdm(desc=f"pack {group}/{split}", unit="doc", disable=not progress, leave=False, mininterval=1.0)
    try:
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
            bar.update(len(docs))
    finally:
        bar.close()


def _group_seed(seed: int, group: str) -> list[int]:
    # one independent stream per group, stable across Python runs (str hash() is salted)
    return [int(seed), int.from_bytes(hashlib.sha256(group.encode()).digest()[:8], "little")]


def _pack_split(
    source: GroupSource,
    tokenizer: Tokenizer,
    group: str,
    split: str,
    context_length: int,
    seed: int,
    root: Path,
    dtype: np.dtype,
    progress: bool,
) -> dict:
    """Write `<root>/<group>/<split>.bin` and return its manifest entry."""
    gdir = root / group
    gdir.mkdir(parents=True, exist_ok=True)
    final = gdir / f"{split}.bin"
    tmp = gdir / f"{split}.bin.tmp-{os.getpid()}"
    stage = gdir / f"{split}.stage.tmp-{os.getpid()}"
    try:
        if split == "train":
            # Pass 1: tokens in source order to a staging file, remembering document lengths only,
            # so a large group never sits in RAM. Pass 2: copy documents out in shuffled order.
            lengths = array("q")
            w = _TokenWriter(stage, dtype)
            for toks in _encode_stream(source, tokenizer, group, split, progress):
                w.add(toks)
                lengths.append(len(toks))
            w.close()
            n_docs, n_tokens = len(lengths), w.written
            n_seq = n_tokens // context_length
            if n_seq > 0:
                lens = np.frombuffer(lengths, dtype=np.int64)
                starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
                staged = np.memmap(stage, dtype=dtype, mode="r", shape=(n_tokens,))
                keep = n_seq * context_length
                out = _TokenWriter(tmp, dtype)
                for d in np.random.default_rng(_group_seed(seed, group)).permutation(n_docs):
                    take = min(int(lens[d]), keep - (out.written + out.buffered))
                    out.add(np.asarray(staged[starts[d] : starts[d] + take]))
                    if out.written + out.buffered >= keep:
                        break
                out.close()
                del staged
        else:
            n_docs = 0
            w = _TokenWriter(tmp, dtype)
            for toks in _encode_stream(source, tokenizer, group, split, progress):
                w.add(toks)
                n_docs += 1
            w.close()
            n_tokens = w.written
            n_seq = n_tokens // context_length
            os.truncate(tmp, n_seq * context_length * dtype.itemsize)  # drop the partial last window
        if n_seq == 0:
            raise DataError(
                f"group {group!r} split {split!r} has {n_tokens} tokens ({n_docs} documents, one EOS each), "
                f"fewer than one sequence of context_length={context_length}; use a smaller "
                "train.context_length or give the group more data"
            )
        os.replace(tmp, final)
    finally:
        for p in (tmp, stage):
            if p.exists():
                p.unlink()
    floor = source.loss_floor(group, split)
    return {
        "file": f"{group}/{split}.bin",
        "n_docs": int(n_docs),
        "n_tokens": int(n_tokens),  # EOS included, before dropping the remainder
        "n_seq": int(n_seq),
        "dtype": dtype.name,
        "bytes": int(final.stat().st_size),
        "sha256": _sha256_file(final),
        "loss_floor": None if floor is None else float(floor),
    }


# --- public API -----------------------------------------------------------------------------------
def _open(root: Path, manifest: dict, groups: list[str]) -> PackedGroups:
    L = int(manifest["context_length"])
    arrays: dict[str, dict[str, np.ndarray]] = {s: {} for s in SPLITS}
    for g in groups:
        for s in SPLITS:
            e = manifest["groups"][g][s]
            arrays[s][g] = np.memmap(
                root / e["file"], dtype=np.dtype(e["dtype"]), mode="r", shape=(e["n_seq"], L)
            )
    tok = manifest["tokenizer"]
    return PackedGroups(
        groups=list(groups),
        context_length=L,
        vocab_size=int(tok["vocab_size"]),
        eos_id=int(tok["eos_id"]),
        train=arrays["train"],
        val=arrays["val"],
        test=arrays["test"],
        manifest=manifest,
        root=root,
    )


def _usable(root: Path, manifest: dict | None, groups: list[str], verify_checksums: bool) -> bool:
    if manifest is None:
        return False
    L = int(manifest["context_length"])
    for g in groups:
        for s in SPLITS:
            e = manifest["groups"].get(g, {}).get(s)
            if e is None or _entry_problem(root, e, L, verify_checksums) is not None:
                return False
    return True


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

    A file whose size (or, with `verify_checksums`, sha256) disagrees with the manifest raises a
    DataError naming it, or is rebuilt when `rebuild_on_mismatch` is set.
    """
    groups = list(groups)
    if not groups:
        raise DataError("groups: need at least one group to pack")
    for g in groups:
        _check_group_name(g)
    source.check_groups(groups)
    if not isinstance(context_length, (int, np.integer)) or context_length < 1:
        raise DataError(f"train.context_length: must be an integer >= 1, got {context_length!r}")
    context_length = int(context_length)
    dtype = token_dtype(int(tokenizer.vocab_size))
    if not 0 <= int(tokenizer.eos_id) < int(tokenizer.vocab_size):
        raise DataError(f"data.tokenizer: eos_id {tokenizer.eos_id} is outside [0, {tokenizer.vocab_size})")
    digest, key_inputs = cache_key(source, tokenizer, context_length, seed)
    root = Path(cache_dir).expanduser() / f"{source.name}-{digest}"
    root.mkdir(parents=True, exist_ok=True)

    manifest = _read_manifest(root)
    if (
        manifest is not None
        and manifest.get("key") == key_inputs
        and _usable(root, manifest, groups, verify_checksums)
    ):
        return _open(root, manifest, groups)  # fast path: no lock, no document read

    with _file_lock(root / ".lock"):
        manifest = _read_manifest(root)  # another process may have finished it while we waited
        if manifest is None or manifest.get("key") != key_inputs:
            manifest = {
                "format_version": FORMAT_VERSION,
                "source": source.name,
                "key_hash": digest,
                "key": key_inputs,
                "context_length": context_length,
                "seed": int(seed),
                "tokenizer": {
                    "name": tokenizer.name,
                    "vocab_size": int(tokenizer.vocab_size),
                    "eos_id": int(tokenizer.eos_id),
                },
                "dtype": dtype.name,
                "groups": {},
            }
        # leftovers of an interrupted build (we hold the lock, so nobody else is writing them)
        for p in root.glob("*/*.tmp-*"):
            p.unlink(missing_ok=True)
        for g in groups:
            for s in SPLITS:
                entry = manifest["groups"].get(g, {}).get(s)
                if entry is not None:
                    problem = _entry_problem(root, entry, context_length, verify_checksums)
                    if problem is None:
                        continue
                    if not rebuild_on_mismatch:
                        raise DataError(
                            f"cache: {problem} (cache {root}); delete it or pass rebuild_on_mismatch=True"
                        )
                entry = _pack_split(source, tokenizer, g, s, context_length, seed, root, dtype, progress)
                manifest["groups"].setdefault(g, {})[s] = entry
                manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                # record each finished file at once: an interrupted build resumes where it stopped
                _atomic_write_json(root / MANIFEST_NAME, manifest)
        _atomic_write_json(root / MANIFEST_NAME, manifest)
    return _open(root, manifest, groups)


def load_packed(
    root: str | Path, groups: list[str] | None = None, verify_checksums: bool = False
) -> PackedGroups:
    """Open an existing cache by its manifest (all complete groups, in manifest order, by default)."""
    root = Path(root).expanduser()
    manifest = _read_manifest(root)
    if manifest is None:
        raise DataError(
            f"cache: no readable {MANIFEST_NAME} in {root}; it is not a finished cache (rebuild it)"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"cache: {root} has format_version {manifest.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; rebuild it"
        )
    complete = [g for g, e in manifest["groups"].items() if all(s in e for s in SPLITS)]
    if groups is None:
        groups = complete
    missing = [g for g in groups if g not in complete]
    if missing:
        raise DataError(f"cache: {root} has no complete group(s) {missing}; it has {complete}")
    L = int(manifest["context_length"])
    for g in groups:
        for s in SPLITS:
            problem = _entry_problem(root, manifest["groups"][g][s], L, verify_checksums)
            if problem is not None:
                raise DataError(f"cache: {problem}; rebuild it (build_packed(..., rebuild_on_mismatch=True))")
    return _open(root, manifest, groups)
