"""Grid-search mixtures, the DML log-linear law fit and simplex optimiser, the dynamic-law fit, sim()."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from aioli_repro.mixing.laws import (
    LogLinearLaw,
    fit_linear_dynamic,
    fit_log_linear,
    minimize_on_simplex,
    r2_score,
    sim,
)
from aioli_repro.mixing.simplex import dirichlet_cover, grid_m2, grid_points, select_best

# HazyResearch/aioli dirichlet_weights/k_3_n_9_seed_0.txt (the released m = 3 sweep, seed 0)
OFFICIAL_K3_N9_SEED0 = np.array(
    [
        [0.290991, 0.305786, 0.403223],
        [0.895544, 0.061192, 0.043264],
        [0.439226, 0.094484, 0.466289],
        [0.657667, 0.106660, 0.235673],
        [0.148904, 0.499877, 0.351219],
        [0.084589, 0.310648, 0.604763],
        [0.097333, 0.752472, 0.150196],
        [0.500644, 0.398725, 0.100631],
        [0.165316, 0.092574, 0.742110],
    ]
)


# -- grid -------------------------------------------------------------------------------------------
def test_grid_m2_values():
    g = grid_m2()
    assert g.shape == (9, 2)
    np.testing.assert_allclose(g[:, 0], np.arange(1, 10) / 10)
    np.testing.assert_allclose(g.sum(axis=1), 1.0)
    np.testing.assert_allclose(grid_m2(5)[:, 0], np.arange(1, 6) / 6)
    np.testing.assert_allclose(grid_points(2, n_runs=9), g)


@pytest.mark.parametrize("m,n", [(3, 9), (7, 10)])
def test_dirichlet_cover_on_simplex_and_deterministic(m, n):
    a = dirichlet_cover(m, n, seed=3)
    assert a.shape == (n, m)
    assert np.all(a >= 0)
    np.testing.assert_allclose(a.sum(axis=1), 1.0)
    np.testing.assert_array_equal(a, dirichlet_cover(m, n, seed=3))
    assert not np.allclose(a, dirichlet_cover(m, n, seed=4))
    np.testing.assert_array_equal(grid_points(m, n_runs=n, seed=3), a)


def test_dirichlet_cover_does_not_touch_global_rng():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    dirichlet_cover(3, 9, seed=0)
    assert np.random.random() == before


def test_dirichlet_cover_legacy_reproduces_released_file():
    pts = dirichlet_cover(3, 9, alpha=1.0, oversample=4, seed=0, legacy=True)
    np.testing.assert_allclose(pts, OFFICIAL_K3_N9_SEED0, atol=5e-7)


def test_dirichlet_cover_is_more_spread_than_plain_draws():
    m, n = 3, 9
    cover, plain = [], []
    for seed in range(10):
        cover.append(pdist(dirichlet_cover(m, n, seed=seed)).min())
        plain.append(pdist(np.random.default_rng(seed).dirichlet(np.ones(m), n)).min())
    assert np.mean(cover) > 2.0 * np.mean(plain)


def test_select_best_uses_average_perplexity():
    P = np.array([[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]])
    # row 0 has the lowest mean loss (2.95) but row 1 the lowest mean exp(loss)
    L = np.array([[1.0, 4.9], [3.0, 3.0], [3.5, 3.5]])
    idx, p = select_best(P, L)
    assert idx == 1
    np.testing.assert_array_equal(p, P[1])


# -- static log-linear law ----------------------------------------------------------------------------
def _true_law(m: int, seed: int) -> LogLinearLaw:
    rng = np.random.default_rng(seed)
    A = rng.uniform(0.5, 2.5, (m, m)) * np.where(np.eye(m) > 0, 1.5, 0.4)
    return LogLinearLaw(rng.uniform(1.5, 3.0, m), rng.uniform(0.5, 1.5, m), A).gauge_fixed()


@pytest.mark.parametrize("m,n", [(2, 15), (3, 15), (3, 20), (7, 20)])
def test_fit_log_linear_recovers_known_law(m, n):
    true = _true_law(m, seed=m + n)
    P = grid_m2(n) if m == 2 else dirichlet_cover(m, n, seed=1)
    law, info = fit_log_linear(P, true.predict(P), seed=0)
    np.testing.assert_allclose(law.c, true.c, atol=1e-3)
    np.testing.assert_allclose(law.b, true.b, rtol=1e-3)
    np.testing.assert_allclose(law.A, true.A, atol=1e-3)
    np.testing.assert_allclose(law.A.sum(axis=1), 0.0, atol=1e-9)  # reported gauge
    assert info["r2"] > 0.999 and info["r2_pooled"] > 0.999 and info["mse"] < 1e-8
    # held-out mixtures are predicted too (the law, not just the points, is recovered)
    Q = dirichlet_cover(m, 7, seed=99) if m > 2 else grid_m2(7)
    np.testing.assert_allclose(law.predict(Q), true.predict(Q), atol=1e-4)


def test_law_gauge_does_not_change_predictions():
    law = LogLinearLaw(np.array([1.0, 2.0]), np.array([0.5, 0.7]), np.array([[2.0, 0.5], [0.1, 1.5]]))
    P = grid_m2(9)
    np.testing.assert_allclose(law.gauge_fixed().predict(P), law.predict(P))
    # b is the reducible loss at the uniform mixture in the fixed gauge
    g = law.gauge_fixed()
    np.testing.assert_allclose(g.b, law.predict(np.array([0.5, 0.5])) - law.c)


def test_fit_log_linear_underdetermined_still_runs():
    true = _true_law(7, seed=0)
    P = dirichlet_cover(7, 5, seed=0)
    law, info = fit_log_linear(P, true.predict(P))
    assert np.all(np.isfinite(law.A)) and info["mse"] < 1e-6


def test_fit_log_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="must both be"):
        fit_log_linear(np.ones((3, 2)) / 2, np.ones((3, 3)))


# -- simplex optimiser --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "q,expected",
    [
        ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),  # interior
        ([0.7, 0.5, -0.2], [0.6, 0.4, 0.0]),  # on an edge (Euclidean projection of q)
        ([2.0, -0.5, -0.5], [1.0, 0.0, 0.0]),  # on a vertex
    ],
)
def test_minimize_on_simplex_quadratic(q, expected):
    q = np.asarray(q)
    p = minimize_on_simplex(lambda p: float(np.sum((p - q) ** 2)), 3, seed=0)
    np.testing.assert_allclose(p, expected, atol=1e-5)
    assert p.min() >= 0 and abs(p.sum() - 1) < 1e-12


def test_minimize_on_simplex_linear_objective_hits_vertex():
    w = np.array([3.0, 1.0, 2.0, 5.0])
    p = minimize_on_simplex(lambda p: float(w @ p), 4)
    np.testing.assert_allclose(p, [0, 1, 0, 0], atol=1e-9)


def test_law_optimum_matches_dense_grid():
    law = _true_law(3, seed=5)
    k = np.arange(201) / 200
    g1, g2 = np.meshgrid(k, k, indexing="ij")
    mask = g1 + g2 <= 1 + 1e-12
    grid = np.stack([g1[mask], g2[mask], 1 - g1[mask] - g2[mask]], axis=1)
    best_grid = float(np.min(law.predict(grid).sum(axis=1)))
    p = law.optimum()
    assert law.total(p) <= best_grid + 1e-12
    np.testing.assert_allclose(p, grid[np.argmin(law.predict(grid).sum(axis=1))], atol=0.01)


# -- linear dynamic law, scores ------------------------------------------------------------------------
def test_fit_linear_dynamic_recovers_A():
    rng = np.random.default_rng(0)
    m = 3
    A = rng.normal(size=(m, m)) * 0.1 + np.eye(m) * 0.3
    P = dirichlet_cover(m, 9, seed=0)
    before = np.array([3.0, 2.5, 4.0])  # one parent for all children
    after = before - P @ A.T
    A_hat, d, r2 = fit_linear_dynamic(P, before, after)
    np.testing.assert_allclose(A_hat, A, atol=1e-10)
    assert d is None and r2 > 0.999999
    # per-child parents (N, m) work the same way
    before_n = before + rng.normal(scale=0.01, size=(9, m))
    A_hat2, _, _ = fit_linear_dynamic(P, before_n, before_n - P @ A.T)
    np.testing.assert_allclose(A_hat2, A, atol=1e-10)


def test_r2_score_modes():
    y = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    assert r2_score(y, y) == 1.0
    yhat = y.copy()
    yhat[:, 0] = 2.0  # column 0 predicted by its mean: R² = 0
    np.testing.assert_allclose(r2_score(y, yhat, multioutput="raw"), [0.0, 1.0])
    assert r2_score(y, yhat) == pytest.approx(0.5)
    assert r2_score(y, yhat, multioutput="pooled") > 0.99  # between-group spread dominates


def test_sim_identical_and_hand_example():
    A = np.array([[1.0, 0.2, 0.0], [0.0, 1.5, 0.1], [0.3, 0.0, 2.5]])
    assert sim(A, A) == pytest.approx(1.0)
    assert sim(3.0 * A, A) == pytest.approx(1.0)  # scale-free: Ã^t is compared up to b^t
    # column sums (1, 2, 3) vs (3, 2, 1): cosine 10/14, Spearman -1 -> 0.5·10/14 − 0.5 = −1/7
    s, cos, rho = sim(np.diag([3.0, 2.0, 1.0]), np.diag([1.0, 2.0, 3.0]), return_parts=True)
    assert cos == pytest.approx(10 / 14) and rho == pytest.approx(-1.0)
    assert s == pytest.approx(-1 / 7)


def test_m2_optimum_matches_official_closed_form():
    # the official A/SE seed-0 static fit: L_i = c_i + exp(k_i p_i + b_i) (2_static_law.ipynb)
    c, k, b = np.array([2.636, 3.033]), np.array([-3.0, -2.646]), np.array([-0.619, -0.129])
    law = LogLinearLaw(c, np.exp(b), -np.diag(k))
    p1 = (k[1] + b[1] - b[0] + np.log(k[1] / k[0])) / (k[0] + k[1])  # the notebook's closed form
    assert law.optimum()[0] == pytest.approx(p1, abs=1e-6)
    # and a fit to the 9-point sweep of that law finds it again
    P = grid_m2(9)
    fitted, _ = fit_log_linear(P, law.predict(P))
    assert fitted.optimum()[0] == pytest.approx(p1, abs=1e-4)
