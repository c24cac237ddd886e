"""What DoReMi and DoGE share: online weights alpha learned by a proxy run, averaged over updates.

Both proxies update alpha once per optimizer step from a per-group score (DoReMi's excess loss,
DoGE's gradient alignment); the final static run trains on the time-average of alpha. This base
keeps that bookkeeping (alpha, its running sum, the last scores), its logging and its checkpoint
state in one place; subclasses compute the scores and the step's loss.

The weights live where the update runs: numpy on the host (DoGE), or float64 tensors on the training
device (DoReMi, `_weights_to`), so that its steady-state step never waits for the device. `alpha`,
`avg` and `scores` are then host copies, read back lazily: once per change, and only when something
asks (log points, checkpoints, the run summary). `shown_alpha()` is the last such copy, never a read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aioli_repro.mixing.base import MixingContext, MixingMethod

_WEIGHTS = ("alpha", "avg", "scores")
Array = np.ndarray | torch.Tensor  # host (numpy) or device weights


class _HostView:
    """`method.alpha` (`avg`, `scores`): the host copy; assigning one moves all the weights to the host."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: AveragedWeightsMethod | None, owner: type | None = None) -> Any:
        return self if obj is None else obj._host()[self.name]

    def __set__(self, obj: AveragedWeightsMethod, value: np.ndarray) -> None:
        obj._put_host({self.name: value})


class AveragedWeightsMethod(MixingMethod):
    """Base of the proxy methods whose output is the time-average of their weights alpha."""

    #: what `scores` holds, for the logged metric name `<name>/<score_label>/<group>`
    score_label: str = "score"
    log_every: int = 10

    alpha = _HostView()  # the current weights
    avg = _HostView()  # the sum of alpha over the updates
    scores = _HostView()  # the last score per group

    def setup(self, ctx: MixingContext) -> None:
        super().setup(ctx)
        m = ctx.m
        uniform = np.full(m, 1.0 / m)
        self._weights: dict[str, Array] = {"alpha": uniform, "avg": np.zeros(m), "scores": np.zeros(m)}
        self._host_weights: dict[str, np.ndarray] = self._weights  # the last host copy
        self._host_stale = False  # the weights changed on the device since that copy
        self.n_updates = 0
        self._last_logged = -1

    def _record(self, alpha: Array, scores: Array | None = None) -> None:
        """Make `alpha` the current weights (computed from `scores`) and count it in the average."""
        w = self._weights
        if scores is not None:
            w["scores"] = scores
        w["alpha"] = alpha
        w["avg"] = w["avg"] + alpha
        self.n_updates += 1
        # host weights: the same dict as the host copy, so it is current; device weights: read back on demand
        self._host_stale = isinstance(alpha, torch.Tensor)

    # -- where the weights live -----------------------------------------------------------------
    def _weights_to(self, device: torch.device) -> None:
        """Keep the weights as float64 tensors on `device` from now on (again after a checkpoint load)."""
        if all(isinstance(v, torch.Tensor) and v.device == device for v in self._weights.values()):
            return
        # a copy: a tensor sharing memory with a host array would change the host copy behind its back
        self._weights = {
            k: torch.as_tensor(v, dtype=torch.float64).to(device, copy=True) for k, v in self._weights.items()
        }

    def _host(self) -> dict[str, np.ndarray]:
        """The weights on the host: one device read if they changed there since the last copy."""
        if self._host_stale:
            rows = torch.stack([self._weights[k] for k in _WEIGHTS]).cpu().numpy()
            self._host_weights, self._host_stale = dict(zip(_WEIGHTS, rows)), False
        return self._host_weights

    def _put_host(self, values: dict[str, Any]) -> None:
        """Replace some weights with host values; all of them are on the host afterwards."""
        new = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
        self._weights = {**self._host(), **new}
        self._host_weights, self._host_stale = self._weights, False

    def shown_alpha(self) -> np.ndarray:
        """alpha as of its last host copy: what the console shows between steps without reading the device."""
        return self._host_weights["alpha"]

    # -- reporting and checkpoints --------------------------------------------------------------
    def final_proportions(self) -> np.ndarray | None:
        if self.n_updates == 0:
            return self.alpha.copy()
        avg = self.avg / self.n_updates
        return avg / avg.sum()

    def log_metrics(self) -> dict[str, float]:
        # nothing before the first update (asked at train start too, where Lightning forbids logging);
        # only here, every log_every updates, are device weights read back during training
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
        host = self._host()  # builtins only: Lightning loads checkpoints with weights_only=True
        return {
            **super().state_dict(),
            **{k: host[k].tolist() for k in _WEIGHTS},
            "n_updates": self.n_updates,
            "last_logged": self._last_logged,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._put_host({k: state[k] for k in _WEIGHTS})  # back on the device at the next update
        self.n_updates = int(state["n_updates"])
        self._last_logged = int(state.get("last_logged", -1))
