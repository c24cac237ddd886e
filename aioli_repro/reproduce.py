"""Reproduce the paper's tables end to end: sweep -> runs -> table.

    python -m aioli_repro.reproduce table2 --scale tiny|paper|auto [--seeds N] [--launcher L] [overrides...]
    python -m aioli_repro.reproduce table3 --scale tiny|paper|auto [--fraction 0.5] [--prior-steps N]
    python -m aioli_repro.reproduce table2 --scale tiny --dry-run   # the job list and what is done
    python -m aioli_repro.reproduce detect-scale                    # what --scale auto picks, and why

1. The sweep: every (setting x method x seed) of the experiment configs `conf/experiment/table2.yaml`
   (m = 2, 3) and `table2_m7.yaml` (m = 7, fewer seeds), or `table3*.yaml` for the restricted setting,
   expanded exactly as Hydra's basic sweeper expands them. Pipelines whose summary already exists are
   skipped; every other one runs its stages, and finished stages inside it are reused (by config hash).
   Launchers:
     inprocess          (default) through the pipeline API, one progress line per pipeline: in this
                        process, or --n-jobs worker processes (default: one per CPU core at scale
                        tiny, 1 otherwise); the fastest on a CPU
     local              Hydra multirun, basic launcher (`python -m aioli_repro.run -m experiment=...`)
     local_parallel     Hydra multirun with joblib, --n-jobs pipelines at a time, one torch thread each
     slurm              Hydra multirun with submitit: slurm_rtx6000ada for m = 2, 3, slurm_a100 for m = 7
     slurm_rtx6000ada / slurm_a100    one of the two for every job
   With a Hydra launcher, the methods run in two phases (stratified, grid, skillit, doge, aioli; then
   dml and doremi, which reuse grid's sweep and the stratified run), so parallel jobs never wait on a
   stage another job is training.
2. `results.load_runs` reads the pipelines of exactly this job list (summary.json, or W&B offline runs).
3. `tables.build_table2` / `build_table3` -> `<out-dir>/table2.{csv,md,png}` (+ `table2_vs_paper.md`).
4. The table and the wall time are printed.

`--scale tiny` is the CPU miniature `conf/scale/table_smoke.yaml` (synthetic groups, 128-step runs, 1 seed);
`--scale paper` is `conf/scale/paper.yaml` (Pythia-160m on SlimPajama-6B, 5 / 3 seeds); `auto` picks
paper when a CUDA GPU is present and tiny otherwise. Any other name is a `conf/scale/` file.
Extra positional arguments are Hydra overrides applied to every job (e.g. `train.max_steps=20`).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import aioli_repro.config  # noqa: F401  (registers resolvers)

CONF = Path(__file__).resolve().parents[1] / "conf"
SCALE_ALIASES = {"smoke": "table_smoke", "tiny": "miniature", "paper": "paper"}
# (experiment, m-class) invocations of each table; m = 7 has its own seeds (and SLURM node type)
EXPERIMENTS = {
    "table2": ("table2", "table2_m7"),
    "table3": ("table3", "table3_m7"),
    "headroom": ("headroom", "headroom_m7"),
}  # fmt: skip
ENTRYPOINT = {"table2": "aioli_repro.run", "table3": "aioli_repro.restricted", "headroom": "aioli_repro.run"}
SLURM_BY_EXPERIMENT = {
    "table2": "slurm_rtx6000ada", "table2_m7": "slurm_a100",
    "table3": "slurm_rtx6000ada", "table3_m7": "slurm_a100",
    "headroom": "slurm_rtx6000ada", "headroom_m7": "slurm_a100",
}  # fmt: skip
LAUNCHERS = ("inprocess", "local", "local_parallel", "slurm", "slurm_rtx6000ada", "slurm_a100")
# methods that only reuse other methods' stages come second on a Hydra launcher
LATE_METHODS = ("dml", "doremi")
# Rows that get the most seeds: the reference and every Aioli arm (the statistics rule).
CORE_METHODS = ("stratified", "aioli", "aioli_mult", "aioli_null")
# Seeds per CPU scale and table: (m = 2, 3; m = 7; at most this many for the other baselines).
# Scales not listed (paper) take the experiment configs' seeds (5 for m = 2, 3 and 3 for m = 7) for every row.
DEFAULT_SEEDS = {
    "table_smoke": {"table2": (1, 1, 1), "table3": (1, 1, 1), "headroom": (1, 1, 1)},
    "miniature": {"table2": (5, 5, 3), "table3": (3, 3, 3), "headroom": (3, 3, 3)},
}


# -- scale ---------------------------------------------------------------------------------------------
def detect_scale() -> tuple[str, str]:
    """('paper' | 'tiny', why): paper when a CUDA GPU is present."""
    try:
        import torch

        if torch.cuda.is_available():
            return "paper", f"a CUDA GPU is present ({torch.cuda.get_device_name(0)})"
        return "tiny", "no CUDA GPU found (torch.cuda.is_available() is False)"
    except Exception as e:  # a broken CUDA install should not stop the CPU miniature
        return "tiny", f"no usable CUDA GPU ({type(e).__name__}: {e})"


def resolve_scale(scale: str, log: Callable[[str], None] = print) -> tuple[str, str]:
    """(user-facing name, conf/scale file) for --scale; 'auto' prints which and why."""
    if scale == "auto":
        scale, why = detect_scale()
        what = "Pythia-160m on SlimPajama-6B" if scale == "paper" else "CPU miniature on synthetic groups"
        log(f"[reproduce] SCALE not set: {why} -> scale {scale} ({what}). Set SCALE=tiny|paper to choose.")
    cfg_name = SCALE_ALIASES.get(scale, scale)
    if not (CONF / "scale" / f"{cfg_name}.yaml").exists():
        options = sorted({*SCALE_ALIASES, *(p.stem for p in (CONF / "scale").glob("*.yaml"))})
        raise SystemExit(f"error: --scale: unknown scale {scale!r}; allowed: auto, {', '.join(options)}")
    return scale, cfg_name


# -- jobs ------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One pipeline of the sweep (Table 3: one baseline's pair of pipelines): its Hydra overrides, output
    directories, and what the driver prints about it. The composed config is made on first use."""

    experiment: str
    overrides: list[str]
    dirs: list[Path]  # pipeline directories this job writes (Table 3: one per variant)
    meta: dict  # setting, label, method, seed, scale_name, train budget, model size
    done: bool = False
    _cfg: DictConfig | None = None

    @property
    def cfg(self) -> DictConfig:
        if self._cfg is None:
            self._cfg = compose_job(self.overrides)
        return self._cfg

    @property
    def keys(self) -> list[str]:
        return [d.name for d in self.dirs]

    @property
    def setting(self) -> str:
        return str(self.meta["setting"])

    @property
    def method(self) -> str:
        return str(self.meta["method"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def label(self) -> str:
        return f"{self.meta['label']} {self.method} seed {self.seed}"

    def refresh(self) -> bool:
        # a cached plan may name a folder that an older version of this code wrote without the setting key
        key = f"-{self.meta['setting']}-"
        legacy = [d.with_name(d.name.replace(key, "-", 1)) if _legacy_only(d, key) else d for d in self.dirs]
        self.dirs = legacy
        self.done = all((d / "summary.json").exists() for d in self.dirs)
        return self.done


def _legacy_only(d: Path, key: str) -> bool:
    """`d` does not exist but the same folder in the earlier naming (no setting key) does."""
    return key in d.name and not d.exists() and d.with_name(d.name.replace(key, "-", 1)).is_dir()


def job_meta(cfg: DictConfig) -> dict:
    t = cfg.train
    return {
        "setting": str(cfg.groups.key), "label": str(cfg.groups.label), "method": str(cfg.method.name),
        "seed": int(cfg.seed), "scale_name": str(cfg.scale_name), "max_steps": int(t.max_steps),
        "batch_size": int(t.batch_size), "context_length": int(t.context_length),
        "n_layer": int(cfg.model.n_layer), "d_model": int(cfg.model.d_model),
    }  # fmt: skip


def default_cache_dir() -> str:
    """What `cache_dir` resolves to inside a Hydra job started from the current directory."""
    return os.environ.get("AIOLI_CACHE", str(Path.cwd() / ".cache" / "aioli"))


def expand_overrides(params: dict, arguments: Sequence[str]) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper launches for sweeper `params` + command-line args."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    strings = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    overrides = OverridesParser.create().parse_overrides(strings)
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    return batch


def sweep_params(experiment: str, arguments: Sequence[str] = ()) -> dict:
    """hydra.sweeper.params of an experiment config."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        c = compose(
            "train",
            overrides=[f"experiment={experiment}", f"cache_dir={default_cache_dir()}", *arguments],
            return_hydra_config=True,
        )
    return dict(OmegaConf.to_container(c.hydra.sweeper.params))


def _is_hydra_override(arg: str) -> bool:
    """`hydra.launcher.partition=gpu` and the like: for the Hydra command line, not the job configs
    (a launcher's fields do not exist until the launcher is chosen)."""
    return arg.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0] == "hydra"


def _is_sweep_key(arg: str, key: str) -> bool:
    return arg.split("=", 1)[0].lstrip("+~") == key


def job_arguments(
    table: str,
    experiment: str,
    scale_cfg: str,
    results_dir: Path,
    seeds: int | None,
    settings: Sequence[str] | None,
    methods: Sequence[str] | None,
    extra: Sequence[str],
) -> list[str]:
    """The command-line part of one multirun (what the driver passes after `-m`)."""
    args = [f"experiment={experiment}", f"scale={scale_cfg}", f"results_dir={results_dir}"]
    if seeds is not None:
        args.append(f"seed=range(0,{seeds})")
    if settings:
        args.append("groups=" + ",".join(settings))
    if methods:
        args.append("method=" + ",".join(methods))
    return args + list(extra)


def compose_job(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"cache_dir={default_cache_dir()}"])


def pipeline_dirs(table: str, cfg: DictConfig, results_dir: Path) -> list[Path]:
    from aioli_repro.pipeline.stage import result_dir, stage_hash

    if table == "table3":
        from aioli_repro.restricted import pipeline_dirs as restricted_dirs

        return list(restricted_dirs(cfg, results_dir).values())
    return [result_dir(results_dir, cfg, "pipeline", stage_hash(cfg))]


def plan(
    table: str,
    scale_cfg: str,
    results_dir: Path,
    seeds: int | None = None,
    seeds_m7: int | None = None,
    settings: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    extra: Sequence[str] = (),
    baseline_seeds: int | None = None,
) -> list[Job]:
    """Every job of the table's sweep, in launch order, with its done flag.

    seeds / seeds_m7: number of seeds (None: the experiment configs' 5 and 3). settings / methods
    restrict the sweep (None: all); a setting is kept in whichever experiment (m-class) sweeps it.
    baseline_seeds: methods outside `CORE_METHODS` keep only seeds below it (None: all).
    """
    import hashlib
    import json

    from hydra import compose, initialize_config_dir

    # Composing is slow (0.2-0.8 s a config), so the expanded plan is cached under the results directory,
    # keyed by the arguments and the content of every config file: a re-run composes nothing.
    h = hashlib.sha256(json.dumps([table, scale_cfg, str(results_dir), seeds, seeds_m7, settings, methods,
                                   list(extra), baseline_seeds], default=str).encode())  # fmt: skip
    for f in sorted(CONF.rglob("*.yaml")):
        h.update(str(f.relative_to(CONF)).encode() + f.read_bytes())
    cache = results_dir / ".plans" / f"{table}-{h.hexdigest()[:16]}.json"
    if cache.exists():
        try:
            rows = json.loads(cache.read_text())
            jobs = [
                Job(r["experiment"], r["overrides"], [Path(d) for d in r["dirs"]], r["meta"]) for r in rows
            ]
            for j in jobs:
                j.refresh()
            return jobs
        except (ValueError, KeyError, TypeError):
            pass  # a stale or torn cache: compose again

    jobs: list[Job] = []
    for experiment in EXPERIMENTS[table]:
        params = sweep_params(experiment)
        wanted = params["groups"].split(",")
        if settings:
            wanted = [s for s in wanted if s in settings]
            if not wanted:
                continue
        n = seeds_m7 if experiment.endswith("_m7") else seeds
        args = job_arguments(
            table, experiment, scale_cfg, results_dir, n, wanted if settings else None, methods, extra
        )
        composed: dict[tuple, DictConfig] = {}
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            for ov in expand_overrides(params, args):
                # `seed=s` only sets a value: compose once per job without it, then set it (much faster
                # than one compose per job at the paper's 196 jobs)
                rest = tuple(o for o in ov if not _is_sweep_key(o, "seed"))
                seed = [o.split("=", 1)[1] for o in ov if _is_sweep_key(o, "seed")]
                if rest not in composed:
                    composed[rest] = compose("train", overrides=[*rest, f"cache_dir={default_cache_dir()}"])
                cfg = copy.deepcopy(composed[rest])
                if seed:
                    cfg.seed = int(seed[-1])
                few = baseline_seeds is not None and str(cfg.method.name) not in CORE_METHODS
                if few and int(cfg.seed) >= baseline_seeds:
                    continue
                job = Job(experiment, ov, pipeline_dirs(table, cfg, results_dir), job_meta(cfg), _cfg=cfg)
                job.refresh()
                jobs.append(job)
    if settings:
        unknown = set(settings) - {j.setting for j in jobs}
        if unknown:
            raise SystemExit(f"error: --settings: unknown or not in {table}: {sorted(unknown)}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    rows = [
        {
            "experiment": j.experiment,
            "overrides": j.overrides,
            "dirs": [str(d) for d in j.dirs],
            "meta": j.meta,
        }
        for j in jobs
    ]
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, cache)
    return jobs


