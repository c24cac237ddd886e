"""Aioli (Chen et al., ICLR 2025; paper Algorithms 1 and 2, official `AioliTrainer`).

LMO view (paper Table 1): the linear dynamic law L^{t+1}_i = L^t_i − Σ_j A^t_ij p^t_j, with A^t
learned *inside the run* by LearnParams and p solved by exponentiated gradient (EG).

Schedule (all in optimizer steps; the probe steps are ordinary training steps of the budget):

    [0, prior_steps)                          static prior (restricted setting), multinomial batches
    round t = 0..T−1, r0 = prior_steps + t·U, T = (max_steps − prior_steps) / U:
      val at r0                               L^0
      K = k·m probe intervals of lp_steps     interval τ trains on q_{I_τ} (k shuffled sweeps of the
                                              m smoothed one-hots), val after each: β[:, j] += L_prev − L
      at r0 + K·lp_steps                      A^t from β (solve), normalise, EMA, EG update of p
      [r0 + K·lp_steps, r0 + U)               exploitation on p, multinomial batches

A^t orientation: A[i, j] = how much training on group j lowers the validation loss of group i (per
probe interval, i.e. lp_steps steps; the official code does not rescale it either).

Differences from the released code (all documented in docs/deviations.md):
- probe batches realise q_j exactly for every m (`probe_composition="exact"`); the official m = 7
  probes realise 0.545/0.091/0 and take 66 of the 140 nominal steps;
- the solve can use the realised probe mixtures (`solve_with="realised"`) instead of the nominal ones;
- `update_rule="ema_from_uniform"` (default) is what every released script ran (`--ema`: p ∝ exp(η
  colsum Ā_ema) recomputed from uniform each round); `"multiplicative"` is the paper's Algorithm 1, a
  named variant (`method=aioli_mult`);
- η = 0 is allowed: the null arm (`method=aioli_null`) runs the same probes and schedule, p stays uniform;
- the probe order is drawn from (seed, setting), not the seed alone, so settings do not share it;
- `diagonal=True` with one_hot_factor = 1 keeps only the diagonal (the official code ignores the flag);
- a zero-sum A after normalisation gives A = 0 (no update) instead of a division by zero.
"""

from __future__ import annotations

import copy
import warnings
import zlib
from collections.abc import Sequence

import numpy as np

from aioli_repro.mixing.base import MixingContext, MixingMethod, StepStats
from aioli_repro.mixing.learn_params import normalize_A, probe_mixtures, solve_A
from aioli_repro.mixing.simplex import softmax

UPDATE_RULES = ("multiplicative", "ema_from_uniform")
COMPOSITIONS = ("exact", "multinomial")
SOLVE_WITH = ("realised", "nominal")


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _pos_int(name: str, v: object, minimum: int = 1) -> int:
    """v as an int >= minimum, or a ValueError naming method.mixer.<name>."""
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"method.mixer.{name}: must be an integer >= {minimum}, got {v!r}")
    return int(v)


