"""Your own data: which files a LocalSource reads or skips (and why), checks before packing, and a
per-group cache that does not depend on the other groups of a run."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from aioli_repro.data.cache import PackedGroups, build_packed, packed_line
from aioli_repro.data.local import GroupReport, LocalSource, format_report
from aioli_repro.data.source import SPLITS, DataError
from aioli_repro.data.tokenizer import ByteTokenizer

EXT = "not in data.source.extensions"


class CountingLocal(LocalSource):
    """A LocalSource that counts documents() calls per group (a repack reads documents)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.reads: Counter[str] = Counter()

    def documents(self, group: str, split: str) -> Iterator[str]:
        self.reads[group] += 1
        yield from super().documents(group, split)


def _mixed(folder: Path) -> None:
    """One group folder with every kind of file the reader must tell apart."""
    folder.mkdir(parents=True)
    (folder / "_private.txt").write_text("underscore files are normal files " * 3)
    (folder / ".hidden.txt").write_text("dot files are hidden")
    (folder / "a.py").write_text("def f():\n    return 1\n")
    (folder / "b.md").write_text("# title\n\nsome *markdown*")
    (folder / "c.rst").write_text("Title\n=====\n\nrst text")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "nul.txt").write_bytes(b"looks like text\0but is not")
    (folder / "sub" / ".cache").mkdir(parents=True)
    (folder / "sub" / ".cache" / "x.txt").write_text("inside a hidden folder")
    (folder / "sub" / "d.txt").write_bytes("nested ééé".encode() + b"\xff")  # not valid UTF-8


def _doc(g: str, i: int) -> str:
    return f"{g} document {i:02d} " * 8  # 112 bytes: 113 tokens with the EOS


def _groups(root: Path, sizes: dict[str, int]) -> None:
    for g, n in sizes.items():
        (root / g).mkdir(parents=True)
        for i in range(n):
            (root / g / f"{i:02d}.txt").write_text(_doc(g, i))


def _build(src: LocalSource, groups: list[str], cache: Path, **kw) -> PackedGroups:
    return build_packed(src, ByteTokenizer(), groups, 16, cache, progress=kw.pop("progress", False), **kw)


def test_files_used_and_skipped_with_reasons(tmp_path: Path) -> None:
    _mixed(tmp_path / "data" / "mixed")
    src = LocalSource(str(tmp_path / "data"))
    assert src.available_groups() == ["mixed"]
    (rep,) = src.report()
    assert isinstance(rep, GroupReport) and rep.group == "mixed" and rep.error is None
    assert rep.files == ["_private.txt", "a.py", "b.md", "c.rst", "sub/d.txt"]
    assert rep.skipped == [
        (".hidden.txt", "hidden (name starts with '.')"),
        ("empty.txt", "empty file"),
        ("image.png", f"extension .png {EXT}"),
        ("nul.txt", "binary (NUL byte in the first KiB)"),
        ("sub/.cache/", "hidden (name starts with '.')"),
    ]
    # five documents, one per file: 5 * 0.05 rounds to 0, but val and test get one each from 3 docs on
    assert rep.docs == {"train": 3, "val": 1, "test": 1}
    docs = sorted(d for s in SPLITS for d in src.documents("mixed", s))
    assert docs[0] == "# title\n\nsome *markdown*" and len(docs) == 5
    assert any(d.startswith("nested ééé") and d.endswith("\ufffd") for d in docs)  # bad UTF-8 replaced
    # an underscore folder at the root is a group too
    (tmp_path / "data" / "_extra").mkdir()
    (tmp_path / "data" / "_extra" / "x.txt").write_text("x")
    assert LocalSource(str(tmp_path / "data")).available_groups() == ["_extra", "mixed"]


