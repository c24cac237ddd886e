"""DoGE proxy stage: reweight groups by how well their training gradient aligns with the val gradient.

In LMO terms (paper Table 1) DoGE assumes the linear dynamic law with A^t_ij = <grad L^val_i,
grad L^train_j> (here the val side is pooled over groups, so only the column sums of A^t are
estimated), and solves for the weights with EGD. The pipeline is: this proxy run (stratified
sampling, gradient = sum_i alpha_i clip(g_i)) -> a static run on the time-average of alpha.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from aioli_repro import world
from aioli_repro.mixing.averaged_weights import AveragedWeightsMethod
from aioli_repro.mixing.base import Batch, MixingContext, StepContext
from aioli_repro.model import lm_token_losses

_RNG_TAG = 0xD06E  # keeps the val-sampling stream apart from the data sampler's (same run seed)


def _grad_norm(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Global L2 norm over a gradient tuple, as `clip_grad_norm_` computes it."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _dot(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.stack([torch.sum(x.float() * y.float()) for x, y in zip(a, b)]).sum()


def _clip_coef(norm: torch.Tensor) -> torch.Tensor:
    # exactly `clip_grad_norm_(max_norm=1.0)`: scale by 1/(norm + 1e-6) when that is below 1
    return torch.clamp(1.0 / (norm + 1e-6), max=1.0)


def _group_loss_and_grad(
    seq_loss: torch.Tensor,
    mask: torch.Tensor,
    count: torch.Tensor,
    grads_of: Callable[[torch.Tensor, bool], tuple[torch.Tensor, ...]],
    params: list[torch.Tensor],
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A group's mean training loss (the term to backpropagate) and the gradient of its global mean.

    On one process: the batch mean and its gradient. Under DDP each rank holds a slice of the batch: its
    term is its share of the global mean (times the world size, as DDP averages the final gradients),
    and the gradient is the sum over ranks of the shares' gradients, i.e. that of the global mean.
    """
    if world.size() == 1:
        loss = seq_loss[mask].mean()
        return loss, grads_of(loss, True)
    share = seq_loss[mask].sum() / count.to(seq_loss.dtype)
    grads = grads_of(share, True) if bool(mask.any()) else tuple(torch.zeros_like(p) for p in params)
    flat = world.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    summed = tuple(f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads))
    return share * world.size(), summed


