"""Grid-search mixtures: the m = 2 grid, the Dirichlet simplex cover, and picking the best sweep point.

Grid search (GS) and DML share one sweep of static runs. The released code sweeps
    m = 2: p_1 in {0.1, ..., 0.9} (9 runs; the extremes 0 and 1 are excluded from the fits),
    m >= 3: a "cover" of the simplex: 16N Dirichlet(1) draws merged down to N points
            (`dirichlet_cover.py`; the m = 3 files are N = 9 per seed).
"""

from __future__ import annotations

import numpy as np


def grid_m2(n: int = 9) -> np.ndarray:
    """The m = 2 grid p_1 = k/(n+1), k = 1..n, as rows (p_1, 1 - p_1); n = 9 gives 0.1, ..., 0.9."""
    if n < 1:
        raise ValueError(f"grid_m2: n must be >= 1, got {n}")
    p1 = np.arange(1, n + 1, dtype=np.float64) / (n + 1)
    return np.stack([p1, 1.0 - p1], axis=1)


def dirichlet_cover(
    m: int,
    n: int,
    alpha: float | np.ndarray = 1.0,
    oversample: int = 4,
    seed: int = 0,
    legacy: bool = False,
) -> np.ndarray:
    """n points that cover the simplex Δ^m evenly (official `cover_simplex`).

    Draw n·2**oversample points from Dirichlet(alpha), then repeatedly replace the closest pair
    (Euclidean) by its midpoint, appended at the end, until n points remain. Merging pulls the
    points apart, so the cover is more even than n plain Dirichlet draws.

    The draws come from a local `np.random.default_rng(seed)`, never the global RNG. `legacy=True`
    draws from `np.random.RandomState(seed)` instead, which is the stream the official script gets
    from `np.random.seed(seed)`: with (m=3, n=9, alpha=1, oversample=4) it reproduces the released
    `dirichlet_weights/k_3_n_9_seed_<seed>.txt` files.
    """
    if m < 2 or n < 1 or oversample < 0:
        raise ValueError(f"dirichlet_cover: need m >= 2, n >= 1, oversample >= 0; got {m}, {n}, {oversample}")
    alphas = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (m,)).copy()
    n_draw = n * (1 << oversample)
    rng = np.random.RandomState(seed) if legacy else np.random.default_rng(seed)
    pts = rng.dirichlet(alphas, n_draw)
    # Keep a full distance matrix and update it per merge (O(K^2) per merge instead of a fresh
    # pdist); row-major argmin over the symmetric matrix picks the same pair (i < j) as the official.
    diff = pts[:, None, :] - pts[None, :, :]
    dist = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    np.fill_diagonal(dist, np.inf)
    while len(pts) > n:
        i, j = np.unravel_index(np.argmin(dist), dist.shape)
        mid = (pts[i] + pts[j]) / 2.0
        keep = np.ones(len(pts), dtype=bool)
        keep[[i, j]] = False
        pts = np.vstack([pts[keep], mid])
        d_new = np.sqrt(((pts[:-1] - mid) ** 2).sum(axis=1))
        dist = dist[np.ix_(keep, keep)]
        dist = np.block([[dist, d_new[:, None]], [d_new[None, :], np.full((1, 1), np.inf)]])
    return pts


def grid_points(m: int, n_runs: int = 10, seed: int = 0, alpha: float = 1.0) -> np.ndarray:
    """The sweep's static mixtures, shape (n_runs, m).

    m = 2: the evenly spaced grid `grid_m2(n_runs)` (n_runs = 9 is the released 0.1..0.9 sweep).
    m >= 3: `dirichlet_cover(m, n_runs, alpha, seed=seed)`, a different cover per seed as released.
    """
    if m == 2:
        return grid_m2(n_runs)
    return dirichlet_cover(m, n_runs, alpha=alpha, seed=seed)


def lattice_interior(m: int, n: int) -> np.ndarray:
    """Every mixture (a_1, ..., a_m) / n with positive integers a_i summing to n (C(n-1, m-1) points)."""
    if m < 1 or n < m:
        raise ValueError(f"lattice_interior: need 1 <= m <= n, got m={m}, n={n}")
    if m == 1:
        return np.ones((1, 1))
    rows = [[a, *rest] for a in range(1, n - m + 2) for rest in lattice_interior(m - 1, n - a) * (n - a)]
    return np.asarray(rows, dtype=np.float64) / n


def headroom_points(m: int) -> np.ndarray:
    """The static mixtures of the headroom grid (the same for every seed).

    m = 2: the released grid p_1 = 0.1..0.9 (so grid search reuses these runs); m = 3: the 15 interior
    points of the 1/7 lattice; m >= 4: a 20-point Dirichlet(1) cover (cover seed 0) plus the m "tilted"
    mixtures that put 1/2 on one group and share the rest, so every group's up-weighting is tried.
    """
    if m == 2:
        return grid_m2(9)
    if m == 3:
        return lattice_interior(3, 7)
    tilted = np.full((m, m), 0.5 / (m - 1))
    np.fill_diagonal(tilted, 0.5)
    return np.vstack([dirichlet_cover(m, 20, seed=0), tilted])


def softmax(x: np.ndarray) -> np.ndarray:
    """The point of the simplex proportional to exp(x) (shifted by max(x), so it cannot overflow)."""
    z = np.exp(x - np.max(x))
    return z / z.sum()


def average_perplexity(val_losses: np.ndarray) -> np.ndarray:
    """Mean over groups of exp(per-group loss): the paper's "average (test) perplexity" metric."""
    return np.exp(np.asarray(val_losses, dtype=np.float64)).mean(axis=-1)


def select_best(proportions: np.ndarray, val_losses: np.ndarray) -> tuple[int, np.ndarray]:
    """Grid search's choice: the sweep point with the lowest average validation perplexity.

    We select by the table's metric, mean_i exp(L_i), on validation losses (never test). The
    official code never selects (its only hint is `linreg`'s "lowest" printout of mean loss); the
    two criteria agree unless groups' losses differ a lot in scale.
    """
    P = np.asarray(proportions, dtype=np.float64)
    L = np.asarray(val_losses, dtype=np.float64)
    if P.ndim != 2 or L.shape != P.shape:
        raise ValueError(f"select_best: proportions {P.shape} and val_losses {L.shape} must both be (N, m)")
    ppl = average_perplexity(L)
    if not np.isfinite(ppl).any():
        raise ValueError("select_best: no sweep point has finite validation losses")
    best = int(np.nanargmin(np.where(np.isfinite(ppl), ppl, np.nan)))
    return best, P[best].copy()
