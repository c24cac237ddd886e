"""MixingCallback: drives a `MixingMethod` between optimizer steps of Lightning's training loop.

After every step (and once before the first) it: hands the method the step's per-group training
losses, runs a per-group validation evaluation if the method asks for one, and pushes the method's
proportions and batch composition into the sampler for the next step. Proportions are logged
whenever they change, and the whole trajectory is kept (and checkpointed) for the run summary, each
entry flagged as a probe (Aioli's LearnParams mixtures) or the mixture the method trains on. Changes
of the trained mixture are printed (`[mix] step 120: arxiv=0.47 stackexchange=0.53`, see MixAnnouncer).

RunProgressBar: the whole run's steps (also after a resume) and the trained mixture, refreshed by time.

StepBoundaryCheckpoint: on SIGTERM or the SLURM requeue signal, saves `last.ckpt` at the end of the
current step (docs/reliability.md).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from tqdm import tqdm

from aioli_repro import world
from aioli_repro.mixing.averaged_weights import AveragedWeightsMethod
from aioli_repro.mixing.base import MixingContext, MixingMethod
from aioli_repro.training.checkpointing import wait_for_checkpoint

# Checkpointed callback state. 1: trajectory entries (step, p); 2: (step, p, probe) and the method's
# evaluation time and count (carried across a resume).
STATE_VERSION = 2


def format_mixture(groups: list[str], p: np.ndarray | list[float]) -> str:
    """`arxiv=0.47 stackexchange=0.53`."""
    return " ".join(f"{g}={float(v):.2f}" for g, v in zip(groups, p))


def trajectory_records(summary: dict) -> list[dict]:
    """A run summary's mixture trajectory as `{"step", "p": {group: value}, "probe"}` records, in step order.

    Summaries written before trajectories carried group names hold `[step, [p...]]` pairs (no probe flag);
    both shapes are read here, so nothing else needs to know about the old one."""
    groups = list(summary["groups"])
    out = []
    for rec in summary.get("trajectory") or []:
        if isinstance(rec, dict):
            step, p, probe = rec["step"], dict(rec["p"]), bool(rec.get("probe", False))
        else:
            step, p, probe = rec[0], dict(zip(groups, rec[1])), False
        out.append({"step": int(step), "p": p, "probe": probe})
    return out


class MixAnnouncer:
    """One console line per change of the mixture a method trains on, at most about `max_lines` a run.

    Methods that change their mixture every step (DoReMi and DoGE weights) would flood the console, so
    a change is printed only when at least max_steps / max_lines steps passed since the last printed
    one; the last change held back is printed at the end of training. A change not visible at two
    decimals is not printed. Aioli's rounds (T <= max_lines) are all printed.
    """

    def __init__(self, groups: list[str], max_steps: int, max_lines: int = 20) -> None:
        self.groups = list(groups)
        self.gap = max(1, int(max_steps) // max(1, max_lines))
        self._last_step: int | None = None
        self._last_text: str | None = None
        self._pending: tuple[int, str, str] | None = None
        self.lines: list[str] = []  # what was printed, for tests

    def observe(self, step: int, p: np.ndarray, label: str = "") -> None:
        text = format_mixture(self.groups, p)
        if text == self._last_text:
            self._pending = None  # a held-back change that was undone is no change
            return
        line = f"[mix] step {step}{f' ({label})' if label else ''}: {text}"
        if self._last_step is not None and step - self._last_step < self.gap:
            self._pending = (step, line, text)
            return
        self._emit(step, line, text)

    def flush(self) -> None:
        if self._pending is not None:
            self._emit(*self._pending)

    def _emit(self, step: int, line: str, text: str) -> None:
        self._last_step, self._last_text, self._pending = step, text, None
        self.lines.append(line)
        tqdm.write(line, file=sys.stderr)  # clears and redraws an active progress bar


class MixingCallback(L.Callback):
    """Drives `method` between steps; see the module docstring.

    `method_ready`: the caller already ran `method.setup` with this run's context (train.preflight does,
    to validate the options before any work), so it is not set up a second time here.
    `announce`: print changes of the trained mixture (MixAnnouncer).
    """

    def __init__(
        self,
        method: MixingMethod,
        extras: dict | None = None,
        val_every: int = 0,
        method_ready: bool = False,
        announce: bool = True,
    ) -> None:
        self.method = method
        self.extras = extras or {}
        self.val_every = val_every  # periodic per-group val logging (0: only at the end)
        self.method_ready = method_ready
        self.announce = announce
        self.groups: list[str] = []
        self.trajectory: list[tuple[int, list[float], bool]] = []  # (step, p, probe)
        self.val_history: list[tuple[int, list[float]]] = []
        self._last_p: np.ndarray | None = None
        self._last_probe: bool | None = None
        self._pending_state: dict | None = None
        self._is_setup = False
        self.announcer: MixAnnouncer | None = None
        # the trained mixture for the progress bar: (label, values), and whether the next batch is a probe
        self.shown: tuple[str, list[float]] | None = None
        self.probing = False
        # wall time of the method's own validation passes (Aioli's LearnParams, Skill-It), checkpointed so
        # that it covers the whole run: the main extra cost of an online method, reported in the summary
        self.method_eval_s = 0.0
        self.method_evals = 0

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        self.groups = list(dm.groups)
        if not self.method_ready:
            ctx = MixingContext(
                groups=self.groups,
                max_steps=int(trainer.max_steps),
                batch_size=int(dm.batch_size),
                seed=int(dm.sampler.seed),
                extras=self.extras,
            )
            self.method.setup(ctx)
        self._is_setup = True
        if self.announce:
            self.announcer = MixAnnouncer(self.groups, int(trainer.max_steps))
        if self._pending_state is not None:
            self._load_method_state()

    def _load_method_state(self) -> None:
        self.method.load_state_dict(self._pending_state["method"])
        self._pending_state = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed: the method state was loaded in load_state_dict. Everything _after_step does for the
        # checkpoint's step already happened before that checkpoint was written, and each part of it
        # is idempotent (needs_validation via last_validated_step, val_history and the trajectory by
        # step), so this only matters for a fresh run's step 0 (and shows the mixture on the console).
        self._after_step(trainer, pl_module, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.announcer is not None:
            self.announcer.flush()

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
            self._log(trainer, {f"val/loss/{g}": float(v) for g, v in zip(self.groups, losses)}, step)
        metrics = self.method.log_metrics()
        if metrics:
            self._log(trainer, metrics, step)
        if step >= trainer.max_steps:
            return
        # every rank computed the same p from reduced statistics; rank 0's is used, so they cannot drift
        p = world.broadcast_array(np.asarray(self.method.proportions(), dtype=np.float64), pl_module.device)
        probe = bool(self.method.is_probe())
        trainer.datamodule.sampler.set_proportions(p, self.method.composition())
        flag_changed = self._last_probe is not None and probe != self._last_probe
        if self._last_p is None or not np.array_equal(p, self._last_p) or flag_changed:
            self._last_p, self._last_probe = p.copy(), probe
            self.trajectory.append((step, p.tolist(), probe))
            self._log(trainer, {f"mix/p/{g}": float(v) for g, v in zip(self.groups, p)}, step)
        self._last_probe = probe
        self._show(step, p, probe)

    def _show(self, step: int, p: np.ndarray, probe: bool) -> None:
        """Track the trained mixture for the progress bar and the console (never a probe)."""
        self.probing = probe
        if probe:
            return
        label, values = self._trained(p)
        self.shown = (label, values.tolist())
        if self.announcer is not None:
            self.announcer.observe(step, values, "" if label == "p" else "loss weights")

    def _trained(self, p: np.ndarray) -> tuple[str, np.ndarray]:
        """("p", sampled proportions), or ("w", the loss weights alpha) for DoReMi/DoGE proxies, whose
        sampling stays stratified while alpha decides what is learned. alpha as last copied to the host
        (DoReMi: at its log points): reading it here would make every step wait for the device."""
        m = self.method
        if isinstance(m, AveragedWeightsMethod) and getattr(m, "reweight_by", "loss") != "sample":
            return "w", np.asarray(m.shown_alpha(), dtype=np.float64)
        return "p", p

    def summary_trajectory(self) -> list[dict[str, Any]]:
        """The summary's `trajectory`: {"step", "p": {group: proportion}, "probe"} per change of p."""
        return [
            {"step": int(s), "p": {g: float(v) for g, v in zip(self.groups, p)}, "probe": bool(probe)}
            for s, p, probe in self.trajectory
        ]

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
            "version": STATE_VERSION,
            "method": self.method.state_dict(),
            "trajectory": [[s, p, probe] for s, p, probe in self.trajectory],
            "val_history": self.val_history,
            "last_p": None if self._last_p is None else self._last_p.tolist(),
            "last_probe": self._last_probe,
            "method_eval_s": self.method_eval_s,
            "method_evals": self.method_evals,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores callbacks after `setup`, so the method is loaded right away; this also
        # covers a checkpoint taken at max_steps, where fit ends without calling on_train_start.
        self._pending_state = state_dict
        if self._is_setup:
            self._load_method_state()
        # version 1 entries are (step, p): probes were not flagged then
        self.trajectory = [
            (int(e[0]), list(e[1]), bool(e[2]) if len(e) > 2 else False) for e in state_dict["trajectory"]
        ]
        self.val_history = [(int(s), list(v)) for s, v in state_dict.get("val_history", [])]
        last = state_dict.get("last_p")
        self._last_p = None if last is None else np.asarray(last)
        self._last_probe = state_dict.get("last_probe")
        self.method_eval_s = float(state_dict.get("method_eval_s", 0.0))
        self.method_evals = int(state_dict.get("method_evals", 0))


