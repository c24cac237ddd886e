"""What DoReMi and DoGE share: online weights alpha learned by a proxy run, averaged over updates.

Both proxies update alpha once per optimizer step from a per-group score (DoReMi's excess loss,
DoGE's gradient alignment); the final static run trains on the time-average of alpha. This base
keeps that bookkeeping (alpha, its running sum, the last scores), its logging and its checkpoint
state in one place; subclasses compute the scores and the step's loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aioli_repro.mixing.base import MixingContext, MixingMethod


class AveragedWeightsMethod(MixingMethod):
    """Base of the proxy methods whose output is the time-average of their weights alpha."""

    #: what `scores` holds, for the logged metric name `<name>/<score_label>/<group>`
    score_label: str = "score"
    log_every: int = 10

    def setup(self, ctx: MixingContext) -> None:
        super().setup(ctx)
        m = ctx.m
        self.alpha = np.full(m, 1.0 / m)
        self.avg = np.zeros(m)
        self.n_updates = 0
        self.scores = np.zeros(m)
        self._last_logged = -1

    def _record(self, alpha: np.ndarray) -> None:
        """Make `alpha` the current weights and count it in the average."""
        self.alpha = alpha
        self.avg += alpha
        self.n_updates += 1

    # -- reporting and checkpoints --------------------------------------------------------------
    def final_proportions(self) -> np.ndarray | None:
        if self.n_updates == 0:
            return self.alpha.copy()
        avg = self.avg / self.n_updates
        return avg / avg.sum()

    def log_metrics(self) -> dict[str, float]:
        # nothing before the first update (asked at train start too, where Lightning forbids logging)
        if self.n_updates in (0, self._last_logged) or self.n_updates % self.log_every != 0:
            return {}
        self._last_logged = self.n_updates
        out: dict[str, float] = {}
        for g, a, s, v in zip(self.ctx.groups, self.alpha, self.scores, self.avg / self.n_updates):
            out[f"{self.name}/alpha/{g}"] = float(a)
            out[f"{self.name}/{self.score_label}/{g}"] = float(s)
            out[f"{self.name}/alpha_avg/{g}"] = float(v)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "alpha": self.alpha.tolist(),
            "avg": self.avg.tolist(),
            "n_updates": self.n_updates,
            "scores": self.scores.tolist(),
            "last_logged": self._last_logged,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.alpha = np.asarray(state["alpha"], dtype=np.float64)
        self.avg = np.asarray(state["avg"], dtype=np.float64)
        self.n_updates = int(state["n_updates"])
        self.scores = np.asarray(state["scores"], dtype=np.float64)
        self._last_logged = int(state.get("last_logged", -1))
