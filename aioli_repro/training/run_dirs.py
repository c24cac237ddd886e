"""Run directories: one training process each, the default layout, finding an unfinished run, cleanup."""

from __future__ import annotations

import contextlib
import glob
import json
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from aioli_repro.fileio import file_lock, is_locked, shown_path
from aioli_repro.training.checkpointing import checkpoint_head
from aioli_repro.training.identity import run_identity


class RunDirInUse(RuntimeError):
    """Another process is training in the same run directory."""


# -- run directories of `python -m aioli_repro.train` ---------------------------------------------------
@dataclass
class UnfinishedRun:
    run_dir: Path
    step: int


_DATE_DIR = re.compile(r"\d{4}-\d{2}-\d{2}")

# what a run directory holds before the run writes anything: Hydra's record, the training lock
UNUSED_RUN_FILES = frozenset({".hydra", ".train.lock"})


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """One training process per run directory (two would interleave logs and overwrite checkpoints).

    Non-blocking, unlike the pipeline's stage lock (which waits, then reuses the finished stage): two
    plain train commands that land in one directory (e.g. started in the same second) are a mistake.
    """
    with ExitStack() as held:
        try:
            held.enter_context(file_lock(run_dir / ".train.lock", blocking=False))
        except BlockingIOError:
            raise RunDirInUse(
                f"run directory {run_dir} is in use by another training process; wait for it to finish "
                "or pick another directory (hydra.run.dir=...)"
            ) from None
        yield


def run_dir_busy(run_dir: Path) -> bool:
    """Is a training process holding `run_dir`'s lock right now?"""
    return is_locked(run_dir / ".train.lock")


def default_layout(run_dir: Path, run_name: str) -> bool:
    """Is `run_dir` `<root>/<date>/<time>-<run_name>` (conf/train.yaml's hydra.run.dir)?"""
    time_dir = re.fullmatch(r"\d{2}-\d{2}-\d{2}-" + re.escape(run_name), run_dir.name)
    return bool(time_dir and _DATE_DIR.fullmatch(run_dir.parent.name))


def find_unfinished_run(cfg: DictConfig, fresh: Path, extras: dict | None = None) -> UnfinishedRun | None:
    """The newest earlier run of the same command that did not finish: a directory
    `<root>/<date>/<time>-<run_name>` beside `fresh` with `checkpoints/last.ckpt`, no `summary.json`, the
    same run identity (read from the checkpoint, as a resume checks it) and no process training in it.

    Candidates that cannot be resumed safely (another process trains in it, an unreadable checkpoint)
    are named on stderr and left alone.
    """
    run_name = str(cfg.run_name)
    want = json.loads(json.dumps(run_identity(cfg, extras), sort_keys=True, default=str))
    for d in sorted(fresh.parent.parent.glob(f"*/*-{glob.escape(run_name)}"), reverse=True):
        last = d / "checkpoints" / "last.ckpt"
        if d == fresh or not default_layout(d, run_name) or not last.is_file():
            continue
        if (d / "summary.json").exists():
            continue
        head = checkpoint_head(last)
        if head is None or head[0] != want:
            continue  # unreadable (said), or another config under the same name
        if run_dir_busy(d):
            print(
                f"[aioli_repro] not resuming {shown_path(d)}: another process trains in it", file=sys.stderr
            )
            continue
        return UnfinishedRun(d, head[1])
    return None


def remove_if_unused(
    run_dir: Path, parent_too: bool = False, unused: frozenset[str] = UNUSED_RUN_FILES
) -> None:
    """Remove a run directory that holds nothing the run wrote (only names in `unused`: Hydra's
    `.hydra`, the lock file), and with `parent_too` its parent (a date folder) and the layout's root
    (`outputs/`) if they are then empty."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or any(p.name not in unused for p in run_dir.iterdir()):
        return
    for p in run_dir.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # another process may have written there meanwhile
        run_dir.rmdir()
        if parent_too:
            run_dir.parent.rmdir()
            run_dir.parent.parent.rmdir()
