"""Read W&B offline runs (`run-<id>.wandb`) without network.

W&B 0.31 offline mode writes no config.yaml / wandb-summary.json: config, history and summary live only
in the binary transaction log. Two independent readers produce the same dict
`{config, summary, history, meta}`:

* ``leet``: the documented CLI ``python -m wandb leet inspect --json [--summary]`` (a subprocess);
* ``parser``: an in-process decoder of the LevelDB-log-style file (header ``:W&B`` + 0xBEE1 + version 0,
  32 KiB blocks of CRC-checked FULL/FIRST/MIDDLE/LAST chunks, each record a ``wandb_internal_pb2.Record``).

``read_run(path)`` tries leet first and falls back to the parser. Keys starting with ``_`` (W&B's own
``_runtime``, ``_timestamp``, ``_wandb``) are dropped, except ``_step`` in history rows, and null summary
values are dropped, because leet drops them too; the two readers are then directly comparable.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
FRAME = 7  # crc32:u32, length:u16, type:u8
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
MAGIC = b":W&B"
IDENT, VERSION = 0xBEE1, 0
READERS = ("auto", "leet", "parser")


class WandbFormatError(RuntimeError):
    """The .wandb file is not in the format this parser understands (or is corrupt)."""


def find_run_file(path: str | Path) -> Path:
    """The `.wandb` file for a file, an `offline-run-*` directory or a `wandb/` directory (latest run)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"no W&B run at {p}")
    files = sorted(p.glob("run-*.wandb"))
    if not files:
        # a wandb/ directory: pick the newest run, as `leet` does
        files = sorted(p.glob("*run-*/run-*.wandb"), key=lambda f: (f.stat().st_mtime, f.name))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {p}")
    return files[-1]


# -- parser ------------------------------------------------------------------------------------------
def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield each `wandb_internal_pb2.Record` of a .wandb file, checking header and CRCs.

    Reads block by block, so a consumer that stops early (see `read_config`) reads only what it needs.
    A torn final chunk (a run killed mid-write) ends the iteration instead of raising.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = find_run_file(path)
    with open(path, "rb") as fh:
        block = fh.read(BLOCK)
        if len(block) < FRAME or block[:4] != MAGIC or struct.unpack("<HB", block[4:7]) != (IDENT, VERSION):
            raise WandbFormatError(f"{path}: bad header (not a W&B 0.x transaction log with version 0)")
        pos, buf, pending = FRAME, bytearray(), False
        while block:
            while pos + FRAME <= len(block):
                crc, n, typ = struct.unpack("<IHB", block[pos : pos + FRAME])
                if n == 0 and typ == 0:  # zero fill: nothing more was written
                    return
                chunk = block[pos + FRAME : pos + FRAME + n]
                if len(chunk) < n:
                    if len(block) < BLOCK:
                        return  # torn tail
                    raise WandbFormatError(f"{path}: chunk at {fh.tell() - len(block) + pos} crosses a block")
                pos += FRAME + n
                if zlib.crc32(chunk, zlib.crc32(bytes([typ]))) & 0xFFFFFFFF != crc:
                    raise WandbFormatError(f"{path}: crc mismatch at byte {fh.tell() - len(block) + pos}")
                if typ not in (FULL, FIRST, MIDDLE, LAST):
                    raise WandbFormatError(f"{path}: unknown chunk type {typ}")
                if typ in (FULL, FIRST):
                    buf, pending = bytearray(), True
                elif not pending:
                    raise WandbFormatError(f"{path}: MIDDLE/LAST chunk without FIRST")
                buf += chunk
                if typ in (FULL, LAST):
                    rec = pb.Record()
                    rec.ParseFromString(bytes(buf))
                    pending = False
                    yield rec
            # fewer than FRAME bytes left in a block are zero padding
            block, pos = fh.read(BLOCK), 0


