"""How many training tokens each group of a run holds: the token prior of RegMix, Olmix and UniMax."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from aioli_repro.training.preflight import build_data


def group_token_counts(cfg: DictConfig, split: str = "train") -> np.ndarray:
    """Tokens per group of `cfg.groups.names` in `split` that a run can train on (packed sequences x
    context length), from the packed-token cache (built on first use)."""
    _, packed = build_data(cfg)
    groups = list(cfg.groups.names)
    return np.asarray([packed.n_seq(g, split) * packed.context_length for g in groups], dtype=np.float64)


def token_prior(cfg: DictConfig) -> np.ndarray:
    """The natural mixture: each group's share of the training tokens."""
    counts = group_token_counts(cfg)
    return counts / counts.sum()
