"""A seeded local search on the simplex for the best static mixture (the refined headroom, issue 25).

The headroom grid (`simplex.headroom_points`) is a lower bound on what a static mixture can reach: a
method beat its best point. This search starts from the grid's best point and moves one group's share at
a time, so every candidate is a mixture a reader can name:

    raise group i by s:  c'_i = c_i + s, the other groups scaled by (1 − c_i − s) / (1 − c_i)
    lower group i by s:  c'_i = c_i − s, the other groups scaled by (1 − c_i + s) / (1 − c_i)

A candidate replaces the centre only when it is better by more than its noise (`accepts`); otherwise the
step halves. The rule is pre-registered in docs/miniature.md; the runs it asks for are made elsewhere
(`pipeline.refine`), and this module only decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DIGITS = 6  # mixtures are run from their printed form, so the same point always gets the same stage hash


@dataclass(frozen=True)
class SearchRule:
    """The pre-registered schedule: initial step, the step below which the search stops, at most
    `max_iters` iterations, and the smallest share a group may get."""

    step: float
    min_step: float
    max_iters: int
    floor: float = 0.02


def rule_for(m: int) -> SearchRule:
    """docs/miniature.md: s0 = 0.1 (m = 2), 1/7 (m = 3, the grid's spacing), 0.1 (m >= 4); stop below
    s0 / 4 or after 8 / 6 / 4 iterations."""
    s0 = 1.0 / 7.0 if m == 3 else 0.1
    iters = 8 if m == 2 else 6 if m == 3 else 4
    return SearchRule(step=s0, min_step=s0 / 4.0, max_iters=iters)


def canonical(p: np.ndarray | list[float]) -> np.ndarray:
    """p rounded to `DIGITS` decimals, the largest share absorbing the rounding so that it sums to 1."""
    q = np.round(np.asarray(p, dtype=np.float64), DIGITS)
    k = int(np.argmax(q))
    q[k] = round(1.0 - (q.sum() - q[k]), DIGITS)
    return q


def neighbours(c: np.ndarray, s: float, floor: float = 0.02) -> list[np.ndarray]:
    """The 2m moves of step s from centre c (raise, then lower, each group in order), without the moves
    that would leave any group below `floor`."""
    c = np.asarray(c, dtype=np.float64)
    out = []
    for i in range(len(c)):
        for sign in (1.0, -1.0):
            ci = c[i] + sign * s
            if ci < floor or ci > 1.0 - floor:
                continue
            q = c * ((1.0 - ci) / (1.0 - c[i]))
            q[i] = ci
            if q.min() < floor - 1e-12:
                continue
            out.append(canonical(q))
    return out


def accepts(candidate: np.ndarray, centre: np.ndarray) -> bool:
    """A candidate beats the centre beyond its noise: over the seeds both ran (values in seed order),
    the paired difference of val avg ppl has mean + one standard error < 0."""
    d = np.asarray(candidate, dtype=np.float64) - np.asarray(centre, dtype=np.float64)
    if len(d) < 2:
        return bool(d.mean() < 0)
    return bool(d.mean() + d.std(ddof=1) / math.sqrt(len(d)) < 0)


@dataclass
class SearchState:
    """Where one setting's search is: centre, step, iterations done, and whether it has stopped."""

    centre: np.ndarray
    step: float
    iters: int = 0
    done: bool = False

    def advance(self, rule: SearchRule, moved_to: np.ndarray | None) -> None:
        """After an iteration: move to the accepted candidate, or halve the step; stop per the rule."""
        self.iters += 1
        if moved_to is not None:
            self.centre = canonical(moved_to)
        else:
            self.step /= 2.0
        self.done = self.step < rule.min_step - 1e-12 or self.iters >= rule.max_iters


def choose(centre_vals: np.ndarray, candidate_vals: list[np.ndarray]) -> int | None:
    """Index of the candidate with the lowest mean val that `accepts` against the centre, else None."""
    if not candidate_vals:
        return None
    best = int(np.argmin([np.mean(v) for v in candidate_vals]))
    return best if accepts(candidate_vals[best], centre_vals) else None
