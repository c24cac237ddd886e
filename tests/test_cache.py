"""The packed-token cache: exact packing, manifest, reuse, invalidation, corruption and concurrency."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aioli_repro.data.cache import (
    MANIFEST_NAME,
    PackedGroups,
    build_packed,
    cache_root,
    group_cache_dir,
    load_packed,
    token_dtype,
)
from aioli_repro.data.local import LocalSource
from aioli_repro.data.source import SPLITS, DataError, GroupSource
from aioli_repro.data.tokenizer import ByteTokenizer, Tokenizer

EOS = 256


class CountingSource(GroupSource):
    """In-memory documents; counts `documents` calls and documents yielded (optionally logged to a file)."""

    name = "counting"

    def __init__(self, docs: dict[str, dict[str, list[str]]], log: str | None = None, delay: float = 0.0):
        self.docs = docs
        self.calls = 0
        self.yielded = 0
        self.log = log
        self.delay = delay

    def available_groups(self) -> list[str]:
        return list(self.docs)

    def documents(self, group: str, split: str) -> Iterator[str]:
        self.calls += 1
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {group} {split}\n")
        for d in self.docs[group][split]:
            self.yielded += 1
            if self.delay:
                time.sleep(self.delay)
            yield d

    def fingerprint(self) -> dict:
        return {"docs": hashlib.sha256(json.dumps(self.docs, sort_keys=True).encode()).hexdigest()}

    def group_fingerprint(self, group: str) -> dict:
        return {"docs": hashlib.sha256(json.dumps(self.docs[group], sort_keys=True).encode()).hexdigest()}

    def loss_floor(self, group: str, split: str) -> float | None:
        return 0.5 if group == "a" and split == "val" else None


def _docs() -> dict[str, dict[str, list[str]]]:
    return {
        "a": {
            "train": [f"a-train-{i}-" + "t" * (i % 7) for i in range(30)],
            # val: 3 + 2 + 5 bytes + 3 EOS = 13 tokens -> context 4 gives 3 sequences, 1 token dropped
            "val": ["abc", "de", "fghij"],
            "test": ["0123456789", "xy"],
        },
        "b": {
            "train": [f"b{i}" * (1 + i % 3) for i in range(25)],
            "val": ["hello", "world"],
            "test": ["bbbbbbbbbbbb"],
        },
    }


def _flat_tokens(docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += list(d.encode()) + [EOS]
    return out


def _build(src: GroupSource, cache: Path, L: int = 4, seed: int = 0, **kw) -> PackedGroups:
    return build_packed(src, ByteTokenizer(), ["a", "b"], L, cache, seed=seed, progress=False, **kw)


def test_packing_matches_hand_computation(tmp_path: Path) -> None:
    docs = _docs()
    packed = _build(CountingSource(docs), tmp_path)
    assert packed.groups == ["a", "b"] and packed.context_length == 4
    assert (packed.vocab_size, packed.eos_id) == (257, EOS)
    val_a = packed.val["a"]
    assert val_a.dtype == np.uint16 and val_a.shape == (3, 4)
    # val/test keep document order; one EOS after every document; the remainder is dropped
    assert val_a.reshape(-1).tolist() == _flat_tokens(docs["a"]["val"])[:12]
    assert (
        packed.test["a"].reshape(-1).tolist() == _flat_tokens(docs["a"]["test"])[:12]
    )  # 14 tokens -> 3 seqs
    assert packed.test["b"].shape == (3, 4)  # 12 + 1 = 13 tokens
    for g in ("a", "b"):
        train_docs = docs[g]["train"]
        n_tok = len(_flat_tokens(train_docs))
        flat = packed.train[g].reshape(-1).tolist()
        assert packed.train[g].shape == (n_tok // 4, 4)
        # train is a document-level shuffle: complete pieces are distinct documents, the tail a prefix of one
        pieces = bytes(t if t != EOS else 0 for t in flat).split(b"\0")
        full, tail = [p.decode() for p in pieces[:-1]], pieces[-1].decode()
        assert len(set(full)) == len(full) and set(full) <= set(train_docs)
        assert any(d.startswith(tail) for d in set(train_docs) - set(full))
        assert full != train_docs[: len(full)]  # really shuffled
    man = packed.manifest["groups"]
    entries = packed.manifest["entries"]
    assert (
        re.fullmatch(r"a-[0-9a-f]{16}", entries["a"]) and packed.entry_dir("a") == packed.root / entries["a"]
    )
    assert man["a"]["val"] | {"sha256": None} == {
        "file": f"{entries['a']}/val.bin",
        "n_docs": 3,
        "n_tokens": 13,
        "n_seq": 3,
        "dtype": "uint16",
        "bytes": 24,
        "sha256": None,
        "loss_floor": 0.5,
    }
    assert packed.loss_floor("a", "val") == 0.5 and packed.loss_floor("b", "val") is None
    for g in ("a", "b"):
        for s in SPLITS:
            e = man[g][s]
            assert e["n_docs"] == len(docs[g][s])
            assert e["n_tokens"] == len(_flat_tokens(docs[g][s]))
            assert e["sha256"] == hashlib.sha256((packed.root / e["file"]).read_bytes()).hexdigest()
    for g in ("a", "b"):  # each group's entry keeps its own manifest, files relative to the entry
        on_disk = json.loads((packed.entry_dir(g) / MANIFEST_NAME).read_text())
        assert {s: on_disk["splits"][s]["file"] for s in SPLITS} == {s: f"{s}.bin" for s in SPLITS}
        assert all(on_disk["splits"][s] | {"file": man[g][s]["file"]} == man[g][s] for s in SPLITS)
        assert on_disk["key"]["context_length"] == 4 and on_disk["key"]["group"] == g
    assert packed.stats()["a"]["val"] == {"docs": 3, "tokens": 13, "seqs": 3}
    assert packed.stats()["b"]["test"] == {"docs": 1, "tokens": 13, "seqs": 3}


def test_second_build_reads_nothing_and_is_identical(tmp_path: Path) -> None:
    first = _build(CountingSource(_docs()), tmp_path)
    src = CountingSource(_docs())
    second = _build(src, tmp_path)
    assert (src.calls, src.yielded) == (0, 0)
    assert second.root == first.root
    for s in SPLITS:
        for g in ("a", "b"):
            np.testing.assert_array_equal(first.split(s)[g], second.split(s)[g])
    again = load_packed(first.root)
    assert again.groups == ["a", "b"]
    np.testing.assert_array_equal(again.train["b"], first.train["b"])
    # a different cache dir rebuilds and produces the very same bytes (deterministic shuffle)
    other = _build(CountingSource(_docs()), tmp_path / "other")
    for g in ("a", "b"):
        np.testing.assert_array_equal(other.train[g], first.train[g])
    # adding a group later packs only that group, in the same root; the others' entries are reused
    docs = _docs() | {"c": {s: ["cccc"] * 3 for s in SPLITS}}
    src_c = CountingSource(docs)
    out = build_packed(src_c, ByteTokenizer(), ["a", "c"], 4, tmp_path, progress=False)
    assert src_c.calls == 3 and out.root == first.root and out.groups == ["a", "c"]
    assert out.entry_dir("a") == first.entry_dir("a")
    assert set(load_packed(first.root).groups) == {"a", "b", "c"}
    # the run's key hashes its entries in run order, however they are opened
    reordered = build_packed(CountingSource(docs), ByteTokenizer(), ["c", "a"], 4, tmp_path, progress=False)
    assert load_packed(first.root, ["c", "a"]).manifest["key_hash"] == reordered.manifest["key_hash"]
    assert load_packed(first.root, ["a", "c"]).manifest["key_hash"] == out.manifest["key_hash"]
    assert reordered.manifest["key_hash"] != out.manifest["key_hash"]


def test_key_changes_give_new_roots(tmp_path: Path) -> None:
    base = _build(CountingSource(_docs()), tmp_path)
    assert _build(CountingSource(_docs()), tmp_path, L=5).root != base.root
    reseeded = _build(CountingSource(_docs()), tmp_path, seed=1)
    assert reseeded.root != base.root
    assert not np.array_equal(reseeded.train["a"], base.train["a"])  # seed changes the document order
    np.testing.assert_array_equal(reseeded.val["a"], base.val["a"])  # ... but not held-out data
    changed = _docs()
    changed["b"]["val"][0] = "HELLO"
    other = _build(CountingSource(changed), tmp_path)
    # same settings folder; only the changed group gets a new entry, and the run a new key
    assert other.root == base.root and other.entry_dir("a") == base.entry_dir("a")
    assert other.entry_dir("b") != base.entry_dir("b")
    assert other.manifest["key_hash"] != base.manifest["key_hash"]
    assert _build(CountingSource(_docs()), tmp_path).manifest["key_hash"] == base.manifest["key_hash"]
    assert cache_root(CountingSource(_docs()), ByteTokenizer(), 4, tmp_path) == base.root
    for g in ("a", "b"):
        assert group_cache_dir(CountingSource(_docs()), ByteTokenizer(), g, 4, tmp_path) == base.entry_dir(g)


def test_corruption_detected_and_rebuilt(tmp_path: Path) -> None:
    packed = _build(CountingSource(_docs()), tmp_path)
    root, a_train, b_val = packed.root, packed.entry_dir("a") / "train.bin", packed.entry_dir("b") / "val.bin"
    good = a_train.read_bytes()
    del packed  # drop the memmaps before touching the files
    os.truncate(a_train, 10)
    with pytest.raises(DataError, match=r"/a-[0-9a-f]{16}/train\.bin has 10 bytes"):
        _build(CountingSource(_docs()), tmp_path)
    with pytest.raises(DataError, match=r"a-[0-9a-f]{16}/train\.bin"):
        load_packed(root)
    src = CountingSource(_docs())
    rebuilt = _build(src, tmp_path, rebuild_on_mismatch=True)
    assert src.calls == 1  # only the broken file
    assert a_train.read_bytes() == good
    assert rebuilt.train["a"].shape[0] * 4 * 2 == len(good)
    # same size, different bytes: only a checksum catches it
    del rebuilt
    data = bytearray(b_val.read_bytes())
    data[0] ^= 1
    b_val.write_bytes(bytes(data))
    _build(CountingSource(_docs()), tmp_path)  # size check passes
    with pytest.raises(DataError, match="sha256"):
        _build(CountingSource(_docs()), tmp_path, verify_checksums=True)
    with pytest.raises(DataError, match="sha256"):
        load_packed(root, verify_checksums=True)
    _build(CountingSource(_docs()), tmp_path, verify_checksums=True, rebuild_on_mismatch=True)
    load_packed(root, verify_checksums=True)


def test_half_written_cache_without_manifest_is_rebuilt(tmp_path: Path) -> None:
    packed = _build(CountingSource(_docs()), tmp_path)
    root, entries = packed.root, [packed.entry_dir(g) for g in ("a", "b")]
    expected = {g: {s: packed.split(s)[g].copy() for s in SPLITS} for g in ("a", "b")}
    del packed
    for entry in entries:
        (entry / MANIFEST_NAME).unlink()
        (entry / "train.bin.tmp-999").write_bytes(b"junk")  # a leftover temp file
    (entries[0] / "val.bin").write_bytes(b"\x01\x02")  # a torn file from a crashed build
    for where in (root, entries[0]):
        with pytest.raises(DataError, match="manifest"):
            load_packed(where)
    src = CountingSource(_docs())
    again = _build(src, tmp_path)
    assert src.calls == 6  # nothing unlisted is trusted
    for g in ("a", "b"):
        for s in SPLITS:
            np.testing.assert_array_equal(again.split(s)[g], expected[g][s])
    assert not list(root.glob("*/*.tmp-*"))
    assert load_packed(root, ["a"]).groups == ["a"]


class FailingSource(CountingSource):
    """Raises part-way through one group/split, like a build killed mid-way."""

    def __init__(self, docs: dict, fail_at: tuple[str, str]) -> None:
        super().__init__(docs)
        self.fail_at = fail_at

    def documents(self, group: str, split: str) -> Iterator[str]:
        for i, d in enumerate(super().documents(group, split)):
            if (group, split) == self.fail_at and i == 1:
                raise KeyboardInterrupt
            yield d


def test_interrupted_build_resumes_where_it_stopped(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _build(FailingSource(_docs(), fail_at=("b", "val")), tmp_path)
    root = cache_root(CountingSource(_docs()), ByteTokenizer(), 4, tmp_path)
    b_entry = group_cache_dir(CountingSource(_docs()), ByteTokenizer(), "b", 4, tmp_path)
    recorded = json.loads((b_entry / MANIFEST_NAME).read_text())["splits"]
    assert list(recorded) == ["train"] and not list(root.glob("*/*.tmp-*"))  # the torn file is gone
    assert sorted(p.name for p in b_entry.glob("*.bin")) == ["train.bin"]
    with pytest.raises(DataError, match=r"for group\(s\) \['b'\]"):
        load_packed(root, ["a", "b"])  # b is unfinished
    log = tmp_path / "reads.log"
    src = CountingSource(_docs(), log=str(log))
    resumed = _build(src, tmp_path)
    assert log.read_text().split("\n")[:-1] == [f"{os.getpid()} b val", f"{os.getpid()} b test"]
    fresh = _build(CountingSource(_docs()), tmp_path / "fresh")
    for s in SPLITS:
        for g in ("a", "b"):
            np.testing.assert_array_equal(resumed.split(s)[g], fresh.split(s)[g])
    assert resumed.manifest["key_hash"] == fresh.manifest["key_hash"]


def test_building_one_group_does_not_wait_for_another(tmp_path: Path) -> None:
    import fcntl
    import threading

    src = CountingSource(_docs())
    a_entry = group_cache_dir(src, ByteTokenizer(), "a", 4, tmp_path)
    a_entry.mkdir(parents=True)
    done: dict[str, PackedGroups] = {}

    def pack(g: str) -> None:
        done[g] = build_packed(src, ByteTokenizer(), [g], 4, tmp_path, progress=False)

    threads = {g: threading.Thread(target=pack, args=(g,), daemon=True) for g in ("a", "b")}
    with open(a_entry / ".lock", "a+") as held:  # another process is packing group a
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        threads["a"].start()
        threads["b"].start()
        threads["b"].join(timeout=20)
        threads["a"].join(timeout=1)
        assert set(done) == {"b"}  # b was packed at once; a waits for its lock
    threads["a"].join(timeout=20)
    assert set(done) == {"a", "b"} and done["a"].root == done["b"].root


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"group 'a' split 'val' has 13 tokens.*context_length=64.*smaller"):
        _build(CountingSource(_docs()), tmp_path, L=64)

    class Huge(ByteTokenizer):
        name = "huge"
        vocab_size = 2**33

    with pytest.raises(DataError, match="does not fit"):
        build_packed(CountingSource(_docs()), Huge(), ["a"], 4, tmp_path, progress=False)
    assert token_dtype(257) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(50277) == np.uint16

    class Liar(Tokenizer):
        name, vocab_size, eos_id = "liar", 100, 99

        def encode(self, doc: str | bytes) -> np.ndarray:
            return np.array([5, 150], dtype=np.int64)

    with pytest.raises(DataError, match="outside its vocab_size 100"):
        build_packed(CountingSource(_docs()), Liar(), ["a"], 2, tmp_path, progress=False)
    with pytest.raises(DataError, match="unknown group 'z'"):
        build_packed(CountingSource(_docs()), ByteTokenizer(), ["a", "z"], 4, tmp_path, progress=False)


def test_uint32_and_local_source_end_to_end(tmp_path: Path) -> None:
    class Wide(ByteTokenizer):
        name, vocab_size, eos_id = "wide", 70_000, 69_999

    root = tmp_path / "data"
    for g in ("x", "y"):
        (root / g).mkdir(parents=True)
        for i in range(12):
            (root / g / f"{i}.txt").write_text(f"{g} doc {i} " * 3)
    src = LocalSource(str(root), val_fraction=0.2, test_fraction=0.2)
    packed = build_packed(src, Wide(), ["x", "y"], 8, tmp_path / "cache", progress=False)
    assert packed.train["x"].dtype == np.uint32
    assert packed.manifest["groups"]["x"]["val"]["n_docs"] == 2
    n_tok = sum(len(d.encode()) + 1 for d in src.documents("y", "test"))
    assert packed.test["y"].shape == (n_tok // 8, 8)
    assert 69_999 in set(np.asarray(packed.train["y"]).ravel().tolist())


def _build_in_child(cache: str, log: str, q: mp.Queue) -> None:
    try:
        packed = build_packed(
            CountingSource(_docs(), log=log, delay=0.005),
            ByteTokenizer(),
            ["a", "b"],
            4,
            cache,
            progress=False,
        )
        q.put({f"{g}/{s}": packed.manifest["groups"][g][s]["sha256"] for g in ("a", "b") for s in SPLITS})
    except Exception as e:  # report instead of dying silently
        q.put(repr(e))


def test_two_processes_share_one_build(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    log = tmp_path / "reads.log"
    procs = [
        ctx.Process(target=_build_in_child, args=(str(tmp_path / "cache"), str(log), q)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(isinstance(r, dict) for r in results), results
    assert results[0] == results[1]
    reads = log.read_text().splitlines()
    # every group/split was read exactly once: whichever process held an entry's lock packed it, and
    # the other reused it
    assert sorted(r.split(maxsplit=1)[1] for r in reads) == sorted(f"{g} {s}" for g in "ab" for s in SPLITS)
    packed = load_packed(
        cache_root(CountingSource(_docs()), ByteTokenizer(), 4, tmp_path / "cache"), verify_checksums=True
    )
    assert packed.groups == ["a", "b"]


def test_a_source_without_group_fingerprints_keys_each_group_by_the_whole_source(tmp_path: Path) -> None:
    class Whole(CountingSource):  # a third-party source that only implements fingerprint()
        group_fingerprint = GroupSource.group_fingerprint

    base = _build(Whole(_docs()), tmp_path)
    assert base.entry_dir("a") != _build(CountingSource(_docs()), tmp_path).entry_dir("a")
    src = Whole(_docs())
    assert _build(src, tmp_path).manifest["key_hash"] == base.manifest["key_hash"] and src.calls == 0
    changed = _docs()
    changed["b"]["val"][0] = "HELLO"
    src = Whole(changed)
    other = _build(src, tmp_path)
    # safe rather than minimal: any change re-keys every group
    assert src.calls == 6 and other.entry_dir("a") != base.entry_dir("a")
    np.testing.assert_array_equal(other.train["a"], base.train["a"])
