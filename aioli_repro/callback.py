"""MixingCallback: drives a `MixingMethod` between optimizer steps of Lightning's training loop.

After every step (and once before the first) it: hands the method the step's per-group training
losses, runs a per-group validation evaluation if the method asks for one, and pushes the method's
proportions and batch composition into the sampler for the next step. Proportions are logged
whenever they change, and the whole trajectory is kept (and checkpointed) for the run summary.

StepBoundaryCheckpoint: on SIGTERM or the SLURM requeue signal, saves `last.ckpt` at the end of the
current step (docs/reliability.md).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np

from aioli_repro.mixing.base import MixingContext, MixingMethod


class MixingCallback(L.Callback):
    def __init__(self, method: MixingMethod, extras: dict | None = None, val_every: int = 0) -> None:
        self.method = method
        self.extras = extras or {}
        self.val_every = val_every  # periodic per-group val logging (0: only at the end)
        self.trajectory: list[tuple[int, list[float]]] = []
        self.val_history: list[tuple[int, list[float]]] = []
        self._last_p: np.ndarray | None = None
        self._pending_state: dict | None = None
        self._is_setup = False
        # wall time of the method's own validation passes (Aioli's LearnParams, Skill-It) in this process:
        # the main extra cost of an online method, reported in the summary and by the benchmark
        self.method_eval_s = 0.0
        self.method_evals = 0

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        ctx = MixingContext(
            groups=list(dm.groups),
            max_steps=int(trainer.max_steps),
            batch_size=int(dm.batch_size),
            seed=int(dm.sampler.seed),
            extras=self.extras,
        )
        self.method.setup(ctx)
        pl_module.mixing_method = self.method
        self._is_setup = True
        if self._pending_state is not None:
            self._load_method_state()

    def _load_method_state(self) -> None:
        self.method.load_state_dict(self._pending_state["method"])
        self._pending_state = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed: the method state was loaded in load_state_dict. Everything _after_step does for the
        # checkpoint's step already happened before that checkpoint was written, and each part of it
        # is idempotent (needs_validation via last_validated_step, val_history and the trajectory by
        # step), so this only matters for a fresh run's step 0.
        self._after_step(trainer, pl_module, trainer.global_step)

    # -- between steps --------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        step = trainer.global_step
        finish = getattr(pl_module, "finish_step", None)
        if finish is not None:  # the module's end-of-step work, before any checkpoint of this step
            finish(step)
        if pl_module.last_stats is not None:
            self.method.on_step_end(step, pl_module.last_stats)
        self._after_step(trainer, pl_module, step)

    def _after_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if self.method.needs_validation(step):
            t0 = time.perf_counter()
            losses = pl_module.evaluate("val", max_seqs=self._method_eval_cap())  # host numpy: synced
            self.method_eval_s += time.perf_counter() - t0
            self.method_evals += 1
            self.method.on_validation(step, losses)
        periodic_val = self.val_every and step % self.val_every == 0 and step < trainer.max_steps
        if periodic_val and not (self.val_history and self.val_history[-1][0] >= step):
            losses = pl_module.evaluate("val")
            self.val_history.append((step, losses.tolist()))
            groups = trainer.datamodule.groups
            self._log(trainer, {f"val/loss/{g}": float(v) for g, v in zip(groups, losses)}, step)
        metrics = self.method.log_metrics()
        if metrics:
            self._log(trainer, metrics, step)
        if step >= trainer.max_steps:
            return
        p = np.asarray(self.method.proportions(), dtype=np.float64)
        trainer.datamodule.sampler.set_proportions(p, self.method.composition())
        if self._last_p is None or not np.array_equal(p, self._last_p):
            self._last_p = p.copy()
            self.trajectory.append((step, p.tolist()))
            groups = trainer.datamodule.groups
            self._log(trainer, {f"mix/p/{g}": float(v) for g, v in zip(groups, p)}, step)

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        # Straight to the loggers: allowed in every hook, and no per-step Lightning bookkeeping.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _method_eval_cap(self) -> int | None:
        return getattr(self.method, "eval_max_seqs", None)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "method": self.method.state_dict(),
            "trajectory": self.trajectory,
            "val_history": self.val_history,
            "last_p": None if self._last_p is None else self._last_p.tolist(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores callbacks after `setup`, so the method is loaded right away; this also
        # covers a checkpoint taken at max_steps, where fit ends without calling on_train_start.
        self._pending_state = state_dict
        if self._is_setup:
            self._load_method_state()
        self.trajectory = [(int(s), list(p)) for s, p in state_dict["trajectory"]]
        self.val_history = [(int(s), list(v)) for s, v in state_dict.get("val_history", [])]
        last = state_dict.get("last_p")
        self._last_p = None if last is None else np.asarray(last)


class RunInterrupted(SystemExit):
    """Training stopped on a signal after saving `last.ckpt`; the exit status is 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, requeue: bool = False) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.step = int(step)
        self.checkpoint = checkpoint
        self.requeue = requeue


class StepBoundaryCheckpoint(L.Callback):
    """Saves `last.ckpt` at the end of the step during which SIGTERM or the requeue signal arrived.

    Lightning turns SIGTERM into a flag and stops after the current step; this callback writes the
    checkpoint at that step's end, at the same point of the loop as the periodic ModelCheckpoint (so
    a resume from it is exactly as from a periodic one) and, unlike Lightning's own SLURM handler, never
    from inside a signal handler in the middle of a step. The requeue signal (SLURM, e.g. SIGUSR1 via
    `--signal=USR1@120`) is handled the same way, then `RunInterrupted(requeue=True)` stops the run and
    the caller requeues the job. Place it after the MixingCallback (method state must be post-step).
    """

    def __init__(self, path: Path | None, requeue_signal: int | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.requeue_signal = requeue_signal
        self.requeue_requested = False
        self._previous_handler: object = None
        self.saved_step: int | None = None

    def _on_requeue_signal(self, signum: int, frame: object) -> None:
        self.requeue_requested = True  # acted on at the end of the current step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # registered after Lightning's own handlers (it installs them just before this hook)
        if self.requeue_signal is not None and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(self.requeue_signal, self._on_requeue_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.requeue_signal, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        term = trainer.received_sigterm
        step = int(trainer.global_step)
        if not (term or self.requeue_requested) or step >= trainer.max_steps:
            return  # nothing asked, or the last step: the run finishes normally
        if self.path is not None and self.saved_step != step:
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_step = step
        if self.requeue_requested and not term:
            saved = self.path if self.saved_step == step else None
            raise RunInterrupted(self.requeue_signal, step, saved, requeue=True)
        # SIGTERM: Lightning raises SIGTERMException once this step's hooks are done
