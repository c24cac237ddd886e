"""The proxy swarm of RegMix and Olmix: short static runs on mixtures drawn around the token prior.

`swarm_points` is RegMix's sampling rule (sail-sg/regmix, mixture_config/synthesize_mixture.py), written
anew: Dirichlet draws centred on the tempered token prior at a strength picked from a log-spaced ladder,
rejection of mixtures that would repeat a group's tokens more than `max_usage` times, small weights zeroed
and weights rounded to a grid of `minimum`, duplicates dropped, then `n` picked at random. `run_swarm`
trains one proxy per point, all labelled "swarm" so that RegMix and Olmix share identical proxies, in
`swarm_jobs` worker processes if asked (one device or CPU shared by several proxies at once).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from aioli_repro.config import ConfigError
from aioli_repro.pipeline.recipes import Pipeline, derive, static_mixer
from aioli_repro.pipeline.stage import Stage, read_summary

# The released sampling constants (synthesize_mixture.py); `swarm_points`' defaults.
SAMPLING = {
    "temperature": 0.5,  # prior ** 0.5: flattens a skewed prior before it centres the Dirichlet
    "min_strength": 0.1,  # Dirichlet concentration = tempered prior x strength, strength on a
    "max_strength": 5.0,  # log-spaced ladder from 0.1 (near-vertex mixtures) to 5 (near the prior)
    "n_strengths": 15,
    "minimum": 2e-4,  # weights below it are zeroed; weights are rounded to multiples of it
    "max_usage": 15.0,  # reject a mixture whose weight exceeds prior x 15 (token repetition cap)
    "oversample": 100,  # candidates drawn per requested point before deduplication
}
# method.pipeline.<key> for each sampling option
SAMPLING_FIELDS = {k: f"swarm_{k}" for k in SAMPLING}
_DEDUP_L1 = 1e-5  # the released deduplication threshold (L1 distance between sorted neighbours)


def swarm_points(
    prior: np.ndarray,
    n: int,
    seed: int,
    temperature: float = SAMPLING["temperature"],
    min_strength: float = SAMPLING["min_strength"],
    max_strength: float = SAMPLING["max_strength"],
    n_strengths: int = SAMPLING["n_strengths"],
    minimum: float = SAMPLING["minimum"],
    max_usage: float = SAMPLING["max_usage"],
    oversample: int = SAMPLING["oversample"],
) -> np.ndarray:
    """`n` distinct mixtures (n, m) drawn around `prior` by RegMix's rule, deterministic per `seed`.

    The Dirichlet's mean is the tempered prior (prior ** temperature, renormalised); the usage bound is
    on the untempered prior, as released. Rows sum to 1 (the released rounding is renormalised)."""
    prior = np.asarray(prior, dtype=np.float64)
    prior = prior / prior.sum()
    m = prior.size
    if minimum * m >= 1:
        raise ConfigError(f"method.pipeline.swarm_minimum: must be below 1/m = {1 / m:.4g}, got {minimum}")
    rng = np.random.default_rng(seed)
    cands = _draw(prior, n * oversample, rng, temperature, min_strength, max_strength, n_strengths)
    bound = np.minimum(prior * max_usage, 1.0)
    cands = cands[np.all(cands <= bound, axis=1)]
    cands = _dedup(_round_to_grid(cands, minimum))
    if len(cands) < n:
        raise ConfigError(
            f"method.pipeline.swarm_size: only {len(cands)} distinct mixtures of {n * oversample} draws "
            f"pass the usage bound and the {minimum:g} grid, fewer than the {n} asked for; lower "
            f"swarm_size or swarm_minimum, or raise swarm_oversample / swarm_max_usage"
        )
    return cands[rng.choice(len(cands), size=n, replace=False)]


def _draw(
    prior: np.ndarray, count: int, rng: np.random.Generator, temperature: float,
    min_strength: float, max_strength: float, n_strengths: int,
) -> np.ndarray:  # fmt: skip
    """Dirichlet(tempered prior x strength) draws, one ladder strength picked uniformly per draw (the
    released code draws at all 15 strengths and keeps one at random: the same distribution)."""
    centre = prior**temperature
    centre = centre / centre.sum()
    if min_strength == max_strength:
        strengths = np.array([min_strength])
    else:
        strengths = np.logspace(np.log10(min_strength), np.log10(max_strength), n_strengths)
    which = rng.integers(len(strengths), size=count)
    out = np.empty((count, prior.size))
    for k, s in enumerate(strengths):  # numpy's Dirichlet stays exact for tiny concentrations
        rows = np.flatnonzero(which == k)
        out[rows] = rng.dirichlet(centre * s, size=rows.size)
    return out


def _round_to_grid(x: np.ndarray, minimum: float) -> np.ndarray:
    if minimum <= 0:
        return x
    x = np.where(x < minimum, 0.0, x)
    x = x / x.sum(axis=1, keepdims=True)
    x = np.round(x / minimum) * minimum
    return x / x.sum(axis=1, keepdims=True)


def _dedup(x: np.ndarray) -> np.ndarray:
    """Lexicographically sorted rows, each kept if it is more than 1e-5 (L1) from the row before it (the
    released loop compares with the last row kept: the same unless near-duplicates chain)."""
    if len(x) == 0:
        return x
    x = x[np.lexsort(x.T[::-1])]
    gap = np.abs(np.diff(x, axis=0)).sum(axis=1)
    return x[np.concatenate([[True], gap > _DEDUP_L1])]


# -- the proxies -------------------------------------------------------------------------------------
def swarm_stages(cfg: DictConfig, points: np.ndarray, steps: int) -> list[Stage]:
    """One static proxy per point: `steps` steps, the main run's warm-up share, one val at the end."""
    share = float(cfg.train.warmup_steps) / float(cfg.train.max_steps)
    warmup = int(round(share * steps))
    return [
        Stage(
            f"swarm{i}",
            derive(cfg, "swarm", static_mixer(p), max_steps=steps, warmup_steps=warmup, val_every=steps),
        )
        for i, p in enumerate(points)
    ]


