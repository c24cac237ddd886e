"""DoReMi proxy stage: reweight per-group training losses by their excess over a reference model.

In LMO terms (paper Table 1) DoReMi assumes the linear dynamic law with a *diagonal* A^t, where
A^t_ii is the proxy's training loss on group i minus a reference model's, clipped at 0, and solves
for the weights with exponentiated-gradient descent (EGD). The pipeline is: reference = the
stratified run -> this proxy run (stratified sampling, loss reweighted by alpha) -> a static run on
the time-average of alpha (`final_proportions`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aioli_repro import world
from aioli_repro.mixing.averaged_weights import AveragedWeightsMethod
from aioli_repro.mixing.base import Batch, MixingContext, StepContext
from aioli_repro.model import build_model, lm_token_losses, load_decoder_state


class DoReMi(AveragedWeightsMethod):
    """DoReMi proxy (Xie et al. 2023) as in the Aioli code's `DoremiTrainer`, with its bugs fixed.

    Per optimizer step, for every group i present in the batch: L_i = mean per-sequence loss of the
    proxy, R_i = the same for the reference, excess e_i = max(L_i - R_i, 0) ("group" clip, as the
    Aioli code) or the mean of per-token max(l - r, 0) ("token" clip, as the DoReMi paper); absent
    groups keep their previous excess. Then log a' = log a + mu * e, a' = softmax, a = (1-c) a' + c/m,
    and the time-average of a is what the final static run uses.

    The training loss is sum_{i present} a_i * L_i (the DoReMi paper's objective: per-group mean
    losses weighted by a, not renormalised over the groups present). Sampling stays stratified
    (`reweight_by="loss"`); `reweight_by="sample"` instead samples from a and trains on the plain mean.

    Gradient accumulation: the per-group proxy/reference loss sums are accumulated over the
    `accumulate_grad_batches` micro-batches of one optimizer step and a is updated once, at the last
    micro-batch, from the whole step's excess. Every micro-batch's loss is weighted by the a in force
    when the step began (the previous step's update), so one step's gradient and update do not depend
    on how its batch is split. (The official trainer discarded the first micro-batch's losses.)

    The window sums, the update and alpha stay on the training device in float64 (the same maths as the
    former host numpy update): a steady-state step never waits for the device. The host copies of alpha,
    its average and the scores are read back only when asked for (see mixing/averaged_weights.py).

    Uses of the step context (all `training_loss` touches): `step.model` (the proxy decoder),
    `step.model_config` (to build the reference), `step.device` and `step.accumulate_grad_batches`.
    The reference checkpoint comes from the constructor or `ctx.extras["reference_checkpoint"]`;
    alternatively set `reference_model` before training.
    """

    name = "doremi"
    score_label = "excess"

    def __init__(
        self,
        mu: float = 0.01,
        smoothing: float = 1e-3,
        reference_checkpoint: str | None = None,
        clip: str = "group",
        reweight_by: str = "loss",
        log_every: int = 10,
        weight_with: str = "updated",
    ) -> None:
        if weight_with not in ("updated", "previous"):
            raise ValueError(
                f"method.mixer.weight_with: unknown value {weight_with!r}; allowed: ['updated', 'previous']"
            )
        if clip not in ("group", "token"):
            raise ValueError(f"method.mixer.clip: unknown value {clip!r}; allowed: ['group', 'token']")
        if reweight_by not in ("loss", "sample"):
            raise ValueError(
                f"method.mixer.reweight_by: unknown value {reweight_by!r}; allowed: ['loss', 'sample']"
            )
        if not mu > 0:
            raise ValueError(f"method.mixer.mu: must be > 0, got {mu!r}")
        if not 0 <= smoothing <= 1:
            raise ValueError(f"method.mixer.smoothing: must be in [0, 1], got {smoothing!r}")
        self.mu = float(mu)
        self.smoothing = float(smoothing)
        self.reference_checkpoint = reference_checkpoint
        self.clip = clip
        self.reweight_by = reweight_by
        self.log_every = int(log_every)
        # "updated" (paper, official): update alpha from this batch, then weight its loss with the new alpha.
        # "previous": weight with the alpha in force when the step began (independent of micro-batching;
        # always used under gradient accumulation, where the step's excess is known only at its end).
        self.weight_with = weight_with
        self.reference_model: torch.nn.Module | None = None
        self._ref_compiled: tuple[torch.nn.Module, torch.nn.Module] | None = None  # (reference, what runs)

    def setup(self, ctx: MixingContext) -> None:
        super().setup(ctx)
        if self.reference_checkpoint is None:
            self.reference_checkpoint = ctx.extras.get("reference_checkpoint")
        # per-group sums over the micro-batches of the current optimizer step: rows proxy loss, reference
        # loss ("group") or clipped token excess ("token"), sequence count; a device tensor once training
        self._window: np.ndarray | torch.Tensor = np.zeros((3, ctx.m))
        self._micro = 0

    def _to_device(self, device: torch.device) -> None:
        """The weights and the window as float64 on `device` (once, and again after a checkpoint load):
        the update runs there, so a step never reads a device value back."""
        self._weights_to(device)
        w = self._window
        if not (isinstance(w, torch.Tensor) and w.device == device):
            self._window = torch.as_tensor(w, dtype=torch.float64).to(device, copy=True)

    # -- reference ------------------------------------------------------------------------------
    def _reference(self, step: StepContext) -> torch.nn.Module:
        if self.reference_model is None:
            if not self.reference_checkpoint:
                raise ValueError(
                    "DoReMi needs a reference model: set method.mixer.reference_checkpoint or pass "
                    "extras['reference_checkpoint'] (the stratified run's checkpoint)"
                )
            with torch.random.fork_rng(devices=[]):  # the throw-away init must not shift the run's RNG
                ref = build_model(step.model_config)
            ref.load_state_dict(load_decoder_state(self.reference_checkpoint))
            self.reference_model = ref
        ref = self.reference_model
        proxy_param = next(step.model.parameters())
        ready = self._ref_compiled
        if ready is None or ready[0] is not ref or next(ref.parameters()).device != proxy_param.device:
            # once: same device and dtype as the proxy's parameters (mixed precision comes from the
            # surrounding autocast), frozen, and compiled when the proxy is (train.compile): its no-grad
            # forward is a third of a step
            ref.to(device=step.device, dtype=proxy_param.dtype)
            ref.eval()
            ref.requires_grad_(False)
            compiled = isinstance(step.model, torch._dynamo.eval_frame.OptimizedModule)
            self._ref_compiled = (ref, torch.compile(ref, dynamic=False) if compiled else ref)
        return self._ref_compiled[1]

    # -- the step -------------------------------------------------------------------------------
    def proportions(self) -> np.ndarray:
        return self.alpha if self.reweight_by == "sample" else self._p

    def training_loss(self, batch: Batch, seq_loss: torch.Tensor, step: StepContext) -> torch.Tensor:
        m = self.ctx.m
        gids = batch.group_ids.to(seq_loss.device)
        ref = self._reference(step)
        with torch.no_grad():  # the official code forgot this and kept the reference graph alive
            ref_tok = lm_token_losses(ref, batch.tokens).float()
            if self.clip == "group":
                excess_rows = ref_tok.mean(dim=1)  # reference per-sequence loss
            else:  # per-token excess needs the proxy's token losses: one extra no-grad forward
                proxy_tok = lm_token_losses(step.model, batch.tokens).float()
                excess_rows = (proxy_tok - ref_tok).clamp_min(0).mean(dim=1)
            rows = torch.stack([seq_loss.detach(), excess_rows, torch.ones_like(excess_rows)]).double()
            sums = torch.zeros(3, m, dtype=torch.float64, device=seq_loss.device).index_add_(1, gids, rows)
            # DDP: the global batch's sums on every rank (the official code read them back per group)
            sums = world.all_reduce_sum(sums)
        self._to_device(sums.device)
        self._window += sums

        accumulate = max(1, int(step.accumulate_grad_batches))
        self._micro += 1
        updated_first = self.weight_with == "updated" and accumulate == 1
        if updated_first:
            self._update()
        # Loss for this micro-batch, weighted by alpha (new, or as at the start of the step: see weight_with).
        counts = torch.zeros(m, device=seq_loss.device, dtype=seq_loss.dtype).index_add(
            0, gids, torch.ones_like(seq_loss)
        )
        group_sum = torch.zeros(m, device=seq_loss.device, dtype=seq_loss.dtype).index_add(0, gids, seq_loss)
        if world.size() > 1:  # this rank's share of the global group means, scaled for DDP's gradient average
            counts = world.all_reduce_sum(counts.detach().clone())
            group_sum = group_sum * world.size()
        group_mean = group_sum / counts.clamp_min(1)  # absent groups: 0, so they contribute nothing
        if self.reweight_by == "sample":
            loss = seq_loss.mean()
        else:
            loss = (self._weights["alpha"].to(seq_loss.dtype) * group_mean).sum()

        if not updated_first and self._micro >= accumulate:
            self._update()
        return loss

    def _update(self) -> None:
        """One EGD step on the step's excess, in float64 on the device: no host read (issue 24)."""
        proxy, excess_sum, count = self._window.unbind(0)
        n = count.clamp_min(1)
        if self.clip == "group":
            excess = (proxy / n - excess_sum / n).clamp_min(0.0)
        else:
            excess = excess_sum / n
        scores = torch.where(count > 0, excess, self._weights["scores"])  # absent groups keep theirs
        log_a = self._weights["alpha"].log() + self.mu * scores
        a = (log_a - log_a.max()).exp()  # softmax, shifted as mixing.simplex.softmax
        a = a / a.sum()
        self._record((1.0 - self.smoothing) * a + self.smoothing / self.ctx.m, scores)
        self._window.zero_()
        self._micro = 0

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        proxy, excess, count = self._window.tolist()  # builtins only (weights_only checkpoint loads)
        window = {"sum_proxy": proxy, "sum_excess": excess, "count": count, "micro": self._micro}
        return {**super().state_dict(), "window": window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        w = state["window"]
        self._window = np.asarray([w["sum_proxy"], w["sum_excess"], w["count"]], dtype=np.float64)
        self._micro = int(w["micro"])