class DoGE(AveragedWeightsMethod):
    """DoGE proxy (Fan et al. 2024) as in the Aioli code's `DogeTrainer`.

    Per optimizer step: draw `val_batch_size` val sequences (own seeded generator), g_val = gradient
    of their mean token loss; for each train group i present, g_i = gradient of its mean loss. Both
    are clipped to global norm <= 1 (as the official code). score_i = lr * <g_i, g_val> /
    (mean_j ||g_j|| + 1e-6), clipped to [0, lr * score_clip] (the mean runs over all m groups, absent
    ones counting 0, as the official code); log a += score / mu; a = softmax (no smoothing). The
    returned loss is sum_i a_i * l_i / max(1, ||g_i||) with detached scale factors, so its backward
    is exactly sum_i a_i clip(g_i) (norm <= 1, so the trainer's clip at 1.0 is a no-op).

    Memory: only g_val and one g_i are alive at a time (two model-sized gradient buffers whatever m
    is); the official code kept an (m+1) x P float32 matrix on the host (5 GB at m=7).
    Cost: one val forward/backward, m backward passes through the retained train graph and the final
    backward of the returned loss. With gradient accumulation every micro-batch updates a.

    Uses of the step context: `step.model` (parameters with requires_grad), `step.device`, `step.lr`
    and `step.val_sequences()`.
    """

    name = "doge"

    def __init__(
        self,
        mu: float = 0.01,
        val_batch_size: int = 2,
        val_sampling: str = "pooled",
        score_clip: float = 5.0,
        log_every: int = 10,
    ) -> None:
        if val_sampling not in ("pooled", "per_group"):
            raise ValueError(
                f"method.mixer.val_sampling: unknown value {val_sampling!r}; allowed: ['pooled', 'per_group']"
            )
        if not mu > 0:
            raise ValueError(f"method.mixer.mu: must be > 0, got {mu!r}")
        if int(val_batch_size) < 1:
            raise ValueError(f"method.mixer.val_batch_size: must be >= 1, got {val_batch_size!r}")
        self.mu = float(mu)
        self.val_batch_size = int(val_batch_size)
        self.val_sampling = val_sampling
        self.score_clip = float(score_clip)
        self.log_every = int(log_every)

    def setup(self, ctx: MixingContext) -> None:
        super().setup(ctx)
        self.log_alpha = np.full(ctx.m, -np.log(ctx.m))
        self.rng = np.random.default_rng([int(ctx.seed), _RNG_TAG])
        self._val: list[np.ndarray] | None = None

    # -- validation batch -----------------------------------------------------------------------
    def _val_batch(self, step: StepContext) -> torch.Tensor:
        if self._val is None:
            # The whole val split (the datamodule's cap only bounds evaluation cost), as the official code.
            self._val = list(step.val_sequences())
        sizes = np.array([len(v) for v in self._val])
        if self.val_sampling == "pooled":  # uniform over all val sequences: groups weighted by val-set size
            flat = self.rng.integers(0, sizes.sum(), size=self.val_batch_size)
            g = np.searchsorted(np.cumsum(sizes), flat, side="right")
            i = flat - np.concatenate([[0], np.cumsum(sizes)[:-1]])[g]
        else:  # uniform over groups, then over that group's sequences
            g = self.rng.integers(0, len(sizes), size=self.val_batch_size)
            i = self.rng.integers(0, sizes[g])
        rows = np.stack([self._val[gg][ii] for gg, ii in zip(g, i)]).astype(np.int64)
        return torch.from_numpy(rows).to(step.device)

    # -- the step -------------------------------------------------------------------------------
    def training_loss(self, batch: Batch, seq_loss: torch.Tensor, step: StepContext) -> torch.Tensor:
        m = self.ctx.m
        params = [p for p in step.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DoGE needs trainable parameters in the model")

        def grads_of(loss: torch.Tensor, retain: bool) -> tuple[torch.Tensor, ...]:
            gs = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
            return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(gs, params))

        # (1) validation gradient; its graph is separate from the train graph and freed right away.
        val_loss = lm_token_losses(step.model, self._val_batch(step)).float().mean()
        g_val = grads_of(val_loss, retain=False)
        val_coef = _clip_coef(_grad_norm(g_val))

        # (2) one group gradient at a time (buffer 2), dotted with g_val and dropped.
        gids = batch.group_ids.to(seq_loss.device)
        counts = world.all_reduce_sum(torch.bincount(gids, minlength=m))  # DDP: the global batch's
        present = counts.cpu().numpy() > 0
        group_losses: dict[int, torch.Tensor] = {}
        dots = torch.zeros(m, device=seq_loss.device)
        norms = torch.zeros(m, device=seq_loss.device)  # clipped norms; absent groups stay 0
        coefs = torch.ones(m, device=seq_loss.device)
        for i in np.flatnonzero(present):
            loss_i, g_i = _group_loss_and_grad(seq_loss, gids == int(i), counts[i], grads_of, params)
            norm_i = _grad_norm(g_i)
            coefs[i] = _clip_coef(norm_i)
            norms[i] = norm_i * coefs[i]
            dots[i] = _dot(g_i, g_val) * coefs[i] * val_coef
            group_losses[int(i)] = loss_i
            del g_i
        del g_val

        # (3) scores and the EGD step on log alpha (one host sync).
        lr = float(step.lr)
        dots_np, norms_np = dots.detach().double().cpu().numpy(), norms.detach().double().cpu().numpy()
        self.scores = np.clip(lr * dots_np / (norms_np.mean() + 1e-6), 0.0, lr * self.score_clip)
        # DDP: every rank computed the same scores (its g_val is from the same val batch); rank 0's are
        # used, so that a non-deterministic GPU kernel cannot make the weights drift apart
        self.scores = world.broadcast_array(self.scores, seq_loss.device)
        # kept in log space (log-softmax) so a weight driven towards 0 cannot underflow and stick there
        log_a = self.log_alpha + self.scores / self.mu
        top = log_a.max()
        self.log_alpha = log_a - (top + np.log(np.exp(log_a - top).sum()))
        self._record(np.exp(self.log_alpha))

        # (4) a loss whose gradient is sum_i alpha_i clip(g_i): detached clip factors per group.
        weights = torch.as_tensor(self.alpha, dtype=seq_loss.dtype, device=seq_loss.device) * coefs.detach()
        return torch.stack([weights[i] * loss_i for i, loss_i in group_losses.items()]).sum()

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "log_alpha": self.log_alpha.tolist(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.log_alpha = np.asarray(state["log_alpha"], dtype=np.float64)
        self.rng.bit_generator.state = state["rng"]
