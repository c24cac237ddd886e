"""The refined headroom table (issue 25): the local search's optimum p* beside the grid's best point,
each against stratified, and p* against Skill-It, on test, paired by seed with 95% t intervals.

The search chose p* on val (`mixing.simplex_search`); test is read only here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from aioli_repro.results.stats import Paired, fmt_paired, paired
from aioli_repro.results.tables import HEADROOM, TIDY_COLUMNS
from aioli_repro.results.tables import REFINED as REFINED_ROW

GRID, REFINED = HEADROOM, REFINED_ROW  # the Table 2 row names


@dataclass
class SearchResult:
    """One setting's search: the start (the grid's best point) and the optimum, with test per seed."""

    setting: str  # the row label, e.g. "A/B/SE" (the `setting` column of `load_runs`)
    groups: list[str]
    start_p: np.ndarray
    start_test: pd.Series
    opt_p: np.ndarray
    opt_test: pd.Series
    iterations: int
    points: int
    complete: bool


def _stat(rows: list[dict], setting: str, arm: str, name: str, pr: Paired | None) -> None:
    if pr is not None:
        rows.append({"setting": setting, "arm": arm, "statistic": name, "seed": None,
                     "value": pr.mean, "lo": pr.lo, "hi": pr.hi})  # fmt: skip


def tidy(results: list[SearchResult], stratified: dict[str, pd.Series], skillit: dict[str, pd.Series]):
    """Long form: per setting and arm, the mixture, test avg ppl per seed and the paired differences."""
    rows: list[dict] = []
    for r in results:
        ref, sk = stratified.get(r.setting), skillit.get(r.setting)
        for arm, p, test in ((GRID, r.start_p, r.start_test), (REFINED, r.opt_p, r.opt_test)):
            for g, v in zip(r.groups, p):
                rows.append({"setting": r.setting, "arm": arm, "statistic": f"p/{g}", "seed": None,
                             "value": float(v), "lo": np.nan, "hi": np.nan})  # fmt: skip
            for seed, v in test.items():
                rows.append({"setting": r.setting, "arm": arm, "statistic": "test_avg_ppl", "seed": int(seed),
                             "value": float(v), "lo": np.nan, "hi": np.nan})  # fmt: skip
            _stat(rows, r.setting, arm, "delta_vs_stratified", paired(test, ref) if ref is not None else None)
        _stat(
            rows, r.setting, REFINED, "delta_vs_skillit", paired(r.opt_test, sk) if sk is not None else None
        )
        _stat(rows, r.setting, REFINED, "delta_vs_grid", paired(r.opt_test, r.start_test))
        if sk is not None and ref is not None:
            _stat(rows, r.setting, "Skill-It", "delta_vs_stratified", paired(sk, ref))
        rows.append({"setting": r.setting, "arm": REFINED, "statistic": "search_iterations", "seed": None,
                     "value": float(r.iterations), "lo": np.nan, "hi": np.nan})  # fmt: skip
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def markdown(
    results: list[SearchResult], stratified: dict[str, pd.Series], skillit: dict[str, pd.Series], footer: str
) -> str:
    """One row per setting: both mixtures, their Δ from stratified, p* − Skill-It and p* − grid."""

    def cell(x: pd.Series, ref: pd.Series | None) -> str:
        pr = paired(x, ref) if ref is not None else None
        return fmt_paired(pr) if pr is not None else "—"

    head = (
        "| Setting | grid best p | Δ grid − stratified | refined p* | Δ p* − stratified | Δ p* − grid | "
        "Skill-It − stratified | Δ p* − Skill-It | iterations (points) |"
    )
    lines = [
        "**Refined headroom: the best static mixture from a local search started at the grid's best "
        "point** (test avg ppl, paired by seed, 95% t-interval; `better` / `worse` only where the interval "
        "excludes 0)",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in results:
        ref, sk = stratified.get(r.setting), skillit.get(r.setting)
        sk_ref = fmt_paired(paired(sk, ref)) if sk is not None and ref is not None else "—"
        lines.append(
            f"| {r.setting} | {_p(r.start_p)} | {cell(r.start_test, ref)} | "
            f"{_p(r.opt_p)} | {cell(r.opt_test, ref)} | {cell(r.opt_test, r.start_test)} | {sk_ref} | "
            f"{cell(r.opt_test, sk)} | {r.iterations} ({r.points}){'' if r.complete else ', incomplete'} |"
        )
    lines += [
        "",
        "p* was chosen on val (mean over seeds 0–2; a move only when better by more than one standard "
        "error of the paired val difference), never on test. Grid best p: the start, the committed "
        "headroom grid's val-best point, re-run as a static run. Search rule: docs/miniature.md (issue 25). "
        "Trace of every evaluated point: `refined_headroom_trace.csv`.",
        "",
        footer,
    ]
    return "\n".join(lines)


def _p(p: np.ndarray) -> str:
    return " / ".join(f"{v:.3f}" for v in p)
