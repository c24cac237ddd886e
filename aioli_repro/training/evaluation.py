"""Per-group loss on held-out packed sequences: one batched pass across all groups.

A sequence's loss is its mean token loss (all T-1 positions are scored: packed windows have no
padding), and a group's loss is the mean over its sequences, as in the official evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aioli_repro import world
from aioli_repro.mixing.simplex import average_perplexity
from aioli_repro.model import lm_token_losses


def group_perplexities(losses: np.ndarray) -> np.ndarray:
    """exp of each group's mean loss."""
    return np.exp(np.asarray(losses, dtype=np.float64))


def avg_ppl(losses: np.ndarray) -> float:
    """The paper's "average test perplexity": mean over groups of exp(group loss)."""
    return float(average_perplexity(losses))


def ppl_of_mean_loss(losses: np.ndarray) -> float:
    """exp of the mean group loss (reported alongside; never the headline number)."""
    return float(np.exp(np.mean(np.asarray(losses, dtype=np.float64))))


@dataclass(frozen=True)
class EvalSet:
    """The held-out sequences an evaluation scores, on the device once (not copied per batch).

    tokens: (N, T) int32, the first `max_seqs` sequences of each group in group order; group_ids: (N,).
    int32 halves the int64 footprint; each batch is widened on the device."""

    tokens: torch.Tensor
    group_ids: torch.Tensor
    m: int


def eval_set(sequences: list[np.ndarray], device: torch.device, max_seqs: int | None = None) -> EvalSet:
    """`sequences[g]` is an (n_g, T) array; the first `max_seqs` of each group are kept."""
    if any(len(arr) == 0 for arr in sequences):
        raise ValueError("every group needs at least one held-out sequence")
    kept = [np.asarray(arr[: min(len(arr), max_seqs or len(arr))]) for arr in sequences]
    rows = np.concatenate(kept).astype(np.int32)
    gids = np.concatenate([np.full(len(a), g, dtype=np.int64) for g, a in enumerate(kept)])
    return EvalSet(torch.from_numpy(rows).to(device), torch.from_numpy(gids).to(device), len(sequences))


@torch.inference_mode()
def evaluate_groups(
    model: torch.nn.Module,
    data: EvalSet,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Mean loss per group over `data`.

    Sequences of all groups are batched together (no per-group passes) and summed per group on
    the device, so there is a single host sync at the end. Under DDP the batches are shared out over
    the ranks and the per-group sums reduced, so every rank returns the same losses.
    """
    device = data.tokens.device
    sums = torch.zeros(data.m, dtype=torch.float64, device=device)
    counts = torch.zeros(data.m, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    # DDP: rank r takes every size()-th chunk (the same chunks as on one device) and the sums are reduced
    starts = range(world.rank() * batch_size, len(data.group_ids), batch_size * world.size())
    try:
        for start in starts:
            tokens = data.tokens[start : start + batch_size].long()
            gids = data.group_ids[start : start + batch_size]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                seq_loss = lm_token_losses(model, tokens).float().mean(dim=1)
            sums.index_add_(0, gids, seq_loss.double())
            counts.index_add_(0, gids, torch.ones_like(seq_loss, dtype=torch.float64))
    finally:
        model.train(was_training)
    if world.size() > 1:
        sums, counts = world.all_reduce_sum(torch.stack([sums, counts])).unbind(0)
    return (sums / counts).cpu().numpy()
