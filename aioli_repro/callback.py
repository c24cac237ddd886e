"""MixingCallback: drives a `MixingMethod` between optimizer steps of Lightning's training loop.

After every step (and once before the first) it: hands the method the step's per-group training
losses, runs a per-group validation evaluation if the method asks for one, and pushes the method's
proportions and batch composition into the sampler for the next step. Proportions are logged
whenever they change, and the whole trajectory is kept (and checkpointed) for the run summary.
"""

from __future__ import annotations

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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending_state is not None:  # resumed: method state restored after setup
            self.method.load_state_dict(self._pending_state["method"])
            self._pending_state = None
        self._after_step(trainer, pl_module, trainer.global_step)

    # -- between steps --------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if pl_module.last_stats is not None:
            self.method.on_step_end(step, pl_module.last_stats)
        self._after_step(trainer, pl_module, step)

    def _after_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if self.method.needs_validation(step):
            self.method.on_validation(step, pl_module.evaluate("val", max_seqs=self._method_eval_cap()))
        if self.val_every and step % self.val_every == 0 and step < trainer.max_steps:
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
        self._pending_state = state_dict
        self.trajectory = [(int(s), list(p)) for s, p in state_dict["trajectory"]]
        self.val_history = [(int(s), list(v)) for s, v in state_dict.get("val_history", [])]
        last = state_dict.get("last_p")
        self._last_p = None if last is None else np.asarray(last)
