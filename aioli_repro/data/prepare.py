"""Tokenise and pack every group a set of runs needs, once, one process per group (`make prepare`).

`prepare(source, tokenizer, groups, context_length, cache_dir, seed)` writes exactly the cache entries
that `build_packed` writes for the same settings (each worker *is* `build_packed` on one group), so a
later run with those settings finds them and packs nothing. Per group:

- an entry that is already complete is verified (sha256 of every file, in full) and skipped;
- otherwise its missing splits are packed (an entry interrupted mid-way resumes at the split it was on);
- as soon as the group is done, the sha256 of each of its files, with the file's size and mtime, goes
  into `<settings folder>/prepared.json` (`cache.PREPARED_NAME`): a killed prepare keeps every group it
  finished, and running it again does only the others.

A run with `data.verify_checksums=true` then accepts a prepared file whose size, mtime and manifest
sha256 equal that record, instead of hashing it again (`cache._verified_by_prepare`); a file written
since (a new mtime) or an unprepared one is hashed as before. A prepare always hashes in full: it first
drops its groups' records, so `build_packed` re-hashes their files.

Parallelism: one process per group (forked where the platform can, so the source and the tokenizer are
inherited, not copied), `workers` at a time, the groups to pack first and the largest of them first. What
every worker would otherwise load by itself (SlimPajama: the HF splits, downloaded on first use, and the
per-group row index) is loaded once, before the workers start. HF fast tokenizers may also use their own
threads within a group (TOKENIZERS_PARALLELISM, left on), the only way the largest group gets more than one
core (not measured; see docs/benchmarks.md). A group whose worker fails is reported and the others go on.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aioli_repro.data.cache import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    PREPARED_NAME,
    _read_manifest,
    _usable,
    build_packed,
    cache_key,
    cache_root,
    check_pack_args,
    group_cache_dir,
    token_dtype,
)
from aioli_repro.data.slimpajama import SlimPajamaSource
from aioli_repro.data.source import SPLITS, DataError, GroupSource, human_count
from aioli_repro.data.tokenizer import Tokenizer
from aioli_repro.fileio import atomic_write_json, file_lock

PREPARE_LOCK = ".prepare.lock"  # in the settings folder, held while prepared.json is rewritten
HEARTBEAT_S = 60.0  # a packing group says how far it got this often


def default_workers() -> int:
    """The cores this process may use (a SLURM / cgroup CPU set counts, not the machine's cores)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


@dataclass
class GroupResult:
    """What a prepare did with one group."""

    group: str
    status: str  # "packed" (some split written), "verified" (complete already: hashed, kept) or "failed"
    entry: str = ""  # the entry folder's name in the settings folder
    splits: dict = field(default_factory=dict)  # the entry manifest's split records
    packed: list[str] = field(default_factory=list)  # splits this prepare wrote
    files: dict = field(default_factory=dict)  # {file: {sha256, bytes, mtime_ns}}: the prepared.json record
    seconds: float = 0.0
    error: str | None = None

    @property
    def tokens_packed(self) -> int:
        """Tokens (EOS included) of the splits this prepare wrote."""
        return sum(int(self.splits[s]["n_tokens"]) for s in self.packed)

    @property
    def bytes(self) -> int:
        return sum(int(f["bytes"]) for f in self.files.values())


@dataclass
class PrepareReport:
    root: Path  # the settings folder (`PackedGroups.root` of every run with these settings)
    workers: int  # processes used
    results: dict[str, GroupResult]  # by group, in the order they finished
    seconds: float  # wall-clock of the packing and verifying (the source's loading not included)
    load_seconds: float  # loading what the workers share (SlimPajama: download, HF splits, row index)

    @property
    def failed(self) -> list[GroupResult]:
        return [r for r in self.results.values() if r.status == "failed"]

    @property
    def tokens_packed(self) -> int:
        return sum(r.tokens_packed for r in self.results.values())


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h {m % 60:02d}m {s:02d}s" if m >= 60 else f"{m}m {s:02d}s"


# --- one group (in a worker process, or in this one) ----------------------------------------------
@dataclass
class _Work:
    """What every group's worker shares."""

    source: GroupSource
    tokenizer: Tokenizer
    context_length: int
    cache_dir: str
    seed: int
    rebuild_on_mismatch: bool
    progress: bool
    heartbeat_s: float


def _file_ids(entry: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each split file present: a file this prepare (re)wrote gets new ones."""
    out = {}
    for s in SPLITS:
        try:
            st = (entry / f"{s}.bin").stat()
        except OSError:
            continue
        out[s] = (st.st_ino, st.st_mtime_ns)
    return out


@contextmanager
def _heartbeat(work: _Work, group: str) -> Iterator[None]:
    """While packing: '[prepare] <group>: train 1,200,000 documents read (5m 00s)' every heartbeat_s."""
    source = work.source
    if not work.progress or not work.heartbeat_s or not hasattr(source, "__dict__"):
        yield
        return
    original, t0 = source.documents, time.monotonic()
    due = [t0 + work.heartbeat_s]

    def documents(g: str, split: str):
        for i, doc in enumerate(original(g, split), 1):
            now = time.monotonic()
            if now >= due[0]:
                _say(True, f"[prepare] {group}: {split} {i:,} documents read ({_duration(now - t0)})")
                due[0] = now + work.heartbeat_s
            yield doc

    had_own = "documents" in vars(source)
    source.documents = documents  # this instance only (a worker's copy, or restored below)
    try:
        yield
    finally:
        if had_own:
            source.documents = original
        else:
            del source.documents


def prepare_group(work: _Work, group: str) -> GroupResult:
    """Verify or pack one group's entry with `build_packed`; failures are returned, not raised."""
    t0 = time.perf_counter()
    try:
        entry = group_cache_dir(
            work.source, work.tokenizer, group, work.context_length, work.cache_dir, work.seed
        )
        before = _file_ids(entry)
        with _heartbeat(work, group):
            build_packed(
                work.source,
                work.tokenizer,
                [group],
                work.context_length,
                cache_dir=work.cache_dir,
                seed=work.seed,
                progress=False,
                verify_checksums=True,  # in full: this group's prepared.json record was dropped
                rebuild_on_mismatch=work.rebuild_on_mismatch,
            )
        manifest = _read_manifest(entry)
        if manifest is None:  # pragma: no cover - build_packed just wrote it
            raise DataError(f"cache: {entry / MANIFEST_NAME} vanished right after packing")
        files = {}
        for s in SPLITS:
            rec = manifest["splits"][s]
            st = (entry / rec["file"]).stat()
            files[rec["file"]] = {"sha256": rec["sha256"], "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        after = _file_ids(entry)
        packed = [s for s in SPLITS if before.get(s) != after.get(s)]
        return GroupResult(
            group=group,
            status="packed" if packed else "verified",
            entry=entry.name,
            splits=manifest["splits"],
            packed=packed,
            files=files,
            seconds=time.perf_counter() - t0,
        )
    except DataError as e:
        return GroupResult(group, "failed", seconds=time.perf_counter() - t0, error=" ".join(str(e).split()))
    except Exception:  # a bug: keep its traceback, and let the other groups go on
        return GroupResult(group, "failed", seconds=time.perf_counter() - t0, error=traceback.format_exc())


_WORK: _Work | None = None  # a worker process's share, set once by `_init_worker`


def _init_worker(work: _Work) -> None:
    global _WORK
    _WORK = work


def _pool_task(group: str) -> GroupResult:
    assert _WORK is not None
    return prepare_group(_WORK, group)


def _results(work: _Work, order: list[str], workers: int) -> Iterator[GroupResult]:
    """Each group's result as it finishes: in this process for one worker, else in a process pool."""
    n = min(workers, len(order))
    if n <= 1:
        for g in order:
            yield prepare_group(work, g)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker, initargs=(work,))
    try:
        futures = {pool.submit(_pool_task, g): g for g in order}  # started in this order
        for f in as_completed(futures):
            try:
                yield f.result()
            except BrokenProcessPool:
                yield GroupResult(
                    futures[f], "failed", error="its worker process died (killed, or out of memory)"
                )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- prepared.json --------------------------------------------------------------------------------
def read_prepared(root: str | Path) -> dict:
    """The settings folder's prepared.json ({} if there is none or it is unreadable)."""
    try:
        data = json.loads((Path(root) / PREPARED_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _update_prepared(
    root: Path, settings: dict, drop: tuple[str, ...] = (), add: GroupResult | None = None
) -> None:
    """Drop entries' records and/or add one, under the settings folder's prepare lock."""
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / PREPARE_LOCK):
        data = read_prepared(root)
        entries = data.get("entries") if isinstance(data.get("entries"), dict) else {}
        for name in drop:
            entries.pop(name, None)
        if add is not None:
            entries[add.entry] = {
                "group": add.group,
                "verified": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": add.files,
                "n_tokens": {s: int(add.splits[s]["n_tokens"]) for s in SPLITS},
            }
        data = {
            "format_version": FORMAT_VERSION,
            "settings": settings,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "entries": dict(sorted(entries.items())),
        }
        atomic_write_json(root / PREPARED_NAME, data, indent=1)


# --- the whole prepare ----------------------------------------------------------------------------
def _complete(work: _Work, group: str) -> bool:
    """Does the group have a complete entry already (sizes checked, nothing hashed)?"""
    w = work
    _, key = cache_key(w.source, w.tokenizer, w.context_length, w.seed, group=group)
    entry = group_cache_dir(w.source, w.tokenizer, group, w.context_length, w.cache_dir, w.seed)
    return _usable(entry, _read_manifest(entry), key, verify_checksums=False)


def _size_hint(source: GroupSource, group: str) -> int:
    """Training documents of a group, when known cheaply (0 if not): the largest group starts first.

    SlimPajama: also loads the HF splits and computes the row index of every group, here, once, so
    that the workers inherit them instead of each loading (or downloading) them."""
    try:
        if isinstance(source, SlimPajamaSource) and not source.streaming:
            for s in ("val", "test"):
                source.split_indices(group, s)  # loads the held-out HF split and indexes it
            return len(source.split_indices(group, "train"))
        return int(source.num_documents(group, "train") or 0)
    except DataError as e:
        if str(e).startswith("data.source.path"):
            raise  # the data cannot be loaded at all (offline, a wrong path): one error, not one per group
        return 0  # this group only (e.g. no documents of it): its own worker reports it


def prepare(
    source: GroupSource,
    tokenizer: Tokenizer,
    groups: list[str],
    context_length: int,
    cache_dir: str | Path,
    seed: int = 0,
    workers: int | None = None,
    rebuild_on_mismatch: bool = False,
    progress: bool = True,
    heartbeat_s: float = HEARTBEAT_S,
) -> PrepareReport:
    """Verify or pack every group's cache entry, `workers` processes at a time (default: every core
    this process may use). Returns what happened per group; a failed group does not stop the others."""
    groups = check_pack_args(groups, context_length, "prepare")
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 1:
        raise DataError(f"--workers: must be an integer >= 1, got {workers!r}")
    token_dtype(int(tokenizer.vocab_size))  # a vocabulary the cache cannot hold fails here, once
    source.validate(groups)
    work = _Work(
        source=source,
        tokenizer=tokenizer,
        context_length=int(context_length),
        cache_dir=str(cache_dir),
        seed=int(seed),
        rebuild_on_mismatch=bool(rebuild_on_mismatch),
        progress=bool(progress),
        heartbeat_s=float(heartbeat_s or 0),
    )
    root = cache_root(source, tokenizer, int(context_length), cache_dir, int(seed))
    _, settings = cache_key(source, tokenizer, int(context_length), int(seed))
    done = [g for g in groups if _complete(work, g)]
    todo = [g for g in groups if g not in done]
    n = min(int(workers), len(groups))
    _say(
        progress,
        f"[prepare] {len(groups)} group(s) {groups}, tokenizer {tokenizer.name!r}, context {context_length}: "
        f"{len(todo)} to pack, {len(done)} already there (to verify); {n} worker process(es); cache {root}",
    )
    t_load = time.perf_counter()
    todo = _largest_first(source, todo, progress)
    load_s = time.perf_counter() - t_load
    entries = [
        group_cache_dir(source, tokenizer, g, int(context_length), cache_dir, int(seed)).name for g in groups
    ]
    _update_prepared(root, settings, drop=tuple(entries))  # their files are hashed again, in full, below
    t0 = time.perf_counter()
    results = _pack_and_record(work, todo + done, n, root, settings)
    report = PrepareReport(root, n, results, time.perf_counter() - t0, load_s)
    _say(progress, summary_line(report))
    return report


def _largest_first(source: GroupSource, todo: list[str], progress: bool) -> list[str]:
    """The groups to pack, largest first, so the longest pack starts at once (loads the source's index)."""
    if not todo:
        return todo
    if isinstance(source, SlimPajamaSource):
        _say(progress, f"[prepare] loading {source.path} (downloaded on first use), indexing its groups")
    hints = {g: _size_hint(source, g) for g in todo}
    return sorted(todo, key=lambda g: -hints[g])  # stable: equal hints keep the config's order


def _pack_and_record(
    work: _Work, groups: list[str], n: int, root: Path, settings: dict
) -> dict[str, GroupResult]:
    """Pack or verify the groups on n processes, adding each finished one to the prepared record."""
    results: dict[str, GroupResult] = {}
    for k, r in enumerate(_results(work, groups, n), 1):
        results[r.group] = r
        if r.status != "failed":
            _update_prepared(root, settings, add=r)
        _say(work.progress, result_line(r, k, len(groups)))
    return results


def result_line(r: GroupResult, k: int, n: int) -> str:
    """One line per finished group."""
    head = f"[prepare] ({k}/{n}) {r.group}:"
    if r.status == "failed":
        return f"{head} FAILED: {r.error}"
    if r.status == "verified":
        return (
            f"{head} already prepared, skipped (sha256 of {len(r.files)} files, {human_count(r.bytes)}B, "
            f"verified in {_duration(r.seconds)})"
        )
    cells = [
        f"{s} {int(r.splits[s]['n_docs']):,} docs {human_count(int(r.splits[s]['n_tokens']))} tokens"
        for s in r.packed
    ]
    kept = [s for s in SPLITS if s not in r.packed]
    if kept:  # a resumed entry: these splits were packed before
        cells.append(f"kept {', '.join(kept)}")
    rate = r.tokens_packed / r.seconds if r.seconds > 0 else 0.0
    return f"{head} packed {' | '.join(cells)} in {_duration(r.seconds)} ({human_count(int(rate))} tokens/s)"


def summary_line(report: PrepareReport) -> str:
    by = {s: [r for r in report.results.values() if r.status == s] for s in ("packed", "verified", "failed")}
    rate = report.tokens_packed / report.seconds if report.seconds > 0 else 0.0
    parts = [
        f"{len(by['packed'])} packed ({human_count(report.tokens_packed)} tokens, "
        f"{human_count(int(rate))} tokens/s)",
        f"{len(by['verified'])} already prepared",
    ]
    if by["failed"]:
        parts.append(f"{len(by['failed'])} FAILED ({', '.join(r.group for r in by['failed'])})")
    took = f"done in {_duration(report.seconds)} with {report.workers} worker(s)"
    if report.load_seconds >= 0.1:
        took += f" (+ {_duration(report.load_seconds)} loading the source)"
    return f"[prepare] {took}: {', '.join(parts)}"
