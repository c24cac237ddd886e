"""A labelled variant of a single-run method (a sensitivity arm, an oracle run) runs as one stage under its
own name; any other unknown name is a config error that names the field."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from aioli_repro.config import ConfigError
from aioli_repro.pipeline.recipes import learn_grid, learn_single, recipe_for


def _cfg(name: str, target: str) -> object:
    return OmegaConf.create({"method": {"name": name, "mixer": {"_target_": target}}})


def test_variants_of_aioli_and_static_are_single_runs() -> None:
    assert recipe_for(_cfg("aioli_eta30x", "aioli_repro.mixing.aioli.Aioli")) is learn_single
    assert recipe_for(_cfg("oracle_full_t84", "aioli_repro.mixing.aioli.Aioli")) is learn_single
    assert recipe_for(_cfg("grid", "aioli_repro.mixing.static.Stratified")) is learn_grid


def test_other_unknown_names_fail_with_the_field() -> None:
    with pytest.raises(ConfigError, match="method: unknown method 'doge_fast'"):
        recipe_for(_cfg("doge_fast", "aioli_repro.mixing.doge.DoGE"))
