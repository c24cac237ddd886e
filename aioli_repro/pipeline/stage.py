"""A pipeline stage: one training run, identified by a hash of the config that produces it.

Stage outputs live in `<results_dir>/<method>-<setting key>-<stage>-<hash>/` (e.g.
`aioli-a_se-run-0123456789ab`; results written before the setting key was added, `<method>-<stage>-
<hash>/`, are still found and reused). `summary.json` is written last (atomically),
so its presence means the stage finished; a directory without it is an interrupted stage that
resumes from its last checkpoint. Two stages with the same training config share one directory,
which is how the DoReMi reference *is* the stratified baseline and DML reuses grid search's sweep.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from aioli_repro.fileio import file_lock
from aioli_repro.training.identity import stage_identity


def stage_hash(cfg: DictConfig, extras: dict | None = None) -> str:
    blob = json.dumps(stage_identity(cfg, extras), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Stage:
    """One run of a method's pipeline."""

    name: str  # e.g. "reference", "proxy", "sweep-3", "final"
    cfg: DictConfig  # the full training config for this run
    extras: dict = field(default_factory=dict)  # inputs from earlier stages (paths, graphs)
    inputs: list[str] = field(default_factory=list)  # directories of the stages this one consumed

    def directory(self, results_dir: Path) -> Path:
        return result_dir(results_dir, self.cfg, self.name, stage_hash(self.cfg, self.extras))


def result_dir(results_dir: str | Path, cfg: DictConfig, part: str, h: str) -> Path:
    """`<method>-<setting key>-<part>-<hash>` (the setting key says which data the results are from), or
    the same folder in the earlier naming, `<method>-<part>-<hash>`, where one exists already."""
    label = cfg.method.name
    legacy = Path(results_dir) / f"{label}-{part}-{h}"
    key = OmegaConf.select(cfg, "groups.key", default=None)
    if key is None or legacy.is_dir():
        return legacy
    return Path(results_dir) / f"{label}-{_safe(str(key))}-{part}-{h}"


def _safe(part: str) -> str:
    """A folder-name part: anything but letters, digits, `_`, `.` and `+` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_.+]", "_", part) or "_"


def read_summary(run_dir: Path) -> dict | None:
    """A finished stage's summary, or None if the stage has not finished (or its summary is unreadable)."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write cannot happen with rename, but never trust a bad file


@contextmanager
def stage_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on a stage directory so two sweeps never train the same stage at once."""
    with file_lock(Path(run_dir) / ".lock"):
        yield
