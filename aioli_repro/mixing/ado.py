"""ADO, Adaptive Data Optimization (Jiang et al., ICLR 2025; released code yidingjiang/ado).

LMO view: ADO assumes a separate power law per group in the amount of data seen,
L_i(n) = e^{E_i} + e^{A_i} n^{-α_i} (no cross-group terms: a diagonal law), fits it online to the group's
smoothed training loss, and samples each group in proportion to its forecast rate of loss reduction
-dL_i/dn = α_i (L_i(n) - e^{E_i}) / n, times a prior and a credit term (the group's recent share of the
batches, to the power s), with a minimum probability and a running-average smoothing:

    dist = clip_min(normalise(rate · prior · credit^s), min_prob)
    p    = (1 - w) p_avg + w dist,   p_avg <- running mean of dist since step 0 (started at the prior)

Schedule, in the released loop's index itr = step - 1 (the step just taken): every step records the
per-group mean training loss (on the device) and the batch composition (host counts, for the credit EMA);
at itr >= start_step with itr % fit_every == 0 the laws are refitted on the Savitzky-Golay-smoothed loss
history, rows warmup_steps, warmup_steps + fit_stride, ...; once fitted, p is recomputed after every step.
Until then p is the prior. n counts training sequences: of the whole run for every group (`n_from="total"`,
the released default, `use_same_step_size=True`) or of the group itself (`"domain"`, the paper's n_i).

The fit (released `fit_scaling_law`): for every group, L-BFGS (200 iterations, tol 1e-5, history 10) from
a grid of 8 x 8 x 8 starts (A, E, α), minimising the Huber loss (δ = 1e-3) between log L and the log of
the law plus hinge penalties (A <= 6.5, E >= 0.5, 0 <= α <= 0.8); the start with the lowest final value
wins, and a fit with a NaN or inf keeps the previous laws. All groups and starts run as one batch.

Differences from the released code: the L-BFGS line search is Armijo backtracking (jaxopt: zoom), and a
start whose line search fails stops there; the smoothing window shrinks to the rows available (the
released runs always had more than 101); the prior is uniform unless given (`prior`), where the
released loader used the token distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from aioli_repro import world
from aioli_repro.config import ConfigError
from aioli_repro.mixing.base import MixingContext, MixingMethod, StepStats

# released starting grid (a, e, alpha): 8 x 8 x 8 points, a outermost
GRID_A = np.arange(-2.0, 6.0, 1.0)
GRID_E = np.arange(-2.0, 2.0, 0.5)
GRID_ALPHA = np.arange(8) * 0.1
HUBER_DELTA = 1e-3
A_MAX, E_MIN, ALPHA_MAX, ALPHA_MIN = 6.5, 0.5, 0.8, 1e-3  # hinge penalties of the released loss
LBFGS_MAXITER, LBFGS_TOL, LBFGS_HISTORY = 200, 1e-5, 10
N_FROM = ("total", "domain")


# -- the law and its fit ---------------------------------------------------------------------------
def power_law(params: np.ndarray, n: np.ndarray) -> np.ndarray:
    """L(n) = e^E + e^A n^-α for params (..., 3) = (A, E, α), broadcast against n."""
    a, e, alpha = np.moveaxis(np.asarray(params, dtype=np.float64), -1, 0)
    return np.exp(e) + np.exp(a) * np.asarray(n, dtype=np.float64) ** -alpha


def fit_objective(
    theta: np.ndarray, log_n: np.ndarray, log_loss: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Released fitting loss and its gradient, per problem: theta (P, 3), log_n and log_loss (P, T).

    Huber(log L, log(e^{A - α log n} + e^E)) summed over the points, plus the hinge penalties."""
    z = (theta[:, 0:1] - theta[:, 1:2]) - theta[:, 2:3] * log_n  # log(power-law term / e^E)
    t = np.exp(-np.abs(z))
    r = (log_loss - theta[:, 1:2]) - (np.maximum(z, 0.0) + np.log1p(t))  # pred = E + softplus(z)
    c = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # d huber / d r
    f = (c * (r - 0.5 * c)).sum(axis=1)  # huber(r) = c r - c^2 / 2
    w_power = np.where(z >= 0, 1.0, t) / (1.0 + t)  # sigmoid(z) = d pred / d A
    cw = c * w_power
    g_a = cw.sum(axis=1)
    g = np.stack([-g_a, g_a - c.sum(axis=1), (cw * log_n).sum(axis=1)], axis=1)
    a, e, alpha = theta[:, 0], theta[:, 1], theta[:, 2]
    f = f + np.maximum(alpha - ALPHA_MAX, 0) - np.minimum(alpha, ALPHA_MIN)
    f = f + np.maximum(a - A_MAX, 0) - np.minimum(e - E_MIN, 0)
    g[:, 0] += a > A_MAX
    g[:, 1] -= e < E_MIN
    g[:, 2] += (alpha > ALPHA_MAX).astype(np.float64) - (alpha < ALPHA_MIN)
    return f, g


