"""Running a sweep's pending jobs: in-process (one at a time or a pool of worker processes, dependent
jobs after their prerequisite) or as Hydra multiruns (local, joblib, SLURM), in two method phases."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from aioli_repro.pipeline.sweep import (
    CORE_METHODS,
    DEFAULT_SEEDS,
    DEPENDS_ON,
    ENTRYPOINT,
    LATE_METHODS,
    SLURM_BY_EXPERIMENT,
    Job,
    compose_job,
    is_hydra_override,
)


# -- running ---------------------------------------------------------------------------------------------
def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _execute(table: str, cfg: DictConfig, results_dir: Path, log: Callable[[str], None]) -> list[dict]:
    """Run one job's pipeline(s); the pipeline summaries."""
    from aioli_repro.pipeline.recipes import run_method
    from aioli_repro.pipeline.restricted import run_restricted

    if table == "table3":
        return [s for s, _ in run_restricted(cfg, results_dir, log).values()]
    return [run_method(cfg, results_dir, log)[0]]


def _done_line(summaries: list[dict], stage_log: list[str], seconds: float) -> str:
    trained = sum("training in" in m for m in stage_log)
    reused = sum("already done" in m for m in stage_log)
    ppl = ", ".join(f"{s.get('variant') or 'ppl'} {s['test/avg_ppl']:.3f}" for s in summaries)
    return f"done in {seconds:.1f} s ({trained} stages trained, {reused} reused; test avg {ppl})"


def worker_init(threads: int) -> None:
    import lightning.pytorch  # noqa: F401  (sets its loggers' level on import: quiet them after)
    import torch

    torch.set_num_threads(threads)
    _quiet_lightning()


def _worker(table: str, overrides: list[str], results_dir: Path, verbose: bool) -> dict:
    """One job in a worker process (parallel in-process runs): composes its config and runs it."""
    stage_log: list[str] = []
    t = time.time()
    try:
        cfg = compose_job(overrides)
        if not verbose:
            cfg = OmegaConf.merge(cfg, {"progress": False})
        summaries = _execute(table, cfg, results_dir, stage_log.append)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "log": stage_log, "seconds": time.time() - t}
    return {"summaries": summaries, "log": stage_log, "seconds": time.time() - t}


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_n_jobs(scale_cfg: str) -> int:
    """Pipelines at a time for the in-process launcher: one per CPU core for the CPU miniature (each run
    uses one torch thread; a 1M-parameter model gains little from a second), one on a GPU."""
    if scale_cfg not in DEFAULT_SEEDS:  # a GPU scale: one pipeline at a time
        return 1
    return max(1, min(cpu_cores(), 8))


def run_inprocess(
    table: str, jobs: list[Job], results_dir: Path, verbose: bool = False, n_jobs: int = 1
) -> list[tuple[Job, str]]:
    """Run the pending jobs, one at a time in this process (n_jobs = 1) or n_jobs at a time in worker
    processes; return [(job, error)] of failures. A job that reuses another job's stage (DML: grid's
    sweep, DoReMi: the stratified run) starts after that job, so no worker waits on a stage lock."""
    _quiet_lightning()
    failures: list[tuple[Job, str]] = []
    # stratified and the Aioli arms first: a sweep cut short still has the comparisons with most seeds
    pending = sorted((j for j in jobs if not j.done), key=lambda j: j.method not in CORE_METHODS)
    t0, n = time.time(), len(jobs)
    width = len(str(n))
    number = {id(j): i for i, j in enumerate(jobs, 1)}

    def head(job: Job) -> str:
        return f"[{number[id(job)]:>{width}}/{n}] {job.label}"

    def progress() -> str:
        finished = sum(1 for j in pending if j.done)
        left = len(pending) - finished - len(failures)
        elapsed = time.time() - t0
        eta = f", ETA {fmt_seconds(elapsed / finished * left)}" if finished and left > 0 else ""
        return f"[elapsed {fmt_seconds(elapsed)}{eta}]"

    for job in jobs:
        if job.done:
            print(f"{head(job)}: already done ({job.dirs[0].name})", flush=True)
    if n_jobs > 1 and len(pending) > 1:
        _run_pool(table, pending, results_dir, verbose, n_jobs, head, progress, failures)
        return failures

    for job in pending:
        print(f"{head(job)}: running", flush=True)
        cfg = job.cfg
        if not verbose:
            cfg = OmegaConf.merge(cfg, {"progress": False})
        stage_log: list[str] = []

        def log(msg: str, stage_log: list[str] = stage_log) -> None:
            stage_log.append(msg)
            if verbose or "training in" in msg or "warning" in msg:
                print(f"      {msg}", flush=True)

        t = time.time()
        try:
            summaries = _execute(table, cfg, results_dir, log)
        except Exception as e:  # keep going: the table shows what finished, failures are listed at the end
            failures.append((job, f"{type(e).__name__}: {e}"))
            print(f"{head(job)}: FAILED after {time.time() - t:.1f} s: {type(e).__name__}: {e}", flush=True)
            if verbose:
                traceback.print_exc()
            continue
        job.done = True
        print(f"{head(job)}: {_done_line(summaries, stage_log, time.time() - t)} {progress()}", flush=True)
    return failures


