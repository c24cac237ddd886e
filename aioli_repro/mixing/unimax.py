"""UniMax (Chung et al., ICLR 2023): a token budget spread uniformly over groups, each capped at N epochs.

The groups are visited from smallest to largest. Each gets the uniform share of the budget still left
(left budget / groups still unvisited), or all its tokens N times over if that is less; what a capped group
does not use passes to the larger groups. With no cap binding, the mixture is uniform over groups by tokens:
stratified. The mixing law it assumes is none: it is a token-count heuristic (UtiliMax's baseline).
"""

from __future__ import annotations

import numpy as np

from aioli_repro.config import ConfigError


def unimax_allocation(tokens: np.ndarray, budget: float, max_epochs: float) -> np.ndarray:
    """Training tokens given to each group (same order as `tokens`), summing to at most `budget` (less only
    when every group is capped: then the run would repeat data beyond `max_epochs` everywhere)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    if tokens.ndim != 1 or len(tokens) == 0 or np.any(tokens <= 0):
        raise ValueError(f"tokens: one positive count per group, got {tokens.tolist()}")
    if not budget > 0:
        raise ConfigError(f"method.pipeline budget: must be > 0 tokens, got {budget}")
    if not max_epochs > 0:
        raise ConfigError(f"method.pipeline.max_epochs: must be a number > 0, got {max_epochs}")
    alloc = np.zeros_like(tokens)
    left = float(budget)
    order = np.argsort(tokens, kind="stable")
    for i, g in enumerate(order):
        share = left / (len(order) - i)
        alloc[g] = min(share, tokens[g] * max_epochs)
        left -= alloc[g]
    return alloc


def unimax_proportions(tokens: np.ndarray, budget: float, max_epochs: float) -> np.ndarray:
    """The allocation as sampling proportions."""
    alloc = unimax_allocation(tokens, budget, max_epochs)
    return alloc / alloc.sum()
