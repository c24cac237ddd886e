"""The one atomic writer and the one file lock every layer uses (results, caches, checkpoints, stages).

An atomic write goes to a temporary file in the target's directory, is fsync'd, then renamed over the
target: a reader sees the old file or the whole new one, never a torn one, even after a crash.
A lock is an `flock` on a file, released by the kernel if its holder dies; the holder writes its pid
into it so a person can see which process holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(binary file)` on a temporary file next to `path`, fsync it, rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> None:
    """`obj` as JSON (non-JSON values as strings), written atomically."""
    blob = json.dumps(obj, indent=indent, default=str).encode()
    atomic_write(path, lambda f: f.write(blob))


@contextmanager
def file_lock(path: str | Path, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing). Non-blocking: BlockingIOError if held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:  # "a+": a waiting process leaves the holder's pid alone
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def is_locked(path: str | Path) -> bool:
    """Is another process holding the lock on `path` right now?"""
    path = Path(path)
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it is below it (as the user typed outputs/...)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
