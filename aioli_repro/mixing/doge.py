"""DoGE proxy stage: reweight groups by how well their training gradient aligns with the val gradient.

In LMO terms (paper Table 1) DoGE assumes the linear dynamic law with A^t_ij = <grad L^val_i,
grad L^train_j> (here the val side is pooled over groups, so only the column sums of A^t are
estimated), and solves for the weights with EGD. The pipeline is: this proxy run (stratified
sampling, gradient = sum_i alpha_i clip(g_i)) -> a static run on the time-average of alpha.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aioli_repro import world
from aioli_repro.mixing.averaged_weights import AveragedWeightsMethod
from aioli_repro.mixing.base import Batch, MixingContext, StepContext
from aioli_repro.model import lm_token_losses

_RNG_TAG = 0xD06E  # keeps the val-sampling stream apart from the data sampler's (same run seed)


def _clip_coef(norm: torch.Tensor) -> torch.Tensor:
    # exactly `clip_grad_norm_(max_norm=1.0)`: scale by 1/(norm + 1e-6) when that is below 1
    return torch.clamp(1.0 / (norm + 1e-6), max=1.0)


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """d loss / d params as one flat fp32 vector (zeros for parameters the loss does not reach).

    Flat, so that a norm, a dot product or a weighted sum is one kernel rather than one per parameter.
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).float().reshape(-1) for g, p in zip(grads, params)]
    )


