"""A pipeline stage: one training run, identified by a hash of the config that produces it.

Stage outputs live in `<results_dir>/<name>-<hash>/`. `summary.json` is written last (atomically),
so its presence means the stage finished; a directory without it is an interrupted stage that
resumes from its last checkpoint. Two stages with the same training config share one directory,
which is how the DoReMi reference *is* the stratified baseline and DML reuses grid search's sweep.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Keys that do not change what a run computes, so they stay out of the stage hash.
_NOT_HASHED = (
    "progress",
    "progress_refresh",
    "num_threads",
    "run_name",
    "logger",
    "cache_dir",
    "results_dir",
    "hp",
)


def stage_identity(cfg: DictConfig, extras: dict | None = None) -> dict:
    """The resolved config that determines a run's results (plus stage inputs such as a reference path)."""
    full = OmegaConf.to_container(cfg, resolve=True)
    ident = {k: v for k, v in full.items() if k not in _NOT_HASHED}
    ident["method"] = {"mixer": full["method"]["mixer"]}  # the method's name is a label, its mixer is the run
    ident["extras"] = {k: v for k, v in (extras or {}).items() if k != "prior_tokens"}
    return ident


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
        label = self.cfg.method.name
        return Path(results_dir) / f"{label}-{self.name}-{stage_hash(self.cfg, self.extras)}"


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
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