def test_extensions_override_and_validation(tmp_path: Path) -> None:
    _mixed(tmp_path / "mixed")
    (tmp_path / "mixed" / "rows.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "mixed" / "LICENSE").write_text("MIT licence text")
    (rep,) = LocalSource(str(tmp_path), extensions=["md", ".PNG"]).report()
    # .jsonl always counts (2 documents); the others now by the given list only
    assert rep.files == ["b.md", "rows.jsonl"]
    assert rep.docs == {"train": 1, "val": 1, "test": 1}
    skipped = dict(rep.skipped)
    assert skipped["image.png"] == "binary (NUL byte in the first KiB)"  # accepted type, binary content
    assert skipped["a.py"] == f"extension .py {EXT}" and skipped["LICENSE"] == f"extension (none) {EXT}"
    assert skipped["nul.txt"] == f"extension .txt {EXT}"  # the extension is checked first
    # the default takes extension-less text files (LICENSE, Makefile) and code
    (default,) = LocalSource(str(tmp_path)).report()
    assert {"LICENSE", "a.py", "rows.jsonl"} <= set(default.files) and len(default.files) == 7
    assert sum(default.docs.values()) == 8
    # a list of nothing: only .jsonl / .parquet
    (only,) = LocalSource(str(tmp_path), extensions=[]).report()
    assert only.files == ["rows.jsonl"]
    for bad in (".txt", [".tar.gz"], ["a/b"], [3]):
        with pytest.raises(DataError, match=r"^data\.source\.extensions: "):
            LocalSource(str(tmp_path), extensions=bad)


def test_every_bad_group_is_named_before_anything_is_packed(tmp_path: Path) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    _groups(root, {"good": 6, "empty": 0})
    (root / "pics").mkdir()
    for name in ("a.png", "b.png", "c.jpg"):
        (root / "pics" / name).write_bytes(b"\x89PNG\0")
    (root / "dots").mkdir()
    (root / "dots" / ".DS_Store").write_bytes(b"\0")
    src = CountingLocal(str(root))
    with pytest.raises(DataError) as err:
        _build(src, ["good", "empty", "pics", "dots"], cache)
    msg = str(err.value)
    assert msg.startswith("data.source: 3 groups cannot be used: group 'empty': folder ")
    assert f"{root / 'empty'} is empty; group 'pics'" in msg
    assert (
        f"3 files, all skipped: extension .png {EXT} (2: a.png, b.png); extension .jpg {EXT} (1: c.jpg)"
        in msg
    )
    assert (
        "group 'dots'" in msg and "1 file, all skipped: hidden (name starts with '.') (1: .DS_Store)" in msg
    )
    assert "'good'" not in msg and sum(src.reads.values()) == 0
    assert not cache.exists()  # nothing was written, not even a folder
    # validate() is the same check, callable on its own and idempotent
    for _ in range(2):
        with pytest.raises(DataError, match="3 groups cannot be used"):
            src.validate(["good", "empty", "pics", "dots"])
    src.validate(["good"])
    with pytest.raises(DataError, match=r"^data\.source: group 'empty': folder .* is empty$"):
        src.validate(["good", "empty"])
    lines = format_report(src.report(["pics"])).splitlines()
    assert lines[1:] == [
        f"[data]   skipped 2: extension .png {EXT} (a.png, b.png)",
        f"[data]   skipped 1: extension .jpg {EXT} (c.jpg)",
        f"[data]   cannot be used: folder {root / 'pics'}: 3 files, all skipped: extension .png {EXT} "
        f"(2: a.png, b.png); extension .jpg {EXT} (1: c.jpg)",
    ]


def test_a_group_cache_does_not_depend_on_the_other_groups(tmp_path: Path) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    _groups(root, {"a": 8, "b": 8})
    first = _build(LocalSource(str(root)), ["a", "b"], cache)
    a_dir, b_dir = first.entry_dir("a"), first.entry_dir("b")
    a_files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in a_dir.iterdir()}
    del first
    (root / "b" / "new.md").write_text("one more document for b " * 4)
    src = CountingLocal(str(root))
    second = _build(src, ["a", "b"], cache)
    assert src.reads == {"b": 3}  # b repacked (three splits), a not read at all
    assert second.entry_dir("a") == a_dir and second.entry_dir("b") != b_dir
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in a_dir.iterdir()} == a_files
    assert sum(st["docs"] for st in second.stats()["b"].values()) == 9
    # a subset, by an explicit mapping: the same entry, nothing read
    sub = CountingLocal(str(root), groups={"a": "a"})
    only_a = _build(sub, ["a"], cache)
    assert only_a.entry_dir("a") == a_dir and not sub.reads
    # the root path is not part of the key: a copy of the data reuses the cache
    shutil.copytree(root / "a", tmp_path / "copy" / "a")
    moved = CountingLocal(str(tmp_path / "copy"))
    assert _build(moved, ["a"], cache).entry_dir("a") == a_dir and not moved.reads