def _rows_per_group(batch: Batch, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(this rank's, the global batch's) rows per group, on the host.

    One process, with the counts the sampler attached to the batch: no device read. Otherwise one read
    of this rank's counts and, under DDP, their sum over the ranks (a single transfer).
    """
    if batch.group_counts is not None and world.size() == 1:
        counts = np.asarray(batch.group_counts).astype(np.int64)
        return counts, counts
    local = torch.bincount(batch.group_ids, minlength=m)
    both = torch.cat([local, world.all_reduce_sum(local.clone())]).cpu().numpy()
    return both[:m], both[m:]


def _group_gradients(
    model: torch.nn.Module, batch: Batch, local: np.ndarray, total: np.ndarray, params: list[torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Flat gradient of each present group's global mean loss, from a forward/backward on its rows only.

    Rows are independent, so this is the gradient the whole-batch graph would give, without backward
    passes through that graph. Under DDP each rank differentiates its rows' share of the global mean
    (zeros when it holds none of the group) and the shares are summed over the ranks.
    """
    order = torch.argsort(batch.group_ids, stable=True)  # groups become contiguous row ranges
    tokens = batch.tokens.index_select(0, order)
    start = np.concatenate([[0], np.cumsum(local)])
    out: dict[int, torch.Tensor] = {}
    for i in np.flatnonzero(total > 0):
        rows = tokens[int(start[i]) : int(start[i + 1])]
        if len(rows):
            # compiled, every group size would be a graph of its own, past Dynamo's recompile limit: the
            # group batches share one graph with a dynamic batch dimension instead
            tok = lm_token_losses(model, rows, dynamic_batch=True)
            share = tok.float().mean(dim=1).sum() / float(total[i])
            g = _flat_grad(share, params)
        else:
            g = torch.zeros(sum(p.numel() for p in params), device=tokens.device)
        out[int(i)] = world.all_reduce_sum(g)
    return out


def _weighted_sum(grads: dict[int, torch.Tensor], weights: np.ndarray) -> torch.Tensor:
    """sum_i weights[i] * grads[i], formed in the first group's buffer (no further model-sized set)."""
    (first, acc), *rest = grads.items()
    acc.mul_(float(weights[first]))
    for i, g in rest:
        acc.add_(g, alpha=float(weights[i]))
    return acc


class _WithGradient(torch.autograd.Function):
    """A scalar with the value `value` whose gradient w.r.t. `params` is `flat` (split per parameter).

    The gradient reaches the parameters through the backward Lightning runs on the returned loss, so the
    precision plugin's loss scale, the 1/k of gradient accumulation, DDP's gradient hooks and the
    clipping after backward all apply to it as to any loss.
    """

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, flat: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        ctx.metas = [(p.shape, p.dtype) for p in params]
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (flat,) = ctx.saved_tensors
        parts = (flat * grad_out).split([s.numel() for s, _ in ctx.metas])
        return (None, None, *(g.view(s).to(d) for g, (s, d) in zip(parts, ctx.metas)))


class DoGE(AveragedWeightsMethod):
    """DoGE proxy (Fan et al. 2024) as in the Aioli code's `DogeTrainer`.

    Per optimizer step: draw `val_batch_size` val sequences (own seeded generator), g_val = gradient
    of their mean token loss; for each train group i present, g_i = gradient of its mean loss. Both
    are clipped to global norm <= 1 (as the official code). score_i = lr * <g_i, g_val> /
    (mean_j ||g_j|| + 1e-6), clipped to [0, lr * score_clip] (the mean runs over all m groups, absent
    ones counting 0, as the official code); log a += score / mu; a = softmax (no smoothing). The
    returned loss has the value sum_i a_i * l_i / max(1, ||g_i||) and the gradient sum_i a_i clip(g_i)
    (norm <= 1, so the trainer's clip at 1.0 is a no-op), formed from the g_i already computed.

    Cost: the module's forward (for its logs; never backpropagated), one val forward/backward and one
    forward/backward per present group on that group's rows only, so the train rows are differentiated
    once in all. With gradient accumulation every micro-batch updates a.
    Memory: g_val and one flat gradient per present group (m + 1 model-sized fp32 sets at the peak; the
    official code kept an (m+1) x P float32 matrix on the host); the loss holds their weighted sum.

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
        rows = torch.from_numpy(np.stack([self._val[gg][ii] for gg, ii in zip(g, i)]).astype(np.int64))
        if step.device.type == "cuda":  # pinned, so the copy below does not wait for the GPU
            rows = rows.pin_memory()
        return rows.to(step.device, non_blocking=True)

    # -- the step -------------------------------------------------------------------------------
    def training_loss(self, batch: Batch, seq_loss: torch.Tensor, step: StepContext) -> torch.Tensor:
        m = self.ctx.m
        params = [p for p in step.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DoGE needs trainable parameters in the model")

        # (1) validation gradient; its graph is separate from the train graph and freed right away.
        g_val = _flat_grad(lm_token_losses(step.model, self._val_batch(step)).float().mean(), params)
        val_coef = _clip_coef(torch.linalg.vector_norm(g_val))

        # (2) group gradients (DDP: of the global batch's group means), each dotted with g_val.
        local, total = _rows_per_group(batch, m)
        grads = _group_gradients(step.model, batch, local, total, params)
        stats = []
        for g in grads.values():
            norm = torch.linalg.vector_norm(g)
            coef = _clip_coef(norm)
            stats.append(torch.stack([torch.dot(g, g_val) * coef * val_coef, norm * coef, coef]))
        del g_val

        # (3) scores and the EGD step on log alpha (one host read of the stats).
        dots, norms, coefs = np.zeros(m), np.zeros(m), np.ones(m)  # absent groups: dot and norm 0
        dots[list(grads)], norms[list(grads)], coefs[list(grads)] = (
            torch.stack(stats).double().cpu().numpy().T
        )
        self._update_weights(dots, norms, float(step.lr), seq_loss.device)

        # (4) the loss: value sum_i w_i l_i (what the module logs), gradient sum_i w_i g_i, where
        # w_i = alpha_i * clip factor of g_i. Under DDP each rank's value is its share of that (times the
        # world size, as DDP averages gradients) and every rank carries the same, already summed gradient.
        weights = self.alpha * coefs
        sums = torch.zeros(m, dtype=seq_loss.dtype, device=seq_loss.device)
        sums.index_add_(0, batch.group_ids, seq_loss.detach())
        scale = weights * world.size() / np.maximum(total, 1)
        value = torch.stack([float(scale[i]) * sums[i] for i in grads]).sum()
        return _WithGradient.apply(value, _weighted_sum(grads, weights), *params)

    def _update_weights(self, dots: np.ndarray, norms: np.ndarray, lr: float, device: torch.device) -> None:
        """Scores from the clipped dots and norms, then one EGD step on log alpha (float64 on the host)."""
        self.scores = np.clip(lr * dots / (norms.mean() + 1e-6), 0.0, lr * self.score_clip)
        # DDP: every rank computed the same scores (its g_val is from the same val batch); rank 0's are
        # used, so that a non-deterministic GPU kernel cannot make the weights drift apart
        self.scores = world.broadcast_array(self.scores, device)
        # kept in log space (log-softmax) so a weight driven towards 0 cannot underflow and stick there
        log_a = self.log_alpha + self.scores / self.mu
        top = log_a.max()
        self.log_alpha = log_a - (top + np.log(np.exp(log_a - top).sum()))
        self._record(np.exp(self.log_alpha))

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "log_alpha": self.log_alpha.tolist(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.log_alpha = np.asarray(state["log_alpha"], dtype=np.float64)
        self.rng.bit_generator.state = state["rng"]
