"""Paired differences over seeds with a 95% interval, and the verdict a table may claim from them.

Every method runs with common random numbers (the same initialisation and data order per seed), so a
method is compared with stratified seed by seed: d_s = x_s − ref_s, mean ± t_{0.975, n−1} · sd(d) / √n.
A difference is a claim only when its interval excludes 0; otherwise it is a tie, whatever its sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as _st

LEVEL = 0.95


@dataclass(frozen=True)
class Paired:
    """A paired difference (x − ref) over `n` common seeds: mean, sd of the differences, interval."""

    mean: float
    sd: float
    lo: float
    hi: float
    n: int

    @property
    def verdict(self) -> str:
        """'better' (interval below 0), 'worse' (above 0), 'tie' (contains 0), or 'n<2' (no interval)."""
        if self.n < 2 or math.isnan(self.lo):
            return "n<2"
        if self.hi < 0:
            return "better"
        if self.lo > 0:
            return "worse"
        return "tie"


def t_interval(d: np.ndarray, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, lo, hi) of the mean of `d` with Student's t; lo = hi = nan for fewer than 2 values."""
    d = np.asarray(d, dtype=np.float64)
    mean = float(d.mean()) if len(d) else float("nan")
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    half = float(_st.t.ppf(0.5 + level / 2, len(d) - 1)) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def paired(x: pd.Series, ref: pd.Series, level: float = LEVEL) -> Paired | None:
    """x − ref over the seeds both have (Series indexed by seed); None when they share no seed."""
    common = sorted(set(x.index) & set(ref.index))
    if not common:
        return None
    d = x.loc[common].to_numpy(np.float64) - ref.loc[common].to_numpy(np.float64)
    mean, lo, hi = t_interval(d, level)
    sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    return Paired(mean, sd, lo, hi, len(d))


def fmt_paired(p: Paired, digits: int = 3) -> str:
    """'-0.123 [-0.201, -0.045]' with the verdict appended where the interval excludes 0."""
    s = f"{p.mean:+.{digits}f}"
    if p.n >= 2:
        s += f" [{p.lo:+.{digits}f}, {p.hi:+.{digits}f}]"
    v = p.verdict
    return s + (" better" if v == "better" else " worse" if v == "worse" else "")


def wins_text(verdicts: list[str]) -> str:
    """'2 (2/3/1)': the wins, then the W/T/L tally."""
    return f"{sum(v == 'better' for v in verdicts)} ({tally(verdicts)})"


def tally(verdicts: list[str]) -> str:
    """'W/T/L' counts of better / tie (or no interval) / worse."""
    w = sum(v == "better" for v in verdicts)
    lo = sum(v == "worse" for v in verdicts)
    return f"{w}/{len(verdicts) - w - lo}/{lo}"