def default_seeds(
    scale_cfg: str, table: str, seeds: int | None, seeds_m7: int | None, baseline_seeds: int | None = None
) -> tuple[int | None, int | None, int | None]:
    """(seeds for m = 2, 3; for m = 7; at most for the non-core baselines), None = the experiment configs'.

    CPU scales take `DEFAULT_SEEDS`; --seeds N alone gives m = 7 min(N, 3) seeds at the paper scale (as
    released) and N at a CPU scale; --baseline-seeds caps the rows outside `CORE_METHODS`."""
    preset = DEFAULT_SEEDS.get(scale_cfg, {}).get(table)
    if preset is not None:
        seeds_m7 = seeds_m7 if seeds_m7 is not None else (seeds if seeds is not None else preset[1])
        seeds = seeds if seeds is not None else preset[0]
        baseline_seeds = baseline_seeds if baseline_seeds is not None else preset[2]
    elif seeds_m7 is None and seeds is not None:
        seeds_m7 = min(seeds, 3)
    return seeds, seeds_m7, baseline_seeds


# -- running ---------------------------------------------------------------------------------------------
def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _execute(table: str, cfg: DictConfig, results_dir: Path, log: Callable[[str], None]) -> list[dict]:
    """Run one job's pipeline(s); the pipeline summaries."""
    from aioli_repro.pipeline.recipes import run_method
    from aioli_repro.restricted import run_restricted

    if table == "table3":
        return [s for s, _ in run_restricted(cfg, results_dir, log).values()]
    return [run_method(cfg, results_dir, log)[0]]