def run_swarm(pipe: Pipeline, prior: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """Draw the swarm around the token prior (`prior`, read from the data when None) and train (or reuse)
    one proxy per point; the points and the proxies' summaries, in order. Options: method.pipeline.swarm_*
    (size, steps, seed, jobs and the sampling options of `SAMPLING`)."""
    from aioli_repro.pipeline.token_counts import token_prior

    pcfg = pipe.cfg.method.get("pipeline", {})
    m = len(pipe.groups)
    n = int(pcfg.get("swarm_size", 512))
    if n <= m:  # a regression over the simplex needs more points than groups
        raise ConfigError(f"method.pipeline.swarm_size: must be more than the m = {m} groups, got {n}")
    steps = int(pcfg.get("swarm_steps") or pipe.cfg.train.max_steps)
    seed = int(pcfg.get("swarm_seed", pipe.cfg.seed))
    sampling = {k: pcfg[f] for k, f in SAMPLING_FIELDS.items() if pcfg.get(f) is not None}
    points = swarm_points(token_prior(pipe.cfg) if prior is None else prior, n, seed, **sampling)
    stages = swarm_stages(pipe.cfg, points, steps)
    jobs = int(pcfg.get("swarm_jobs") or 1)
    trained = train_in_workers(pipe, stages, jobs) if jobs > 1 else set()
    summaries = []
    for stage in stages:  # cached now, where workers trained them: pipe.done lists every proxy
        summaries.append(pipe.run(stage))
        if stage.name in trained:
            pipe.done[-1]["reused"] = False
    return points, summaries


def train_in_workers(pipe: Pipeline, stages: Iterable[Stage], jobs: int) -> set[str]:
    """Train the unfinished stages in `jobs` spawned worker processes (the in-process launcher's worker
    set-up: one torch thread share each, Lightning quiet); the names of the stages they trained. A stage
    another process is training waits on its stage lock, so concurrent swarms are safe."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from aioli_repro.pipeline.launch import cpu_cores, worker_init

    pending = [s for s in stages if read_summary(s.directory(pipe.results_dir)) is None]
    if len(pending) < 2:
        return set()
    threads = max(1, cpu_cores() // jobs)
    pipe.log(f"[pipeline] swarm: {len(pending)} proxies in {jobs} worker processes, {threads} thread(s) each")
    ctx = multiprocessing.get_context("spawn")  # not fork: the parent has torch's thread pools
    trained: set[str] = set()
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=worker_init, initargs=(threads,)) as ex:
        futures = {
            ex.submit(_train_stage, _worker_cfg(s.cfg, threads), s.name, str(pipe.results_dir)): s
            for s in pending
        }
        try:
            for fut in as_completed(futures):
                try:
                    log, was_trained = fut.result()
                except BrokenProcessPool as e:  # every pending stage fails so: say what it means
                    raise RuntimeError(
                        f"swarm: a worker process died (killed? out of memory?) with {futures[fut].name} "
                        "pending; run again to resume the unfinished proxies"
                    ) from e
                for msg in log:
                    pipe.log(msg)
                if was_trained:
                    trained.add(futures[fut].name)
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)
            raise
    return trained


def _worker_cfg(cfg: DictConfig, threads: int) -> DictConfig:
    """The stage's config with worker-only presentation keys (not hashed: the stage folder is the same)."""
    cfg = OmegaConf.merge(cfg, {"progress": False})
    n = cfg.get("num_threads")
    cfg.num_threads = threads if n is None else min(int(n), threads)
    return cfg


def _train_stage(cfg: DictConfig, name: str, results_dir: str) -> tuple[list[str], bool]:
    """In a worker process: run one stage; its log lines and whether this call trained it."""
    from aioli_repro.config import register_resolvers

    register_resolvers()  # the stage hash resolves the config's interpolations (by_m, ...)
    log: list[str] = []
    pipe = Pipeline(cfg, results_dir, log=log.append)
    pipe.run(Stage(name, cfg))
    return log, not pipe.done[-1]["reused"]