def test_key_hash_identifies_the_data_of_every_group(tmp_path: Path) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    _groups(root, {"a": 5, "b": 5})

    def key(*groups: str, **kw) -> str:
        return _build(LocalSource(str(root), **kw), list(groups), cache).manifest["key_hash"]

    base = key("a", "b")
    assert re.fullmatch(r"[0-9a-f]{16}", base) and key("a", "b") == base  # stable
    assert len({base, key("b", "a"), key("a"), key("a", "b", split_seed=1)}) == 4
    (root / "a" / "00.txt").write_text("changed")
    assert key("a", "b") != base
    (root / "a" / "00.txt").write_text(_doc("a", 0))
    (root / "b" / "03.txt").write_text("changed too")
    assert key("a", "b") != base


def test_progress_is_one_line_per_packed_group(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    _groups(root, {"a": 20, "b": 3})
    packed = _build(LocalSource(str(root)), ["a", "b"], cache, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "pack a/" not in "".join(err)  # no per-split bars
    # a: 20 docs of 113 tokens each (EOS included); round(20 * 0.05) = 1 each for val and test
    assert re.fullmatch(
        r"\[data\] packed a: train 18 docs 2\.0k tokens \| val 1 docs 113 tokens \| "
        r"test 1 docs 113 tokens \(\d+\.\d s\)",
        err[0],
    )
    assert err[1].startswith("[data] packed b: train 1 docs 113 tokens | val 1 docs 113 tokens")
    assert packed.stats()["a"] == {
        "train": {"docs": 18, "tokens": 18 * 113, "seqs": 18 * 113 // 16},
        "val": {"docs": 1, "tokens": 113, "seqs": 7},
        "test": {"docs": 1, "tokens": 113, "seqs": 7},
    }
    _build(LocalSource(str(root)), ["a", "b"], cache, progress=True)
    assert capsys.readouterr().err == ""  # reused: silent
    assert packed_line("g", packed.manifest["groups"]["a"], 2.04).endswith("113 tokens (2.0 s)")
    report = format_report(LocalSource(str(root)).report(["a"]), packed.stats()).splitlines()
    assert report == [
        f"[data] a ({root / 'a'}): 20 files used, 0 skipped",
        "[data]   train 18 docs 2.0k tokens | val 1 docs 113 tokens | test 1 docs 113 tokens",
    ]


def test_presplit_detection_does_not_catch_code_folders(tmp_path: Path) -> None:
    code = tmp_path / "code"
    for rel in ("src/model.py", "test/test_model.py", "train.py", "README.md"):
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_text(f"# {rel}\n")
    books = tmp_path / "books"
    for split, n in (("train", 3), ("validation", 2), ("test", 1)):
        (books / split).mkdir(parents=True)
        for i in range(n):
            (books / split / f"{i}.txt").write_text(f"{split} {i}")
    (books / "NOTES.md").write_text("not a split")
    src = LocalSource(str(tmp_path))
    books_rep, code_rep = src.report()  # groups in name order
    assert code_rep.files == ["README.md", "src/model.py", "test/test_model.py", "train.py"]
    assert sum(code_rep.docs.values()) == 4  # carved, not pre-split
    assert books_rep.docs == {"train": 3, "val": 2, "test": 1}
    assert books_rep.skipped == [("NOTES.md", "outside train/val/test of a pre-split group")]
