"""Skill-It (Chen et al. 2023), online with a loss window, as in the official `SkillitTrainer`.

LMO view (paper Table 1): linear dynamic law, A^t = diag(L^t)·Gᵀ from a static skills graph G,
solved by exponentiated gradient. Every `update_steps` steps (one round) the mixture becomes

    p_i ∝ exp(η · Σ_j G[i, j] · ℓ_j),   ℓ = sum (or mean) of the last `window` val-loss vectors,

recomputed from scratch each round (official). With A^t_ij = ℓ_i G[j, i] the column sums are
Σ_i A^t_ij = Σ_i G[j, i] ℓ_i, so this is p_j ∝ exp(η Σ_i A^t_ij): Table 1's EGD step taken from ones.
`accumulate=True` multiplies onto the previous p instead (Table 1's EGD literally; with window=1 it is
exactly p^t_j ∝ p^{t−1}_j exp(η Σ_i L^t_i G[j, i])).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aioli_repro.mixing.base import MixingContext, MixingMethod, StepStats
from aioli_repro.mixing.simplex import softmax


def skills_graph_from_losses(L_start: np.ndarray, L_end: np.ndarray) -> np.ndarray:
    """Skills graph from m single-group training runs (official `mixing_law_fitting.skills_graph`).

    L_start, L_end: (m_trained, m_eval) validation losses of run j (trained only on group j) at its
    start and end. Returns

        G[j, i] = (L_start[j, i] − L_end[j, i]) / L_start[j, i],

    the relative loss drop of eval group i when training only on group j: **row = trained group,
    column = evaluated group**, positive when training on j helps i. In the paper's LMO form,
    A^t = diag(L^t)·Gᵀ, i.e. A^t_ij = L^t_i · G[j, i]. Table 1 writes the ratio as
    (L^{T+1}_i(1_j) − L^1_i(1_j)) / L^1_i(1_j), which is negative when j helps i; under the law
    L^{t+1} = L^t − A p and the update p ∝ exp(+η Σ_i A_ij) that sign would favour harmful groups, so
    we (like the official code and its shipped graphs, diagonals ≈ +0.7) use the drop: A > 0 ⇔ j helps i.
    """
    L0 = np.asarray(L_start, dtype=np.float64)
    L1 = np.asarray(L_end, dtype=np.float64)
    if L0.ndim != 2 or L0.shape != L1.shape:
        raise ValueError(f"skills_graph_from_losses: need equal 2-D shapes, got {L0.shape} and {L1.shape}")
    if np.any(L0 <= 0) or not np.all(np.isfinite(L0)) or not np.all(np.isfinite(L1)):
        raise ValueError("skills_graph_from_losses: losses must be finite and L_start positive")
    return (L0 - L1) / L0


def lmo_matrix(graph: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Skill-It's A^t in LMO orientation: A^t_ij = L^t_i · G[j, i] (= diag(L^t)·Gᵀ)."""
    G = np.asarray(graph, dtype=np.float64)
    return np.asarray(losses, dtype=np.float64)[:, None] * G.T


def load_graph(graph: Sequence[Sequence[float]] | str | Path) -> np.ndarray:
    """An inline matrix, or a path to .npy or .json (a list of rows, or {"skills_graph": rows})."""
    if isinstance(graph, (str, Path)):
        path = Path(graph)
        if not path.exists():
            raise ValueError(f"method.mixer.graph: file {str(path)!r} does not exist")
        if path.suffix == ".npy":
            return np.asarray(np.load(path), dtype=np.float64)
        if path.suffix == ".json":
            obj = json.loads(path.read_text())
            if isinstance(obj, dict):
                obj = obj.get("skills_graph", obj.get("graph"))
            return np.asarray(obj, dtype=np.float64)
        raise ValueError(f"method.mixer.graph: unsupported file type {path.suffix!r}; use .npy or .json")
    return np.asarray([list(row) for row in graph], dtype=np.float64)