def _run_pool(
    table: str,
    pending: list[Job],
    results_dir: Path,
    verbose: bool,
    n_jobs: int,
    head: Callable[[Job], str],
    progress: Callable[[], str],
    failures: list[tuple[Job, str]],
) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    by_cell = {(j.experiment, j.setting, j.seed, j.method): j for j in pending}
    failed: set[int] = set()

    def ready(job: Job) -> bool:
        dep = by_cell.get((job.experiment, job.setting, job.seed, DEPENDS_ON.get(job.method, "")))
        return dep is None or dep.done or id(dep) in failed

    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1) // n_jobs)
    print(f"[reproduce] {n_jobs} pipelines at a time (worker processes, {threads} torch thread each)")
    queue = list(pending)
    running: dict = {}
    # spawn, not fork: the parent has imported torch (and its thread pools)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=worker_init, initargs=(threads,)) as ex:
        while queue or running:
            for job in [j for j in queue if ready(j)][: n_jobs - len(running)]:
                queue.remove(job)
                running[ex.submit(_worker, table, job.overrides, results_dir, verbose)] = job
                print(f"{head(job)}: running", flush=True)
            if not running:  # only jobs whose prerequisite is missing: run them anyway
                job = queue.pop(0)
                running[ex.submit(_worker, table, job.overrides, results_dir, verbose)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                try:
                    out = fut.result()
                except Exception as e:  # the worker process died (killed, out of memory)
                    out = {"error": f"worker died: {type(e).__name__}: {e}", "log": [], "seconds": 0.0}
                for msg in out["log"]:
                    if verbose or "training in" in msg or "warning" in msg:
                        print(f"      {msg}", flush=True)
                if "error" in out:
                    failures.append((job, out["error"]))
                    failed.add(id(job))
                    print(f"{head(job)}: FAILED after {out['seconds']:.1f} s: {out['error']}", flush=True)
                    continue
                job.done = True
                line = _done_line(out["summaries"], out["log"], out["seconds"])
                print(f"{head(job)}: {line} {progress()}", flush=True)


def hydra_commands(
    table: str, jobs: list[Job], launcher: str, results_dir: Path, n_jobs: int | None, extra: Sequence[str]
) -> list[tuple[list[str], dict]]:
    """The multirun commands (and env) that run the pending jobs: per experiment, two method phases, over
    the settings x methods x seeds box of the pending jobs (finished pipelines inside the box only reread
    their stages)."""
    cmds = []
    for experiment in dict.fromkeys(j.experiment for j in jobs):
        mine = [j for j in jobs if j.experiment == experiment and not j.done]
        early = [j for j in mine if j.method not in LATE_METHODS]
        late = [j for j in mine if j.method in LATE_METHODS]
        for phase in (early, late):
            if not phase:
                continue
            settings = list(dict.fromkeys(j.setting for j in phase))
            methods = list(dict.fromkeys(j.method for j in phase))
            seeds = sorted({j.seed for j in phase})
            name = SLURM_BY_EXPERIMENT[experiment] if launcher == "slurm" else launcher
            args = [
                f"experiment={experiment}",
                *[
                    o
                    for o in phase[0].overrides
                    if o.split("=", 1)[0] not in ("experiment", "groups", "method", "seed")
                ],
                "groups=" + ",".join(settings),
                "method=" + ",".join(methods),
                "seed=" + ",".join(map(str, seeds)),
            ]
            env = dict(os.environ)
            if name != "local":
                args.append(f"hydra/launcher={name}")
            if name == "local_parallel":
                args += ["num_threads=1"]
                if n_jobs:
                    args.append(f"hydra.launcher.n_jobs={n_jobs}")
                env["OMP_NUM_THREADS"] = "1"
            args += [o for o in extra if is_hydra_override(o)]  # launcher fields: after the launcher
            cmds.append(([sys.executable, "-m", ENTRYPOINT[table], "-m", *args], env))
    return cmds


def run_hydra(
    table: str, jobs: list[Job], launcher: str, results_dir: Path, n_jobs: int | None, extra: Sequence[str]
) -> list[tuple[Job, str]]:
    failures = []
    for cmd, env in hydra_commands(table, jobs, launcher, results_dir, n_jobs, extra):
        print("[reproduce] " + " ".join(cmd[1:]), flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            failures.append((None, f"exit status {rc}: {' '.join(cmd[1:])}"))
    for j in jobs:
        if not j.refresh() and not any(f[0] is None for f in failures):
            failures.append((j, "no pipeline summary after the multirun"))
    return failures