def _done_line(summaries: list[dict], stage_log: list[str], seconds: float) -> str:
    trained = sum("training in" in m for m in stage_log)
    reused = sum("already done" in m for m in stage_log)
    ppl = ", ".join(f"{s.get('variant') or 'ppl'} {s['test/avg_ppl']:.3f}" for s in summaries)
    return f"done in {seconds:.1f} s ({trained} stages trained, {reused} reused; test avg {ppl})"


def _worker_init(threads: int) -> None:
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


def default_n_jobs(scale_cfg: str) -> int:
    """Pipelines at a time for the in-process launcher: one per CPU core for the CPU miniature (each run
    uses one torch thread; a 1M-parameter model gains little from a second), one on a GPU."""
    if scale_cfg not in DEFAULT_SEEDS:  # a GPU scale: one pipeline at a time
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


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
        eta = f", ETA {_fmt_s(elapsed / finished * left)}" if finished and left > 0 else ""
        return f"[elapsed {_fmt_s(elapsed)}{eta}]"

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


DEPENDS_ON = {"dml": "grid", "doremi": "stratified"}  # method -> the method whose stages it reuses


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
    with ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as ex:
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
            args += [o for o in extra if _is_hydra_override(o)]  # launcher fields: after the launcher
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


# -- tables ----------------------------------------------------------------------------------------------
def load_frame(jobs: list[Job], results_dir: Path, source: str = "auto"):
    """The `load_runs` frame restricted to this job list's pipelines."""
    from aioli_repro.results import load_runs

    keys = {k for j in jobs for k in j.keys}
    df = load_runs(results_dir, source=source)
    return df[df["run_key"].isin(keys)].reset_index(drop=True)


