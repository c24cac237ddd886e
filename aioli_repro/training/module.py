"""The LightningModule: the decoder, its optimiser and schedule, per-group losses, evaluation.

Mixing is not in here: the `MixingCallback` attaches a `MixingMethod`, and the training step only
asks it for the loss to backpropagate (identity mean unless the method reweights).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch

from aioli_repro import world
from aioli_repro.config import ConfigError
from aioli_repro.mixing.base import Batch, MixingMethod, StepContext, StepStats
from aioli_repro.model import GPTNeoX, ModelConfig, build_model, lm_token_losses
from aioli_repro.training.clipping import clip_gradients_
from aioli_repro.training.device_settings import DeviceSettings
from aioli_repro.training.evaluation import EvalSet, eval_set, evaluate_groups
from aioli_repro.training.loggers import JsonlLogger

_CKPT_KEY = "aioli_repro"  # our extra state in every Lightning checkpoint


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and the groups affected."""


def rng_state() -> dict:
    """Python, numpy (global) and torch RNG states, as builtins/tensors (checkpoints load weights_only)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {k: np.asarray(v).tolist() for k, v in np_state["state"].items()}
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = dict(state["numpy"])
    np_state["state"] = {
        k: (np.asarray(v, dtype=np.uint32) if k == "key" else v) for k, v in np_state["state"].items()
    }
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flat(d: object, prefix: str = "") -> dict[str, object]:
    if isinstance(d, dict):
        out: dict[str, object] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


@dataclass
class RunClock:
    """Wall and training-loop time of a run over all its processes.

    Every checkpoint carries the totals up to that point, so a resumed run adds its own time to what
    the interrupted ones spent up to their last checkpoint (work redone after a resume is counted once).
    """

    start: float = field(default_factory=time.time)  # this process (before data preparation)
    fit_start: float | None = None
    fit_end: float | None = None
    prior_wall_s: float = 0.0
    prior_fit_s: float = 0.0
    prior_processes: int = 0  # earlier processes whose time is included (0: never resumed)

    def wall_s(self) -> float:
        return self.prior_wall_s + time.time() - self.start

    def fit_s(self) -> float:
        if self.fit_start is None:
            return self.prior_fit_s
        return self.prior_fit_s + (self.fit_end or time.time()) - self.fit_start

    def state(self) -> dict:
        return {"wall_s": self.wall_s(), "fit_s": self.fit_s(), "processes": self.prior_processes + 1}

    def load(self, state: dict | None) -> None:
        if state:  # absent in checkpoints written before the clock was carried
            self.prior_wall_s = float(state["wall_s"])
            self.prior_fit_s = float(state["fit_s"])
            self.prior_processes = int(state["processes"])


@dataclass
class OptimConfig:
    """AdamW + linear warm-up then cosine decay (released code: 1e-7 -> 5e-4 over 500 steps, then cosine
    to 1e-4)."""

    lr: float = 5e-4
    min_lr: float = 1e-4
    warmup_steps: int = 500
    warmup_start_lr: float = 1e-7
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


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
        settings: DeviceSettings | None = None,
        method: MixingMethod | None = None,
    ) -> None:
        super().__init__()
        self.model_config = model
        self.groups = list(groups)
        self.max_steps = max_steps
        self.optim = optim or OptimConfig()
        self.eval_batch_size = eval_batch_size
        self.log_every = log_every
        self.model: GPTNeoX = build_model(model)
        # precision, fused AdamW, compile...: resolved once (training/device_settings.py); default plain fp32
        self.settings = settings or DeviceSettings("cpu", "32-true", False, False, False, False)
        # the method whose training_loss shapes each step (the MixingCallback drives the rest of it)
        self.mixing_method = method
        self.last_stats: StepStats | None = None
        m = len(self.groups)
        # running per-group train loss between logging points; device-resident, no per-step sync
        self.register_buffer("_log_sum", torch.zeros(m), persistent=False)
        self.register_buffer("_log_cnt", torch.zeros(m), persistent=False)
        # backprop loss summed over the logging window, and the first non-finite step (-1: none) with
        # its groups: device-resident so that a GPU step never waits on the host
        self.register_buffer("_log_loss", torch.zeros(()), persistent=False)
        self.register_buffer("_bad_step", torch.full((), -1, dtype=torch.long), persistent=False)
        self.register_buffer("_bad_groups", torch.zeros(m, dtype=torch.bool), persistent=False)
        self.register_buffer("_bad_present", torch.zeros(m, dtype=torch.bool), persistent=False)
        self._eval_cache: dict[tuple, np.ndarray] = {}
        self._eval_sets: dict[tuple, EvalSet] = {}  # held-out tokens on the device, per (split, cap)
        self.tokens_seen = 0
        self.shown_loss: float | None = None  # mean train loss of the last logging window (host)
        self._finished_step = -1  # the last step whose end-of-step bookkeeping ran (see finish_step)
        self._window_start = 0  # step at which the current logging window began
        # what determines the run's results (set by run_training); a checkpoint from another config is refused
        self.run_identity: dict | None = None
        self.last_checkpoint_step: int | None = None  # step of the last checkpoint written or loaded
        self.clock = RunClock()  # run_training replaces it with one started before data preparation

    def configure_model(self) -> None:
        if self.settings.compile and not isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            # static shapes: one graph per batch shape (training, evaluation, an eval tail, DoGE's val
            # batch), each compiled once; automatic dynamic shapes would move training onto a slower
            # dynamic-batch graph as soon as a second shape is seen
            self.model = torch.compile(self.model, dynamic=False)

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        token_loss = lm_token_losses(self.model, batch.tokens)
        seq_loss = token_loss.float().mean(dim=1)
        method = self.mixing_method
        loss = method.training_loss(batch, seq_loss, self._step_context()) if method else seq_loss.mean()
        detached = seq_loss.detach()
        m = len(self.groups)
        sums = torch.zeros(m, device=detached.device).index_add_(0, batch.group_ids, detached)
        ones = torch.ones_like(detached)
        cnts = torch.zeros(m, device=detached.device).index_add_(0, batch.group_ids, ones)
        loss_bad = ~torch.isfinite(loss.detach())
        if world.size() > 1:  # the method and the logs see the whole global batch, as on one device;
            # the loss is each rank's own: with its flag in the same reduction, all ranks stop together
            flag = loss_bad.to(sums.dtype).reshape(1)
            sums, cnts, n_bad = world.all_reduce_sum(torch.cat([sums, cnts, flag])).split([m, m, 1])
            loss_bad = n_bad[0] > 0
        self._guard_finite(loss.detach(), loss_bad, sums, cnts)
        self.last_stats = StepStats(loss_sum=sums, count=cnts, host_count=batch.group_counts)
        self._log_sum += sums
        self._log_cnt += cnts
        self._log_loss += loss.detach().float()
        self.tokens_seen += batch.tokens.numel() * world.size()
        # nothing is read back here: train metrics reach the loggers (and the progress bar) from
        # finish_step at log points, stamped with the step they belong to and written before that step's
        # checkpoint, so a resumed run logs exactly the same rows
        return loss

    def _step_context(self) -> StepContext:
        return StepContext(
            step=int(self.global_step),
            model=self.model,
            model_config=self.model_config,
            device=self.device,
            lr=float(self.trainer.optimizers[0].param_groups[0]["lr"]),
            accumulate_grad_batches=max(1, int(self.trainer.accumulate_grad_batches or 1)),
            val_sequences=lambda: self.trainer.datamodule.eval_sequences("val")[0],
        )

    def _guard_finite(
        self, loss: torch.Tensor, loss_bad: torch.Tensor, sums: torch.Tensor, cnts: torch.Tensor
    ) -> None:
        """Stop on a NaN/inf loss before it reaches the weights (CPU) or before any checkpoint (GPU).

        `loss_bad`, `sums` and `cnts` are the same on every rank (under DDP: reduced over the ranks), so
        every rank stops at the same step with the same message."""
        bad_groups = ~torch.isfinite(sums)
        bad = bad_groups.any() | loss_bad
        step = self.global_step + 1  # the step being computed (global_step counts completed steps)
        if not self.settings.sync_free:  # a host check costs nothing on a CPU: raise before backward
            if bool(bad):
                shown = loss if world.size() == 1 else None  # under DDP each rank's own loss differs
                msg = self._nonfinite_message(step, bad_groups.tolist(), cnts.tolist(), shown)
                raise NonFiniteLossError(msg)
            return
        # GPU: remember the first bad step on the device; raised at the next log point or checkpoint
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, torch.full_like(self._bad_step, step), self._bad_step)
        self._bad_groups = torch.where(first, bad_groups, self._bad_groups)
        self._bad_present = torch.where(first, cnts > 0, self._bad_present)

    def _nonfinite_message(
        self, step: int, bad_groups: list[bool], counts: list[float], loss: object, found_later: bool = False
    ) -> str:
        """`loss`: the value to show (None: none, e.g. under DDP); `found_later`: the GPU path's wording."""
        names = [g for g, b in zip(self.groups, bad_groups) if b]
        if not names:  # every group's own loss was finite: the method's combined loss was not
            names = [g for g, c in zip(self.groups, counts) if c > 0]
            where = f"in the method's training loss over group(s) {names}"
        else:
            where = f"in group(s) {names}"
        if found_later:  # GPU: found at a log point or checkpoint, after the step was taken
            return (
                f"non-finite training loss first at step {step} {where}; no checkpoint was written after it"
            )
        value = "" if loss is None else f" ({float(loss)})"
        return f"non-finite training loss{value} at step {step} {where}; stopped before the update"

    def _raise_if_nonfinite(self) -> None:
        """GPU path: one host sync, at log points and before a checkpoint is written."""
        step = int(self._bad_step)
        if step >= 0:
            present = [float(x) for x in self._bad_present.tolist()]
            msg = self._nonfinite_message(step, self._bad_groups.tolist(), present, None, found_later=True)
            raise NonFiniteLossError(msg)

    def on_train_batch_end(self, outputs: object, batch: Batch, batch_idx: int) -> None:
        self.finish_step(self.global_step)  # no-op when the MixingCallback already ran it

    def finish_step(self, step: int) -> None:
        """End-of-step bookkeeping: finite check and train-metric logging at log points.

        Lightning runs callbacks' `on_train_batch_end` (ModelCheckpoint included) before the module's,
        so the MixingCallback calls this first: a checkpoint of step k then holds the state after all
        of step k's work, and the logging window restarts exactly there on resume. Idempotent per step.
        """
        if step == self._finished_step:
            return
        self._finished_step = step
        if not (step % self.log_every == 0 or step == self.max_steps):
            return
        if self.settings.sync_free:
            self._raise_if_nonfinite()
        means = (self._log_sum / self._log_cnt.clamp_min(1)).tolist()
        cnt = self._log_cnt.tolist()
        n_steps = step - self._window_start
        metrics = {f"train/loss/{g}": v for g, v, c in zip(self.groups, means, cnt) if c > 0}
        if n_steps > 0:  # each rank's loss is over its slice: their mean is the global batch's
            window_loss = float(world.all_reduce_sum(self._log_loss.clone())) / world.size()
            metrics["train/loss"] = window_loss / n_steps
            self.shown_loss = metrics["train/loss"]  # the progress bar's, updated at log points only
        metrics["train/tokens"] = float(self.tokens_seen)
        metrics["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self._log_sum.zero_()
        self._log_cnt.zero_()
        self._log_loss.zero_()
        self._window_start = step

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.settings.sync_free:
            self._raise_if_nonfinite()  # never write a checkpoint after a non-finite step
        checkpoint[_CKPT_KEY] = {
            "tokens_seen": int(self.tokens_seen),
            "log_sum": self._log_sum.detach().cpu(),
            "log_cnt": self._log_cnt.detach().cpu(),
            "log_loss": self._log_loss.detach().cpu(),
            "window_start": self._window_start,
            "finished_step": self._finished_step,
            "rng": rng_state(),
            "metrics_offsets": self._metrics_offsets(),
            "identity": None if self.run_identity is None else json.dumps(self.run_identity, sort_keys=True),
            "clock": self.clock.state(),
        }
        self.last_checkpoint_step = int(self.global_step)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(_CKPT_KEY)
        if state is None:
            return  # e.g. a weights-only checkpoint
        self._check_identity(state.get("identity"))
        self.tokens_seen = int(state["tokens_seen"])
        self._log_sum.copy_(state["log_sum"])
        self._log_cnt.copy_(state["log_cnt"])
        self._log_loss.copy_(state["log_loss"])
        self._window_start = int(state["window_start"])
        self._finished_step = int(state["finished_step"])
        set_rng_state(state["rng"])
        self._truncate_metrics(state.get("metrics_offsets") or {})
        self.clock.load(state.get("clock"))
        self.last_checkpoint_step = int(checkpoint.get("global_step", -1))

    def _check_identity(self, saved: str | None) -> None:
        if saved is None or self.run_identity is None:
            return
        old, new = _flat(json.loads(saved)), _flat(json.loads(json.dumps(self.run_identity, sort_keys=True)))
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
        if diff:
            unset = "<unset>"
            shown = "; ".join(f"{k}: {old.get(k, unset)!r} -> {new.get(k, unset)!r}" for k in diff[:5])
            raise ConfigError(
                f"resume: the checkpoint in this run directory was written with a different config ({shown}"
                f"{'; ...' if len(diff) > 5 else ''}); use a new run directory or the original config"
            )

    def _jsonl_loggers(self) -> list[JsonlLogger]:
        if self._trainer is None:
            return []
        return [lg for lg in self.trainer.loggers if isinstance(lg, JsonlLogger)]

    def _metrics_offsets(self) -> dict[str, int]:
        return {lg.path.name: lg.offset() for lg in self._jsonl_loggers()}

    def _truncate_metrics(self, offsets: dict[str, int]) -> None:
        # Rows logged after the checkpoint by the interrupted process are logged again by this one.
        for lg in self._jsonl_loggers():
            if lg.path.name in offsets:
                lg.rewind(int(offsets[lg.path.name]))

    def configure_optimizers(self) -> dict:
        o = self.optim
        groups = param_groups(self.model, o.weight_decay)
        fused = self.settings.fused_adamw
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, o, self.max_steps) / o.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as the Trainer asks, without Lightning's precision plugin, which refuses fused optimizers
        (training/clipping.py says why); unscales first under 16-mixed's grad scaler."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        clip_gradients_(optimizer, gradient_clip_val, gradient_clip_algorithm, scaler)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, split: str, max_seqs: int | None = None, use_cache: bool = True) -> np.ndarray:
        """Per-group mean loss on val/test (ordered as self.groups); cached per (step, split, cap)."""
        dm = self.trainer.datamodule
        sequences, default_cap = dm.eval_sequences(split)
        cap = max_seqs if max_seqs is not None else default_cap
        key = (self.global_step, split, cap)
        if use_cache and key in self._eval_cache:
            return self._eval_cache[key]
        data = self._eval_sets.get((split, cap))
        if data is None or data.tokens.device != self.device:  # on the device once per split and cap
            data = self._eval_sets[(split, cap)] = eval_set(sequences, self.device, cap)
        autocast = self.settings.autocast_dtype  # evaluation runs in training's precision
        losses = evaluate_groups(self.model, data, self.eval_batch_size, autocast)
        self._eval_cache = {k: v for k, v in self._eval_cache.items() if k[0] == self.global_step}
        self._eval_cache[key] = losses
        return losses
