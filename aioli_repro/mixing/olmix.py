"""Olmix (allenai/olmix, 2026): the per-domain log-linear law, its proposers, and mixture reuse.

Law (olmix `fit/utils.py` `mixing_law`), one per evaluated domain i, over the training mixture p:

    L_i(p) = exp(log_c_i) + exp(Σ_j T_ij p_j)

fitted as released (`LogLinearRegressor` + `fit/law.py`): Huber loss (delta 0.02, summed over the
swarm) minimised by L-BFGS (lr 0.01, history 10, 20 inner iterations, strong-Wolfe line search) for
100 outer steps from 10 x 30 starts (log_c_i on linspace(-2, 1.5, 10); T_ii ~ -U(0, 1), T_ij ~ 0.1 U(0, 1));
the start whose best step has the lowest mean Huber loss on the swarm wins.

Proposers (olmix `PROPOSER_TYPES`):
    exact       argmin_p  Σ_i w_i exp(T_i · p) + kl_reg · KL(p || prior)  on the simplex (the default;
                c_i does not move the argmin), w_i = 1/n. Released with cvxpy/ECOS; here
                Newton steps on the KKT system (SLSQP at kl_reg = 0): the problem is convex, so any
                exact solver reaches the same point.
    kl_bound    (ours) the same law under the constraint KL(p || prior) <= bound: the penalised
                solution at the smallest kl_reg that meets the bound (Lagrange duality).
    simulation  10 rounds of 100k Dirichlet draws around a prior that moves halfway to the best draws.
    search      the best observed swarm point.

Mixture reuse (olmix `expand_collapsed_weights`, configs/mixture_reuse_case_study): the old domains'
relative ratios are frozen, the old block becomes one virtual domain whose prior is the old domains'
summed prior, only the block's total and the new domains' shares are solved, then the block is
expanded with its frozen ratios. A log-linear law stays log-linear under that collapse (T_i,old · r).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize

HUBER_DELTA = 0.02  # LogLinearRegressor.fit's default (ScalingLaw.fit's own default, 0.01, is overridden)
FIT_STEPS = 100  # L-BFGS outer steps per start
LOG_C_STARTS = np.linspace(-2.0, 1.5, 10)
DRAWS_PER_LOG_C = 30
KL_REG = 0.05  # LogLinearExactProposer's default and the mixture-reuse case study's configs


@dataclass
class OlmixLaw:
    """L_i(p) = exp(log_c_i) + exp(T_i · p) for each evaluated domain i (rows) over training domains j."""

    log_c: np.ndarray  # (n,)
    T: np.ndarray  # (n, m)

    def __post_init__(self) -> None:
        self.log_c = np.asarray(self.log_c, dtype=np.float64)
        self.T = np.atleast_2d(np.asarray(self.T, dtype=np.float64))

    def predict(self, p: np.ndarray) -> np.ndarray:
        """Per-domain losses for one mixture (m,) -> (n,) or a batch (N, m) -> (N, n)."""
        p = np.asarray(p, dtype=np.float64)
        return np.exp(self.log_c) + np.exp(p @ self.T.T)

    def params(self) -> list[list[float]]:
        """Per domain [log_c_i, T_i1, ..., T_im]: the released parameter vector."""
        return [[float(c), *map(float, t)] for c, t in zip(self.log_c, self.T)]


# -- fitting -------------------------------------------------------------------------------------------
def init_params(idx: int, m: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The released starts for domain `idx`: each log_c on the grid with 30 random slope vectors."""
    for log_c in LOG_C_STARTS:
        for _ in range(DRAWS_PER_LOG_C):
            t = rng.random(m) * 0.1
            t[idx] = -rng.random()
            yield np.concatenate([[log_c], t])


