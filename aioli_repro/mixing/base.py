"""One interface for every mixing method.

In the paper's framework (LMO) every method minimises the average validation loss under its own
mixing law; what differs is the law, how its parameters A^t are set, and how p is solved. In code,
a method is a small state machine that the `MixingCallback` drives between optimizer steps of
Lightning's one training loop:

    setup(ctx)                                    once, before training
    [needs_validation(step) -> on_validation()]   the callback evaluates per-group val loss on request
    proportions(), composition()                  used by the sampler for the next batch
    is_probe()                                    whether those proportions are a probe (Aioli)
    training_loss(batch, seq_loss, step)          inside the training step (loss reweighting, DoGE)
    on_step_end(step, stats)                      after every optimizer step, with per-group train losses

`step` is always the number of optimizer steps already taken (Lightning's global_step). A method
keeps all its state in `state_dict()`, which the callback stores in every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aioli_repro.data.datamodule import Batch

__all__ = ["Batch", "MixingContext", "MixingMethod", "StepContext", "StepStats"]


@dataclass
class MixingContext:
    """What a method may know about the run it drives."""

    groups: list[str]
    max_steps: int
    batch_size: int
    seed: int
    # optional extras a pipeline stage passes in (e.g. a DoReMi reference checkpoint path)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def m(self) -> int:
        return len(self.groups)


@dataclass
class StepContext:
    """What `training_loss` may use of the step being taken: nothing of Lightning or the module.

    `step` is the number of optimizer steps already taken (this step's index); `lr` is the learning rate
    of this optimizer step; `val_sequences()` returns the whole val split, one (n, T) array per group
    (DoGE draws its validation batch from it).
    """

    step: int
    model: torch.nn.Module
    model_config: Any
    device: torch.device
    lr: float
    accumulate_grad_batches: int
    val_sequences: Callable[[], list[np.ndarray]]


@dataclass
class StepStats:
    """Per-group training loss of the step just taken, kept on device until a method asks."""

    loss_sum: torch.Tensor  # (m,) sum of per-sequence mean losses
    count: torch.Tensor  # (m,) number of sequences
    host_count: np.ndarray | None = None  # the same counts, from the host (no device read)

    def counts(self) -> np.ndarray:
        """Sequences per group as numpy: the host copy when there is one, else a device read."""
        if self.host_count is not None:
            return np.asarray(self.host_count, dtype=np.float64)
        return self.count.detach().double().cpu().numpy()

    def mean(self) -> np.ndarray:
        """Per-group mean loss as numpy (NaN for groups absent from the batch). Forces a host sync."""
        s = self.loss_sum.detach().float().cpu().numpy()
        c = self.count.detach().float().cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(c > 0, s / np.maximum(c, 1), np.nan)


class MixingMethod:
    """Base class: stratified behaviour everywhere; subclasses override what their method changes."""

    #: the method's name, for messages and tests (configs name methods by `method.name`)
    name: str = "base"

    def setup(self, ctx: MixingContext) -> None:
        self.ctx = ctx
        self._p = np.full(ctx.m, 1.0 / ctx.m)

    # -- what the sampler uses next ---------------------------------------------------------------
    def proportions(self) -> np.ndarray:
        """Proportions for the next training batch (a distribution over ctx.groups)."""
        return self._p

    def composition(self) -> str:
        """Batch composition for the next step: "multinomial" (paper) or "exact" (largest remainder)."""
        return "multinomial"

    def is_probe(self) -> bool:
        """Are the current `proportions()` a probe (a mixture trained on to measure, not the method's choice)?

        Aioli's LearnParams steps are; summaries and the console separate them from the trained mixture.
        """
        return False

    # -- requests and observations ----------------------------------------------------------------
    def needs_validation(self, step: int) -> bool:
        """Does the method need per-group validation losses now, after `step` optimizer steps?"""
        return False

    def on_validation(self, step: int, val_loss: np.ndarray) -> None:
        """Per-group validation losses (ordered as ctx.groups) after `step` steps."""

    def on_step_end(self, step: int, stats: StepStats) -> None:
        """Called after every optimizer step; `step` counts the steps now taken."""

    def training_loss(self, batch: Batch, seq_loss: torch.Tensor, step: StepContext) -> torch.Tensor:
        """Scalar loss to backpropagate. `seq_loss` is (B,) per-sequence mean token loss.

        Default: the batch mean (sampling does the mixing). DoReMi reweights per group; DoGE
        computes per-group gradient alignment here.
        """
        return seq_loss.mean()

    # -- reporting and checkpoints ----------------------------------------------------------------
    def log_metrics(self) -> dict[str, float]:
        """Scalars to log now (e.g. A^t entries, β). Called after each step; return {} when nothing new."""
        return {}

    def final_proportions(self) -> np.ndarray | None:
        """Proportions a later static stage should use (DoReMi/DoGE proxies return the average weights)."""
        return None

    def state_dict(self) -> dict:
        return {"p": self._p.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self._p = np.asarray(state["p"], dtype=np.float64)
