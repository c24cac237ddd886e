"""What determines a run's results: the resolved config minus presentation keys, plus stage inputs.

The stage hash (pipeline) and the resume check (a checkpoint written under another config is refused)
both come from here.
"""

from __future__ import annotations

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
    "keep_checkpoints",  # what a pipeline deletes after a stage finished
    "restricted",  # read only by the restricted pipeline, which hashes it itself (pipeline/restricted.py)
)

# Keys declared in conf/ after results were computed, left out of the identity so that every earlier
# stage hash (and every checkpoint's resume check) still holds. Both tables are {section: {key: ...}}.
# Keys that never change what a run computes: never part of the identity, whatever their value.
_NOT_HASHED_NESTED: dict[str, tuple[str, ...]] = {
    "trainer": ("slurm_requeue", "requeue_signal", "strategy"),
    "data": ("verify_checksums", "rebuild_on_mismatch"),
}
# Keys that do change results, at the value they implicitly had before they were declared (the code's
# default): left out at that value, so runs made before keep their hash; any other value is part of the
# identity, as it was when given as `+key=value`. Declaring another such key: add it here with that value.
_HASHED_UNLESS_DEFAULT: dict[str, dict[str, object]] = {
    "data": {"seed": 0},
    "trainer": {"fused_optimizer": "auto", "tf32": "auto"},
}


def _drop_late_declared_keys(ident: dict) -> None:
    """Remove the keys of `_NOT_HASHED_NESTED`, and those of `_HASHED_UNLESS_DEFAULT` at their default."""
    for section, keys in _NOT_HASHED_NESTED.items():
        node = ident.get(section)
        if isinstance(node, dict):
            for k in keys:
                node.pop(k, None)
    for section, defaults in _HASHED_UNLESS_DEFAULT.items():
        node = ident.get(section)
        if isinstance(node, dict):
            for k, default in defaults.items():
                if k in node and node[k] == default and type(node[k]) is type(default):
                    del node[k]


def stage_identity(cfg: DictConfig, extras: dict | None = None) -> dict:
    """The resolved config that determines a run's results (plus stage inputs such as a reference path)."""
    full = OmegaConf.to_container(cfg, resolve=True)
    ident = {k: v for k, v in full.items() if k not in _NOT_HASHED}
    _drop_late_declared_keys(ident)
    ident["method"] = {"mixer": full["method"]["mixer"]}  # the method's name is a label, its mixer is the run
    ident["extras"] = dict(extras or {})
    return ident


# Config keys that may change between a run and its resume without changing what it computes.
# (The trainer/data keys of _NOT_HASHED_NESTED are already out of the stage identity.)
_RESUME_FREE = {"train": ("checkpoint_every",)}


def run_identity(cfg: DictConfig, extras: dict | None) -> dict:
    """What determines a run's results: the pipeline's stage identity minus keys free to change on resume."""
    ident = stage_identity(cfg, extras)
    for section, free in _RESUME_FREE.items():
        if isinstance(ident.get(section), dict):
            ident[section] = {k: v for k, v in ident[section].items() if k not in free}
    return ident
