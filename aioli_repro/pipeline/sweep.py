"""The sweep behind a paper table: scales, seeds, the job list (one pipeline per setting x method x
seed, expanded from the experiment configs as Hydra expands them) and what is already done."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from aioli_repro.config import CONF_DIR, compose_train
from aioli_repro.fileio import atomic_write_json

CONF = CONF_DIR  # the one conf/ path (config.py)

SCALE_ALIASES = {"smoke": "table_smoke", "tiny": "miniature", "paper": "paper"}

# (experiment, m-class) invocations of each table; m = 7 has its own seeds (and SLURM node type)
EXPERIMENTS = {
    "table2": ("table2", "table2_m7"),
    "table3": ("table3", "table3_m7"),
    "headroom": ("headroom", "headroom_m7"),
    "sensitivity": ("sensitivity",),
    "post": ("table2_post", "table2_post_m7"),
}  # fmt: skip

ENTRYPOINT = {
    "table2": "aioli_repro.run", "table3": "aioli_repro.restricted", "headroom": "aioli_repro.run",
    "sensitivity": "aioli_repro.run", "post": "aioli_repro.run",
}  # fmt: skip

SLURM_BY_EXPERIMENT = {
    "table2": "slurm_rtx6000ada", "table2_m7": "slurm_a100",
    "table3": "slurm_rtx6000ada", "table3_m7": "slurm_a100",
    "headroom": "slurm_rtx6000ada", "headroom_m7": "slurm_a100", "sensitivity": "slurm_rtx6000ada",
    "table2_post": "slurm_rtx6000ada", "table2_post_m7": "slurm_a100",
}  # fmt: skip

LAUNCHERS = ("inprocess", "local", "local_parallel", "slurm", "slurm_rtx6000ada", "slurm_a100")

# The one dependency table: method -> the method whose stages it reuses (DML: grid's sweep; DoReMi: the
# stratified run as its reference). A dependent job starts after its prerequisite.
DEPENDS_ON = {
    "dml": "grid", "doremi": "stratified",
    # issue 26: UniMax uncapped is the stratified run; RegMix (linear) and Olmix train RegMix's swarm
    "unimax": "stratified", "regmix_linear": "regmix", "olmix": "regmix",
}  # fmt: skip
LATE_METHODS = tuple(DEPENDS_ON)  # with a Hydra launcher: the second phase

# Rows that get the most seeds: the reference and every Aioli arm (the statistics rule).
CORE_METHODS = ("stratified", "aioli", "aioli_mult", "aioli_null")

# Seeds per CPU scale and table: (m = 2, 3; m = 7; at most this many for the other baselines).
# Scales not listed (paper) take the experiment configs' seeds (5 for m = 2, 3 and 3 for m = 7) for every row.
DEFAULT_SEEDS = {
    "table_smoke": {
        "table2": (1, 1, 1),
        "table3": (1, 1, 1),
        "headroom": (1, 1, 1),
        "sensitivity": (1, 1, 1),
        "post": (1, 1, 1),
    },
    "miniature": {
        "table2": (5, 5, 3),
        "table3": (3, 3, 3),
        "headroom": (3, 3, 3),
        "sensitivity": (5, 5, 5),
        "post": (3, 3, 3),
    },
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


def job_configs(jobs: list[Job]) -> list[DictConfig]:
    """Every job's composed config: a cached plan's jobs carry none."""
    todo = [j for j in jobs if j._cfg is None]
    for j, cfg in zip(todo, _compose_per_seed([j.overrides for j in todo]), strict=True):
        j._cfg = cfg
    return [j.cfg for j in jobs]


def _compose_per_seed(overrides: Sequence[Sequence[str]]) -> list[DictConfig]:
    """Each override list's config. `seed=s` only sets a value, so each set of overrides but the seed is
    composed once and the seed set after (composing each of the paper's 252 jobs takes about a minute)."""
    composed: dict[tuple, DictConfig] = {}
    out = []
    for ov in overrides:
        rest = tuple(o for o in ov if not _is_sweep_key(o, "seed"))
        seed = [o.split("=", 1)[1] for o in ov if _is_sweep_key(o, "seed")]
        if rest not in composed:
            composed[rest] = compose_job(rest)
        cfg = copy.deepcopy(composed[rest])
        if seed:
            cfg.seed = int(seed[-1])
        out.append(cfg)
    return out


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
    overrides = [f"experiment={experiment}", f"cache_dir={default_cache_dir()}", *arguments]
    c = compose_train(overrides, return_hydra_config=True)
    return dict(OmegaConf.to_container(c.hydra.sweeper.params))


def is_hydra_override(arg: str) -> bool:
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
    """One job's config, as its multirun would compose it (with this process's cache folder)."""
    return compose_train([*overrides, f"cache_dir={default_cache_dir()}"])


def pipeline_dirs(table: str, cfg: DictConfig, results_dir: Path) -> list[Path]:
    from aioli_repro.pipeline.stage import result_dir, stage_hash

    if table == "table3":
        from aioli_repro.pipeline.restricted import pipeline_dirs as restricted_dirs

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
    # Composing is slow (0.2-0.8 s a config), so the expanded plan is cached under the results directory,
    # keyed by the arguments and the content of every config file: a re-run composes nothing.
    key = [table, scale_cfg, str(results_dir), seeds, seeds_m7, settings, methods]
    key += [list(extra), baseline_seeds]
    cache = _plan_cache_path(table, results_dir, key)
    jobs = _load_plan(cache)
    if jobs is not None:
        return jobs
    jobs = []
    for experiment in EXPERIMENTS[table]:
        params = sweep_params(experiment)
        wanted = [s for s in params["groups"].split(",") if not settings or s in settings]
        if not wanted:
            continue
        n = seeds_m7 if experiment.endswith("_m7") else seeds
        args = job_arguments(
            table, experiment, scale_cfg, results_dir, n, wanted if settings else None, methods, extra
        )
        jobs += _compose_jobs(table, experiment, expand_overrides(params, args), results_dir, baseline_seeds)
    if settings:
        unknown = set(settings) - {j.setting for j in jobs}
        if unknown:
            raise SystemExit(f"error: --settings: unknown or not in {table}: {sorted(unknown)}")
    rows = [{"experiment": j.experiment, "overrides": j.overrides, "dirs": [str(d) for d in j.dirs],
             "meta": j.meta} for j in jobs]  # fmt: skip
    atomic_write_json(cache, rows, indent=None)
    return jobs


def jobs_for(overrides: list[list[str]], results_dir: Path, experiment: str = "ad hoc") -> list[Job]:
    """Jobs for explicit override lists (one pipeline each, `python -m aioli_repro.run` semantics), with
    their done flags: the sensitivity study's search points and oracle runs, which no sweep config lists."""
    return _compose_jobs("table2", experiment, overrides, Path(results_dir).resolve(), None)


def _compose_jobs(
    table: str, experiment: str, overrides: list[list[str]], results_dir: Path, baseline_seeds: int | None
) -> list[Job]:
    """One Job per override list, with its done flag; baselines' seeds at or above baseline_seeds dropped."""
    jobs = []
    for ov, cfg in zip(overrides, _compose_per_seed(overrides), strict=True):
        few = baseline_seeds is not None and str(cfg.method.name) not in CORE_METHODS
        if few and int(cfg.seed) >= baseline_seeds:
            continue
        job = Job(experiment, ov, pipeline_dirs(table, cfg, results_dir), job_meta(cfg), _cfg=cfg)
        job.refresh()
        jobs.append(job)
    return jobs


def _plan_cache_path(table: str, results_dir: Path, key: list) -> Path:
    """Where the plan for these arguments (`key`) and the present content of `conf/` is cached."""
    h = hashlib.sha256(json.dumps(key, default=str).encode())
    for f in sorted(CONF.rglob("*.yaml")):
        h.update(str(f.relative_to(CONF)).encode() + f.read_bytes())
    return results_dir / ".plans" / f"{table}-{h.hexdigest()[:16]}.json"


def _load_plan(cache: Path) -> list[Job] | None:
    """The cached plan's jobs with fresh done flags, or None when there is none or it is stale or torn."""
    if not cache.exists():
        return None
    try:
        rows = json.loads(cache.read_text())
        jobs = [Job(r["experiment"], r["overrides"], [Path(d) for d in r["dirs"]], r["meta"]) for r in rows]
    except (ValueError, KeyError, TypeError):
        return None
    for j in jobs:
        j.refresh()
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
