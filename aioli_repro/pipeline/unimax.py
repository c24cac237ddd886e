"""UniMax as a pipeline: the proportions come from token counts alone (no proxy run), then one static run.

Where no epoch cap binds (every group holds more than budget / m tokens x max_epochs), UniMax is uniform and
its run *is* the stratified run: the recipe returns that run (shared with the stratified row) instead of a
second, identical one.
"""

from __future__ import annotations

import numpy as np

from aioli_repro.mixing.unimax import unimax_proportions
from aioli_repro.pipeline.recipes import Learned, Pipeline, _named
from aioli_repro.pipeline.token_counts import group_token_counts


def learn_unimax(pipe: Pipeline) -> Learned:
    cfg = pipe.cfg
    tokens = group_token_counts(cfg)
    budget = float(cfg.train.max_steps) * float(cfg.train.batch_size) * float(cfg.train.context_length)
    max_epochs = float(cfg.method.get("pipeline", {}).get("max_epochs", 1.0))
    p = unimax_proportions(tokens, budget, max_epochs)
    m = len(p)
    epochs = {g: float(budget * q / t) for g, q, t in zip(pipe.groups, p, tokens)}
    info = {
        "learned_proportions": _named(p, pipe.groups),
        "unimax": {"budget_tokens": budget, "epochs": epochs},
    }
    uniform = bool(np.allclose(p, 1.0 / m, rtol=0, atol=1e-12))
    what = "no cap binds: the stratified run" if uniform else "capped"
    pipe.log(f"[pipeline] unimax: p = {np.round(p, 3).tolist()} ({what})")
    if uniform:
        info["unimax"]["equals_stratified"] = True
        return Learned(p=np.full(m, 1.0 / m), result=pipe.stratified_run()[0], info=info)
    return Learned(p=p, info=info)
