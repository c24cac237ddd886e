"""Paper Table 3, the restricted setting: a baseline learns its mixture on shortened runs, then

    base     a full-length static run on the learned proportions p          (Table 3 row "method")
    +aioli   a full-length Aioli run with p as its prior: prior_steps steps  (row "method + Aioli")
             on p, then Aioli's rounds (paper Alg. 1 with S_init, p_init = p)

    python -m aioli_repro.restricted method=<grid|dml|skillit|doremi|doge> groups=<setting> seed=<s> \
        scale=<scale> [restricted.fraction=0.5] [restricted.prior_steps=N] [results_dir=PATH]
    python -m aioli_repro.restricted -m experiment=table3 scale=paper      # the whole sweep

How the baseline learns p (the paper: "using only 0.5S steps"; how the 0.5S budget is split is not in
the paper or the code, so every stage of the method is shortened alike):
  the method's own pipeline (`pipeline.recipes`) runs with train.max_steps, and its proxy / graph-run
  lengths (method.pipeline.proxy_steps, graph_steps), multiplied by `restricted.fraction`, and without
  its final static run:
    grid     the sweep's best point (by val avg ppl) among the shortened sweep runs
    dml      the optimum of the law fitted to the shortened sweep
    doremi   the shortened proxy's average weights (its reference = the shortened stratified run)
    doge     the shortened proxy's average weights
    skillit  the time-average of the shortened online run's mixture (m shortened one-hot graph runs
             first); Skill-It has no static output, and the average is what DoReMi/DoGE report too

Stages are shared by config hash as everywhere else: the grid base run *is* the Table 2 sweep run at
that point, and re-running skips every finished stage. Each variant writes a pipeline summary
`<results_dir>/<method>-<setting key>-restricted-<base|aioli>-pipeline-<hash>/summary.json` with `variant`
("base" | "+aioli") and `base_method`, which `results.tables.build_table3` reads, plus a W&B pipeline run.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from aioli_repro.config import CONF_DIR, ConfigError
from aioli_repro.pipeline.recipes import (
    RECIPES,
    Learned,
    Pipeline,
    _unique,
    derive,
    pipeline_summary,
    static_mixer,
    write_pipeline_summary,
)
from aioli_repro.pipeline.stage import Stage, read_summary, result_dir, stage_hash

BASELINES = ("grid", "dml", "skillit", "doremi", "doge")
VARIANTS = {"base": "base", "+aioli": "aioli"}  # variant -> directory tag
CONF = CONF_DIR  # the one conf/ path (config.py)
DEFAULT_FRACTION = 0.5


# -- options -----------------------------------------------------------------------------------------
def options(cfg: DictConfig) -> tuple[float, int]:
    """(fraction, prior_steps) from cfg.restricted (defaults: 0.5 and one Aioli round)."""
    r = cfg.get("restricted") or {}
    fraction = r.get("fraction", DEFAULT_FRACTION)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ConfigError(f"restricted.fraction: must be a number in (0, 1], got {fraction!r}")
    prior_steps = r.get("prior_steps")
    if prior_steps is None:
        prior_steps = OmegaConf.select(cfg, "hp.aioli.update_steps")
    if not isinstance(prior_steps, int) or isinstance(prior_steps, bool) or prior_steps < 1:
        raise ConfigError(
            "restricted.prior_steps: must be an integer >= 1 (null: hp.aioli.update_steps), "
            f"got {prior_steps!r}"
        )
    return float(fraction), int(prior_steps)


def base_config(cfg: DictConfig) -> DictConfig:
    """cfg without the `restricted` block, so stage hashes match the same runs launched from Table 2."""
    new = copy.deepcopy(cfg)
    OmegaConf.set_struct(new, False)
    if "restricted" in new:
        del new["restricted"]
    return new


def shortened(cfg: DictConfig, fraction: float) -> DictConfig:
    """The method's config with every stage length multiplied by `fraction` (at least 1 step)."""
    new = copy.deepcopy(cfg)
    OmegaConf.set_struct(new, False)
    new.train.max_steps = max(1, int(round(fraction * int(cfg.train.max_steps))))
    pcfg = new.method.get("pipeline")
    if pcfg is not None:
        for key in ("proxy_steps", "graph_steps"):
            v = pcfg.get(key)
            if v is not None:
                pcfg[key] = max(1, int(round(fraction * int(v))))
        if pcfg.get("graph_eval_step") is not None:
            pcfg.graph_eval_step = max(1, int(round(fraction * int(pcfg.graph_eval_step))))
    return new


def aioli_mixer(cfg: DictConfig, prior: np.ndarray, prior_steps: int) -> dict:
    """Aioli's mixer as `conf/method/aioli.yaml` resolves it for this run, with the restricted prior."""
    tmp = copy.deepcopy(cfg)
    OmegaConf.set_struct(tmp, False)
    tmp.method = OmegaConf.load(CONF / "method" / "aioli.yaml")
    mixer = OmegaConf.to_container(tmp.method.mixer, resolve=True)
    mixer["prior"] = [float(x) for x in prior]
    mixer["prior_steps"] = int(prior_steps)
    return mixer


