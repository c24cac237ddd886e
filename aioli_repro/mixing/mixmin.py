"""MixMin's convex problem and its solver (Thudi et al., ICML 2025; released code Anvith-Thudi/MixMin).

A proxy model is trained on each source k alone. If the model class is large enough, training on the
mixture w of the sources gives the mixture of the per-source models, so the best w for a target is

    minimise  F(w) = - sum_n u_n log sum_k w_k exp(logp[k, n])   over the simplex,

where logp[k, n] is proxy k's log-probability of target unit n (a token, or a whole sequence as in the
released LLM code) and u_n >= 0 its weight. F is convex in w (minus the log of a linear function).

The released solver (LLM_DataMixing/mixmin_gen.py, PCBA/pcba_100k_mixmin.py) is exponentiated gradient,
i.e. entropic mirror descent, from the uniform mixture: w <- w * exp(-lr * grad F(w)) / Z with lr 1, at most
100 steps, stopping once max_k |grad_k F| < 1e-4. At an interior optimum of the simplex the gradient is
-sum(u) in every coordinate, not 0, so that test rarely fires: in practice it runs all 100 steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from aioli_repro.config import ConfigError

LR, MAX_STEPS, TOL = 1.0, 100, 1e-4  # the released defaults


@dataclass
class MixMinFit:
    """weights: the solution; objective: F there; history: F at every iterate (start included);
    iterations: EG steps taken; stopped_by_tol: the gradient test ended the loop."""

    weights: np.ndarray
    objective: float
    iterations: int
    stopped_by_tol: bool
    history: list[float] = field(default_factory=list)


def unit_weights(group_ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """u_n = 1 / (G * n_g * len_n): every group counts equally whatever its size (n_g units of group g, G
    groups), and a unit of len_n tokens is scored per token, as the released code divides a sequence's
    log-probability by its length. With token units (len 1) the weights sum to 1."""
    gids = np.asarray(group_ids)
    if gids.ndim != 1 or len(gids) == 0:
        raise ValueError(f"group_ids: a non-empty 1-d array, got shape {gids.shape}")
    _, inverse, counts = np.unique(gids, return_inverse=True, return_counts=True)
    lens = np.ones(len(gids)) if lengths is None else np.asarray(lengths, dtype=np.float64)
    if lens.shape != gids.shape or np.any(lens <= 0):
        raise ValueError(f"lengths: one positive length per unit ({len(gids)}), got shape {lens.shape}")
    return 1.0 / (len(counts) * counts[inverse] * lens)


def _log_mixture(w: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """log sum_k w_k exp(logp[k, n]) for every unit n, by log-sum-exp (a zero weight drops its proxy)."""
    with np.errstate(divide="ignore"):
        a = logp + np.log(w)[:, None]
    top = a.max(axis=0)
    with np.errstate(invalid="ignore"):  # -inf - -inf: a unit no proxy in the mixture can produce
        return top + np.log(np.exp(a - top).sum(axis=0))


def objective(w: np.ndarray, logp: np.ndarray, u: np.ndarray) -> float:
    """F(w): the target's weighted cross-entropy under the mixture w of the proxies."""
    return -float(u @ _log_mixture(w, logp))


def value_and_gradient(w: np.ndarray, logp: np.ndarray, u: np.ndarray) -> tuple[float, np.ndarray]:
    """F(w) and dF/dw_k = - sum_n u_n p_k(n) / p_w(n), the ratio taken in log space."""
    lse = _log_mixture(w, logp)
    return -float(u @ lse), -(np.exp(logp - lse[None, :]) @ u)


def eg_step(w: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
    """One exponentiated-gradient step, w * exp(-lr * grad) renormalised (in log space, so a large
    gradient cannot overflow)."""
    with np.errstate(divide="ignore"):
        z = np.log(w) - lr * grad
    z -= z.max()
    new = np.exp(z)
    return new / new.sum()


def _check(logp: np.ndarray, u: np.ndarray, lr: float, max_steps: int, tol: float) -> None:
    if logp.ndim != 2 or logp.shape[0] < 1 or logp.shape[1] < 1:
        raise ValueError(f"logp: a (proxies, units) array, got shape {logp.shape}")
    if np.isnan(logp).any() or (logp == np.inf).any():
        raise ValueError("logp: log-probabilities must be finite or -inf (no NaN, no +inf)")
    if u.shape != (logp.shape[1],) or not np.all(np.isfinite(u)) or np.any(u < 0) or u.sum() <= 0:
        raise ValueError(f"u: one finite weight >= 0 per unit ({logp.shape[1]}), not all 0")
    if np.any(np.all(logp == -np.inf, axis=0)):
        raise ValueError("logp: some target unit has probability 0 under every proxy")
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise ConfigError(f"method.pipeline.eg_lr: must be a finite number > 0, got {lr!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"method.pipeline.eg_steps: must be an integer >= 1, got {max_steps!r}")
    if not (isinstance(tol, (int, float)) and np.isfinite(tol) and tol >= 0):
        raise ConfigError(f"method.pipeline.eg_tol: must be a finite number >= 0, got {tol!r}")


def solve_mixmin(
    logp: np.ndarray,
    u: np.ndarray | None = None,
    lr: float = LR,
    max_steps: int = MAX_STEPS,
    tol: float = TOL,
) -> MixMinFit:
    """Minimise F over the simplex by exponentiated gradient from the uniform mixture (released solver).

    logp: (K, N) log-probabilities of N target units under K proxies; u: (N,) unit weights (default
    1/N). As released, the last iterate is returned, and the loop stops after the step whose gradient
    (taken before the step) had max |g| < tol."""
    logp = np.asarray(logp, dtype=np.float64)
    u = np.full(logp.shape[1], 1.0 / max(logp.shape[1], 1)) if u is None else np.asarray(u, np.float64)
    _check(logp, u, lr, max_steps, tol)
    w = np.full(logp.shape[0], 1.0 / logp.shape[0])
    value, g = value_and_gradient(w, logp, u)
    history = [value]
    stopped = False
    while len(history) <= max_steps and not stopped:
        w = eg_step(w, g, lr)
        stopped = bool(np.max(np.abs(g)) < tol)  # the gradient the step used, as released
        value, g = value_and_gradient(w, logp, u)
        history.append(value)
    return MixMinFit(w, history[-1], len(history) - 1, stopped, history)
