"""Aioli's LearnParams (paper Algorithm 2): the probe mixtures and the solve for the matrix A.

Each probe j trains on a smoothed one-hot mixture q_j; β collects the validation-loss drops it
causes. Under the linear dynamic law those drops are β_i = P A_i, so A is one linear solve. The
released code normalises A before the update (`normalize_A`).
"""

from __future__ import annotations

import numpy as np


def probe_mixtures(m: int, one_hot_factor: float) -> np.ndarray:
    """Row j: the smoothed one-hot q_j (f on group j, (1−f)/(m−1) elsewhere; official `one_hot_factor`)."""
    f = float(one_hot_factor)
    Q = np.full((m, m), (1.0 - f) / (m - 1))
    np.fill_diagonal(Q, f)
    return Q


def solve_A(beta: np.ndarray, P: np.ndarray, diagonal: bool = False, one_hot: bool = False) -> np.ndarray:
    """A from the averaged loss drops β (row i = eval group, column j = probe) and the probe mixtures P.

    Under the law, probe j lowers loss i by Σ_l A_il P[j, l], i.e. β_i = P A_i, so A_i = P^{-1} β_i
    (paper Alg. 2; official `np.linalg.solve(W, G[i])`). `one_hot` (f = 1): P = I, A = β.
    `diagonal`: Aioli-Diagonal, A = diag(β_ii / P_ii) (official: G_ii / f).
    """
    beta = np.asarray(beta, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    if diagonal:
        d = np.diag(beta) if one_hot else np.diag(beta) / np.diag(P)
        return np.diag(d)
    if one_hot:
        return beta.copy()
    try:
        return np.linalg.solve(P, beta.T).T
    except np.linalg.LinAlgError:  # only a degenerate realised mixture (e.g. multinomial probes) gets here
        return np.linalg.lstsq(P, beta.T, rcond=None)[0].T


def normalize_A(A: np.ndarray) -> np.ndarray:
    """Official `--aioli_normalize_A`: shift by min(A) if negative, then divide by the sum of all entries.

    Keeps the EG step size independent of the loss scale (early losses are large). A sum of 0 (all
    entries equal after the shift) gives A = 0, i.e. no preference, where the official code divides by 0.
    """
    A = np.asarray(A, dtype=np.float64).copy()
    lo = float(A.min())
    if lo < 0:
        A -= lo
    total = float(A.sum())
    if not np.isfinite(total) or total <= 0.0:
        return np.zeros_like(A)
    return A / total