def check_aioli(cfg: DictConfig, prior_steps: int) -> None:
    """Fail before any training if Aioli's schedule does not fit (update_steps | max_steps - prior_steps)."""
    from hydra.utils import instantiate

    from aioli_repro.mixing.base import MixingContext

    m = len(cfg.groups.names)
    mixer = instantiate(aioli_mixer(cfg, np.full(m, 1.0 / m), prior_steps))
    t = cfg.train
    try:
        mixer.setup(
            MixingContext(list(cfg.groups.names), int(t.max_steps), int(t.batch_size), int(cfg.seed), {})
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{e} (restricted setting: prior_steps = {prior_steps}, train.max_steps = {t.max_steps})"
        ) from e


def pipeline_key(cfg: DictConfig) -> str:
    """Hash of what a restricted pipeline computes: the base run config + fraction + prior_steps."""
    fraction, prior_steps = options(cfg)
    blob = json.dumps({"run": stage_hash(base_config(cfg)), "fraction": fraction, "prior_steps": prior_steps})
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pipeline_dirs(cfg: DictConfig, results_dir: str | Path) -> dict[str, Path]:
    """{variant: pipeline directory} of the restricted pipelines for this (setting, method, seed)."""
    key = pipeline_key(cfg)
    return {v: result_dir(results_dir, cfg, f"restricted-{tag}-pipeline", key) for v, tag in VARIANTS.items()}


# -- learning phase ------------------------------------------------------------------------------------
def learn(
    cfg: DictConfig, results_dir: Path, log: Callable[[str], None] = print
) -> tuple[np.ndarray, Learned, list]:
    """Run the baseline's learning phase on shortened runs; return (p, what it learned, its stages)."""
    name = cfg.method.name
    if name not in BASELINES:
        raise ConfigError(f"method: the restricted setting takes one of {list(BASELINES)}, got {name!r}")
    fraction, _ = options(cfg)
    pipe = Pipeline(shortened(base_config(cfg), fraction), results_dir, log)
    pipe.check()  # bad input fails here, before any stage folder exists
    learned = RECIPES[name](pipe)
    p = np.clip(learned.p, 0.0, None)
    return p / p.sum(), learned, pipe.done


# -- the recipe ----------------------------------------------------------------------------------------
def _base_stage(cfg0: DictConfig, name: str, p: np.ndarray) -> Stage:
    if name == "grid":
        # the grid's pick is one of the sweep points: its full-length run is the Table 2 sweep run
        from aioli_repro.mixing.simplex import grid_points

        pcfg = cfg0.method.pipeline
        points = grid_points(len(p), n_runs=int(pcfg.n_runs), seed=int(pcfg.cover_seed))
        hits = [i for i, q in enumerate(points) if np.allclose(q, p, atol=1e-12)]
        if hits:
            i = hits[0]
            return Stage(f"sweep{i}", derive(cfg0, "sweep", static_mixer(points[i])))
    return Stage("final", derive(cfg0, name, static_mixer(p)))


def run_restricted(
    cfg: DictConfig, results_dir: str | Path, log: Callable[[str], None] = print
) -> dict[str, tuple[dict, Path]]:
    """Both variants for cfg.method (a baseline) on cfg's setting and seed: {variant: (summary, path)}.

    Finished variants (their pipeline summary exists) are returned as they are, without any work.
    """
    results_dir = Path(results_dir)
    name = cfg.method.name
    if name not in BASELINES:
        raise ConfigError(f"method: the restricted setting takes one of {list(BASELINES)}, got {name!r}")
    fraction, prior_steps = options(cfg)
    cfg0 = base_config(cfg)
    dirs = pipeline_dirs(cfg, results_dir)
    out: dict[str, tuple[dict, Path]] = {}
    for variant, d in dirs.items():
        s = read_summary(d)
        if s is not None and "stages" in s:
            log(f"[restricted] {name} {variant}: already done ({d})")
            out[variant] = (s, d / "summary.json")
    if len(out) == len(dirs):
        return out
    check_aioli(cfg0, prior_steps)

    p, learned, learn_done = learn(cfg, results_dir, log)
    groups = list(cfg.groups.names)
    named = {g: float(v) for g, v in zip(groups, p)}
    log(f"[restricted] {name}: learned on {fraction:g} x the steps: p = {np.round(p, 3).tolist()}")

    stages = {
        "base": _base_stage(cfg0, name, p),
        "+aioli": Stage("final", derive(cfg0, "aioli", aioli_mixer(cfg0, p, prior_steps))),
    }
    for variant, stage in stages.items():
        if variant in out:
            continue
        pipe = Pipeline(cfg0, results_dir, log)
        final = pipe.run(stage)
        info = {
            "variant": variant,
            "base_method": name,
            "learned_proportions": named,
            "restricted": {
                "fraction": fraction,
                "learn_steps": int(round(fraction * int(cfg0.train.max_steps))),
                "prior_steps": prior_steps if variant == "+aioli" else None,
                "law_fit": learned.info.get("law_fit"),
            },
        }
        method = name if variant == "base" else f"{name}+aioli"
        summary = pipeline_summary(final, info, method, _unique([*learn_done, *pipe.done]))
        path = dirs[variant] / "summary.json"
        write_pipeline_summary(cfg, summary, path)
        out[variant] = (summary, path)
    return out
