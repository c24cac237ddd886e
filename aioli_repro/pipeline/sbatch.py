"""One pipeline job as an sbatch script: the submitit launcher config's fields as sbatch options, the
requeue signal, and the job's command (`pipeline.submit` submits these scripts; its docstring has the rules).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from aioli_repro.pipeline.sweep import CONF, ENTRYPOINT, SLURM_BY_EXPERIMENT, Job, default_cache_dir

SLURM_LAUNCHERS = tuple(sorted(set(SLURM_BY_EXPERIMENT.values())))
SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGCONT")  # what aioli_repro.training.slurm accepts
# submitit fields that have no meaning for one sbatch job per pipeline
SUBMITIT_ONLY = {"_target_", "max_num_timeout", "array_parallelism", "submitit_folder", "name"}
# submitit queue fields that the launcher yaml files do not list (all optional)
EXTRA_FIELDS = ("comment", "exclude", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu")


def slurm_dir(results_dir: str | Path) -> Path:
    return Path(results_dir) / "slurm"


def job_key(job: Job) -> str:
    """The key of a job in submitted.json: its (first) pipeline directory's name."""
    return job.keys[0]


def launcher_of(job: Job, launcher: str = "slurm") -> str:
    """The launcher config of a job: by m-class for `slurm`, else the one named."""
    return SLURM_BY_EXPERIMENT[job.experiment] if launcher == "slurm" else launcher


# -- launcher configs -> sbatch options ------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def launcher_overrides(overrides: Sequence[str]) -> tuple[dict[str | None, list[tuple[str, Any]]], list[str]]:
    """({launcher or None (= every launcher): [(field path, value)]}, the hydra.* overrides that are not
    launcher fields) from the driver's command-line overrides. `~hydra.launcher.f` unsets f."""
    scoped: dict[str | None, list[tuple[str, Any]]] = {}
    ignored = []
    for o in overrides:
        key, _, value = o.partition("=")
        delete = key.startswith("~")
        parts = key.lstrip("+~").split(".")
        if len(parts) < 3 or parts[:2] != ["hydra", "launcher"]:
            if key.lstrip("+~").split(".", 1)[0].split("/", 1)[0] == "hydra":
                ignored.append(o)
            continue
        name = parts[2] if parts[2] in SLURM_LAUNCHERS else None
        path = parts[3:] if name else parts[2:]
        if not path:
            raise SystemExit(
                f"error: {o}: name a launcher field, e.g. hydra.launcher.{parts[2]}.partition=..."
            )
        scoped.setdefault(name, []).append((".".join(path), None if delete else _parse_value(value)))
    return scoped, ignored


def launcher_options(name: str, overrides: Sequence[str] = ()) -> dict:
    """The fields of `conf/hydra/launcher/<name>.yaml` (not resolved) with the command line's
    `hydra.launcher.[<name>.]<field>=V` overrides applied (scoped ones last)."""
    path = CONF / "hydra" / "launcher" / f"{name}.yaml"
    if not path.exists():
        raise SystemExit(f"error: no launcher config {path}")
    opts: dict = {f: None for f in EXTRA_FIELDS}
    loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    opts.update({k: v for k, v in loaded.items() if k != "defaults"})
    scoped, _ = launcher_overrides(overrides)
    for field_path, value in [*scoped.get(None, []), *scoped.get(name, [])]:
        head, *rest = field_path.split(".")
        if head not in opts:
            known = ", ".join(sorted(k for k in opts if k not in SUBMITIT_ONLY))
            raise SystemExit(f"error: hydra.launcher.{field_path}: no such launcher field; known: {known}")
        if not rest:
            opts[head] = value
            continue
        node = opts[head] if isinstance(opts[head], dict) else {}
        opts[head] = node
        for p in rest[:-1]:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(rest[-1], None)
        else:
            node[rest[-1]] = value
    return opts


def fmt_time(minutes: int) -> str:
    """sbatch --time: `D-HH:MM:SS` from a day on, else `HH:MM:SS`."""
    d, rem = divmod(int(minutes), 24 * 60)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


def requeue_signal(job: Job) -> str | None:
    """`USR2` (sbatch's spelling) of the job's `trainer.requeue_signal`, or None when the training code
    does not handle it (`trainer.slurm_requeue=false`: the default action of SIGUSR2 would kill the run)."""
    t = job.cfg.get("trainer") or {}
    if not bool(t.get("slurm_requeue", True)):
        return None
    name = str(t.get("requeue_signal", "SIGUSR2")).upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name not in SIGNALS:
        raise SystemExit(f"error: trainer.requeue_signal: unknown value {name!r}; allowed: {list(SIGNALS)}")
    return name[3:]


def job_fields(opts: dict, cfg: Any = None) -> dict:
    """The launcher fields with the job's config filled in: `${trainer.devices}` (tasks and GPUs per node,
    one DDP process per GPU) is the job's device count (1 where the job does not say)."""
    out = dict(opts)
    for k, v in opts.items():
        if isinstance(v, str) and v.startswith("${trainer.") and v.endswith("}"):
            value = OmegaConf.select(cfg, v[2:-1], default=None) if cfg is not None else None
            out[k] = 1 if value is None else value
    return out


