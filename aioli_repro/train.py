"""One training run: `python -m aioli_repro.train [hydra overrides]`.

Builds (or reuses) the packed data cache, the decoder, the mixing method and Lightning's Trainer,
trains, evaluates per-group val/test loss, and writes `summary.json` + `metrics.jsonl` in the run
directory (`aioli_repro.training.run.run_training`). Running the same command again resumes an
unfinished run of it.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from aioli_repro import world
from aioli_repro.config import register_resolvers, user_error_exit
from aioli_repro.fileio import shown_path
from aioli_repro.training.preflight import USER_ERRORS, preflight, report_data
from aioli_repro.training.run import run_training
from aioli_repro.training.run_dirs import default_layout, find_unfinished_run, remove_if_unused
from aioli_repro.training.summary import format_summary

# an entry point: Hydra resolves run_name (the setting_key resolver) before main runs, and a SLURM job
# imports this module to run main, so registering here covers both
register_resolvers()


def _explicit_run_dir(hc: Any) -> str | None:
    """The `hydra.run.dir=...` given on the command line, if any."""
    given = [o.split("=", 1) for o in hc.overrides.hydra]
    values = [kv[1] for kv in given if len(kv) == 2 and kv[0].lstrip("+") == "hydra.run.dir"]
    return values[-1] if values else None


def _same_command_finds(hc: Any, fresh: Path, run_name: str) -> bool:
    """Does running this command again land in the same run directory (directly, or by the lookup)?"""
    from hydra.types import RunMode

    if hc.mode != RunMode.RUN:
        return False  # a multirun job's folder is under a new sweep folder every time
    explicit = _explicit_run_dir(hc)
    if explicit is not None:
        return "${" not in explicit  # e.g. ${now:...}: a new folder every time
    return default_layout(fresh, run_name)


def resume_hint(hc: Any, fresh: Path, run_dir: Path, run_name: str) -> str:
    """The interruption message's advice: the same command if it finds `run_dir` again, else the exact
    command that does."""
    if _same_command_finds(hc, fresh, run_name):
        return f"run the same command again to resume it (in {shown_path(run_dir)})"
    args = [*hc.overrides.task, f"hydra.run.dir={run_dir}"]
    return f"resume with: python -m aioli_repro.train {shlex.join(args)}"


def _resume_target(cfg: DictConfig, hc: Any, fresh: Path) -> Path:
    """Where this command trains: an unfinished earlier run of the same command, or Hydra's new folder."""
    run_name = str(cfg.run_name)
    if _explicit_run_dir(hc) is not None or not _same_command_finds(hc, fresh, run_name):
        return fresh  # an explicit run dir resumes by itself (run_training finds its checkpoint)
    found = find_unfinished_run(cfg, fresh)
    if found is None:
        return fresh
    print(f"[aioli_repro] resuming {shown_path(found.run_dir)} from step {found.step}", file=sys.stderr)
    remove_if_unused(fresh, parent_too=True)
    return found.run_dir


def _rank_zero_run_dir(fresh: Path) -> Path:
    """DDP rank > 0: the folder rank 0 trains in (it may have resumed an earlier run of the command)."""
    return Path(os.environ.get(world.RUN_DIR_ENV) or fresh)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    fresh = Path(hc.runtime.output_dir)
    try:
        checked = preflight(cfg)
        report_data(checked.source, checked.groups, bool(cfg.get("progress", True)))
        run_dir = _resume_target(cfg, hc, fresh) if world.is_launch_zero() else _rank_zero_run_dir(fresh)
        hint = resume_hint(hc, fresh, run_dir, str(cfg.run_name))
        summary = run_training(cfg, run_dir, checked=checked, resume_hint=hint)
    except USER_ERRORS as e:
        user_error_exit(e)
    finally:  # a run that failed before writing anything leaves no folder behind
        if world.is_launch_zero():
            remove_if_unused(fresh, parent_too=default_layout(fresh, str(cfg.run_name)))
    if not world.is_launch_zero():
        return
    print(format_summary(summary))
    print(f"summary: {run_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