def manifest_path(out_dir: str | Path, table: str) -> Path:
    return Path(out_dir) / f"{table}_runs.json"


def write_manifest(jobs: list[Job], out_dir: Path, table: str, results_dir: Path) -> Path:
    """`<out_dir>/<table>_runs.json`: the pipelines (run keys) the table was built from, for the notebooks."""
    import json

    path = manifest_path(out_dir, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "table": table,
        "scale": str(jobs[0].meta["scale_name"]),
        "results_dir": str(results_dir),
        "run_keys": sorted({k for j in jobs for k in j.keys}),
    }
    path.write_text(json.dumps(body, indent=1))
    return path


def select_runs(df, table: str, out_dir: str | Path | None = None, scale: str | None = None):
    """The rows of a `load_runs` frame that make up `table` ("table2" | "table3"): (frame, scale, note).

    With `<out_dir>/<table>_runs.json` (written by the driver) the frame is cut to exactly those
    pipelines. Otherwise: the rows of one scale (`scale`, else the only one, else "paper" if present,
    else the most frequent), and where a (setting, method, seed, variant) appears more than once (runs
    of different budgets in one results directory) the newest file wins.
    """
    import json

    d = df[df["variant"].isna()] if table == "table2" else df[df["variant"].notna()]
    note = ""
    mpath = manifest_path(out_dir, table) if out_dir is not None else None
    if mpath is not None and mpath.exists():
        man = json.loads(mpath.read_text())
        cut = d[d["run_key"].isin(set(man["run_keys"]))]
        if len(cut):
            note = f"runs listed in {mpath} ({len(cut)} of {len(man['run_keys'])} pipelines found)"
            return cut.reset_index(drop=True), str(man["scale"]), note
    if d.empty:
        return d, scale, "no runs"
    if scale is None:
        scales = d["scale"].value_counts()
        scale = "paper" if "paper" in scales.index else str(scales.index[0])
    d = d[d["scale"] == scale].copy()
    d["_mtime"] = [Path(p).stat().st_mtime if Path(str(p)).exists() else 0.0 for p in d["path"]]
    keys = ["setting", "method", "seed", "variant", "base_method"]
    n = len(d)
    d = d.sort_values("_mtime").drop_duplicates(keys, keep="last").drop(columns="_mtime")
    note = f"all runs at scale {scale!r}" + (
        f" ({n - len(d)} older duplicates dropped)" if n > len(d) else ""
    )
    return d.sort_values(["setting", "method", "seed"]).reset_index(drop=True), scale, note


