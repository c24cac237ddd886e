"""RegMix as a pipeline: the proxy swarm -> a regression from mixture to val loss -> its simulated optimum,
then one static run on it (the final stage, made by `run_method`).

method=regmix fits LightGBM, method=regmix_linear least squares (`method.pipeline.regressor`); both
share the swarm's proxies (and Olmix's, at the same swarm options).
"""

from __future__ import annotations

import numpy as np

from aioli_repro.mixing.regmix import HOLDOUT, check_options, fit_regression, simulate_optimum
from aioli_repro.pipeline.recipes import Learned, Pipeline, _named, _val_matrix
from aioli_repro.pipeline.swarm import run_swarm
from aioli_repro.pipeline.token_counts import token_prior


def learn_regmix(pipe: Pipeline) -> Learned:
    pcfg = pipe.cfg.method.get("pipeline", {})
    regressor = str(pcfg.get("regressor", "lightgbm"))
    n_candidates, top_k = int(pcfg.get("sim_candidates", 100_000)), int(pcfg.get("sim_top_k", 128))
    check_options(regressor, n_candidates, top_k)  # before any proxy trains
    prior = token_prior(pipe.cfg)  # read once: the swarm's centre and the simulation's
    points, summaries = run_swarm(pipe, prior)
    groups = pipe.groups
    # RegMix regresses one target loss (Pile-CC val loss in the paper). Ours is the objective every
    # method here is compared on: the mean over groups, equally weighted, of the proxies' val losses
    # (validation, never test).
    y = _val_matrix(summaries, groups).mean(axis=1)
    holdout = pcfg.get("lgbm_holdout")
    predict, stats = fit_regression(
        points,
        y,
        regressor,
        holdout=HOLDOUT if holdout is None else float(holdout),
        min_child_samples=pcfg.get("lgbm_min_child_samples"),
    )
    seed = int(pcfg.get("swarm_seed", pipe.cfg.seed))
    p = simulate_optimum(
        predict,
        prior,
        n_candidates=n_candidates,
        top_k=top_k,
        seed=seed,
    )
    best = int(np.argmin(y))
    pipe.log(
        f"[pipeline] {pipe.cfg.method.name}: {regressor} fit on {len(y)} proxies (R2 {stats['r2']:.3f}, "
        f"Spearman {stats['spearman']:.3f}); best proxy {np.round(points[best], 3).tolist()} "
        f"(val mean loss {y[best]:.4f}); p* = {np.round(p, 3).tolist()}"
    )
    swarm = {"points": points.tolist(), "val_mean_loss": y.tolist()}
    info = {"learned_proportions": _named(p, groups), "regression": stats, "swarm": swarm}
    return Learned(p=p, inputs=[s["run_dir"] for s in summaries], info=info)
