"""Olmix: the per-domain log-linear law fit, the proposers (KL penalty, KL bound, simulation, search),
mixture reuse, and the pipeline end to end (sharing RegMix's swarm)."""

from __future__ import annotations

import numpy as np
import pytest

from aioli_repro.mixing.olmix import (
    OlmixLaw,
    collapse_points,
    fit_olmix_law,
    kl,
    propose_exact,
    propose_kl_bounded,
    propose_search,
    propose_simulation,
    reuse_mixture,
)

# a planted law over 3 domains whose unpenalised optimum is interior: ~(0.307, 0.175, 0.518)
LAW = OlmixLaw(log_c=np.log([2.0, 2.5, 3.0]), T=[[0.5, -0.8, 0.1], [0.0, 0.4, -0.9], [-1.0, 0.3, 0.2]])
PRIOR = np.array([0.74, 0.14, 0.12])  # cc_gh_w's token prior at the miniature


def _simplex_grid(step: int = 400) -> np.ndarray:
    a, b = np.meshgrid(np.arange(step + 1), np.arange(step + 1), indexing="ij")
    keep = a + b <= step
    return np.column_stack([a[keep], b[keep], step - a[keep] - b[keep]]) / step


def _penalised(law: OlmixLaw, p: np.ndarray, q: np.ndarray, kl_reg: float) -> np.ndarray:
    """The exact proposer's objective at each row of p (c_i dropped, as released)."""
    p = np.atleast_2d(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = np.where(p > 0, p * np.log(p / q), 0.0).sum(axis=1)
    return np.exp(p @ law.T.T).mean(axis=1) + kl_reg * ent


def test_fit_recovers_a_planted_law_from_noisy_swarm_losses():
    rng = np.random.default_rng(1)
    P = rng.dirichlet(np.ones(3), 24)
    L = LAW.predict(P) + rng.normal(0.0, 0.002, (24, 3))
    law, info = fit_olmix_law(P, L, seed=0, draws=1)  # 10 starts per domain (one per log_c value)
    Q = rng.dirichlet(np.ones(3), 500)
    assert np.abs(law.predict(Q) - LAW.predict(Q)).max() < 0.005  # noise sd 0.002
    assert np.abs(law.T - LAW.T).max() < 0.05
    assert np.abs(np.exp(law.log_c) - np.exp(LAW.log_c)).max() < 0.03
    assert info["r2"] > 0.999 and len(info["params"]) == 3 and len(info["params"][0]) == 4
    again, _ = fit_olmix_law(P, L, seed=0, draws=1)  # seeded: the same starts, the same fit
    assert np.array_equal(again.T, law.T)


def test_fit_more_starts_reach_the_same_optimum():
    """The released 10 x 30 starts: fewer draws per log_c start land on the same fit for a clean law."""
    rng = np.random.default_rng(2)
    P = rng.dirichlet(np.ones(2), 10)
    law2 = OlmixLaw(log_c=np.log([2.0, 3.0]), T=[[-0.7, 0.2], [0.3, -1.1]])
    L = law2.predict(P) + rng.normal(0.0, 0.002, (10, 2))
    few, info_few = fit_olmix_law(P, L, seed=0, draws=1)
    more, info_more = fit_olmix_law(P, L, seed=0, draws=3)
    assert np.allclose(info_few["huber"], info_more["huber"], rtol=1e-4, atol=1e-12)
    assert np.abs(few.predict(P) - more.predict(P)).max() < 1e-4


def test_exact_proposer_recovers_the_planted_argmin_when_kl_is_loose():
    grid = _simplex_grid()
    best = grid[np.argmin(_penalised(LAW, grid, PRIOR, 0.0))]
    p = propose_exact(LAW, PRIOR, kl_reg=0.0)
    assert np.abs(p - best).max() <= 1 / 400  # the grid's resolution
    assert _penalised(LAW, p, PRIOR, 0.0)[0] <= _penalised(LAW, best, PRIOR, 0.0)[0] + 1e-12
    assert np.abs(propose_exact(LAW, PRIOR, kl_reg=1e-8) - p).max() < 1e-5
    # an optimum on a vertex: training on domain 0 lowers every domain's loss
    vertex = OlmixLaw(log_c=[0.0, 0.0], T=[[-2.0, 0.5], [-1.0, 0.3]])
    assert np.allclose(propose_exact(vertex, [0.5, 0.5], kl_reg=0.0), [1.0, 0.0], atol=1e-8)


@pytest.mark.parametrize("kl_reg", [0.01, 0.05, 1.0])
def test_exact_proposer_is_the_penalised_optimum(kl_reg):
    grid = _simplex_grid()
    p = propose_exact(LAW, PRIOR, kl_reg=kl_reg)
    assert p.sum() == pytest.approx(1.0) and np.all(p > 0)
    assert _penalised(LAW, p, PRIOR, kl_reg)[0] <= _penalised(LAW, grid, PRIOR, kl_reg).min() + 1e-12
    # KKT at an interior optimum: the objective's gradient is equal in every coordinate
    e = np.exp(LAW.T @ p) / 3
    grad = LAW.T.T @ e + kl_reg * (np.log(p / PRIOR) + 1)
    assert np.ptp(grad) < 1e-9


def test_default_kl_penalty_pulls_toward_the_prior():
    free, pulled = propose_exact(LAW, PRIOR, kl_reg=0.0), propose_exact(LAW, PRIOR)  # released 0.05
    assert kl(pulled, PRIOR) == pytest.approx(0.2499, abs=1e-3)
    assert kl(free, PRIOR) == pytest.approx(0.5273, abs=1e-3)
    assert np.abs(propose_exact(LAW, PRIOR, kl_reg=1e6) - PRIOR).max() < 1e-5


def test_kl_bound_is_respected_and_tends_to_the_prior():
    free = propose_exact(LAW, PRIOR, kl_reg=0.0)
    assert np.allclose(propose_kl_bounded(LAW, PRIOR, bound=1.0), free)  # loose: the law's argmin
    dist = []
    for bound in (0.3, 0.1, 0.01, 1e-4, 1e-6):
        p = propose_kl_bounded(LAW, PRIOR, bound=bound)
        assert kl(p, PRIOR) <= bound + 1e-12
        assert kl(p, PRIOR) >= 0.999 * bound  # tight: the bound is active
        dist.append(np.abs(p - PRIOR).sum())
    assert dist == sorted(dist, reverse=True) and dist[-1] < 0.005


def test_simulation_proposer_is_seeded_and_near_the_argmin():
    a = propose_simulation(LAW, PRIOR, np.random.default_rng(0), num_samples=20_000)
    b = propose_simulation(LAW, PRIOR, np.random.default_rng(0), num_samples=20_000)
    assert np.array_equal(a, b) and a.sum() == pytest.approx(1.0)
    assert np.abs(a - propose_exact(LAW, PRIOR, kl_reg=0.0)).max() < 0.03


def test_search_proposer_picks_the_best_observed_point():
    P = np.array([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    L = np.array([[3.0, 2.0], [2.4, 2.5], [2.0, 3.5]])  # mean losses 2.5, 2.45, 2.75
    idx, p = propose_search(P, L)
    assert idx == 1 and np.array_equal(p, [0.5, 0.5])


def test_mixture_reuse_freezes_the_old_ratios():
    law = OlmixLaw(
        log_c=np.log([2.0, 2.5, 3.0, 2.2]),
        T=[[0.5, -0.8, 0.1, 0.2], [0.0, 0.4, -0.9, -0.1], [-1.0, 0.3, 0.2, 0.1], [0.2, 0.1, -0.3, -0.6]],
    )
    prior = np.array([0.4, 0.1, 0.3, 0.2])
    old, ratios = [0, 2], np.array([0.3, 0.7])
    p = reuse_mixture(law, prior, old, ratios, kl_reg=0.05)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert p[0] / p[2] == pytest.approx(0.3 / 0.7, rel=1e-12)  # exactly the frozen ratio
    # optimal among mixtures with that ratio: the collapsed KL prior is [old total, new domains]
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(3), 20_000)  # [old block, domain 1, domain 3]
    full = np.column_stack([x[:, 0] * 0.3, x[:, 1], x[:, 0] * 0.7, x[:, 2]])
    q_small = np.array([0.7, 0.1, 0.2])
    small = collapse_points(p[None, :], old)
    assert np.allclose(small, [[p[0] + p[2], p[1], p[3]]])

    def obj(xs: np.ndarray, fs: np.ndarray) -> np.ndarray:
        return np.exp(fs @ law.T.T).mean(axis=1) + 0.05 * (xs * np.log(xs / q_small)).sum(axis=1)

    assert obj(small, p[None, :])[0] <= obj(x, full).min() + 1e-12
    # with the unconstrained optimum's own ratios (no KL), reuse gives that optimum back
    star = propose_exact(law, prior, kl_reg=0.0)
    back = reuse_mixture(law, prior, old, star[old], kl_reg=0.0)
    assert np.abs(back - star).max() < 1e-6


# -- the pipeline ----------------------------------------------------------------------------------------
SMALL_SWARM = ["hp.regmix.swarm_size=4", "hp.regmix.swarm_steps=6", "hp.olmix.fit_draws=1"]


def test_olmix_end_to_end_reuses_regmix_swarm(make_cfg, tmp_path):
    from test_pipelines import MICRO

    from aioli_repro.pipeline.recipes import run_method
    from aioli_repro.pipeline.token_counts import token_prior

    cfg = make_cfg("method=olmix", *MICRO, *SMALL_SWARM)
    regmix, _ = run_method(make_cfg("method=regmix", *MICRO, *SMALL_SWARM), tmp_path, log=lambda s: None)
    summary, path = run_method(cfg, tmp_path, log=lambda s: None)
    groups = list(cfg.groups.names)
    assert path.exists() and np.isfinite(summary["test/avg_ppl"]) and summary["test/avg_ppl"] > 1
    assert summary["extra_runs"] == 4  # the swarm; the final run is the result
    swarm = [s for s in summary["stages"] if s["name"].startswith("swarm")]
    assert len(swarm) == 4 and all(s["reused"] for s in swarm)  # RegMix trained them
    assert [s["dir"] for s in swarm] == [s["dir"] for s in regmix["stages"] if s["name"].startswith("swarm")]
    assert summary["total_tokens"] == 4 * 6 * 8 * 256 + 12 * 8 * 256
    p = np.array([summary["learned_proportions"][g] for g in groups])
    prior = token_prior(cfg)
    assert p.sum() == pytest.approx(1.0) and np.all(p > 0)
    assert summary["kl_to_prior"] == pytest.approx(kl(p, prior), abs=1e-12)
    fit = summary["law_fit"]
    assert set(fit["params"]) == set(groups) and np.isfinite(fit["r2"])
    law = OlmixLaw([fit["params"][g][0] for g in groups], [fit["params"][g][1:] for g in groups])
    assert np.allclose(p, propose_exact(law, prior, kl_reg=0.05), atol=1e-9)  # the released default weight