def budget_line(jobs: list[Job]) -> str:
    parts = []
    for experiment in dict.fromkeys(j.experiment for j in jobs):
        mine = [j for j in jobs if j.experiment == experiment]
        t = mine[0].meta
        steps = sorted({int(j.meta["max_steps"]) for j in mine}, reverse=True)
        ms = "m = 7" if experiment.endswith("_m7") else "m = 2, 3"
        seeds = len({j.seed for j in mine})
        few = len({j.seed for j in mine if j.method not in CORE_METHODS}) or seeds
        parts.append(
            f"{ms}: {' / '.join(map(str, steps))} steps x {t['batch_size']} x {t['context_length']} tokens, "
            f"{seeds} seed{'s' * (seeds != 1)}" + (f" ({few} for the other baselines)" if few < seeds else "")
        )
    c = jobs[0].meta
    return f"Budget ({c['scale_name']} scale, model {c['n_layer']} layers x d {c['d_model']}): " + "; ".join(
        parts
    )


def build(
    table: str, jobs: list[Job], scale: str, results_dir: Path, out_dir: Path, source: str, footer: str = ""
) -> tuple[object, str, dict[str, Path]]:
    """Build, write and return (table frame, markdown, {what: path})."""
    import pandas as pd

    from aioli_repro.results import data_label
    from aioli_repro.tables import build_table2, build_table3, paper_side_by_side, plot_table, write_table

    df = load_frame(jobs, results_dir, source)
    if df.empty:
        raise SystemExit(f"error: no finished pipelines of this sweep under {results_dir} (source {source})")
    scale_name = str(jobs[0].meta["scale_name"])
    label = data_label(df)
    if table == "headroom":
        return build_headroom(df, scale_name, label, out_dir, footer)
    paths: dict[str, Path] = {}
    if table == "table2":
        best = headroom_runs(results_dir, scale_name)
        tab, md = build_table2(df, scale_name, label, best, smoke=scale_name == "table_smoke")
    else:
        tab, md = build_table3(df, scale=scale_name, data_label=label)
    md = md + ("\n" + footer + "\n" if footer else "")
    paths["csv"], paths["md"] = write_table(tab, md, out_dir, table)
    paths["runs"] = write_manifest(jobs, out_dir, table, results_dir)
    if any(c.get("kind") == "delta" for c in tab.attrs.get("cells", [])):
        paths["png"] = plot_table(tab, out_dir / f"{table}.png")
    else:  # e.g. stratified only: no differences to draw
        print(f"[reproduce] no plot: {table} has no difference cells yet")
    if table == "table2":
        paths.update(write_probe_noise(df, out_dir))
        from aioli_repro.claims import claims_markdown

        paths["claims_md"] = out_dir / "claims.md"
        paths["claims_md"].write_text(claims_markdown(df, pd.DataFrame(tab.attrs["cells"])))
        if set(df["data"].dropna()) == {"slimpajama"}:  # the paper's numbers are about SlimPajama only
            side, side_md = paper_side_by_side(tab)
            paths["vs_paper_md"] = out_dir / "table2_vs_paper.md"
            paths["vs_paper_md"].write_text(side_md)
            paths["vs_paper_csv"] = out_dir / "table2_vs_paper.csv"
            side.to_csv(paths["vs_paper_csv"])
    return tab, md, paths


