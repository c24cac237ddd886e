"""Mixing laws: fit the static log-linear law (DML), optimise a law over the simplex, fit the linear
dynamic law, and the sim(·,·) score of the paper's analysis.

Static log-linear law (paper §3, the Data Mixing Laws form; T = 1, σ = exp):

    L_i(p) = c_i + b_i · exp(−Σ_j A_ij p_j)

The official `mixing_law_fitting.py linreg` writes the same family as `a * exp(x @ M) + b`, i.e.
a_i = b_i (ours), b_i = c_i (ours) and M_ji = −A_ij.

Linear dynamic law (T > 1, σ = Id): L_i^{t+1} = L_i^t − Σ_j A^t_ij p^t_j.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from aioli_repro.mixing.simplex import softmax


# ---------------------------------------------------------------------------------------------------
# static log-linear law
# ---------------------------------------------------------------------------------------------------
@dataclass
class LogLinearLaw:
    """L_i(p) = c_i + b_i · exp(−Σ_j A_ij p_j), reported in the gauge Σ_j A_ij = 0.

    On the simplex Σ_j p_j = 1, so adding s_i to row i of A and multiplying b_i by exp(s_i) gives the
    same law: (b, A) are identifiable only up to that per-row shift. We fix it with zero row sums,
    which makes b_i = L_i(uniform) − c_i (the reducible loss at the stratified mixture) and A_ij the
    log-rate at which moving weight onto group j (away from uniform) lowers group i's excess loss.
    """

    c: np.ndarray  # (m,) irreducible loss per group
    b: np.ndarray  # (m,) > 0
    A: np.ndarray  # (m, m) row = evaluated group i, column = training group j

    def __post_init__(self) -> None:
        self.c = np.asarray(self.c, dtype=np.float64)
        self.b = np.asarray(self.b, dtype=np.float64)
        self.A = np.asarray(self.A, dtype=np.float64)

    @property
    def m(self) -> int:
        return len(self.c)

    def predict(self, p: np.ndarray) -> np.ndarray:
        """Per-group losses for one mixture (m,) or a batch (N, m)."""
        p = np.asarray(p, dtype=np.float64)
        return self.c + self.b * np.exp(-(p @ self.A.T))

    def total(self, p: np.ndarray) -> float:
        """Σ_i L_i(p): the LMO objective (the average differs by the constant 1/m)."""
        return float(np.sum(self.predict(p)))

    def gauge_fixed(self) -> LogLinearLaw:
        """The same law with Σ_j A_ij = 0 (use it to compare a hand-made law with a fitted one)."""
        mu = self.A.mean(axis=1)
        return LogLinearLaw(self.c.copy(), self.b * np.exp(-mu), self.A - mu[:, None])

    def optimum(self, seed: int = 0) -> np.ndarray:
        """argmin_p Σ_i L_i(p) over the simplex."""
        return minimize_on_simplex(self.total, self.m, seed=seed)

    def to_dict(self) -> dict:
        return {"c": self.c.tolist(), "b": self.b.tolist(), "A": self.A.tolist()}


def _zero_sum_basis(m: int) -> np.ndarray:
    """Orthonormal (m, m−1) basis of {v : Σ v = 0}, so A_i = Q z holds the gauge exactly."""
    q, _ = np.linalg.qr(np.eye(m) - 1.0 / m)
    # the first m−1 columns of the centring projector's QR span its (m−1)-dim range
    return q[:, : m - 1]


def fit_log_linear(
    P: np.ndarray,
    L: np.ndarray,
    seed: int = 0,
    n_restarts: int = 8,
    ridge: float = 1e-8,
    max_nfev: int = 300,
) -> tuple[LogLinearLaw, dict]:
    """Fit the static log-linear law to N static runs: P (N, m) mixtures, L (N, m) losses.

    Pass **validation** losses (the paper selects on validation and reports test; the official
    `linreg --loss_diff False` fits on the test pickles, which we do not reproduce).

    Each group's (c_i, b_i, A_i·) is fitted separately (the parameters are disjoint, so this is the
    same least-squares problem as the official joint `curve_fit`):
      1. profile c_i over a grid in [0, min_n L_ni): for fixed c, log(L − c) is linear in p, so
         (log b_i, A_i·) come from least squares; the best few c seed step 2, together with
         `n_restarts` random starts drawn from `np.random.default_rng(seed)`;
      2. refine (c_i, log b_i, A_i·) with `scipy.optimize.least_squares` (TRF, analytic Jacobian,
         c_i ∈ [0, min L_i)) on the squared loss residuals; keep the best.
    `ridge` adds ridge·‖A_i·‖² (gauge-fixed), which only matters when N < m + 1 points leave the
    fit under-determined (e.g. the tiny scale's 5-run sweep at m = 7).

    Returns the law (gauge Σ_j A_ij = 0, b_i > 0) and info: r2 (mean of per-group R², sklearn's
    default for multi-output), r2_pooled, r2_per_group, mse, n_points, n_params_per_group.
    """
    P = np.asarray(P, dtype=np.float64)
    L = np.asarray(L, dtype=np.float64)
    if P.ndim != 2 or L.shape != P.shape:
        raise ValueError(f"fit_log_linear: P {P.shape} and L {L.shape} must both be (N, m)")
    if not np.all(np.isfinite(L)) or np.any(L <= 0):
        raise ValueError("fit_log_linear: losses must be finite and positive")
    N, m = P.shape
    Q = _zero_sum_basis(m)
    X = np.hstack([np.ones((N, 1)), -(P @ Q)])  # exponent = X @ (log b, z), A_i = Q z
    rng = np.random.default_rng(seed)
    c_all, b_all, A_all = np.zeros(m), np.zeros(m), np.zeros((m, m))
    for i in range(m):  # one rng, drawn group by group, so the restarts depend on the seed alone
        best = _fit_one_group(X, L[:, i], rng, n_restarts, np.sqrt(ridge), max_nfev)
        if best is None:
            raise RuntimeError(f"fit_log_linear: no start converged for group {i}")
        c_all[i], b_all[i], A_all[i] = best[0], np.exp(best[1]), Q @ best[2:]
    law = LogLinearLaw(c_all, b_all, A_all)
    return law, _fit_info(L, law.predict(P), m)


def _fit_one_group(
    X: np.ndarray, y: np.ndarray, rng: np.random.Generator, n_restarts: int, sq: float, max_nfev: int
) -> np.ndarray | None:
    """θ = (c, log b, z) minimising Σ_n (c + exp(X_n·(log b, z)) − y_n)² + sq²‖z‖², or None if no start
    converged. Steps 1 (profile starts plus random restarts) and 2 (TRF refinement) of `fit_log_linear`."""
    N, m = X.shape[0], X.shape[1]
    c_hi = float(y.min()) * (1.0 - 1e-9)

    def resid(theta: np.ndarray) -> np.ndarray:
        e = np.exp(np.clip(X @ theta[1:], -700, 700))
        return np.concatenate([theta[0] + e - y, sq * theta[2:]])

    def jac(theta: np.ndarray) -> np.ndarray:
        e = np.exp(np.clip(X @ theta[1:], -700, 700))
        top = np.hstack([np.ones((N, 1)), e[:, None] * X])
        reg = np.hstack([np.zeros((m - 1, 2)), sq * np.eye(m - 1)])
        return np.vstack([top, reg])

    def profile(c: float) -> np.ndarray:
        theta, *_ = np.linalg.lstsq(X, np.log(y - c), rcond=None)
        return np.concatenate([[c], theta])

    # step 1: profile c (log-spaced towards min L, where the fit is most sensitive)
    grid = c_hi * (1.0 - np.geomspace(1e-4, 1.0, 40))
    starts = sorted((profile(c) for c in grid), key=lambda th: float(np.sum(resid(th) ** 2)))[:3]
    for _ in range(n_restarts):
        th = profile(float(rng.uniform(0.0, c_hi)))
        th[2:] += rng.normal(scale=1.0, size=m - 1)
        starts.append(th)
    # step 2: refine every start within c ∈ [0, min y); keep the lowest cost
    lb, ub = np.full(m + 1, -np.inf), np.full(m + 1, np.inf)
    lb[0], ub[0] = 0.0, c_hi
    best, best_cost = None, np.inf
    for th0 in starts:
        th0 = th0.copy()
        th0[0] = float(np.clip(th0[0], 0.0, c_hi * (1 - 1e-12)))
        try:
            res = optimize.least_squares(
                resid,
                th0,
                jac=jac,
                bounds=(lb, ub),
                method="trf",
                x_scale="jac",
                xtol=1e-12,
                ftol=1e-12,
                gtol=1e-12,
                max_nfev=max_nfev,
            )
        except (ValueError, FloatingPointError):
            continue
        if np.isfinite(res.cost) and res.cost < best_cost:
            best, best_cost = res.x, res.cost
    return best


def _fit_info(L: np.ndarray, pred: np.ndarray, m: int) -> dict:
    """Goodness of fit of the predicted losses `pred` against the observed L (both (N, m))."""
    return {
        "r2": r2_score(L, pred),
        "r2_pooled": r2_score(L, pred, multioutput="pooled"),
        "r2_per_group": [float(v) for v in r2_score(L, pred, multioutput="raw")],
        "mse": float(np.mean((L - pred) ** 2)),
        "n_points": int(L.shape[0]),
        "n_params_per_group": int(m + 1),  # c, b and m−1 free entries of A_i· (the gauge removes one)
    }


# ---------------------------------------------------------------------------------------------------
# optimisation over the simplex
# ---------------------------------------------------------------------------------------------------


def _project(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    return p / p.sum()


def minimize_on_simplex(
    f: Callable[[np.ndarray], float], m: int, seed: int = 0, n_restarts: int = 8, polish: bool = True
) -> np.ndarray:
    """argmin of f(p) over the simplex Δ^m (e.g. f = Σ_i L_i(p) of a fitted law).

    1. The official solver: Nelder–Mead on p = softmax(y), from y = 0 (uniform) and from
       `n_restarts` Dirichlet(1) starts of a `default_rng(seed)`; the m vertices are candidates too.
    2. Softmax can only approach the boundary, so the best few candidates are polished with SLSQP
       directly on p (bounds [0, 1], Σ p = 1), which lands exactly on an edge or vertex optimum.
    Returns the best point found (non-negative, summing to 1).
    """
    if m < 1:
        raise ValueError(f"minimize_on_simplex: m must be >= 1, got {m}")
    if m == 1:
        return np.ones(1)
    rng = np.random.default_rng(seed)

    def g(y: np.ndarray) -> float:
        v = float(f(softmax(y)))
        return v if np.isfinite(v) else np.inf

    cands: list[tuple[float, np.ndarray]] = []
    inits = [np.zeros(m)] + [np.log(rng.dirichlet(np.ones(m)) + 1e-12) for _ in range(n_restarts)]
    for y0 in inits:
        res = optimize.minimize(
            g,
            y0,
            method="Nelder-Mead",
            options={"maxiter": 4000 * m, "xatol": 1e-10, "fatol": 1e-14, "adaptive": m > 3},
        )
        p = softmax(res.x)
        cands.append((float(f(p)), p))
    for j in range(m):
        v = np.eye(m)[j]
        cands.append((float(f(v)), v))

    if polish:
        cons = ({"type": "eq", "fun": lambda p: np.sum(p) - 1.0, "jac": lambda p: np.ones_like(p)},)
        for _, p0 in sorted(cands, key=lambda t: t[0])[:3]:
            res = optimize.minimize(
                lambda p: float(f(_project(p))),
                p0,
                method="SLSQP",
                bounds=[(0.0, 1.0)] * m,
                constraints=cons,
                options={"maxiter": 500, "ftol": 1e-15},
            )
            p = _project(res.x)
            cands.append((float(f(p)), p))
    val, p = min(cands, key=lambda t: t[0] if np.isfinite(t[0]) else np.inf)
    return _project(p)


# ---------------------------------------------------------------------------------------------------
# linear dynamic law
# ---------------------------------------------------------------------------------------------------
def fit_linear_dynamic(
    P: np.ndarray, L_before: np.ndarray, L_after: np.ndarray, intercept: bool = False
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Fit L_i^{t+1} = L_i^t − Σ_j A_ij p_j by least squares per group i.

    P (N, m) child mixtures; L_before the losses at the branch point, (N, m) or (m,) when all
    children share one parent; L_after (N, m). The regression target is the drop
    L_i^t − L_i^{t+1} = (A p)_i (no intercept: the paper's form, c^t = L^t and b^t = 1, as the
    official k = 3 "full" fit). `intercept=True` adds a per-group constant d_i; because Σ_j p_j = 1
    it is then only identified jointly with A (least squares returns the minimum-norm solution).

    Returns (A (m, m), d (m,) or None, R² of the predicted L^{t+1}, mean over groups).
    """
    P = np.asarray(P, dtype=np.float64)
    after = np.asarray(L_after, dtype=np.float64)
    before = np.broadcast_to(np.asarray(L_before, dtype=np.float64), after.shape)
    if P.ndim != 2 or after.shape != P.shape:
        raise ValueError(f"fit_linear_dynamic: P {P.shape} and L_after {after.shape} must both be (N, m)")
    drop = before - after
    X = np.hstack([P, np.ones((len(P), 1))]) if intercept else P
    coef, *_ = np.linalg.lstsq(X, drop, rcond=None)  # (m[+1], m): column i = group i
    A = coef[: P.shape[1]].T.copy()
    d = coef[P.shape[1]].copy() if intercept else None
    pred_after = before - X @ coef
    return A, d, r2_score(after, pred_after)


# ---------------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------------
def r2_score(y: np.ndarray, yhat: np.ndarray, multioutput: str = "uniform_average") -> float | np.ndarray:
    """Coefficient of determination; for 2-D inputs per column (groups).

    multioutput: "uniform_average" (mean of per-column R², sklearn's default), "raw" (per column),
    or "pooled" (one R² over all entries, which also credits between-group differences).
    """
    y = np.asarray(y, dtype=np.float64)
    yhat = np.asarray(yhat, dtype=np.float64)
    if y.shape != yhat.shape:
        raise ValueError(f"r2_score: shapes differ, {y.shape} vs {yhat.shape}")
    if multioutput == "pooled" or y.ndim == 1:
        ss_res = float(np.sum((y - yhat) ** 2))
        ss_tot = float(np.sum((y - y.mean()) ** 2))
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    ss_res = np.sum((y - yhat) ** 2, axis=0)
    ss_tot = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.where(ss_res == 0, 1.0, 0.0))
    if multioutput == "raw":
        return r2
    if multioutput == "uniform_average":
        return float(r2.mean())
    raise ValueError(f"r2_score: unknown multioutput {multioutput!r}; allowed: uniform_average, raw, pooled")


def sim(
    A_method: np.ndarray, A_star: np.ndarray, return_parts: bool = False
) -> float | tuple[float, float, float]:
    """The paper's parameter similarity (official `2_measurements.ipynb`).

    Column sums a = 1ᵀA* and â = 1ᵀÃ (how much training on each group j lowers the total loss),
    then sim = 0.5·cosine(â, a) + 0.5·Spearman ρ(â, a). Spearman is ±1 for m = 2 and NaN when a
    vector is constant. `return_parts=True` returns (sim, cosine, spearman).
    """
    a = np.asarray(A_star, dtype=np.float64).sum(axis=0)
    ah = np.asarray(A_method, dtype=np.float64).sum(axis=0)
    if a.shape != ah.shape:
        raise ValueError(f"sim: shapes differ, {np.shape(A_method)} vs {np.shape(A_star)}")
    cos = float(ah @ a / (np.linalg.norm(ah) * np.linalg.norm(a)))
    if np.ptp(a) == 0 or np.ptp(ah) == 0:
        rho = float("nan")
    else:
        rho = float(stats.spearmanr(ah, a).statistic)
    s = 0.5 * cos + 0.5 * rho
    return (s, cos, rho) if return_parts else s
