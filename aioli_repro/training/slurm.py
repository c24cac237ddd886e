"""SLURM: the requeue signal handled at a step boundary, and `scontrol requeue`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from aioli_repro.config import ConfigError


def slurm_job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_setup(cfg: DictConfig) -> tuple[list, int | None]:
    """(Trainer plugins, requeue signal or None) for this process.

    Under SLURM, Lightning's default SLURMEnvironment(auto_requeue=True) saves an `hpc_ckpt_*.ckpt` from
    inside its requeue-signal handler, i.e. in the middle of a step (sampler already advanced, optimizer not),
    and prefers that file on the next start. We keep Lightning's SLURM environment with auto_requeue off
    and handle the requeue signal ourselves at the next step boundary (StepBoundaryCheckpoint), then
    `scontrol requeue` the job: the requeued job resumes exactly.
    """
    plugins: list = []
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer_cfg = cfg.get("trainer") or {}
    if slurm_job_id() is None or not bool(trainer_cfg.get("slurm_requeue", True)):
        return plugins, None
    name = str(trainer_cfg.get("requeue_signal", "SIGUSR2")).upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    allowed = ["SIGUSR1", "SIGUSR2", "SIGHUP", "SIGCONT"]
    if name not in allowed:
        raise ConfigError(f"trainer.requeue_signal: unknown value {name!r}; allowed: {allowed}")
    return plugins, int(getattr(signal, name))


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this job (array task aware); False, with a message, if that fails."""
    job = slurm_job_id()
    if job is None:
        return False
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"[aioli_repro] could not requeue SLURM job {job}: {e}", file=sys.stderr)
        return False
    if r.returncode != 0:
        err = r.stderr.strip()
        print(f"[aioli_repro] scontrol requeue {job} failed ({r.returncode}): {err}", file=sys.stderr)
        return False
    print(f"[aioli_repro] requeued SLURM job {job}", file=sys.stderr)
    return True