def write_probe_noise(df, out_dir: Path) -> dict[str, Path]:
    """beta_noise.{csv,md}: Aioli's probe signal |β| against its standard error, per setting."""
    from aioli_repro.probe_noise import noise_table, round_records
    from aioli_repro.tables import to_markdown

    have = df[df["path"].map(lambda p: str(p).endswith("summary.json") and Path(str(p)).exists())]
    records = round_records(have, ("aioli", "aioli_null", "aioli_mult"))
    if records.empty:
        return {}
    tab = noise_table(records).round(5)
    csv, md = out_dir / "beta_noise.csv", out_dir / "beta_noise.md"
    tab.to_csv(csv, index=False)
    md.write_text(
        "**Aioli's probe signal against its noise** (β: loss drop per probe interval; se: standard error "
        "over the k sweeps of a round; all Aioli arms, all rounds and seeds)\n\n"
        f"{to_markdown(tab.set_index('setting'), 'Setting')}\n"
    )
    return {"beta_noise_csv": csv, "beta_noise_md": md}


def headroom_runs(results_dir: Path, scale_name: str):
    """The best static mixture's per-seed rows (`headroom.best_static`) of the headroom pipelines at this
    scale under results_dir, or None when `make headroom` has not run there."""
    from aioli_repro.headroom import best_static, load_grid
    from aioli_repro.results import load_runs

    if not any(results_dir.glob("headroom-*pipeline-*/summary.json")):
        return None
    runs = load_runs(results_dir, source="summary")
    mine = runs[runs["method"].isin(["headroom", "stratified"]) & (runs["scale"] == scale_name)]
    mine = mine[mine["variant"].isna()]
    best = best_static(load_grid(mine))
    return best if len(best) else None


