"""The processes of one training run (DDP ranks): who am I, and the few collectives a run needs.

Every function is a no-op on a single process, and returns its input unchanged: a one-device run never
pays for, or is changed by, anything here.

- `launch_rank()` reads the rank from the environment, so it works before Lightning starts the process
  group: a rank > 0 takes no lock, writes no file and starts no logger. Lightning's own launcher sets
  LOCAL_RANK for the processes it starts; SLURM sets SLURM_PROCID; torchrun sets RANK.
- The others use torch.distributed once Lightning has initialised it (inside `trainer.fit`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

# rank 0 publishes its run directory here before `trainer.fit`, so the processes Lightning starts (which
# run the same command again) train in the same folder even when rank 0 resumed an earlier one
RUN_DIR_ENV = "AIOLI_REPRO_RUN_DIR"


def launch_rank() -> int:
    """This process's global rank as its launcher set it (0 for a plain single-process run)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
            continue  # one task per job: SLURM_PROCID is 0 and says nothing about DDP
        if os.environ.get(key):
            return int(os.environ[key])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or int(os.environ.get("WORLD_SIZE", "1"))
    return node * per_node + local


def is_launch_zero() -> bool:
    return launch_rank() == 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def size() -> int:
    """Number of processes training this run (1 outside DDP)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the ranks, in place (and returned); `t` itself on one process."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_array(a: np.ndarray, device: torch.device) -> np.ndarray:
    """Rank 0's `a` on every rank (float64); `a` itself on one process."""
    if not _active():
        return a
    t = torch.as_tensor(np.asarray(a, dtype=np.float64), device=device).clone()
    dist.broadcast(t, src=0)
    return t.cpu().numpy()


def barrier() -> None:
    if _active():
        dist.barrier()
