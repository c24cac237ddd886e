"""RegMix: its regressions recover planted optima over the simplex, and its pipeline at a micro budget."""

from __future__ import annotations

import numpy as np
import pytest

from aioli_repro.config import ConfigError
from aioli_repro.mixing.regmix import fit_regression, simulate_optimum
from aioli_repro.pipeline.recipes import run_method
from aioli_repro.pipeline.swarm import swarm_points
from tests.test_pipelines import MICRO

PRIOR = np.array([0.74, 0.14, 0.12])


def _noisy(y: np.ndarray, seed: int) -> np.ndarray:
    return y + np.random.default_rng(100 + seed).normal(0.0, 0.005, y.shape)


def test_linear_recovers_a_planted_linear_law_and_its_vertex_optimum():
    w = np.array([0.5, 0.1, 0.9])  # L(p) = 3 + w . p: lowest at the vertex of group 1
    X = swarm_points(PRIOR, 32, seed=0)
    predict, stats = fit_regression(X, _noisy(3.0 + X @ w, 0), "linear")
    coef = np.asarray(stats["coef"])
    # w is identified up to a constant (the weights sum to 1): its differences, within 0.02 (noise 0.005)
    assert coef - coef[0] == pytest.approx(w - w[0], abs=0.02)
    assert stats["r2"] > 0.99
    p = simulate_optimum(predict, PRIOR, seed=0)
    assert np.abs(p - [0.0, 1.0, 0.0]).sum() < 0.02  # measured 0.0035
    assert p.sum() == pytest.approx(1.0) and np.all(p >= 0)


def test_lightgbm_recovers_a_planted_interior_optimum():
    # L(p) = 3 + 2 |p - p*|^2 with p* inside the simplex, 128 swarm points, noise 0.005, released settings
    # (128/1000 held out for early stopping): mean L1 error 0.077 over these 4 swarms (0.008 to 0.154);
    # the linear regression, whose optimum is always a vertex, is 1.0 away on every one of them
    pstar = np.array([0.5, 0.3, 0.2])
    errors, linear = [], []
    for seed in range(4):
        X = swarm_points(PRIOR, 128, seed=seed)
        y = _noisy(3.0 + 2.0 * ((X - pstar) ** 2).sum(axis=1), seed)
        predict, stats = fit_regression(X, y, "lightgbm")
        assert stats["holdout"] == 16 and stats["min_child_samples"] == 3 and stats["iterations"] > 100
        errors.append(np.abs(simulate_optimum(predict, PRIOR, seed=seed) - pstar).sum())
        line, _ = fit_regression(X, y, "linear")
        linear.append(np.abs(simulate_optimum(line, PRIOR, seed=seed) - pstar).sum())
    assert np.mean(errors) < 0.12 and max(errors) < 0.2
    assert min(linear) > 0.5


def test_leaf_size_follows_the_released_share_of_training_points():
    rng = np.random.default_rng(0)
    X, y = rng.dirichlet([1.0, 1.0, 1.0], 1000), rng.random(1000)
    assert fit_regression(X, y, "lightgbm")[1]["min_child_samples"] == 20  # 872 training points: as released
    assert fit_regression(X[:16], y[:16], "lightgbm", holdout=0.0)[1]["min_child_samples"] == 2


def test_simulation_is_the_mean_of_the_best_candidates():
    def predict(Z: np.ndarray) -> np.ndarray:
        return -Z[:, 2]  # the more of group 2, the lower the loss

    p = simulate_optimum(predict, PRIOR, n_candidates=5000, top_k=1, seed=7)
    cands = np.random.default_rng(7).dirichlet(PRIOR, size=5000)
    assert p == pytest.approx(cands[np.argmax(cands[:, 2])])
    p10 = simulate_optimum(predict, PRIOR, n_candidates=5000, top_k=10, seed=7)
    assert p10 == pytest.approx(cands[np.argsort(-cands[:, 2])[:10]].mean(axis=0))
    assert np.array_equal(p10, simulate_optimum(predict, PRIOR, n_candidates=5000, top_k=10, seed=7))


def test_bad_options_name_the_field():
    X = swarm_points(PRIOR, 8, seed=0)
    with pytest.raises(ConfigError, match=r"^method\.pipeline\.regressor: unknown value 'gp'"):
        fit_regression(X, X[:, 0], "gp")
    with pytest.raises(ConfigError, match=r"^method\.pipeline\.sim_top_k: "):
        simulate_optimum(lambda Z: Z[:, 0], PRIOR, n_candidates=10, top_k=11)


SWARM = [
    "hp.regmix.swarm_size=6",
    "hp.regmix.swarm_steps=6",
    "hp.regmix.sim_candidates=2000",
    "hp.regmix.sim_top_k=16",
]


def test_pipeline_end_to_end_reuses_its_swarm(make_cfg, tmp_path):
    quiet = {"log": lambda s: None}
    first, _ = run_method(make_cfg("method=regmix", *MICRO, *SWARM), tmp_path, **quiet)
    groups = ["arxiv", "stackexchange"]
    assert np.isfinite(first["test/avg_ppl"]) and first["groups"] == groups
    assert [s["name"] for s in first["stages"]] == [f"swarm{i}" for i in range(6)] + ["final"]
    assert first["extra_runs"] == 6
    assert first["total_tokens"] == (6 * 6 + 12) * 8 * 256  # six 6-step proxies and the 12-step final
    p = np.array([first["learned_proportions"][g] for g in groups])
    assert p.sum() == pytest.approx(1.0) and np.all(p >= 0)
    reg = first["regression"]
    assert reg["regressor"] == "lightgbm" and reg["n_points"] == 6 and np.isfinite(reg["r2"])
    y = np.asarray(first["swarm"]["val_mean_loss"])
    assert np.all(np.isfinite(y)) and len(first["swarm"]["points"]) == 6

    again, _ = run_method(make_cfg("method=regmix", *MICRO, *SWARM), tmp_path, **quiet)
    assert all(s["reused"] for s in again["stages"])
    assert again["learned_proportions"] == first["learned_proportions"]

    linear, _ = run_method(make_cfg("method=regmix_linear", *MICRO, *SWARM), tmp_path, **quiet)
    assert [s["dir"] for s in linear["stages"][:6]] == [s["dir"] for s in first["stages"][:6]]
    assert all(s["reused"] for s in linear["stages"][:6]) and not linear["stages"][6]["reused"]
    assert linear["regression"]["regressor"] == "linear" and linear["extra_runs"] == 6
    # the same points and targets; for m = 2 the fit is a line in p_arxiv, so R2 is the squared correlation
    X = np.asarray(linear["swarm"]["points"])
    assert linear["swarm"]["val_mean_loss"] == pytest.approx(y.tolist())
    assert linear["regression"]["r2"] == pytest.approx(np.corrcoef(X[:, 0], y)[0, 1] ** 2)
    # and its optimum lies towards the vertex of the group with the lower slope
    coef = np.asarray(linear["regression"]["coef"])
    q = np.array([linear["learned_proportions"][g] for g in groups])
    assert np.argmax(q) == np.argmin(coef) and q.max() > 0.9


def test_unknown_regressor_fails_before_any_proxy(make_cfg, tmp_path):
    cfg = make_cfg("method=regmix", *MICRO, *SWARM)
    cfg.method.pipeline.regressor = "gp"
    with pytest.raises(ConfigError, match=r"^method\.pipeline\.regressor: unknown value 'gp'"):
        run_method(cfg, tmp_path, log=lambda s: None)
    assert not any(p.name.startswith("swarm") for p in tmp_path.iterdir())