def _law_torch(x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return torch.exp(param[0]) + torch.exp(x @ param[1:])


def _fit_from(x: torch.Tensor, y: torch.Tensor, start: np.ndarray, steps: int, delta: float) -> tuple:
    """One start: L-BFGS on the summed Huber loss; the step with the lowest mean Huber loss is kept."""
    param = torch.nn.Parameter(torch.as_tensor(start, dtype=x.dtype))
    opt = torch.optim.LBFGS([param], lr=0.01, history_size=10, max_iter=20, line_search_fn="strong_wolfe")
    huber = torch.nn.functional.huber_loss
    evals = [0]

    def closure() -> torch.Tensor:
        evals[0] += 1
        opt.zero_grad()
        loss = huber(y, _law_torch(x, param), delta=delta, reduction="sum")
        loss.backward()
        return loss

    best, best_param = np.inf, None
    for _ in range(steps):
        before = evals[0]
        opt.step(closure)
        if evals[0] - before == 1:
            # L-BFGS returned at its first gradient check without touching its state: every later
            # step would do the same, so stopping here gives the released result sooner
            break
        with torch.no_grad():
            mean_loss = float(huber(_law_torch(x, param), y, delta=delta))
        if not np.isfinite(mean_loss):
            break
        if mean_loss <= best:
            best, best_param = mean_loss, param.detach().clone().numpy()
    return best, best_param


def fit_domain(
    P: np.ndarray, y: np.ndarray, idx: int, rng: np.random.Generator, steps: int = FIT_STEPS,
    delta: float = HUBER_DELTA, draws: int = DRAWS_PER_LOG_C,
) -> tuple[np.ndarray, float]:  # fmt: skip
    """Fit domain `idx`'s law to losses y (N,) at mixtures P (N, m): (params [log_c, *T], mean Huber)."""
    x = torch.as_tensor(np.asarray(P, dtype=np.float64))
    yt = torch.as_tensor(np.asarray(y, dtype=np.float64))
    best, best_param = np.inf, None
    for k, start in enumerate(init_params(idx, P.shape[1], rng)):
        if k % DRAWS_PER_LOG_C >= draws:
            continue  # fewer draws per log_c start (still consuming the generator as released would)
        loss, param = _fit_from(x, yt, start, steps, delta)
        if param is not None and loss < best:
            best, best_param = loss, param
    if best_param is None:
        raise RuntimeError(f"olmix: no start of domain {idx}'s law fit reached a finite loss")
    return best_param, float(best)


def fit_olmix_law(
    P: np.ndarray, L: np.ndarray, seed: int, steps: int = FIT_STEPS, delta: float = HUBER_DELTA,
    draws: int = DRAWS_PER_LOG_C,
) -> tuple[OlmixLaw, dict]:  # fmt: skip
    """One law per column of L (N, n) on mixtures P (N, m); info: per-domain R^2 (as released: on the
    fitted points), their mean, the mean Huber losses, and the parameters."""
    P, L = np.asarray(P, dtype=np.float64), np.asarray(L, dtype=np.float64)
    rng = np.random.default_rng(seed)
    fits = [fit_domain(P, L[:, i], i, rng, steps, delta, draws) for i in range(L.shape[1])]
    law = OlmixLaw(log_c=[f[0][0] for f in fits], T=[f[0][1:] for f in fits])
    pred = law.predict(P)
    r2 = [_r2(L[:, i], pred[:, i]) for i in range(L.shape[1])]
    huber = [f[1] for f in fits]
    return law, {"r2": float(np.mean(r2)), "r2_per_domain": r2, "huber": huber, "params": law.params()}


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    ss = float(np.sum((y - y.mean()) ** 2))
    return float(1.0 - np.sum((y - yhat) ** 2) / ss) if ss > 0 else float("nan")


# -- proposers -----------------------------------------------------------------------------------------
def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats (0 log 0 = 0)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def _clean_prior(prior: np.ndarray) -> np.ndarray:
    q = np.maximum(np.asarray(prior, dtype=np.float64), 1e-12)  # as released: strictly positive
    return q / q.sum()


def _loss_terms(law: OlmixLaw, w: np.ndarray, x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Σ_i w_i exp(T_i · x), its gradient and its Hessian."""
    e = w * np.exp(law.T @ x)
    return float(e.sum()), law.T.T @ e, law.T.T @ (e[:, None] * law.T)


def _penalised(law: OlmixLaw, w: np.ndarray, q: np.ndarray, kl_reg: float, x: np.ndarray) -> float:
    return _loss_terms(law, w, x)[0] + kl_reg * kl(x, q)


def _newton_kl(law: OlmixLaw, w: np.ndarray, q: np.ndarray, kl_reg: float, max_iter: int = 200) -> np.ndarray:
    """kl_reg > 0: the optimum is interior; Newton steps on the KKT system (Hessian H + kl_reg diag(1/x),
    bordered by Σ dx = 0) with a backtracking line search that keeps x > 0."""
    m = len(q)
    x = q.copy()
    f = _penalised(law, w, q, kl_reg, x)
    for _ in range(max_iter):
        _, g, H = _loss_terms(law, w, x)
        g = g + kl_reg * (np.log(x / q) + 1.0)
        K = np.zeros((m + 1, m + 1))
        K[:m, :m] = H + kl_reg * np.diag(1.0 / x)
        K[:m, m] = K[m, :m] = 1.0
        dx = np.linalg.solve(K, np.concatenate([-g, [0.0]]))[:m]
        shrink = dx < 0
        t = min(1.0, 0.99 * float(np.min(-x[shrink] / dx[shrink]))) if shrink.any() else 1.0
        while t > 1e-16:
            x_new = x + t * dx
            f_new = _penalised(law, w, q, kl_reg, x_new)
            if f_new <= f + 1e-4 * t * float(g @ dx):
                break
            t /= 2.0
        else:
            break  # no decrease left at machine precision
        x, f = x_new / x_new.sum(), f_new
        if float(-(g @ dx)) < 1e-20:  # the Newton decrement: converged
            break
    return x


def _slsqp(law: OlmixLaw, w: np.ndarray, q: np.ndarray) -> np.ndarray:
    """kl_reg = 0: the law alone, whose optimum may lie on the simplex's boundary (an active-set solver)."""
    res = optimize.minimize(
        lambda x: _loss_terms(law, w, x)[0], q, jac=lambda x: _loss_terms(law, w, x)[1], method="SLSQP",
        bounds=[(0.0, 1.0)] * len(q), constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )  # fmt: skip
    x = np.clip(res.x, 0.0, None)
    return x / x.sum()


def propose_exact(
    law: OlmixLaw, prior: np.ndarray, kl_reg: float = KL_REG, weights: np.ndarray | None = None
) -> np.ndarray:
    """The released exact proposer: argmin over the simplex of Σ_i w_i exp(T_i · p) + kl_reg · KL(p || prior)
    (w_i = 1/n by default). Convex, so any exact solver gives the released (cvxpy/ECOS) optimum."""
    n = law.T.shape[0]
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64)
    q = _clean_prior(prior)
    return _newton_kl(law, w, q, float(kl_reg)) if kl_reg > 0 else _slsqp(law, w, q)


def propose_kl_bounded(
    law: OlmixLaw, prior: np.ndarray, bound: float, weights: np.ndarray | None = None, iters: int = 60
) -> np.ndarray:
    """argmin of Σ_i w_i exp(T_i · p) subject to KL(p || prior) <= bound: the penalised solution at the
    smallest kl_reg whose KL meets the bound (KL of the penalised solution falls as kl_reg grows)."""
    p = propose_exact(law, prior, kl_reg=0.0, weights=weights)
    if kl(p, _clean_prior(prior)) <= bound:
        return p
    lo, hi = -12.0, 12.0  # log10 kl_reg; at 1e12 the solution is the prior to ~1e-12
    best = propose_exact(law, prior, kl_reg=10.0**hi, weights=weights)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        p = propose_exact(law, prior, kl_reg=10.0**mid, weights=weights)
        if kl(p, _clean_prior(prior)) <= bound:
            hi, best = mid, p
        else:
            lo = mid
    return best


def propose_simulation(
    law: OlmixLaw, prior: np.ndarray, rng: np.random.Generator, iterations: int = 10,
    num_samples: int = 100_000, temperature: float | None = None,
) -> np.ndarray:  # fmt: skip
    """The released SimulationProposer: each round draws Dirichlet(alpha * search_prior) mixtures with
    log alpha ~ U(log 1, log 100) + log(2 (round + 1)), averages the draws within 1e-3 of the best
    predicted mean loss, zeroes weights below 1e-5, and moves the search prior halfway to that mix."""
    search = _clean_prior(prior)
    if temperature is not None:
        search = search**temperature / np.sum(search**temperature)
    best = search
    for step in range(iterations):
        offset = np.log(2.0 * (step + 1))
        alphas = np.exp(rng.uniform(np.log(1.0) + offset, np.log(100.0) + offset, size=num_samples))
        draws = rng.gamma(alphas[:, None] * search)
        sims = draws / np.maximum(draws.sum(axis=1, keepdims=True), 1e-300)
        objs = law.predict(sims).mean(axis=1)
        best = sims[objs - objs.min() < 1e-3].mean(axis=0)
        best[best < 1e-5] = 0.0
        best = best / best.sum()
        search = (best + search) / 2.0
    return best


def propose_search(points: np.ndarray, losses: np.ndarray) -> tuple[int, np.ndarray]:
    """The released SearchProposer on observed losses: the swarm point with the lowest mean loss."""
    best = int(np.argmin(np.asarray(losses, dtype=np.float64).mean(axis=1)))
    return best, np.asarray(points[best], dtype=np.float64)


# -- mixture reuse -------------------------------------------------------------------------------------
def collapse(m: int, old_idx: list[int], old_ratios: np.ndarray) -> np.ndarray:
    """The (m, 1 + m_new) matrix E with p_full = E @ x, x = [old block total, new domains' shares]."""
    r = np.asarray(old_ratios, dtype=np.float64)
    if len(r) != len(old_idx) or np.any(r < 0) or r.sum() <= 0:
        raise ValueError(f"old_ratios must be {len(old_idx)} non-negative numbers, got {r.tolist()}")
    new_idx = [j for j in range(m) if j not in set(old_idx)]
    E = np.zeros((m, 1 + len(new_idx)))
    E[old_idx, 0] = r / r.sum()
    E[new_idx, np.arange(1, 1 + len(new_idx))] = 1.0
    return E


def collapse_points(P: np.ndarray, old_idx: list[int]) -> np.ndarray:
    """Swarm mixtures in collapsed coordinates [old block total, new domains...]."""
    P = np.asarray(P, dtype=np.float64)
    new_idx = [j for j in range(P.shape[1]) if j not in set(old_idx)]
    return np.column_stack([P[:, old_idx].sum(axis=1), P[:, new_idx]])


def reuse_mixture(
    law: OlmixLaw, prior: np.ndarray, old_idx: list[int], old_ratios: np.ndarray, kl_reg: float = KL_REG
) -> np.ndarray:
    """A mixture over all m domains whose old domains keep `old_ratios` (relative) exactly: the law and
    the prior are collapsed onto [old block, new domains], the exact proposer solves that, and the old
    block is expanded with its frozen ratios."""
    E = collapse(law.T.shape[1], old_idx, old_ratios)
    small = OlmixLaw(law.log_c, law.T @ E)
    x = propose_exact(small, collapse_points(np.asarray(prior)[None, :], old_idx)[0], kl_reg=kl_reg)
    return E @ x
