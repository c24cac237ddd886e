"""ADO as a pipeline: one online run, given the token prior its released default starts from."""

from __future__ import annotations

from aioli_repro.pipeline.recipes import Learned, Pipeline, Stage
from aioli_repro.pipeline.token_counts import token_prior


def learn_ado(pipe: Pipeline) -> Learned:
    """The run itself is the result; with `prior: natural` (the default) it gets the groups' token shares."""
    extras = {}
    if pipe.cfg.method.mixer.get("prior") == "natural":
        extras["token_prior"] = [float(x) for x in token_prior(pipe.cfg)]
    return Learned(p=None, result=pipe.run(Stage("run", pipe.cfg, extras=extras)))
