"""The LightningModule: the decoder, its optimiser and schedule, per-group losses, evaluation.

Mixing is not in here: the `MixingCallback` attaches a `MixingMethod`, and the training step only
asks it for the loss to backpropagate (identity mean unless the method reweights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from aioli_repro.evaluation import evaluate_groups
from aioli_repro.mixing.base import Batch, MixingMethod, StepStats
from aioli_repro.model import GPTNeoX, ModelConfig, build_model, lm_token_losses


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and the groups affected."""


@dataclass
class OptimConfig:
    """AdamW + linear warm-up then cosine decay (released code: 1e-7 -> 5e-4 over 500 steps, cosine to 1e-4)."""

    lr: float = 5e-4
    min_lr: float = 1e-4
    warmup_steps: int = 500
    warmup_start_lr: float = 1e-7
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based), as the official `LinearWarmupCosineLR`."""
    w = cfg.warmup_steps
    if step < w:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / w
    if step >= max_steps:
        return cfg.min_lr
    frac = (step - w) / max(1, max_steps - w)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every weight matrix and embedding; none on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name.endswith("bias") or isinstance(module, torch.nn.LayerNorm):
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MixingLM(L.LightningModule):
    def __init__(
        self,
        model: ModelConfig,
        groups: list[str],
        max_steps: int,
        optim: OptimConfig | None = None,
        eval_batch_size: int = 16,
        log_every: int = 10,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model_config = model
        self.groups = list(groups)
        self.max_steps = max_steps
        self.optim = optim or OptimConfig()
        self.eval_batch_size = eval_batch_size
        self.log_every = log_every
        self.model: GPTNeoX = build_model(model)
        self.compile = compile
        self.mixing_method: MixingMethod | None = None  # attached by MixingCallback
        self.last_stats: StepStats | None = None
        m = len(self.groups)
        # running per-group train loss between logging points; device-resident, no per-step sync
        self.register_buffer("_log_sum", torch.zeros(m), persistent=False)
        self.register_buffer("_log_cnt", torch.zeros(m), persistent=False)
        self._eval_cache: dict[tuple, np.ndarray] = {}
        self.tokens_seen = 0

    def configure_model(self) -> None:
        if self.compile and not isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            self.model = torch.compile(self.model)

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        token_loss = lm_token_losses(self.model, batch.tokens)
        seq_loss = token_loss.float().mean(dim=1)
        method = self.mixing_method
        loss = method.training_loss(batch, seq_loss, self) if method is not None else seq_loss.mean()
        detached = seq_loss.detach()
        m = len(self.groups)
        sums = torch.zeros(m, device=detached.device).index_add_(0, batch.group_ids, detached)
        cnts = torch.zeros(m, device=detached.device).index_add_(0, batch.group_ids, torch.ones_like(detached))
        self.last_stats = StepStats(loss_sum=sums, count=cnts)
        self._log_sum += sums
        self._log_cnt += cnts
        self.tokens_seen += batch.tokens.numel()
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=len(seq_loss))
        return loss

    def on_train_batch_end(self, outputs: object, batch: Batch, batch_idx: int) -> None:
        step = self.global_step
        if step % self.log_every == 0 or step == self.max_steps:
            self._check_finite(step)
            means = (self._log_sum / self._log_cnt.clamp_min(1)).tolist()
            cnt = self._log_cnt.tolist()
            metrics = {f"train/loss/{g}": v for g, v, c in zip(self.groups, means, cnt) if c > 0}
            metrics["train/tokens"] = float(self.tokens_seen)
            metrics["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log_dict(metrics, on_step=True)
            self._log_sum.zero_()
            self._log_cnt.zero_()

    def _check_finite(self, step: int) -> None:
        # Checked at logging points, where the values are synced anyway.
        bad = [g for g, s in zip(self.groups, self._log_sum.tolist()) if not math.isfinite(s)]
        if bad:
            raise NonFiniteLossError(f"non-finite training loss by step {step} in group(s) {bad}")

    def configure_optimizers(self) -> dict:
        o = self.optim
        fused = torch.cuda.is_available() and next(self.model.parameters()).is_cuda
        opt = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, o, self.max_steps) / o.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if self.optim.grad_clip and self.optim.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, split: str, max_seqs: int | None = None, use_cache: bool = True) -> np.ndarray:
        """Per-group mean loss on val/test (ordered as self.groups); cached per (step, split, cap)."""
        dm = self.trainer.datamodule
        sequences, default_cap = dm.eval_sequences(split)
        cap = max_seqs if max_seqs is not None else default_cap
        key = (self.global_step, split, cap)
        if use_cache and key in self._eval_cache:
            return self._eval_cache[key]
        autocast = torch.bfloat16 if self.device.type == "cuda" else None
        losses = evaluate_groups(self.model, sequences, self.eval_batch_size, self.device, cap, autocast)
        self._eval_cache = {k: v for k, v in self._eval_cache.items() if k[0] == self.global_step}
        self._eval_cache[key] = losses
        return losses