def build_headroom(
    df, scale_name: str, label: str, out_dir: Path, footer: str
) -> tuple[object, str, dict[str, Path]]:
    """headroom.{csv,md} (one row per setting) and headroom_points.csv (every grid point)."""
    from aioli_repro.headroom import headroom_table, load_grid, point_table
    from aioli_repro.tables import SETTINGS, to_markdown

    grid, strat = load_grid(df), df[df["method"] == "stratified"]
    tab = headroom_table(grid, strat, list(SETTINGS))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "headroom.csv", "md": out_dir / "headroom.md"}
    tab.to_csv(paths["csv"], index=False)
    paths["points_csv"] = out_dir / "headroom_points.csv"
    point_table(grid, strat).to_csv(paths["points_csv"], index=False)
    shown = tab.drop(columns=["delta", "lo", "hi"]).set_index("setting")
    md = (
        f"**Headroom: the best static mixture vs stratified (scale: {scale_name}, data: {label})**\n\n"
        f"{to_markdown(shown, 'Setting')}\n\nBest static p: the grid point with the lowest mean val avg ppl "
        "over seeds, uniform (stratified) included. Δ: its test avg ppl − stratified's, paired by seed, with "
        "the 95% t-interval; "
        "`better` = headroom beyond the noise, otherwise none measurable (a negative control).\n"
        + ("\n" + footer + "\n" if footer else "")
    )
    paths["md"].write_text(md)
    return tab, md, paths


