"""Olmix (allenai/olmix): the RegMix swarm -> one log-linear law per group on val losses -> the mixture
that minimises the predicted average loss, kept near the token prior by a KL penalty -> one final run.

The swarm is `pipeline/swarm.py`'s (stage label "swarm"): with the same swarm options, RegMix and Olmix
train the same proxies once. The law and the proposers are `mixing/olmix.py`.
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from aioli_repro.config import ConfigError
from aioli_repro.mixing import olmix
from aioli_repro.pipeline.recipes import Learned, Pipeline, _named, _val_matrix

PROPOSERS = ("exact", "simulation", "search")


def learn_olmix(pipe: Pipeline) -> Learned:
    from aioli_repro.pipeline.swarm import run_swarm
    from aioli_repro.pipeline.token_counts import token_prior

    pcfg = pipe.cfg.method.get("pipeline", {})
    proposer = str(pcfg.get("proposer", "exact"))
    if proposer not in PROPOSERS:
        raise ConfigError(f"method.pipeline.proposer: must be one of {list(PROPOSERS)}, got {proposer!r}")
    prior = token_prior(pipe.cfg)  # read once: the swarm's centre and the proposer's prior
    points, summaries = run_swarm(pipe, prior)
    groups, seed = pipe.groups, int(pipe.cfg.seed)
    val = _val_matrix(summaries, groups)  # fit on validation, never test
    law, fit = olmix.fit_olmix_law(
        points, val, seed=seed, steps=int(pcfg.get("fit_steps", olmix.FIT_STEPS)),
        delta=float(pcfg.get("huber_delta", olmix.HUBER_DELTA)),
        draws=int(pcfg.get("fit_draws", olmix.DRAWS_PER_LOG_C)),
    )  # fmt: skip
    p = _propose(pcfg, proposer, law, prior, points, val, seed)
    kl = olmix.kl(p, prior)
    pipe.log(
        f"[pipeline] olmix: law fit R2={fit['r2']:.4f} on {len(points)} swarm runs; {proposer} proposer: "
        f"p* = {np.round(p, 3).tolist()}, KL(p* || prior) = {kl:.4f}"
    )
    info = {
        "learned_proportions": _named(p, groups),
        "law_fit": {**fit, "params": {g: v for g, v in zip(groups, fit["params"])}},
        "kl_to_prior": kl,
        "token_prior": _named(prior, groups),
        "predicted_val_loss": _named(law.predict(p), groups),
    }
    return Learned(p=p, inputs=[s["run_dir"] for s in summaries], info=info)


def _propose(
    pcfg: DictConfig, proposer: str, law: olmix.OlmixLaw, prior: np.ndarray, points: np.ndarray,
    val: np.ndarray, seed: int,
) -> np.ndarray:  # fmt: skip
    if proposer == "search":
        return olmix.propose_search(points, val)[1]
    if proposer == "simulation":
        return olmix.propose_simulation(law, prior, np.random.default_rng(seed))
    bound = pcfg.get("kl_bound")
    if bound is not None:
        return olmix.propose_kl_bounded(law, prior, float(bound))
    return olmix.propose_exact(law, prior, kl_reg=float(pcfg.get("kl_reg", olmix.KL_REG)))