def _two_loop(g: np.ndarray, S: np.ndarray, Y: np.ndarray, rho: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """L-BFGS direction -H g per problem; history (P, H, 3), newest last; rho = 0 marks an unused pair."""
    q = g.copy()
    coef = np.zeros(rho.shape)
    for i in range(rho.shape[1] - 1, -1, -1):
        coef[:, i] = rho[:, i] * np.einsum("pk,pk->p", S[:, i], q)
        q -= coef[:, i, None] * Y[:, i]
    r = gamma[:, None] * q
    for i in range(rho.shape[1]):
        b = rho[:, i] * np.einsum("pk,pk->p", Y[:, i], r)
        r += S[:, i] * (coef[:, i] - b)[:, None]
    return -r


def _line_search(
    fun: Callable, x: np.ndarray, f: np.ndarray, d: np.ndarray, slope: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Armijo backtracking from step 1, halving up to 30 times, for every problem in idx at once.

    Returns (ok, step, f_new, g_new); problems without a decrease have ok False."""
    step = np.ones(len(idx))
    ok = np.zeros(len(idx), dtype=bool)
    f_new, g_new = np.full(len(idx), np.nan), np.zeros((len(idx), x.shape[1]))
    todo = np.arange(len(idx))
    for _ in range(30):
        ft, gt = fun(x[todo] + step[todo, None] * d[todo], idx[todo])
        good = np.isfinite(ft) & (ft <= f[todo] + 1e-4 * step[todo] * slope[todo])
        good &= np.isfinite(gt).all(axis=1)
        done = todo[good]
        ok[done], f_new[done], g_new[done] = True, ft[good], gt[good]
        todo = todo[~good]
        if len(todo) == 0:
            break
        step[todo] *= 0.5
    return ok, step, f_new, g_new


def batched_lbfgs(
    fun: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    x0: np.ndarray,
    maxiter: int = LBFGS_MAXITER,
    tol: float = LBFGS_TOL,
    history: int = LBFGS_HISTORY,
) -> tuple[np.ndarray, np.ndarray]:
    """Independent L-BFGS runs for P problems at once (as the released code vmaps jaxopt's LBFGS).

    `fun(x, idx)` returns values (len(idx),) and gradients (len(idx), d) of problems idx at x. A problem
    stops when its gradient norm is <= tol, its line search fails, or after maxiter iterations.
    Returns the final points (P, d) and values (P,)."""
    x = np.array(x0, dtype=np.float64)
    P, dim = x.shape
    f, g = fun(x, np.arange(P))
    S, Y = np.zeros((P, history, dim)), np.zeros((P, history, dim))
    rho, gamma = np.zeros((P, history)), np.ones(P)
    active = np.isfinite(f) & (np.linalg.norm(g, axis=1) > tol)
    for _ in range(maxiter):
        idx = np.flatnonzero(active)
        if len(idx) == 0:
            break
        d = _two_loop(g[idx], S[idx], Y[idx], rho[idx], gamma[idx])
        slope = np.einsum("pk,pk->p", g[idx], d)
        uphill = ~(slope < 0)  # not a descent direction: restart from steepest descent
        d[uphill] = -g[idx][uphill]
        slope[uphill] = -np.einsum("pk,pk->p", g[idx][uphill], g[idx][uphill])
        ok, step, f_new, g_new = _line_search(fun, x[idx], f[idx], d, slope, idx)
        active[idx[~ok]] = False
        idx, s = idx[ok], step[ok, None] * d[ok]
        y = g_new[ok] - g[idx]
        sy = np.einsum("pk,pk->p", s, y)
        curved = sy > 1e-10
        S[idx], Y[idx], rho[idx] = np.roll(S[idx], -1, 1), np.roll(Y[idx], -1, 1), np.roll(rho[idx], -1, 1)
        S[idx, -1], Y[idx, -1] = s, y
        rho[idx, -1] = np.where(curved, 1.0 / np.where(curved, sy, 1.0), 0.0)
        gamma[idx] = np.where(curved, sy / np.maximum(np.einsum("pk,pk->p", y, y), 1e-300), gamma[idx])
        x[idx], f[idx], g[idx] = x[idx] + s, f_new[ok], g_new[ok]
        active[idx] &= np.linalg.norm(g[idx], axis=1) > tol
    return x, f


def fit_power_laws(n: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit L_k(n) = e^E + e^A n^-α to each row k of loss (K, T) at n (T,) or (K, T).

    Returns params (K, 3) = (A, E, α) and the fitting loss (K,); a group with no finite fit gets NaNs."""
    loss = np.atleast_2d(np.asarray(loss, dtype=np.float64))
    K, T = loss.shape
    log_n = np.broadcast_to(np.log(np.asarray(n, dtype=np.float64)), (K, T))
    grid = np.stack(np.meshgrid(GRID_A, GRID_E, GRID_ALPHA, indexing="ij"), axis=-1).reshape(-1, 3)
    G = len(grid)
    group = np.repeat(np.arange(K), G)  # problem -> group

    log_loss = np.log(loss)

    def fun(x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return fit_objective(x, log_n[group[idx]], log_loss[group[idx]])

    x, f = batched_lbfgs(fun, np.tile(grid, (K, 1)))
    x, f = x.reshape(K, G, 3), np.where(np.isfinite(f), f, np.nan).reshape(K, G)
    params, values = np.full((K, 3), np.nan), np.full(K, np.nan)
    for k in range(K):
        if np.isfinite(f[k]).any():
            best = int(np.nanargmin(f[k]))
            params[k], values[k] = x[k, best], f[k, best]
    return params, values


def savgol_smooth(y: np.ndarray, window: int, order: int) -> np.ndarray:
    """Savitzky-Golay filter along the last axis (scipy's mode="interp"): a least-squares polynomial of
    degree `order` over each `window` points, evaluated at its centre; the first and last window/2 points
    take the polynomial fitted to the first / last `window` points. The window shrinks to the largest odd
    length that fits; with no room for a polynomial (window <= order) y is returned unchanged."""
    y = np.asarray(y, dtype=np.float64)
    T = y.shape[-1]
    window = min(int(window), T if T % 2 else T - 1)
    if window <= order:
        return y.copy()
    h = window // 2
    offsets = np.arange(window, dtype=np.float64)
    fit = np.linalg.pinv(np.vander(offsets - h, order + 1, increasing=True))  # (order+1, window)
    out = np.empty_like(y)
    windows = np.lib.stride_tricks.sliding_window_view(y, window, axis=-1)
    out[..., h : T - h] = windows @ fit[0]
    edge = np.vander(offsets, order + 1, increasing=True) @ np.linalg.pinv(
        np.vander(offsets, order + 1, increasing=True)
    )  # (window, window): values of the polynomial fitted to a window, at its points
    out[..., :h] = (y[..., :window] @ edge.T)[..., :h]
    out[..., T - h :] = (y[..., T - window :] @ edge.T)[..., window - h :]
    return out


# -- the policy ------------------------------------------------------------------------------------
def clip_min_probability(p: np.ndarray, min_prob: float) -> np.ndarray:
    """Released `clip_min_probability`: rescale for the total deficit, raise to min_prob, renormalise."""
    p = np.asarray(p, dtype=np.float64)
    deficit = max(min_prob * len(p) - p.sum(), 0.0)
    clipped = np.maximum(p * (1.0 - deficit) / p.sum(), min_prob)
    return clipped / clipped.sum()


def ado_distribution(
    params: np.ndarray,
    n_seen: np.ndarray,
    prior: np.ndarray,
    credit: np.ndarray,
    credit_power: float = 0.5,
    min_exponent: float = 0.05,
    min_prob: float = 0.01,
) -> np.ndarray:
    """Released `curr_dist` before smoothing: the forecast rate of loss reduction of each group,
    α_i (L_i(n_i) - e^{E_i}) / n_i with α floored at min_exponent (L itself uses the fitted α),
    times prior_i · credit_i^s, normalised and clipped at min_prob."""
    params = np.asarray(params, dtype=np.float64)
    n = np.asarray(n_seen, dtype=np.float64)
    reducible = power_law(params, n) - np.exp(params[:, 1])
    rate = np.maximum(params[:, 2], min_exponent) * reducible / n
    w = rate * np.asarray(prior, dtype=np.float64) * np.asarray(credit, dtype=np.float64) ** credit_power
    return clip_min_probability(w / w.sum(), min_prob)


def _step_option(name: str, v: object, minimum: int) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"method.mixer.{name}: must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _unit_option(name: str, v: object, low: float, high: float, low_open: bool, high_open: bool) -> float:
    ok = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and np.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"method.mixer.{name}: must be a number in {span}, got {v!r}")
    return float(v)


class ADO(MixingMethod):
    """ADO as released (`AdoSelector` + `AdaptiveLoader`), driven by the harness's per-step train losses.

    Observations stay on the device: each step's per-group loss sums are copied into a (max_steps, m)
    device buffer, read back once per fit; the batch composition comes from the sampler's host counts.
    Options (method.mixer.*), released values for the 60k-step 124M/1B runs in brackets:
    warmup_steps (1000): leading steps left out of the fit; start_step (500): first step that may fit and
    move p; fit_every (1000): refit interval; savgol_window (101), savgol_order (3), fit_stride (10):
    smoothing of the loss history and the stride of the fitted points; credit_decay (0.9, γ1): EMA of the
    batch composition (p_history); credit_power (0.5, s); instant_weight (0.1): weight of the new
    distribution in p; min_prob (0.01); min_exponent (0.05): floor on α in the rate; prior: null
    (uniform), a list or {group: weight}, or "natural" for ctx.extras["token_prior"] (the released default,
    the training-token distribution); n_from: "total" (released) or "domain".
    """

    name = "ado"

    def __init__(
        self,
        warmup_steps: int = 1000,
        start_step: int = 500,
        fit_every: int = 1000,
        savgol_window: int = 101,
        savgol_order: int = 3,
        fit_stride: int = 10,
        credit_decay: float = 0.9,
        credit_power: float = 0.5,
        instant_weight: float = 0.1,
        min_prob: float = 0.01,
        min_exponent: float = 0.05,
        prior: Sequence[float] | Mapping[str, float] | str | None = None,
        n_from: str = "total",
    ) -> None:
        self.warmup_steps = _step_option("warmup_steps", warmup_steps, 0)
        self.start_step = _step_option("start_step", start_step, 0)
        self.fit_every = _step_option("fit_every", fit_every, 1)
        self.savgol_window = _step_option("savgol_window", savgol_window, 1)
        self.savgol_order = _step_option("savgol_order", savgol_order, 0)
        self.fit_stride = _step_option("fit_stride", fit_stride, 1)
        if self.savgol_window % 2 == 0:
            raise ConfigError(f"method.mixer.savgol_window: must be odd, got {savgol_window!r}")
        self.credit_decay = _unit_option("credit_decay", credit_decay, 0.0, 1.0, False, True)
        self.credit_power = _unit_option("credit_power", credit_power, 0.0, np.inf, False, True)
        self.instant_weight = _unit_option("instant_weight", instant_weight, 0.0, 1.0, True, False)
        self.min_prob = _unit_option("min_prob", min_prob, 0.0, 1.0, False, True)
        self.min_exponent = _unit_option("min_exponent", min_exponent, 0.0, np.inf, False, True)
        if n_from not in N_FROM:
            raise ConfigError(f"method.mixer.n_from: unknown value {n_from!r}; allowed: {list(N_FROM)}")
        self.n_from = n_from
        self.prior_option = prior
        self._metrics: dict[str, float] = {}

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, ctx: MixingContext) -> None:
        super().setup(ctx)
        m = ctx.m
        if self.min_prob * m >= 1.0:
            raise ConfigError(f"method.mixer.min_prob: must be < 1/m = {1.0 / m:.4g}, got {self.min_prob!r}")
        self.prior = self._resolve_prior(ctx)
        self._p = self.prior.copy()  # released: the prior until the first fit
        self._p_avg = self.prior.copy()
        self._credit = self.prior.copy()  # p_history
        self._params: np.ndarray | None = None
        self._loss = torch.zeros(ctx.max_steps, m)  # per-step loss sums; moves to the training device
        self._count = np.zeros((ctx.max_steps, m), dtype=np.int64)
        self._seen = np.zeros(m, dtype=np.int64)
        self._rows = 0
        self.n_fits = 0

    def _resolve_prior(self, ctx: MixingContext) -> np.ndarray:
        v = self.prior_option
        if isinstance(v, str):
            if v != "natural":
                raise ConfigError(f"method.mixer.prior: unknown value {v!r}; allowed: null, natural, a list")
            if "token_prior" not in ctx.extras:
                raise ConfigError(
                    "method.mixer.prior: 'natural' needs extras['token_prior'] (pipeline.token_counts."
                    "token_prior); set prior=null (uniform) or a list of m weights"
                )
            v = ctx.extras["token_prior"]
        if v is None:
            return np.full(ctx.m, 1.0 / ctx.m)
        if isinstance(v, Mapping):
            if sorted(v) != sorted(ctx.groups):
                raise ConfigError(f"method.mixer.prior: keys must be {ctx.groups}, got {sorted(v)}")
            v = [v[g] for g in ctx.groups]
        p = np.asarray(list(v), dtype=np.float64)
        if p.shape != (ctx.m,) or not np.all(np.isfinite(p)) or np.any(p <= 0):
            raise ConfigError(f"method.mixer.prior: must be {ctx.m} positive weights, got {list(v)!r}")
        return p / p.sum()

    # -- every step -----------------------------------------------------------------------------
    def on_step_end(self, step: int, stats: StepStats) -> None:
        itr = step - 1  # the released loop's index of the step just taken
        counts = self._host_counts(stats)
        sums = stats.loss_sum.detach()
        if self._loss.device != sums.device:
            self._loss = self._loss.to(sums.device)
        self._loss[itr].copy_(sums)  # no host read: the history is read back at fit times
        self._count[itr] = counts
        self._seen += counts
        self._rows = step
        if counts.sum() > 0:
            share = counts / counts.sum()
            self._credit = self.credit_decay * self._credit + (1.0 - self.credit_decay) * share
        if itr >= self.start_step and itr % self.fit_every == 0:
            self._refit(itr)
        if itr >= self.start_step and self._params is not None:
            self._update_p(itr)

    def _host_counts(self, stats: StepStats) -> np.ndarray:
        """This step's sequences per group: the sampler's host counts (a device read only under DDP,
        where the host counts are this rank's share)."""
        if stats.host_count is not None and world.size() == 1:
            return np.asarray(stats.host_count, dtype=np.int64)
        return np.rint(stats.counts()).astype(np.int64)

    def _update_p(self, itr: int) -> None:
        n = np.full(self.ctx.m, self._seen.sum()) if self.n_from == "total" else np.maximum(self._seen, 1)
        dist = ado_distribution(
            self._params, n, self.prior, self._credit, self.credit_power, self.min_exponent, self.min_prob
        )
        p = (1.0 - self.instant_weight) * self._p_avg + self.instant_weight * dist
        self._p = p / p.sum()
        self._p_avg = (1.0 - 1.0 / (itr + 1)) * self._p_avg + dist / (itr + 1)

    # -- fits -----------------------------------------------------------------------------------
    def fit_data(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, smoothed loss) the fit after `rows` steps uses: n (T,) or (m, T), loss (m, T)."""
        sums = self._loss[:rows].double().cpu().numpy()  # the one host read, once per fit
        counts = self._count[:rows].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        if np.isnan(means[0]).any():  # released: a group absent from the first batch gets its mean
            means[0] = np.where(np.isnan(means[0]), sums[0].sum() / max(counts[0].sum(), 1), means[0])
        last = np.maximum.accumulate(np.where(np.isnan(means), 0, np.arange(rows)[:, None]), axis=0)
        means = np.take_along_axis(means, last, axis=0)  # absent groups keep their previous value
        smooth = savgol_smooth(means.T, self.savgol_window, self.savgol_order)
        keep = slice(self.warmup_steps, rows, self.fit_stride)
        cum = np.cumsum(counts, axis=0)
        n = cum.sum(axis=1)[keep] if self.n_from == "total" else np.maximum(cum[keep].T, 1)
        return n, smooth[:, keep]

    def _refit(self, itr: int) -> None:
        n, loss = self.fit_data(itr + 1)
        if loss.shape[1] == 0:
            return
        params, values = fit_power_laws(n, loss)
        self.n_fits += 1
        if not np.all(np.isfinite(params)):  # released check_valid: keep the previous laws
            return
        self._params = params
        self._metrics = {"ado/fit_points": float(loss.shape[1])}  # no wall times: resumed logs match
        for g, (a, e, alpha), v in zip(self.ctx.groups, params, values):
            self._metrics |= {f"ado/A/{g}": a, f"ado/E/{g}": e, f"ado/alpha/{g}": alpha}
            self._metrics[f"ado/fit_loss/{g}"] = v

    # -- reporting and checkpoints --------------------------------------------------------------
    def log_metrics(self) -> dict[str, float]:
        metrics, self._metrics = self._metrics, {}
        return {k: float(v) for k, v in metrics.items()}

    def laws(self) -> np.ndarray | None:
        """The current fitted laws (m, 3) = (A, E, α) per group, or None before the first fit."""
        return None if self._params is None else self._params.copy()

    def state_dict(self) -> dict[str, Any]:
        rows = self._rows
        return {
            "p": self._p.tolist(),
            "p_avg": self._p_avg.tolist(),
            "credit": self._credit.tolist(),
            "params": None if self._params is None else self._params.tolist(),
            "loss": self._loss[:rows].cpu().clone(),
            "count": torch.from_numpy(self._count[:rows].copy()),
            "n_fits": self.n_fits,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._p = np.asarray(state["p"], dtype=np.float64)
        self._p_avg = np.asarray(state["p_avg"], dtype=np.float64)
        self._credit = np.asarray(state["credit"], dtype=np.float64)
        self._params = None if state["params"] is None else np.asarray(state["params"], dtype=np.float64)
        loss, count = state["loss"], np.asarray(state["count"], dtype=np.int64)
        rows = len(count)
        self._loss = torch.zeros(self.ctx.max_steps, self.ctx.m, dtype=loss.dtype)
        self._loss[:rows] = loss
        self._count = np.zeros((self.ctx.max_steps, self.ctx.m), dtype=np.int64)
        self._count[:rows] = count
        self._seen = count.sum(axis=0)
        self._rows = rows
        self.n_fits = int(state["n_fits"])
        self._metrics = {}