# -- CLI -------------------------------------------------------------------------------------------------
def _csv(s: str | None) -> list[str] | None:
    return [x for x in s.split(",") if x] if s else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aioli_repro.reproduce",
        description="Reproduce the paper's Table 2 / 3: run the sweep (resuming), then build the table.",
    )
    p.add_argument("table", choices=["table2", "table3", "headroom", "detect-scale"])
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. train.max_steps=20")
    p.add_argument("--scale", default="auto", help="tiny | paper | auto (paper if a CUDA GPU is present)")
    p.add_argument("--seeds", type=int, default=None, help="seeds for m = 2, 3 (default: paper 5, tiny 1)")
    p.add_argument(
        "--seeds-m7", type=int, default=None, help="seeds for m = 7 (paper default: min(--seeds, 3))"
    )
    p.add_argument(
        "--baseline-seeds", type=int, default=None, help="at most this many seeds for rows other than "
        "stratified and the Aioli arms (tiny default: 3)",
    )  # fmt: skip
    p.add_argument("--settings", default=None, help="comma list, e.g. a_se,gh_c4 (default: all six)")
    p.add_argument("--methods", default=None, help="comma list of methods (table3: baselines)")
    p.add_argument("--results-dir", default="results/runs", help="stage and pipeline outputs")
    p.add_argument("--out-dir", default="results", help="where table2.{csv,md,png} go")
    p.add_argument("--launcher", default="inprocess", choices=LAUNCHERS)
    p.add_argument(
        "--n-jobs",
        type=int,
        default=None,
        help="pipelines at a time (inprocess, local_parallel); inprocess default: one per CPU core at "
        "scale tiny, 1 otherwise",
    )
    p.add_argument("--source", default="auto", choices=["auto", "summary", "wandb"], help="load_runs source")
    p.add_argument("--fraction", type=float, default=None, help="table3: fraction of steps to learn p (0.5)")
    p.add_argument(
        "--prior-steps", type=int, default=None, help="table3: steps on p before Aioli (one round)"
    )
    p.add_argument("--no-run", action="store_true", help="only build the table from finished pipelines")
    p.add_argument("--dry-run", action="store_true", help="print the job list (done / pending) and exit")
    p.add_argument("--verbose", action="store_true", help="progress bars and every stage line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.table == "detect-scale":
        scale, why = detect_scale()
        print(scale)
        print(f"# {why}", file=sys.stderr)
        return 0
    table = args.table
    overrides = list(args.overrides)
    if table == "table3":
        if args.fraction is not None:
            overrides.append(f"restricted.fraction={args.fraction}")
        if args.prior_steps is not None:
            overrides.append(f"restricted.prior_steps={args.prior_steps}")
    os.environ.setdefault("WANDB_SILENT", "true")
    # W&B's console capture (the default) makes each CPU training step ~10x slower here (measured: 40 tiny
    # steps 64 s with it, 7 s without); the runs' output is in metrics.jsonl / summary.json anyway
    os.environ.setdefault("WANDB_CONSOLE", "off")

    t0 = time.time()
    scale, scale_cfg = resolve_scale(args.scale)
    seeds, seeds_m7, baseline_seeds = default_seeds(
        scale_cfg, table, args.seeds, args.seeds_m7, args.baseline_seeds
    )
    results_dir = Path(args.results_dir).resolve()
    job_overrides = [o for o in overrides if not _is_hydra_override(o)]
    if args.launcher == "inprocess" and len(job_overrides) < len(overrides):
        print("[reproduce] note: hydra.* overrides only apply to a Hydra launcher (--launcher); ignored")
    jobs = plan(
        table, scale_cfg, results_dir, seeds, seeds_m7, _csv(args.settings), _csv(args.methods),
        job_overrides, baseline_seeds,
    )  # fmt: skip
    pending = [j for j in jobs if not j.done]
    n = len(jobs)
    unit = (
        f"pipeline{'s' * (n != 1)}"
        if table != "table3"
        else f"job{'s' * (n != 1)} (a base and a +aioli pipeline each)"
    )
    print(
        f"[reproduce] {table} at scale {scale} (conf/scale/{scale_cfg}.yaml): {n} {unit}, "
        f"{len(jobs) - len(pending)} done, {len(pending)} to run; results in {results_dir}",
        flush=True,
    )
    if args.dry_run:
        for j in jobs:
            print(f"{'done   ' if j.done else 'pending'} {j.label:<34} {' '.join(j.overrides)}")
        return 0

    failures: list = []
    if pending and not args.no_run:
        if args.launcher == "inprocess":
            n_jobs = args.n_jobs or default_n_jobs(scale_cfg)
            failures = run_inprocess(table, jobs, results_dir, args.verbose, n_jobs)
        else:
            failures = run_hydra(table, jobs, args.launcher, results_dir, args.n_jobs, overrides)
    run_s = time.time() - t0
    footer = (
        f"{budget_line(jobs)}. Runs: {results_dir} ({sum(j.done for j in jobs)} of {n} {unit} finished). "
        f"Built by `python -m aioli_repro.reproduce {' '.join(argv if argv is not None else sys.argv[1:])}`."
    )
    tab, md, paths = build(table, jobs, scale, results_dir, Path(args.out_dir), args.source, footer)
    print()
    print(md)
    for what, path in paths.items():
        print(f"[reproduce] {what}: {path}")
    trained = 0 if args.no_run else len(pending) - len(failures)
    print(
        f"[reproduce] wall time {_fmt_s(time.time() - t0)} ({time.time() - t0:.1f} s; sweep {run_s:.1f} s): "
        f"{n} {unit}, {n - len(pending)} already done, {max(trained, 0)} run now"
        + (f", {len(pending)} not run (--no-run)" if args.no_run and pending else "")
        + (f", {len(failures)} failed" if failures else ""),
        flush=True,
    )
    for job, err in failures:
        print(f"[reproduce] FAILED {job.label if job else ''}: {err}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
