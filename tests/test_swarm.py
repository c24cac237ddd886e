"""The proxy swarm: RegMix's sampling rule around the token prior, the proxy stages, parallel workers."""

from __future__ import annotations

import numpy as np
import pytest

from aioli_repro.config import ConfigError
from aioli_repro.pipeline.recipes import Pipeline
from aioli_repro.pipeline.swarm import _draw, run_swarm, swarm_points, swarm_stages
from tests.test_pipelines import MICRO

PRIOR = np.array([0.74, 0.14, 0.12])  # about the miniature's cc_gh_w token prior
TEMPERED = np.sqrt(PRIOR) / np.sqrt(PRIOR).sum()  # (0.544, 0.237, 0.219): the Dirichlet's mean


def test_points_are_distinct_simplex_points_and_deterministic_per_seed():
    X = swarm_points(PRIOR, 64, seed=3)
    assert X.shape == (64, 3)
    assert np.all(X >= 0) and np.allclose(X.sum(axis=1), 1.0, atol=1e-12)
    gaps = np.abs(X[:, None, :] - X[None, :, :]).sum(axis=2) + np.eye(64)
    assert gaps.min() > 1e-5  # deduplicated
    assert np.array_equal(X, swarm_points(PRIOR, 64, seed=3))
    assert not np.array_equal(X, swarm_points(PRIOR, 64, seed=4))


def test_draws_centre_on_the_tempered_prior():
    # the rule's Dirichlet draws average to prior ** 0.5 (renormalised): within 0.005 over 200k draws
    D = _draw(PRIOR, 200_000, np.random.default_rng(0), 0.5, 0.1, 5.0, 15)
    assert np.abs(D.mean(axis=0) - TEMPERED).max() < 0.005
    # the swarm keeps one copy of each repeated (near-vertex) draw, which pulls its mean a little towards
    # the middle: measured 0.066 at most over 500 points; stated tolerance 0.1
    X = swarm_points(PRIOR, 500, seed=1)
    assert np.abs(X.mean(axis=0) - TEMPERED).max() < 0.1
    assert np.argmax(X.mean(axis=0)) == 0  # the largest group stays the largest on average


def test_usage_bound_and_minimum_weight():
    prior = np.array([0.9, 0.05, 0.05])
    X = swarm_points(prior, 200, seed=0, max_usage=2.0)  # a weight may be at most 2 x its prior share
    # (checked before the weights are rounded to the 2e-4 grid, so within 1e-3 after it)
    assert X[:, 1:].max() <= 0.1 + 1e-3 and X[:, 0].min() >= 0.8 - 2e-3
    X = swarm_points(PRIOR, 200, seed=0, minimum=0.01)  # weights below 0.01 are zeroed
    nonzero = X[X > 0]
    assert nonzero.min() >= 0.01 / 1.02  # rounded to multiples of 0.01, renormalised (sum within 1.5%)
    assert np.any(X == 0)


def test_too_few_distinct_mixtures_names_the_field():
    # m = 2 on a 0.1 grid has 11 points at most
    with pytest.raises(ConfigError, match=r"^method\.pipeline\.swarm_size: only \d+ distinct"):
        swarm_points(np.array([0.5, 0.5]), 20, seed=0, minimum=0.1)
    with pytest.raises(ConfigError, match=r"^method\.pipeline\.swarm_minimum: "):
        swarm_points(PRIOR, 4, seed=0, minimum=0.4)


def test_proxy_stages_are_short_static_runs_shared_between_methods(make_cfg, tmp_path):
    cfg = make_cfg("method=regmix")  # tiny: 600 steps, 60 warm-up
    points = swarm_points(np.array([0.6, 0.4]), 3, seed=0)
    stages = swarm_stages(cfg, points, 75)
    assert [s.name for s in stages] == ["swarm0", "swarm1", "swarm2"]
    c = stages[1].cfg
    assert (c.method.name, c.train.max_steps, c.train.warmup_steps, c.train.val_every) == ("swarm", 75, 8, 75)
    assert list(c.method.mixer.proportions) == pytest.approx(points[1].tolist())
    other = swarm_stages(make_cfg("method=regmix_linear"), points, 75)
    assert [s.directory(tmp_path) for s in stages] == [s.directory(tmp_path) for s in other]
    assert len({s.directory(tmp_path) for s in stages}) == 3


SWARM = ["method=regmix", *MICRO, "hp.regmix.swarm_size=3", "hp.regmix.swarm_steps=4"]


@pytest.mark.slow  # spawns worker processes (about a minute): make test-slow
def test_parallel_swarm_equals_the_serial_one(make_cfg, tmp_path):
    serial = Pipeline(make_cfg(*SWARM), tmp_path / "serial", log=lambda s: None)
    P1, S1 = run_swarm(serial)
    par = Pipeline(make_cfg(*SWARM, "hp.regmix.swarm_jobs=2"), tmp_path / "parallel", log=lambda s: None)
    P2, S2 = run_swarm(par)
    assert np.array_equal(P1, P2)
    for a, b in zip(S1, S2):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6, abs=0)
        assert b["train_tokens"] == a["train_tokens"] == 4 * 8 * 256
    assert [d["reused"] for d in par.done] == [False] * 3  # trained by the workers, then read back
    again = Pipeline(make_cfg(*SWARM, "hp.regmix.swarm_jobs=2"), tmp_path / "parallel", log=lambda s: None)
    run_swarm(again)
    assert [d["reused"] for d in again.done] == [True] * 3


def test_swarm_no_larger_than_m_names_the_field(make_cfg, tmp_path):
    pipe = Pipeline(make_cfg(*SWARM, "hp.regmix.swarm_size=2"), tmp_path, log=lambda s: None)
    with pytest.raises(ConfigError, match=r"^method\.pipeline\.swarm_size: must be more than the m = 2"):
        run_swarm(pipe)
    assert not any(tmp_path.iterdir())
