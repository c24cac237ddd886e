"""RegMix's regression and its simulated optimum (sail-sg/regmix, regression_fitting/regression.ipynb).

Pure functions on arrays. `fit_regression` maps mixtures (n, m) to a target loss (n,) with LightGBM at the
released hyper-parameters (gbdt, 1000 rounds at learning rate 0.01, seed 42, early stopping after 3 rounds
without gain on a held-out share of the swarm: the notebook holds out 128 of its 1000 mixtures) or with
ordinary least squares (RegMix's linear variant). `simulate_optimum` draws candidate mixtures from
Dirichlet(token prior x 1) (100,000 in the notebook), predicts their loss, and returns the mean of the
k = 128 best: the mixture RegMix trains its large model on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from aioli_repro.config import ConfigError

Predictor = Callable[[np.ndarray], np.ndarray]

# The notebook's LightGBM hyper-parameters (lgb.LGBMRegressor(**hyper_params) there; the native API here)
LGBM_PARAMS = {
    "objective": "regression",
    "boosting_type": "gbdt",
    "metric": ["l1", "l2"],
    "num_iterations": 1000,
    "learning_rate": 1e-2,
    "seed": 42,
    "verbosity": -1,
}
EARLY_STOPPING_ROUNDS = 3
HOLDOUT = 128 / 1000  # the notebook's early-stopping split: the first 128 of 1000 mixtures
# LightGBM's default leaf size (20), which the notebook keeps for its 872 training mixtures: a swarm of
# tens of points would grow no tree at all, so the leaf keeps that share of the training points (>= 2)
RELEASED_LEAF, RELEASED_TRAIN = 20, 872
REGRESSORS = ("lightgbm", "linear")


def fit_regression(
    X: np.ndarray,
    y: np.ndarray,
    regressor: str = "lightgbm",
    holdout: float = HOLDOUT,
    min_child_samples: int | None = None,
) -> tuple[Predictor, dict]:
    """A predictor of the target loss from a mixture, and fit statistics (plain floats, for the summary).
    `min_child_samples` None: the released leaf share of the training points (see RELEASED_LEAF)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"fit_regression: X (n, m) and y (n,) expected, got {X.shape} and {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("fit_regression: the target has non-finite losses (a diverged proxy?)")
    check_options(regressor)
    if regressor == "lightgbm":
        predict, stats = _fit_lightgbm(X, y, holdout, min_child_samples)
    else:
        predict, stats = _fit_linear(X, y)
    fitted = predict(X)
    stats.update(
        regressor=regressor,
        n_points=int(len(y)),
        r2=_r2(y, fitted),
        spearman=_spearman(y, fitted),
    )
    return predict, stats


def check_options(regressor: str = "lightgbm", n_candidates: int = 1, top_k: int = 1) -> None:
    """ConfigErrors naming the pipeline field, for what FIELDS cannot check alone."""
    if regressor not in REGRESSORS:
        raise ConfigError(
            f"method.pipeline.regressor: unknown value {regressor!r}; allowed: {list(REGRESSORS)}"
        )
    if top_k > n_candidates:
        raise ConfigError(
            f"method.pipeline.sim_top_k: must be at most sim_candidates = {n_candidates}, got {top_k}"
        )


def _fit_lightgbm(
    X: np.ndarray, y: np.ndarray, holdout: float, min_child_samples: int | None
) -> tuple[Predictor, dict]:
    import lightgbm as lgb

    n_hold = int(round(holdout * len(y)))
    if n_hold and len(y) - n_hold < 2:
        raise ValueError(f"fit_regression: {len(y)} points leave too few to train after holding out {n_hold}")
    if min_child_samples is None:
        min_child_samples = max(2, round(RELEASED_LEAF * (len(y) - n_hold) / RELEASED_TRAIN))
    params = {**LGBM_PARAMS, "min_data_in_leaf": int(min_child_samples), "num_threads": 1}
    train = lgb.Dataset(X[n_hold:], y[n_hold:], params={"min_data_in_leaf": int(min_child_samples)})
    stats: dict = {"holdout": n_hold, "min_child_samples": int(min_child_samples)}
    if n_hold:  # as released: train on the rest, stop when the held-out l2 stops improving
        valid = lgb.Dataset(X[:n_hold], y[:n_hold], reference=train)
        stop = lgb.early_stopping(EARLY_STOPPING_ROUNDS, first_metric_only=False, verbose=False)
        booster = lgb.train(params, train, valid_sets=[valid], callbacks=[stop])
        held = booster.predict(X[:n_hold], num_iteration=booster.best_iteration)
        stats.update(holdout_spearman=_spearman(y[:n_hold], held), holdout_r2=_r2(y[:n_hold], held))
    else:
        booster = lgb.train(params, train)
    best = int(booster.best_iteration or booster.current_iteration())
    stats["iterations"] = best
    return (lambda Z: booster.predict(np.asarray(Z, dtype=np.float64), num_iteration=best)), stats


def _fit_linear(X: np.ndarray, y: np.ndarray) -> tuple[Predictor, dict]:
    """y = w . x + b by least squares. The weights sum to 1, so b is not identified apart from w: the
    minimum-norm solution is taken; predictions (all the simulation needs) are the same either way."""
    A = np.hstack([X, np.ones((len(X), 1))])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    w, b = coef[:-1], float(coef[-1])
    return (lambda Z: np.asarray(Z, dtype=np.float64) @ w + b), {"coef": w.tolist(), "intercept": b}


def simulate_optimum(
    predict: Predictor, prior: np.ndarray, n_candidates: int = 100_000, top_k: int = 128, seed: int = 42
) -> np.ndarray:
    """The mean of the `top_k` candidates with the lowest predicted loss, among `n_candidates` drawn from
    Dirichlet(prior x 1) (the notebook's rule; seeded here by `seed`)."""
    check_options(n_candidates=n_candidates, top_k=top_k)
    prior = np.asarray(prior, dtype=np.float64)
    cands = np.random.default_rng(seed).dirichlet(prior / prior.sum(), size=n_candidates)
    pred = np.asarray(predict(cands), dtype=np.float64)
    best = np.argsort(pred, kind="stable")[:top_k]
    p = cands[best].mean(axis=0)
    return p / p.sum()


def _r2(y: np.ndarray, f: np.ndarray) -> float:
    ss = float(np.sum((y - y.mean()) ** 2))
    return float(1.0 - np.sum((y - f) ** 2) / ss) if ss > 0 else float("nan")


def _spearman(y: np.ndarray, f: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(y) < 3 or np.ptp(f) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(y, f).statistic)