class Aioli(MixingMethod):
    """Online Aioli: A^t learned in-run by LearnParams, p by exponentiated gradient.

    Args:
        eta: EG step size η (official 0.2 / 0.1 / 1.0 for m = 2 / 3 / 7).
        update_steps: round length U in optimizer steps; must divide max_steps − prior_steps.
            None: one round over the whole dynamic phase (Aioli-Static).
        lp_rounds: k, sweeps over the m probe mixtures per round.
        lp_steps: optimizer steps per probe interval (k·m·lp_steps must be < U).
        one_hot_factor: f, the weight of the target group in a probe mixture (1/m < f ≤ 1).
        ema: γ for Ā = (1−γ)·A^t + γ·Ā_prev (None: no EMA).
        update_rule: "ema_from_uniform" (released code with --ema: p ∝ exp(η colsum Ā) from uniform each
            round; the default) or "multiplicative" (paper Alg. 1: p ∝ p_prev · exp(η colsum Ā)).
        normalize_A: official normalisation (see `normalize_A`), always on in the released scripts.
        diagonal: Aioli-Diagonal (keep only A_ii).
        prior, prior_steps: restricted setting; train prior_steps steps on the static prior, then run
            Aioli from uniform (paper Alg. 1 with S_init = prior_steps).
        eval_max_seqs: val sequences per group for the LearnParams evaluations (None: the run's cap);
            read by the MixingCallback.
        probe_composition: batch composition of probe steps: "exact" (mixtures realised for every m)
            or "multinomial".
        solve_with: "realised" (probe mixtures measured from the batches' group counts) or "nominal" (q_j).
        seed_offset: mixed with ctx.seed and the group names into the probe-order generator's seed (keeps
            it apart from the sampler's, and different between settings).
    """

    name = "aioli"

    def __init__(
        self,
        eta: float,
        update_steps: int | None,
        lp_rounds: int,
        lp_steps: int,
        one_hot_factor: float,
        ema: float | None = None,
        update_rule: str = "ema_from_uniform",
        normalize_A: bool = True,
        diagonal: bool = False,
        prior: Sequence[float] | None = None,
        prior_steps: int = 0,
        eval_max_seqs: int | None = None,
        probe_composition: str = "exact",
        solve_with: str = "realised",
        seed_offset: int = 0xA101,
    ) -> None:
        # stored as given; everything is checked in setup(), where max_steps and m are known
        self.eta = eta
        self.update_steps = update_steps
        self.lp_rounds = lp_rounds
        self.lp_steps = lp_steps
        self.one_hot_factor = one_hot_factor
        self.ema = ema
        self.update_rule = update_rule
        self.normalize = normalize_A
        self.diagonal = diagonal
        self.prior = None if prior is None else [float(x) for x in prior]
        self.prior_steps = prior_steps
        self.eval_max_seqs = eval_max_seqs
        self.probe_composition = probe_composition
        self.solve_with = solve_with
        self.seed_offset = seed_offset

    # -- set-up ---------------------------------------------------------------------------------
    def _validate(self, ctx: MixingContext) -> None:
        """Every mixer field checked against the run (ctx); a ValueError names the first bad field."""
        if ctx.m < 2:
            raise ValueError(f"groups.names: Aioli needs at least 2 groups, got {ctx.groups}")
        if not isinstance(self.eta, (int, float)) or isinstance(self.eta, bool) or not self.eta >= 0:
            raise ValueError(f"method.mixer.eta: must be a number >= 0 (0: the null arm), got {self.eta!r}")
        self.lp_rounds = _pos_int("lp_rounds", self.lp_rounds)
        self.lp_steps = _pos_int("lp_steps", self.lp_steps)
        self.prior_steps = _pos_int("prior_steps", self.prior_steps, minimum=0)
        self._validate_prior(ctx)
        self._validate_rounds(ctx)
        self._validate_options(ctx.m)

    def _validate_prior(self, ctx: MixingContext) -> None:
        """The restricted setting's prior mixture and its length (prior_steps) agree with each other."""
        m = ctx.m
        if self.prior_steps >= ctx.max_steps:
            raise ValueError(
                f"method.mixer.prior_steps: must be < train.max_steps={ctx.max_steps} (Aioli needs steps "
                f"after the prior phase), got {self.prior_steps}"
            )
        if self.prior_steps > 0 and self.prior is None:
            raise ValueError("method.mixer.prior: prior_steps > 0 needs a prior mixture (one value a group)")
        if self.prior is not None:
            if self.prior_steps == 0:
                raise ValueError(
                    "method.mixer.prior_steps: a prior is set but prior_steps = 0, so it would never be used "
                    "(restricted setting: set both, e.g. method.mixer.prior=[...] method.mixer.prior_steps=N)"
                )
            pr = np.asarray(self.prior, dtype=np.float64)
            if pr.shape != (m,) or not np.all(np.isfinite(pr)) or np.any(pr < 0) or abs(pr.sum() - 1) > 1e-6:
                raise ValueError(
                    f"method.mixer.prior: need {m} non-negative values summing to 1 (groups {ctx.groups}), "
                    f"got {self.prior}"
                )

    def _validate_rounds(self, ctx: MixingContext) -> None:
        """Rounds of update_steps tile the dynamic phase and leave room after LearnParams; sets self.U."""
        m = ctx.m
        dynamic = ctx.max_steps - self.prior_steps
        # None: Aioli-Static, one round over the whole dynamic phase
        U = dynamic if self.update_steps is None else _pos_int("update_steps", self.update_steps)
        self.U = U
        lp_total = self.lp_rounds * m * self.lp_steps
        if dynamic % U != 0:
            ok = [d for d in _divisors(dynamic) if d > lp_total]
            raise ValueError(
                f"method.mixer.update_steps: {U} does not divide max_steps − prior_steps = {dynamic}; rounds "
                f"must tile the run exactly. Allowed values (divisors > lp_rounds·m·lp_steps = {lp_total}): "
                f"{ok}"
            )
        if lp_total >= U:
            raise ValueError(
                f"method.mixer.lp_rounds / method.mixer.lp_steps: LearnParams takes lp_rounds·m·lp_steps = "
                f"{self.lp_rounds}·{m}·{self.lp_steps} = {lp_total} steps per round, which must be < "
                f"update_steps = {U} to leave exploitation steps"
            )

    def _validate_options(self, m: int) -> None:
        """The probe factor, EMA, rule names and probe evaluation size."""
        f = self.one_hot_factor
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not (1.0 / m < f <= 1.0):
            raise ValueError(
                f"method.mixer.one_hot_factor: must be in (1/m, 1] = ({1.0 / m:.4g}, 1] for m = {m} (at 1/m "
                f"every probe mixture is uniform and A cannot be identified), got {f!r}"
            )
        if self.ema is not None and (
            not isinstance(self.ema, (int, float)) or isinstance(self.ema, bool) or not 0 <= self.ema < 1
        ):
            raise ValueError(f"method.mixer.ema: must be null or in [0, 1), got {self.ema!r}")
        for field, value, allowed in (
            ("update_rule", self.update_rule, UPDATE_RULES),
            ("probe_composition", self.probe_composition, COMPOSITIONS),
            ("solve_with", self.solve_with, SOLVE_WITH),
        ):
            if value not in allowed:
                raise ValueError(f"method.mixer.{field}: unknown {value!r}; allowed: {list(allowed)}")
        if self.eval_max_seqs is not None:
            self.eval_max_seqs = _pos_int("eval_max_seqs", self.eval_max_seqs)

    def setup(self, ctx: MixingContext) -> None:
        super().setup(ctx)
        self._validate(ctx)
        m = ctx.m
        self.K = self.lp_rounds * m  # probe intervals per round
        self.lp_total = self.K * self.lp_steps
        self.n_rounds = (ctx.max_steps - self.prior_steps) // self.U
        self.f = float(self.one_hot_factor)
        self.Q = probe_mixtures(m, self.f)
        self._prior = None if self.prior is None else np.asarray(self.prior, dtype=np.float64)
        setting = zlib.crc32(",".join(ctx.groups).encode())
        self._rng = np.random.default_rng([int(ctx.seed), int(self.seed_offset), setting])
        self._step = 0  # steps taken so far = index of the next batch
        self._last_validated = -1
        # current round
        self._round = -1
        self._order: list[int] = []
        self._G = np.zeros((self.lp_rounds, m, m))  # loss drops per sweep: row = eval group, column = probe
        self._prev: np.ndarray | None = None  # last val losses of this round
        self._prev_tau = -1  # boundary index τ at which _prev was taken
        self._n_drops = 0  # intervals whose drop entered _G this round
        self._counts = np.zeros((self.K, m))  # realised sequences per group, per probe interval
        # mixture state: log of the unnormalised EG weights (uniform at the start of the dynamic phase)
        self._logw = np.zeros(m)
        self._p = softmax(self._logw)
        self._A_ema: np.ndarray | None = None
        self._last_A: np.ndarray | None = None
        self._history: list[dict] = []
        self._pending: dict[str, float] | None = None

    # -- schedule -------------------------------------------------------------------------------
    def _locate(self, index: int) -> tuple[str, int, int]:
        """Phase of batch `index` (0-based): ("prior"|"probe"|"exploit"|"done", round, interval or -1)."""
        if index < self.prior_steps:
            return "prior", -1, -1
        if index >= self.ctx.max_steps:
            return "done", self.n_rounds, -1
        t, off = divmod(index - self.prior_steps, self.U)
        if off < self.lp_total:
            return "probe", t, off // self.lp_steps
        return "exploit", t, -1

    def _boundary(self, step: int) -> tuple[int, int] | None:
        """(round, τ) if a LearnParams evaluation is due after `step` steps: τ = 0 is L^0, τ = K the last."""
        if step < self.prior_steps or step >= self.ctx.max_steps:
            return None
        t, off = divmod(step - self.prior_steps, self.U)
        if off % self.lp_steps == 0 and off // self.lp_steps <= self.K:
            return t, off // self.lp_steps
        return None

    def _ensure_round(self, t: int) -> None:
        # Rounds advance in order; each draws its probe order from the method's own generator, so the
        # orders are a function of (seed, setting) alone (and the generator state is checkpointed).
        while self._round < t:
            self._round += 1
            self._order = [int(j) for _ in range(self.lp_rounds) for j in self._rng.permutation(self.ctx.m)]
            self._G = np.zeros((self.lp_rounds, self.ctx.m, self.ctx.m))
            self._prev, self._prev_tau, self._n_drops = None, -1, 0
            self._counts = np.zeros((self.K, self.ctx.m))

    def probe_order(self) -> list[int]:
        """The current round's interval order I (probe index per interval)."""
        return list(self._order)

    # -- what the sampler uses next ---------------------------------------------------------------
    def proportions(self) -> np.ndarray:
        phase, t, tau = self._locate(self._step)
        if phase == "prior":
            return self._prior.copy()
        if phase == "probe":
            self._ensure_round(t)
            return self.Q[self._order[tau]].copy()
        return self._p.copy()

    def composition(self) -> str:
        phase, _, _ = self._locate(self._step)
        return self.probe_composition if phase == "probe" else "multinomial"

    def is_probe(self) -> bool:
        return self._locate(self._step)[0] == "probe"

    # -- requests and observations ----------------------------------------------------------------
    def needs_validation(self, step: int) -> bool:
        self._step = max(self._step, int(step))
        # `_last_validated` is checkpointed, so a resumed run never evaluates the same step twice
        return self._boundary(step) is not None and step != self._last_validated

    def on_validation(self, step: int, val_loss: np.ndarray) -> None:
        step = int(step)
        self._step = max(self._step, step)
        if step == self._last_validated:
            return
        self._last_validated = step
        where = self._boundary(step)
        if where is None:
            return
        t, tau = where
        self._ensure_round(t)
        loss = np.asarray(val_loss, dtype=np.float64).reshape(-1)
        if tau > 0 and self._prev is not None and self._prev_tau == tau - 1:
            sweep = (tau - 1) // self.ctx.m
            self._G[sweep, :, self._order[tau - 1]] += self._prev - loss  # column = probe, + = loss drop
            self._n_drops += 1
        self._prev, self._prev_tau = loss, tau
        if tau == self.K:
            self._update(step)

    def on_step_end(self, step: int, stats: StepStats) -> None:
        self._step = max(self._step, int(step))
        phase, t, tau = self._locate(int(step) - 1)  # the batch just trained
        if phase == "probe" and self.solve_with == "realised":
            self._ensure_round(t)
            # counted on the host when the batch was drawn: no device read on a probe step either
            self._counts[tau] += stats.counts()

    # -- the update -----------------------------------------------------------------------------
    def _probe_matrix(self) -> np.ndarray:
        """Row j: the mixture probe j actually trained on (realised) or q_j (nominal)."""
        if self.solve_with == "nominal":
            return self.Q.copy()
        P = np.zeros_like(self.Q)
        order = np.asarray(self._order)
        for j in range(self.ctx.m):
            c = self._counts[order == j].sum(axis=0)
            if c.sum() <= 0:  # no step statistics reached the method (e.g. a hand-driven loop)
                warnings.warn(
                    "Aioli: no realised probe counts this round; solving with the nominal q_j", stacklevel=2
                )
                return self.Q.copy()
            P[j] = c / c.sum()
        return P

    def _update(self, step: int) -> None:
        m = self.ctx.m
        if self._n_drops != self.K:
            warnings.warn(
                f"Aioli round {self._round}: only {self._n_drops} of {self.K} probe intervals were evaluated "
                "in order; keeping the previous mixture",
                stacklevel=2,
            )
            return
        beta = self._G.mean(axis=0)
        # standard error of β from the k independent sweeps (the noise the update sees)
        k = self.lp_rounds
        beta_se = self._G.std(axis=0, ddof=1) / np.sqrt(k) if k > 1 else np.full_like(beta, np.nan)
        P = self._probe_matrix()
        A_raw = solve_A(beta, P, diagonal=bool(self.diagonal), one_hot=self.f == 1.0)
        if not np.all(np.isfinite(A_raw)):
            warnings.warn(
                f"Aioli round {self._round}: non-finite A (val loss {self._prev}); p kept", stacklevel=2
            )
            return
        A = normalize_A(A_raw) if self.normalize else A_raw
        if self.ema is None or self._A_ema is None:
            A_bar = A
        else:
            A_bar = (1.0 - self.ema) * A + self.ema * self._A_ema
        self._A_ema = A_bar
        grad = A_bar.sum(axis=0)  # Σ_i Ā_ij: how much group j lowers the total loss
        if self.update_rule == "multiplicative":
            self._logw = self._logw + self.eta * grad
        else:
            self._logw = self.eta * grad
        self._logw -= self._logw.max()  # keeps exp() finite; p is unchanged
        self._p = softmax(self._logw)
        self._last_A = A
        self._history.append(
            {
                "step": int(step),
                "round": int(self._round),
                "A": A.tolist(),
                "A_raw": A_raw.tolist(),
                "A_ema": A_bar.tolist(),
                "beta": beta.tolist(),
                "beta_se": beta_se.tolist(),
                "G": self._G.tolist(),  # per sweep: the oracle check (results/oracle.py) splits them
                "P": P.tolist(),
                "p": self._p.tolist(),
            }
        )
        metrics = {f"aioli/A/{i}_{j}": float(A[i, j]) for i in range(m) for j in range(m)}
        metrics.update({f"aioli/beta/{i}_{j}": float(beta[i, j]) for i in range(m) for j in range(m)})
        metrics["aioli/round"] = float(self._round)
        self._pending = metrics

    # -- reporting and checkpoints --------------------------------------------------------------
    def log_metrics(self) -> dict[str, float]:
        out, self._pending = self._pending, None
        return out or {}

    def history(self) -> list[dict]:
        """One dict per round update: step, round, A (used, normalised), A_raw, A_ema, beta, beta_se, G (the
        loss drops of each of the k sweeps, whose mean is beta), P, p."""
        return copy.deepcopy(self._history)

    def lmo_matrix(self) -> np.ndarray | None:
        """The latest A^t (after normalisation, before EMA), for the sim() analysis."""
        return None if self._last_A is None else self._last_A.copy()

    def final_proportions(self) -> np.ndarray | None:
        return None  # online: there is no single mixture for a later static stage

    def state_dict(self) -> dict:
        # builtins only: Lightning checkpoints are loaded with weights_only=True
        return {
            "step": self._step,
            "last_validated": self._last_validated,
            "round": self._round,
            "order": list(self._order),
            "G": self._G.tolist(),
            "prev": None if self._prev is None else self._prev.tolist(),
            "prev_tau": self._prev_tau,
            "n_drops": self._n_drops,
            "counts": self._counts.tolist(),
            "logw": self._logw.tolist(),
            "p": self._p.tolist(),
            "A_ema": None if self._A_ema is None else self._A_ema.tolist(),
            "last_A": None if self._last_A is None else self._last_A.tolist(),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "history": copy.deepcopy(self._history),
            "pending": None if self._pending is None else dict(self._pending),
            "schedule": [self.prior_steps, self.U, self.lp_rounds, self.lp_steps, self.ctx.m],
        }

    def load_state_dict(self, state: dict) -> None:
        sched = [self.prior_steps, self.U, self.lp_rounds, self.lp_steps, self.ctx.m]
        if list(state["schedule"]) != sched:
            raise ValueError(
                f"method.mixer: checkpoint schedule (prior_steps, update_steps, lp_rounds, lp_steps, m) = "
                f"{state['schedule']} differs from the config's {sched}"
            )
        arr = np.asarray
        self._step = int(state["step"])
        self._last_validated = int(state["last_validated"])
        self._round = int(state["round"])
        self._order = [int(j) for j in state["order"]]
        self._G = arr(state["G"], dtype=np.float64)
        self._prev = None if state["prev"] is None else arr(state["prev"], dtype=np.float64)
        self._prev_tau = int(state["prev_tau"])
        self._n_drops = int(state["n_drops"])
        self._counts = arr(state["counts"], dtype=np.float64)
        self._logw = arr(state["logw"], dtype=np.float64)
        self._p = arr(state["p"], dtype=np.float64)
        self._A_ema = None if state["A_ema"] is None else arr(state["A_ema"], dtype=np.float64)
        self._last_A = None if state["last_A"] is None else arr(state["last_A"], dtype=np.float64)
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self._history = copy.deepcopy(state["history"])
        self._pending = None if state["pending"] is None else dict(state["pending"])
