"""Tokenizers, the SlimPajama source (local files in the HF schema) and the local-folder source. Offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from aioli_repro.data.local import LocalSource  # noqa: E402
from aioli_repro.data.slimpajama import SET_NAMES, SlimPajamaSource  # noqa: E402
from aioli_repro.data.source import DataError  # noqa: E402
from aioli_repro.data.tokenizer import ByteTokenizer, build_tokenizer  # noqa: E402


# --- tokenizers -----------------------------------------------------------------------------------
def test_byte_tokenizer_ids_and_round_trip() -> None:
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("byte", 257, 256)
    ids = tok.encode("hé!")
    assert ids.dtype == np.int64
    assert ids.tolist() == [104, 0xC3, 0xA9, 33]  # é is two UTF-8 bytes
    assert tok.encode(b"\x00\xff").tolist() == [0, 255]  # bytes pass through unchanged
    assert tok.encode("").tolist() == []
    text = "naïve café ∑ 🙂\nline"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([*tok.encode("ab"), 256]) == "ab"  # EOS dropped
    assert [x.tolist() for x in tok.encode_batch(["a", b"b"])] == [[97], [98]]


def test_hf_tokenizer_unreachable_hub_is_a_clear_error() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(DataError, match="tokenizer=byte"):
        build_tokenizer("EleutherAI/this-tokenizer-does-not-exist-xyz")


def test_hf_tokenizer_from_a_local_directory(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "[UNK]": 1, "hello": 2, "world": 3, "!": 4}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]").save_pretrained(
        tmp_path
    )
    tok = build_tokenizer(str(tmp_path))
    assert (tok.vocab_size, tok.eos_id) == (5, 0)
    assert tok.encode("hello world !").tolist() == [2, 3, 4]  # no special tokens added
    assert tok.encode(b"world hello").tolist() == [3, 2]  # bytes are decoded as UTF-8
    with pytest.raises(DataError, match="UTF-8"):
        tok.encode(b"\xff\xfe")


# --- SlimPajama on local files in the HF schema ---------------------------------------------------
# documents per (group, HF split); book is deliberately absent
SP_COUNTS = {
    "arxiv": {"train": 6, "validation": 7, "test": 8},
    "stackexchange": {"train": 4, "validation": 5, "test": 4},
    "commoncrawl": {"train": 3, "validation": 2, "test": 3},
}


def _sp_doc(group: str, split: str, i: int) -> str:
    return f"{group} {split} document {i} " + "x" * (i % 5)


def _write_sp(folder: Path, per_split_subfolders: bool = False) -> dict[tuple[str, str], list[str]]:
    """Interleaved rows of several groups, in the schema of DKYoon/SlimPajama-6B."""
    expected: dict[tuple[str, str], list[str]] = {}
    for split in ("train", "validation", "test"):
        rows = []
        for i in range(max(c[split] for c in SP_COUNTS.values())):
            for g, c in SP_COUNTS.items():
                if i < c[split]:
                    text = _sp_doc(g, split, i)
                    rows.append({"text": text, "meta": {"redpajama_set_name": SET_NAMES[g]}})
                    expected.setdefault((g, split), []).append(text)
        path = folder / split / "part-0.jsonl" if per_split_subfolders else folder / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return expected


@pytest.fixture
def sp_dir(tmp_path: Path) -> tuple[Path, dict]:
    d = tmp_path / "sp"
    return d, _write_sp(d)


def _sp(path: Path, tmp_path: Path, **kw) -> SlimPajamaSource:
    return SlimPajamaSource(path=str(path), hf_cache_dir=str(tmp_path / "hf"), **kw)


def test_slimpajama_train_filters_groups(sp_dir, tmp_path: Path) -> None:
    d, expected = sp_dir
    src = _sp(d, tmp_path)
    for g in SP_COUNTS:
        assert list(src.documents(g, "train")) == expected[(g, "train")]
    assert list(src.documents("cc", "train")) == expected[("commoncrawl", "train")]  # official alias
    capped = _sp(d, tmp_path, max_train_docs=2)
    assert list(capped.documents("arxiv", "train")) == expected[("arxiv", "train")][:2]


def test_slimpajama_paper_heldout_halves_validation(sp_dir, tmp_path: Path) -> None:
    d, expected = sp_dir
    src = _sp(d, tmp_path)
    for g, c in SP_COUNTS.items():
        val, test = list(src.documents(g, "val")), list(src.documents(g, "test"))
        n = c["validation"]
        assert (len(val), len(test)) == ((n + 1) // 2, n // 2)
        assert not set(val) & set(test)
        assert sorted(val + test) == sorted(expected[(g, "validation")])
        # the HF test split is not used
        assert not set(val + test) & set(expected[(g, "test")])
    again = _sp(d, tmp_path)
    assert list(again.documents("arxiv", "val")) == list(src.documents("arxiv", "val"))
    other = _sp(d, tmp_path, split_seed=7)
    assert list(other.documents("arxiv", "val")) != list(src.documents("arxiv", "val"))


def test_slimpajama_official_heldout_is_even_odd_of_shuffled_test(sp_dir, tmp_path: Path) -> None:
    import datasets

    d, expected = sp_dir
    src = _sp(d, tmp_path, heldout="official")
    for g in SP_COUNTS:
        docs = expected[(g, "test")]
        # what the official code does: HF Dataset.shuffle(seed=42), even -> val, odd -> test
        shuffled = datasets.Dataset.from_dict({"text": docs}).shuffle(seed=42)["text"]
        shuffled = list(shuffled)
        assert list(src.documents(g, "val")) == shuffled[0::2]
        assert list(src.documents(g, "test")) == shuffled[1::2]
    assert src.fingerprint() != _sp(d, tmp_path).fingerprint()


def test_slimpajama_split_subfolders_and_parquet(tmp_path: Path) -> None:
    import datasets

    d = tmp_path / "sp_sub"
    expected = _write_sp(d, per_split_subfolders=True)
    src = _sp(d, tmp_path)
    assert list(src.documents("stackexchange", "train")) == expected[("stackexchange", "train")]
    # the same rows as parquet (the HF hub's own format)
    pq = tmp_path / "sp_parquet"
    for split in ("train", "validation"):
        (pq / "data").mkdir(parents=True, exist_ok=True)
        rows = [json.loads(line) for line in (d / split / "part-0.jsonl").read_text().splitlines()]
        datasets.Dataset.from_list(rows).to_parquet(str(pq / "data" / f"{split}-00000-of-00001.parquet"))
    src_pq = _sp(pq, tmp_path)
    assert list(src_pq.documents("arxiv", "train")) == expected[("arxiv", "train")]
    assert list(src_pq.documents("arxiv", "val")) == list(src.documents("arxiv", "val"))


def test_slimpajama_errors(sp_dir, tmp_path: Path) -> None:
    d, _ = sp_dir
    src = _sp(d, tmp_path)
    with pytest.raises(DataError, match=r"unknown group 'reddit'.*arxiv"):
        src.check_groups(["arxiv", "reddit"])
    with pytest.raises(DataError, match=r"'book'.*present: \['arxiv', 'commoncrawl', 'stackexchange'\]"):
        list(src.documents("book", "train"))
    with pytest.raises(DataError, match="does not exist"):
        SlimPajamaSource(path=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        SlimPajamaSource(path=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="heldout"):
        SlimPajamaSource(path=str(d), heldout="both")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text(json.dumps({"content": "x", "meta": {"source": "y"}}) + "\n")
    with pytest.raises(DataError, match="meta.redpajama_set_name"):
        list(_sp(bad, tmp_path).documents("arxiv", "train"))
    # official held-out needs the HF test split
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train.jsonl").write_text((d / "train.jsonl").read_text())
    with pytest.raises(DataError, match="no 'test' files"):
        list(_sp(only_train, tmp_path, heldout="official").documents("arxiv", "val"))


def test_slimpajama_fingerprint_tracks_file_content(sp_dir, tmp_path: Path) -> None:
    d, _ = sp_dir
    fp = _sp(d, tmp_path).fingerprint()
    assert fp == _sp(d, tmp_path).fingerprint()
    json.dumps(fp)  # must be JSON-serialisable: it keys the cache
    with open(d / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": "new", "meta": {"redpajama_set_name": "RedPajamaArXiv"}}) + "\n")
    assert _sp(d, tmp_path).fingerprint() != fp
    assert _sp(d, tmp_path, max_train_docs=3).fingerprint() != _sp(d, tmp_path).fingerprint()


# --- local folders ----------------------------------------------------------------------------------
def _write_local(root: Path) -> None:
    (root / "prose").mkdir(parents=True)
    for i in range(20):
        (root / "prose" / f"doc{i:02d}.txt").write_text(f"prose document {i}")
    (root / "code").mkdir()
    with open(root / "code" / "part.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"def f{i}(): pass", "id": i}) + "\n")
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        (root / "qa" / split).mkdir(parents=True)
        for i in range(n):
            (root / "qa" / split / f"{i}.txt").write_text(f"qa {split} {i}")


def test_local_source_folders_jsonl_and_presplit(tmp_path: Path) -> None:
    root = tmp_path / "local"
    _write_local(root)
    src = LocalSource(str(root))
    assert src.available_groups() == ["code", "prose", "qa"]
    for g, n in (("prose", 20), ("code", 10)):
        splits = {s: list(src.documents(g, s)) for s in ("train", "val", "test")}
        assert sum(len(v) for v in splits.values()) == n
        assert len(splits["val"]) >= 1 and len(splits["test"]) >= 1
        all_docs = splits["train"] + splits["val"] + splits["test"]
        assert len(set(all_docs)) == n  # a partition: disjoint and complete
    assert {len(list(src.documents("prose", s))) for s in ("val", "test")} == {1}  # round(20 * 0.05)
    assert set(src.documents("code", "train")) <= {f"def f{i}(): pass" for i in range(10)}
    # pre-split folders are used as they are
    assert sorted(src.documents("qa", "val")) == ["qa val 0", "qa val 1"]
    assert src.split_sizes("qa") == {"train": 5, "val": 2, "test": 3}
    # deterministic, and the seed matters
    assert list(LocalSource(str(root)).documents("prose", "val")) == list(src.documents("prose", "val"))
    seeds = {tuple(LocalSource(str(root), split_seed=s).documents("prose", "test")) for s in range(5)}
    assert len(seeds) > 1
    # explicit mapping, a single-file group and a custom field
    (tmp_path / "one.jsonl").write_text("".join(json.dumps({"body": f"b{i}"}) + "\n" for i in range(4)))
    src2 = LocalSource(str(tmp_path), groups={"one": "one.jsonl", "p": "local/prose"}, text_field="body")
    assert sorted(d for s in ("train", "val", "test") for d in src2.documents("one", s)) == [
        f"b{i}" for i in range(4)
    ]


def test_local_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        LocalSource(str(tmp_path / "missing"))
    root = tmp_path / "r"
    root.mkdir()
    with pytest.raises(DataError, match="no group"):
        LocalSource(str(root))
    (root / "empty").mkdir()
    (root / "ok").mkdir()
    (root / "ok" / "a.txt").write_text("a")
    src = LocalSource(str(root))
    with pytest.raises(DataError, match=r"'empty'.*empty"):
        list(src.documents("empty", "train"))
    (root / "blank").mkdir()
    (root / "blank" / "a.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="zero documents"):
        list(LocalSource(str(root)).documents("blank", "train"))
    (root / "weird").mkdir()
    (root / "weird" / "a.docx").write_bytes(b"PK")
    skipped = r"1 file, all skipped: extension \.docx not in data\.source\.extensions \(1: a\.docx\)"
    with pytest.raises(DataError, match=rf"group 'weird'.*{skipped}"):
        list(LocalSource(str(root)).documents("weird", "train"))
    assert LocalSource(str(root), extensions=[".docx"]).split_sizes("weird") == {
        "train": 1,
        "val": 0,
        "test": 0,
    }
    (root / "nofield").mkdir()
    (root / "nofield" / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no field 'text'"):
        list(LocalSource(str(root)).documents("nofield", "train"))
    with pytest.raises(DataError, match="groups.x"):
        LocalSource(str(root), groups={"x": "not/here"})
    with pytest.raises(DataError, match="val_fraction"):
        LocalSource(str(root), val_fraction=0.6, test_fraction=0.5)
    (root / "partial" / "train").mkdir(parents=True)
    (root / "partial" / "train" / "a.txt").write_text("a")
    with pytest.raises(DataError, match=r"lacks \['val', 'test'\]"):
        list(LocalSource(str(root)).documents("partial", "train"))


def test_slimpajama_streaming_matches_map_style(sp_dir, tmp_path: Path) -> None:
    d, _ = sp_dir
    for heldout in ("paper", "official"):
        eager = _sp(d, tmp_path, heldout=heldout, max_train_docs=4)
        lazy = _sp(d, tmp_path, heldout=heldout, max_train_docs=4, streaming=True)
        for s in ("train", "val", "test"):
            assert list(lazy.documents("arxiv", s)) == list(eager.documents("arxiv", s))
        assert lazy.fingerprint() == eager.fingerprint()  # streaming does not change the documents


def test_slimpajama_unreachable_hub_is_a_clear_error(tmp_path: Path) -> None:
    src = SlimPajamaSource(hf_cache_dir=str(tmp_path / "hf"))  # the default hub name; offline here
    assert src.local_files is None
    with pytest.raises(DataError, match="local files of the same schema"):
        list(src.documents("arxiv", "val"))


def test_data_configs_instantiate(sp_dir) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "data"
    sp = OmegaConf.load(conf / "slimpajama.yaml")
    assert sp.tokenizer == "EleutherAI/pythia-160m"
    src = instantiate(sp.source, path=str(sp_dir[0]))
    assert isinstance(src, SlimPajamaSource) and src.heldout == "paper" and src.split_seed == 42
    local = OmegaConf.load(conf / "local.yaml")
    assert OmegaConf.is_missing(local.source, "root") and local.tokenizer == "byte"
    src = instantiate(local.source, root=str(sp_dir[0].parent))
    assert isinstance(src, LocalSource) and src.available_groups() == ["sp"]
    # train.jsonl / validation.jsonl / test.jsonl make a pre-split group
    assert src.split_sizes("sp") == {
        s: sum(c[hf] for c in SP_COUNTS.values())
        for s, hf in (("train", "train"), ("val", "validation"), ("test", "test"))
    }