def sbatch_options(opts: dict, signal: str | None, cfg: Any = None) -> list[str]:
    """The `#SBATCH` options for the resources of a launcher config (without name, output, chdir), for
    the job whose config is `cfg`."""
    opts = job_fields(opts, cfg)
    out = []

    def add(flag: str, value: Any) -> None:
        if value is not None and value != "":
            out.append(f"--{flag}={value}")

    add("partition", opts.get("partition"))
    add("account", opts.get("account"))
    add("qos", opts.get("qos"))
    add("constraint", opts.get("constraint"))
    add("exclude", opts.get("exclude"))
    add("comment", opts.get("comment"))
    add("nodes", opts.get("nodes"))
    add("ntasks-per-node", opts.get("tasks_per_node"))
    add("cpus-per-task", opts.get("cpus_per_task"))
    if opts.get("gres"):
        add("gres", opts["gres"])
    else:
        add("gpus-per-node", opts.get("gpus_per_node"))
    add("gpus-per-task", opts.get("gpus_per_task"))
    add("cpus-per-gpu", opts.get("cpus_per_gpu"))
    if opts.get("mem_per_gpu") or opts.get("mem_per_cpu"):
        add("mem-per-gpu", opts.get("mem_per_gpu"))
        add("mem-per-cpu", opts.get("mem_per_cpu"))
    elif opts.get("mem_gb") is not None:
        add("mem", f"{opts['mem_gb']}G")
    if opts.get("timeout_min") is not None:
        add("time", fmt_time(opts["timeout_min"]))
    if signal is not None:
        add("signal", f"{signal}@{int(opts.get('signal_delay_s') or 120)}")
    out.append("--requeue")
    for k, v in (opts.get("additional_parameters") or {}).items():
        flag = str(k).replace("_", "-")
        if v is True:
            out.append(f"--{flag}")
        elif v is not None and v is not False:
            add(flag, v)
    return list(dict.fromkeys(out))


def job_command(table: str, job: Job, results_dir: Path, verbose: bool = False) -> list[str]:
    """`python -m <entry point> <the job's overrides>` (as the in-process worker composes the job)."""
    args = list(job.overrides)
    keys = {o.lstrip("+~").split("=", 1)[0] for o in args}
    if "results_dir" not in keys:
        args.append(f"results_dir={results_dir}")
    if not verbose and "progress" not in keys:
        args.append("progress=false")  # no progress bars in a log file
    return [sys.executable, "-m", ENTRYPOINT[table], *args]


def sbatch_script(
    table: str,
    job: Job,
    results_dir: Path,
    launcher: str,
    opts: dict,
    signal: str | None,
    verbose: bool = False,
    cwd: Path | None = None,
) -> str:
    """The sbatch script that runs one pipeline job."""
    cwd = Path.cwd() if cwd is None else cwd
    key = job_key(job)
    logs = slurm_dir(results_dir) / "logs"
    name = f"aioli-{table}-{job.method}-{job.setting}-s{job.seed}"
    head = [f"--job-name={name}", f"--output={logs / f'{key}-%j.out'}"]
    if not opts.get("stderr_to_stdout", True):
        head.append(f"--error={logs / f'{key}-%j.err'}")
    head += ["--open-mode=append", f"--chdir={cwd}"]
    cmd = job_command(table, job, results_dir, verbose)
    cpus = opts.get("cpus_per_task")
    fields = job_fields(opts, job.cfg)
    tasks = int(fields.get("tasks_per_node") or 1) * int(fields.get("nodes") or 1)  # DDP: one per GPU
    srun = ["srun", f"--ntasks={tasks}", *([f"--cpus-per-task={cpus}"] if cpus else [])]
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# aioli_repro {table}: {job.label} ({job.experiment}); pipelines: {', '.join(job.keys)}",
        f"# Written by aioli_repro.pipeline.submit; resources: conf/hydra/launcher/{launcher}.yaml. On the",
        f"# requeue signal{f' (SIG{signal})' if signal else ''} the run saves a checkpoint at the next step "
        "boundary and requeues this",
        "# job; the requeued job skips the finished stages and resumes the interrupted one.",
        *[f"#SBATCH {o}" for o in [*head, *sbatch_options(opts, signal, job.cfg)]],
        "",
        f"export AIOLI_CACHE={q(default_cache_dir())}",
        'export WANDB_SILENT="${WANDB_SILENT:-true}"',
        'export WANDB_CONSOLE="${WANDB_CONSOLE:-off}"',
        *[str(s) for s in (opts.get("setup") or [])],
        "",
        f'echo "[aioli_repro] SLURM job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $(hostname): '
        f'{table} {job.label}"',
        " ".join(q(a) for a in [*srun, *cmd]),
        "",
    ]
    return "\n".join(lines)