def _apply(target: dict, record: Any) -> None:
    """Apply a config or summary record's `update` and `remove` items to `target`."""
    target.update({_key(it): json.loads(it.value_json) for it in record.update})
    for it in record.remove:
        target.pop(_key(it), None)


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def read_config(path: str | Path) -> dict:
    """The run's config (parser only), stopping at the run record when it already holds a config.

    Used to filter runs cheaply: the run record is the second record of the file.
    """
    config: dict = {}
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config.update({_key(it): json.loads(it.value_json) for it in rec.run.config.update})
            if _public(config):
                break
        elif kind == "config":
            config.update({_key(it): json.loads(it.value_json) for it in rec.config.update})
    return _public(config)


def read_run_parser(path: str | Path) -> dict:
    """Config, summary, history and metadata of one run, decoded in-process."""
    path = find_run_file(path)
    config: dict = {}
    summary: dict = {}
    history: list[dict] = []
    meta: dict = {"path": str(path), "state": "running"}
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            meta.update(
                run_id=r.run_id, name=r.display_name, project=r.project, entity=r.entity, job_type=r.job_type
            )
            _apply(config, r.config)
        elif kind == "config":
            _apply(config, rec.config)
        elif kind == "history":
            history.append({_key(it): json.loads(it.value_json) for it in rec.history.item})
        elif kind == "summary":
            _apply(summary, rec.summary)
        elif kind == "exit":
            meta.update(
                state="finished" if rec.exit.exit_code == 0 else "failed", exit_code=rec.exit.exit_code
            )
    return _normalise(config, summary, history, meta)


def _normalise(config: dict, summary: dict, history: list[dict], meta: dict) -> dict:
    rows = [{k: v for k, v in row.items() if k == "_step" or not k.startswith("_")} for row in history]
    return {
        "config": _public(config),
        "summary": {k: v for k, v in _public(summary).items() if v is not None},
        "history": rows,
        "meta": meta,
    }


# -- leet CLI ----------------------------------------------------------------------------------------
def _leet(*args: str, timeout: float) -> str:
    return subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,  # leet opens an interactive browser on a terminal
        check=True,
        timeout=timeout,
    ).stdout


def read_run_leet(path: str | Path, timeout: float = 60.0) -> dict:
    """Config, summary, history and metadata through the documented `wandb leet inspect` CLI."""
    path = find_run_file(path)
    history: list[dict] = []
    job_type = ""
    for line in _leet(str(path), timeout=timeout).splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("type") == "history":
            history.append(rec["history"].get("item", {}))
        elif rec.get("type") == "run":
            job_type = rec["run"].get("job_type", "")
    info = json.loads(_leet("--summary", str(path), timeout=timeout))
    meta = {
        "path": str(path),
        "run_id": info.get("run_id", ""),
        "name": info.get("name", ""),
        "project": info.get("project", ""),
        "entity": info.get("entity", ""),
        "job_type": job_type,
        "state": info.get("state", ""),
    }
    if "exit_code" in info:
        meta["exit_code"] = info["exit_code"]
    return _normalise(info.get("config") or {}, info.get("summary") or {}, history, meta)


def read_run(path: str | Path, reader: str = "auto", timeout: float = 60.0) -> dict:
    """`{config, summary, history: list[dict], meta}` of an offline run (.wandb file or run directory).

    reader: "auto" (leet CLI, then the parser if the CLI is missing or fails), "leet" or "parser".
    """
    if reader not in READERS:
        raise ValueError(f"reader: unknown value {reader!r}; allowed: {list(READERS)}")
    if reader == "parser":
        return read_run_parser(path)
    try:
        return read_run_leet(path, timeout=timeout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, KeyError):
        if reader == "leet":
            raise
        return read_run_parser(path)


def leet_available(timeout: float = 60.0) -> bool:
    """Whether this wandb has the `leet inspect` CLI."""
    try:
        subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--help"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            check=True,
            timeout=timeout,
        )
        return True
    except (OSError, subprocess.SubprocessError):
        return False
