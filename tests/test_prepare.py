"""`python -m aioli_repro.prepare`: the entries a run reuses, idempotence, resuming, parallel == serial,
cheap verification of prepared files by runs, and the tokenizer's offline behaviour."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config

import aioli_repro.data.cache as cache
import aioli_repro.data.prepare as prep
from aioli_repro.data.cache import build_packed
from aioli_repro.data.source import DataError
from aioli_repro.data.tokenizer import build_tokenizer
from aioli_repro.prepare import pop_workers, prepare_from_config
from aioli_repro.training.run import run_training

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["arxiv", "stackexchange"]  # scale=tiny's default groups (a_se)


def _cfg(cache_dir: Path, *extra: str):
    """The tiny scale on small synthetic groups (a few hundred kB each), quiet, in its own cache."""
    return compose_config(
        "scale=tiny",
        f"cache_dir={cache_dir}",
        "progress=false",
        "num_threads=1",
        "logger=none",
        "data.source.train_docs=300",
        "data.source.val_docs=24",
        "data.source.test_docs=24",
        *extra,
    )


def _files(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under the cache: (size, mtime_ns), by path relative to it."""
    return {
        str(p.relative_to(cache_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(cache_dir.rglob("*"))
        if p.is_file()
    }


def _settings_dir(cache_dir: Path) -> Path:
    (root,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    return root


@pytest.fixture
def count_hashing(monkeypatch):
    """Counts whole-file sha256 computations in the cache (in this process)."""
    calls: list[Path] = []
    real = cache._sha256_file

    def counted(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(cache, "_sha256_file", counted)
    return calls


# --- what a run finds -----------------------------------------------------------------------------
def test_prepare_then_a_run_packs_and_hashes_nothing(tmp_path: Path, count_hashing) -> None:
    cfg = _cfg(tmp_path / "cache", "train.max_steps=3", "train.val_every=0", "train.checkpoint_every=0")
    report = prepare_from_config(cfg, workers=2)
    assert report.failed == [] and report.workers == 2
    assert {g: r.status for g, r in report.results.items()} == {g: "packed" for g in GROUPS}
    assert report.tokens_packed > 0
    before = _files(tmp_path / "cache")
    assert any(name.endswith("prepared.json") for name in before)

    count_hashing.clear()
    summary = run_training(cfg, tmp_path / "run")  # data.verify_checksums=true, the default
    assert summary["steps"] == 3
    assert _files(tmp_path / "cache") == before  # nothing packed, rewritten or locked
    assert count_hashing == []  # sizes + mtimes + the prepare's sha256 record, no re-hash

    # the very entries build_packed (the run's path) uses
    root = _settings_dir(tmp_path / "cache")
    packed = build_packed(_source(cfg), build_tokenizer("byte"), GROUPS, 256, tmp_path / "cache")
    assert packed.root == root == report.root
    assert {g: packed.entry_dir(g).name for g in GROUPS} == {g: r.entry for g, r in report.results.items()}


def _source(cfg):
    from hydra.utils import instantiate

    return instantiate(cfg.data.source)


def test_a_changed_file_is_hashed_again_and_prepare_always_hashes(tmp_path: Path, count_hashing) -> None:
    cfg = _cfg(tmp_path / "cache")
    prepare_from_config(cfg, workers=1)
    source, tok = _source(cfg), build_tokenizer("byte")
    args = (source, tok, GROUPS, 256, tmp_path / "cache")

    count_hashing.clear()
    build_packed(*args, verify_checksums=True)
    assert count_hashing == []
    # a file touched since the prepare: its mtime no longer matches the record, so it is hashed
    train = next(_settings_dir(tmp_path / "cache").glob("arxiv-*/train.bin"))
    st = train.stat()
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    build_packed(*args, verify_checksums=True)
    assert count_hashing == [train]

    # a flipped bit with the mtime put back: runs trust the prepare's record (the documented trade-off),
    # but a prepare hashes every file in full and finds it
    data = bytearray(train.read_bytes())
    data[100] ^= 1
    train.write_bytes(bytes(data))
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache._verified_by_prepare(train.parent, _train_record(train), train)
    report = prepare_from_config(cfg, workers=1)
    (bad,) = report.failed
    assert bad.group == "arxiv" and "does not match its sha256" in bad.error
    # ... and drops the record, so runs hash that entry in full again until a prepare succeeds
    assert bad.group not in {e["group"] for e in prep.read_prepared(report.root)["entries"].values()}
    with pytest.raises(DataError, match="does not match its sha256"):
        build_packed(*args, verify_checksums=True)
    # data.rebuild_on_mismatch=true: the prepare repacks that one file and records it again
    fixed = prepare_from_config(_cfg(tmp_path / "cache", "data.rebuild_on_mismatch=true"), workers=1)
    assert fixed.failed == [] and fixed.results["arxiv"].packed == ["train"]
    assert "kept val, test" in prep.result_line(fixed.results["arxiv"], 1, 2)
    count_hashing.clear()
    build_packed(*args, verify_checksums=True)
    assert count_hashing == []


def _train_record(path: Path) -> dict:
    manifest = json.loads((path.parent / "manifest.json").read_text())
    return manifest["splits"]["train"]


# --- idempotent and resumable ---------------------------------------------------------------------
def test_a_second_prepare_verifies_and_writes_nothing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "cache")
    prepare_from_config(cfg, workers=2)
    bins = {k: v for k, v in _files(tmp_path / "cache").items() if k.endswith((".bin", "manifest.json"))}
    again = prepare_from_config(cfg, workers=2)
    assert {g: r.status for g, r in again.results.items()} == {g: "verified" for g in GROUPS}
    assert again.tokens_packed == 0
    assert {k: v for k, v in _files(tmp_path / "cache").items() if k in bins} == bins
    line = prep.result_line(again.results["arxiv"], 1, 2)
    assert "already prepared, skipped" in line and "sha256 of 3 files" in line


def test_progress_lines_and_heartbeat(tmp_path: Path, capsys) -> None:
    cfg = _cfg(tmp_path / "cache")
    source = _source(cfg)
    report = prep.prepare(
        source, build_tokenizer("byte"), GROUPS, 256, tmp_path / "cache", workers=1, heartbeat_s=1e-9
    )
    err = capsys.readouterr().err
    assert "2 to pack, 0 already there" in err and "1 worker process(es)" in err
    assert "[prepare] arxiv: train 1 documents read" in err  # the heartbeat (every document, here)
    assert "[prepare] (1/2) arxiv: packed train 300 docs" in err and "tokens/s)" in err
    assert "[prepare] done in" in err and "2 packed" in err
    assert "documents" not in vars(source)  # the heartbeat's wrapper is gone
    assert report.tokens_packed == sum(
        int(s["n_tokens"]) for r in report.results.values() for s in r.splits.values()
    )


def test_an_interrupted_prepare_resumes_with_the_groups_not_done(tmp_path: Path, monkeypatch) -> None:
    cfg = _cfg(tmp_path / "cache")
    real = prep.build_packed

    def dies_on_stackexchange(source, tokenizer, groups, *a, **kw):
        if groups == ["stackexchange"]:
            raise RuntimeError("killed")
        return real(source, tokenizer, groups, *a, **kw)

    monkeypatch.setattr(prep, "build_packed", dies_on_stackexchange)
    first = prepare_from_config(cfg, workers=1)
    assert first.results["arxiv"].status == "packed"
    (failed,) = first.failed
    assert failed.group == "stackexchange" and "RuntimeError: killed" in failed.error
    recorded = {e["group"] for e in prep.read_prepared(first.root)["entries"].values()}
    assert recorded == {"arxiv"}
    arxiv_files = {
        k: v for k, v in _files(tmp_path / "cache").items() if "/arxiv-" in k and k.endswith(".bin")
    }

    monkeypatch.setattr(prep, "build_packed", real)
    second = prepare_from_config(cfg, workers=1)
    assert {g: r.status for g, r in second.results.items()} == {
        "stackexchange": "packed",
        "arxiv": "verified",
    }
    assert list(second.results) == ["stackexchange", "arxiv"]  # groups to pack go first
    assert {k: v for k, v in _files(tmp_path / "cache").items() if k in arxiv_files} == arxiv_files

    # a deleted entry is packed again, alone
    shutil.rmtree(second.root / second.results["arxiv"].entry)
    third = prepare_from_config(cfg, workers=1)
    assert {g: r.status for g, r in third.results.items()} == {"arxiv": "packed", "stackexchange": "verified"}


def test_a_worker_process_that_dies_fails_its_group_and_a_rerun_finishes(tmp_path: Path, monkeypatch) -> None:
    cfg = _cfg(tmp_path / "cache")
    real = prep.build_packed

    def hard_kill(source, tokenizer, groups, *a, **kw):
        if groups == ["stackexchange"]:
            os._exit(9)  # like SIGKILL: no exception, no cleanup
        return real(source, tokenizer, groups, *a, **kw)

    monkeypatch.setattr(prep, "build_packed", hard_kill)  # forked workers inherit the patch
    first = prepare_from_config(cfg, workers=2)
    assert "stackexchange" in {r.group for r in first.failed}
    assert all("worker process died" in r.error for r in first.failed)
    monkeypatch.setattr(prep, "build_packed", real)
    second = prepare_from_config(cfg, workers=2)
    assert second.failed == [] and second.results["stackexchange"].status == "packed"


# --- parallel == serial ---------------------------------------------------------------------------
def test_parallel_and_serial_prepares_write_identical_caches(tmp_path: Path) -> None:
    groups = "groups=a_b_se"  # three groups on two workers
    serial = prepare_from_config(_cfg(tmp_path / "serial", groups), workers=1)
    parallel = prepare_from_config(_cfg(tmp_path / "parallel", groups), workers=2)
    assert serial.workers == 1 and parallel.workers == 2
    assert serial.root.name == parallel.root.name
    a, b = sorted(serial.root.rglob("*.bin")), sorted(parallel.root.rglob("*.bin"))
    assert [p.relative_to(serial.root) for p in a] == [p.relative_to(parallel.root) for p in b]
    assert len(a) == 9
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes(), x.relative_to(serial.root)
    for m in serial.root.glob("*/manifest.json"):
        mine = json.loads(m.read_text())
        theirs = json.loads((parallel.root / m.relative_to(serial.root)).read_text())
        mine.pop("updated"), theirs.pop("updated")
        assert mine == theirs


# --- the command line -----------------------------------------------------------------------------
def test_pop_workers() -> None:
    argv = ["prog", "--workers", "3", "scale=tiny"]
    assert pop_workers(argv) == 3 and argv == ["prog", "scale=tiny"]
    argv = ["prog", "groups=a_se", "--workers=2"]
    assert pop_workers(argv) == 2 and argv == ["prog", "groups=a_se"]
    assert pop_workers(["prog"]) is None
    for bad in (["--workers", "0"], ["--workers=x"], ["--workers"]):
        with pytest.raises(ValueError, match="--workers"):
            pop_workers(["prog", *bad])


def test_the_command_prepares_in_parallel_and_leaves_no_run_folder(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "aioli_repro.prepare", "--workers", "2", f"cache_dir={tmp_path / 'c'}"]
    cmd += ["data.source.train_docs=100", "data.source.val_docs=16", "data.source.test_docs=16"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "[prepare] (2/2) " in out.stderr and "2 packed" in out.stderr and "2 worker(s)" in out.stderr
    assert "cache: " in out.stdout and not (tmp_path / "outputs").exists()  # no Hydra run folder left
    root = _settings_dir(tmp_path / "c")
    assert set(prep.read_prepared(root)["entries"]) == {p.name for p in root.iterdir() if p.is_dir()}


# --- the tokenizer on an offline node -------------------------------------------------------------
def test_missing_tokenizer_on_an_offline_node_fails_at_once_naming_make_prepare(monkeypatch) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(DataError, match=r"not in the HF cache.*make prepare.*data\.tokenizer=byte"):
        build_tokenizer("EleutherAI/this-tokenizer-does-not-exist-xyz")  # HF_HUB_OFFLINE=1 (conftest)
    # no HF_HUB_OFFLINE, but no route to the hub either: the same line, after one short probe
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    probes = []

    def unreachable(address, timeout=None):
        probes.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(DataError, match="make prepare"):
        build_tokenizer("EleutherAI/this-tokenizer-does-not-exist-xyz")
    assert probes == [(("huggingface.co", 443), 3)]
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the rest of the process is in the HF offline mode


def test_slimpajama_on_an_offline_node_switches_to_offline_mode_and_names_make_prepare(
    tmp_path: Path, monkeypatch
) -> None:
    from aioli_repro.data.slimpajama import SlimPajamaSource

    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(v, raising=False)
    probes = []

    def unreachable(address, timeout=None):
        probes.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    src = SlimPajamaSource(hf_cache_dir=str(tmp_path / "hf"))  # the hub name, nothing cached
    with pytest.raises(DataError, match=r"not in the HF datasets cache.*`make prepare`"):
        list(src.documents("arxiv", "val"))
    assert len(probes) == 1 and os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_a_cached_hub_tokenizer_loads_without_the_network(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    import huggingface_hub.constants
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # the HF hub cache's layout after a download of `someorg/tok` (config.json: known to be absent)
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someorg--tok"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / ".no_exist" / commit).mkdir(parents=True)
    (repo / ".no_exist" / commit / "config.json").touch()
    raw = RawTokenizer(models.WordLevel({"<eos>": 0, "[UNK]": 1, "hi": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]").save_pretrained(
        repo / "snapshots" / commit
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*a, **kw):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    tok = build_tokenizer("someorg/tok")
    assert (tok.vocab_size, tok.eos_id, tok.encode("hi").tolist()) == (3, 0, [2])