class RunProgressBar(TQDMProgressBar):
    """Lightning's bar, counting the run's optimizer steps up to max_steps (also after a resume: the
    rate and time left count this process's steps only), showing the trained mixture (`p=0.42/0.58`;
    `w=` for DoReMi/DoGE loss weights; `(probe)` while Aioli trains on a probe mixture).

    Refreshed every `refresh_s` seconds (and at the last step), whatever the speed: a slow CPU run still
    moves every second, and a fast GPU run syncs its loss for the bar only once a second.
    """

    def __init__(self, mixing: MixingCallback, refresh_s: float = 1.0) -> None:
        super().__init__(refresh_rate=1)  # Lightning's per-batch rate; ours is by time (on_train_batch_end)
        self.mixing = mixing
        self.refresh_s = float(refresh_s)
        self._shown_t = 0.0

    def init_train_tqdm(self) -> Tqdm:
        # Lightning's bar counts batches of the epoch, unknown for our endless sampler ("600/?"), and a
        # resumed run never starts an epoch; this one counts optimizer steps of the whole run
        step = int(self.trainer.global_step)
        self._shown_t = time.monotonic()
        return Tqdm(
            desc="train",
            total=int(self.trainer.max_steps),
            initial=step,  # the rate and time left count this process's steps only
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # Lightning's would reset the bar to the epoch's (unknown) length

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        step, now = int(trainer.global_step), time.monotonic()
        due = now - self._shown_t >= self.refresh_s or step >= trainer.max_steps
        if bar is None or bar.disable or not due:
            return
        self._shown_t = now
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        loss = getattr(pl_module, "shown_loss", None)  # the last logging window's: no device read
        if loss is not None:
            items["train/loss"] = f"{loss:.3f}"
        shown = self.mixing.shown
        if shown is not None or self.mixing.probing:
            label, values = shown if shown is not None else ("p", [])
            text = "/".join(f"{v:.2f}" for v in values) or "-"
            items[label] = f"{text} (probe)" if self.mixing.probing else text
        return items


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
    from inside a signal handler in the middle of a step. The requeue signal (SLURM, e.g. SIGUSR2 via
    `--signal=USR2@120`) is handled the same way, then `RunInterrupted(requeue=True)` stops the run and
    the caller requeues the job. Place it after the MixingCallback (method state must be post-step).
    """

    def __init__(self, path: Path | None, requeue_signal: int | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.requeue_signal = requeue_signal
        self.requeue_requested = False
        self.sigterm_requested = False  # DDP only: Lightning's own flag otherwise
        self._previous_handlers: dict[int, object] = {}
        self.saved_step: int | None = None

    def _on_requeue_signal(self, signum: int, frame: object) -> None:
        self.requeue_requested = True  # acted on at the end of the current step

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.sigterm_requested = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # registered after Lightning's own handlers (it installs them just before this hook)
        if threading.current_thread() is not threading.main_thread():
            return
        if self.requeue_signal is not None:
            self._previous_handlers[self.requeue_signal] = signal.signal(
                self.requeue_signal, self._on_requeue_signal
            )
        if world.size() > 1:
            # Lightning's DDP SIGTERM handler broadcasts from inside the handler, at whatever collective the
            # other ranks are in (a mismatch that kills the run); a flag, reduced at the step's end, is safe
            self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        term = bool(trainer.received_sigterm) or self.sigterm_requested
        ddp = world.size() > 1
        if ddp:  # the ranks get a signal at different steps; all stop and save at the same one
            flags = torch.tensor([float(term), float(self.requeue_requested)], device=pl_module.device)
            term, self.requeue_requested = (bool(f > 0) for f in world.all_reduce_sum(flags).tolist())
        step = int(trainer.global_step)
        if not (term or self.requeue_requested) or step >= trainer.max_steps:
            return  # nothing asked, or the last step: the run finishes normally
        if self.path is not None and self.saved_step != step:
            trainer.save_checkpoint(self.path, weights_only=False)
            wait_for_checkpoint(trainer)  # the run stops here: the file is complete before it says so
            self.saved_step = step
        saved = self.path if self.saved_step == step else None
        if self.requeue_requested and not term:
            raise RunInterrupted(self.requeue_signal, step, saved, requeue=True)
        if ddp:  # Lightning would stop only the ranks that got SIGTERM themselves
            raise RunInterrupted(signal.SIGTERM, step, saved)
        # SIGTERM: Lightning raises SIGTERMException once this step's hooks are done
