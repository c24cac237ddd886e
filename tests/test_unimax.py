"""UniMax: the capped uniform allocation on planted token counts, and its pipeline at a micro budget."""

from __future__ import annotations

import numpy as np
import pytest

from aioli_repro.config import ConfigError
from aioli_repro.mixing.unimax import unimax_allocation, unimax_proportions
from aioli_repro.pipeline.recipes import run_method
from tests.test_pipelines import MICRO


def test_small_groups_are_capped_and_pass_their_share_on():
    # budget 600 over 3 groups: the 10-token group takes 10 (1 epoch), the 100-token group 100 of its
    # 295 share, the largest group what is left, 490
    alloc = unimax_allocation(np.array([1000.0, 10.0, 100.0]), budget=600, max_epochs=1)
    assert alloc == pytest.approx([490.0, 10.0, 100.0])
    # two epochs: 20, then 200 (share 290 capped at 2 x 100), then 380
    assert unimax_allocation(np.array([1000.0, 10.0, 100.0]), 600, 2) == pytest.approx([380.0, 20.0, 200.0])
    p = unimax_proportions(np.array([1000.0, 10.0, 100.0]), 600, 1)
    assert p.sum() == pytest.approx(1.0) and p[1] == pytest.approx(10 / 600)


def test_uncapped_unimax_is_uniform_and_all_capped_uses_every_token():
    assert unimax_proportions(np.array([5e5, 4e5, 3e5]), 4.3e5, 1) == pytest.approx([1 / 3] * 3)
    alloc = unimax_allocation(np.array([10.0, 20.0]), budget=1000, max_epochs=3)
    assert alloc == pytest.approx([30.0, 60.0])  # every group at its cap: less than the budget


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="method.pipeline.max_epochs"):
        unimax_allocation(np.array([1.0, 2.0]), 10, 0)
    with pytest.raises(ValueError, match="tokens"):
        unimax_allocation(np.array([1.0, 0.0]), 10, 1)


def test_uncapped_pipeline_is_the_stratified_run(make_cfg, tmp_path):
    strat, _ = run_method(make_cfg("method=stratified", *MICRO), tmp_path, log=lambda s: None)
    uni, _ = run_method(make_cfg("method=unimax", *MICRO), tmp_path, log=lambda s: None)
    assert uni["run_dir"] == strat["run_dir"] and uni["test/avg_ppl"] == strat["test/avg_ppl"]
    assert uni["extra_runs"] == 0 and uni["unimax"]["equals_stratified"]
    assert list(uni["learned_proportions"].values()) == pytest.approx([0.5, 0.5])


def test_capped_pipeline_trains_on_the_allocation(make_cfg, tmp_path):
    # a cap far below one epoch binds for the smaller group: a static run on the capped mixture
    cfg = make_cfg("method=unimax", *MICRO, "method.pipeline.max_epochs=0.001")
    uni, _ = run_method(cfg, tmp_path, log=lambda s: None)
    p = np.array(list(uni["learned_proportions"].values()))
    assert not np.allclose(p, 0.5) and p.sum() == pytest.approx(1.0)
    assert uni["stages"][-1]["name"] == "final" and uni["extra_runs"] == 0
    assert np.isfinite(uni["test/avg_ppl"])