class SkillIt(MixingMethod):
    """Online Skill-It: p from a fixed skills graph weighted by a window of recent val losses.

    Args:
        eta: EGD step size η (paper/official: 0.2).
        update_steps: steps per round (official: 500 for m = 2, 3; 400 for m = 7).
        window: number of most recent val-loss vectors combined per update (official: 3).
        graph: the (m, m) skills graph G (row = trained group, see `skills_graph_from_losses`):
            inline rows, a .npy/.json path, or None to read `ctx.extras["skills_graph"]` (the
            pipeline's graph stage). An explicit graph wins over extras.
        window_reduce: "sum" (official; the first update sums fewer than `window` entries) or "mean".
        eval_every: evaluate val every this many steps to fill the window; None = update_steps // 2
            (two new losses per round, as the released m = 2, 3 scripts' checkpoint cadence).
        eval_max_seqs: cap on val sequences per group for these evaluations (None = the run's default).
        accumulate: False (default, official): recompute p from ones each round; True: multiply onto
            the previous p (Table 1's EGD).
        init: "graph" (official: p ∝ exp(η·G·1)) or "uniform".
    """

    name = "skillit"

    def __init__(
        self,
        eta: float,
        update_steps: int,
        window: int = 3,
        graph: Sequence[Sequence[float]] | str | None = None,
        window_reduce: str = "sum",
        eval_every: int | None = None,
        eval_max_seqs: int | None = None,
        accumulate: bool = False,
        init: str = "graph",
    ) -> None:
        if not eta > 0:
            raise ValueError(f"method.mixer.eta: must be > 0, got {eta!r}")
        if int(update_steps) < 1:
            raise ValueError(f"method.mixer.update_steps: must be >= 1, got {update_steps!r}")
        if int(window) < 1:
            raise ValueError(f"method.mixer.window: must be >= 1, got {window!r}")
        if window_reduce not in ("sum", "mean"):
            raise ValueError(f"method.mixer.window_reduce: unknown {window_reduce!r}; allowed: [sum, mean]")
        if init not in ("graph", "uniform"):
            raise ValueError(f"method.mixer.init: unknown {init!r}; allowed: ['graph', 'uniform']")
        if eval_every is not None and int(eval_every) < 1:
            raise ValueError(f"method.mixer.eval_every: must be null or >= 1, got {eval_every!r}")
        self.eta = float(eta)
        self.update_steps = int(update_steps)
        self.window = int(window)
        self.graph_arg = graph
        self.window_reduce = window_reduce
        self.eval_every = int(eval_every) if eval_every is not None else max(1, self.update_steps // 2)
        self.eval_max_seqs = eval_max_seqs
        self.accumulate = bool(accumulate)
        self.init = init

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, ctx: MixingContext) -> None:
        super().setup(ctx)
        if self.graph_arg is not None:
            G = load_graph(self.graph_arg)
        elif ctx.extras.get("skills_graph") is not None:
            G = load_graph(ctx.extras["skills_graph"])
        else:
            raise ValueError(
                "method.mixer.graph: Skill-It needs a skills graph; set method.mixer.graph (rows, or a "
                ".npy/.json path) or run the skillit pipeline, which passes extras['skills_graph']"
            )
        if G.shape != (ctx.m, ctx.m) or not np.all(np.isfinite(G)):
            raise ValueError(f"method.mixer.graph: need a finite ({ctx.m}, {ctx.m}) matrix, got {G.shape}")
        self.G = G
        # official initial weights: exp(η·G·1), the row sums ("how much training on i helps everyone")
        self._p = softmax(self.eta * G.sum(axis=1)) if self.init == "graph" else np.full(ctx.m, 1.0 / ctx.m)
        self.history: list[tuple[int, list[float]]] = []  # (step, per-group val loss)
        self._step = 0
        self._last_validated = -1
        self._last_update = 0
        self._n_updates = 0
        self._last_A: np.ndarray | None = None
        self._metrics_pending = False

    # -- round logic ----------------------------------------------------------------------------
    def _update_due(self, step: int) -> bool:
        return 0 < step < self.ctx.max_steps and step % self.update_steps == 0 and step > self._last_update

    def needs_validation(self, step: int) -> bool:
        self._step = max(self._step, step)
        # `_last_validated` is checkpointed, so a resumed run never evaluates the same step twice
        return step % self.eval_every == 0 and step < self.ctx.max_steps and step != self._last_validated

    def on_validation(self, step: int, val_loss: np.ndarray) -> None:
        self._step = max(self._step, step)
        self._last_validated = step
        self.history.append((int(step), [float(v) for v in np.asarray(val_loss, dtype=np.float64)]))
        # keep only what the window can use; the full list would grow with the run
        self.history = self.history[-self.window :]
        if self._update_due(step):
            self._update(step)

    def on_step_end(self, step: int, stats: StepStats) -> None:
        self._step = max(self._step, step)
        # a round boundary without a validation at this step updates from the window as it is
        if self._update_due(step) and not self.needs_validation(step):
            self._update(step)

    def proportions(self) -> np.ndarray:
        # fallback for call orders that skip on_step_end (e.g. the first call after a resume)
        if self._update_due(self._step) and not (
            self._step % self.eval_every == 0 and self._step != self._last_validated
        ):
            self._update(self._step)
        return self._p

    def window_loss(self) -> np.ndarray | None:
        """ℓ: sum (official) or mean of the last `window` val-loss vectors; None before any eval."""
        if not self.history:
            return None
        recent = np.asarray([v for _, v in self.history[-self.window :]], dtype=np.float64)
        return recent.sum(axis=0) if self.window_reduce == "sum" else recent.mean(axis=0)

    def _update(self, step: int) -> None:
        self._last_update = step
        ell = self.window_loss()
        if ell is None:
            return
        logits = self.eta * (self.G @ ell)  # = η Σ_i A^t_ij with A^t = diag(ℓ) Gᵀ
        if self.accumulate:
            logits = logits + np.log(np.maximum(self._p, 1e-300))
        self._p = softmax(logits)
        self._last_A = lmo_matrix(self.G, ell)
        self._n_updates += 1
        self._metrics_pending = True

    # -- reporting and checkpoints --------------------------------------------------------------
    def log_metrics(self) -> dict[str, float]:
        if not self._metrics_pending or self._last_A is None:
            return {}
        self._metrics_pending = False
        m = self.ctx.m
        out = {f"skillit/A/{i}_{j}": float(self._last_A[i, j]) for i in range(m) for j in range(m)}
        out["skillit/updates"] = float(self._n_updates)
        return out

    def lmo_matrix(self) -> np.ndarray | None:
        """The A^t of the latest update (LMO orientation), for the sim() analysis."""
        return None if self._last_A is None else self._last_A.copy()

    def state_dict(self) -> dict:
        return {
            "p": self._p.tolist(),
            "graph": self.G.tolist(),
            "history": [[s, list(v)] for s, v in self.history],
            "step": self._step,
            "last_validated": self._last_validated,
            "last_update": self._last_update,
            "n_updates": self._n_updates,
            "last_A": None if self._last_A is None else self._last_A.tolist(),
            "metrics_pending": self._metrics_pending,
        }

    def load_state_dict(self, state: dict) -> None:
        self._p = np.asarray(state["p"], dtype=np.float64)
        # resume with the graph the run started with, even if the config's graph has changed
        self.G = np.asarray(state["graph"], dtype=np.float64)
        self.history = [(int(s), [float(x) for x in v]) for s, v in state["history"]]
        self._step = int(state["step"])
        self._last_validated = int(state["last_validated"])
        self._last_update = int(state["last_update"])
        self._n_updates = int(state["n_updates"])
        self._last_A = None if state["last_A"] is None else np.asarray(state["last_A"], dtype=np.float64)
        self._metrics_pending = bool(state["metrics_pending"])
