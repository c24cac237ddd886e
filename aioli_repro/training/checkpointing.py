"""Checkpoints written atomically, checked before Lightning unpickles them, and read cheaply."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from aioli_repro.fileio import atomic_write, shown_path


class CheckpointError(RuntimeError):
    """A run directory's checkpoint cannot be resumed from (truncated or corrupt file)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file next to the target, fsync, rename.

    Lightning's own save writes through an fsspec transaction whose temporary file lives in the
    system temp dir, so on a cluster (/tmp local, runs on a shared filesystem) the final move is a
    copy, and a kill during it leaves a truncated `last.ckpt`. Local paths only.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint: storage_options is not supported")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def check_checkpoint_readable(path: Path) -> None:
    """Cheap integrity check (the zip directory at the end of the file) before Lightning unpickles it."""
    try:
        with zipfile.ZipFile(path) as z:
            ok = any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"resume: {path} is not a readable checkpoint ({e}); it was damaged outside this code "
            "(checkpoints are written atomically). Delete it to restart from step 0, or restore a copy"
        ) from e
    if not ok:
        raise CheckpointError(f"resume: {path} is not a torch checkpoint (no data.pkl); delete it to restart")


def checkpoint_head(last: Path) -> tuple[dict | None, int] | None:
    """(run identity, step) of a checkpoint, read without loading its tensors; None if unreadable."""
    try:
        check_checkpoint_readable(last)
        ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        identity = ckpt["aioli_repro"]["identity"]
        return (None if identity is None else json.loads(identity)), int(ckpt["global_step"])
    except Exception as e:  # noqa: BLE001 - whatever the damage: say so and leave the run alone
        print(f"[aioli_repro] not resuming {shown_path(last)}: unreadable checkpoint ({e})", file=sys.stderr)
        return None
