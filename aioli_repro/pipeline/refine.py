"""The refined headroom (issue 25): `mixing.simplex_search` run as static pipelines, every setting in
lockstep so that each iteration's runs fill the worker pool.

Every point is a `method=static` pipeline (multinomial batches, like the headroom grid's points) at each
seed, cached by its config hash like any other pipeline, so a re-run replays the search from its runs in
seconds and an interrupted one resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from aioli_repro.mixing.simplex_search import (
    DIGITS,
    SearchRule,
    SearchState,
    canonical,
    choose,
    neighbours,
    rule_for,
)
from aioli_repro.pipeline.launch import run_inprocess
from aioli_repro.pipeline.sweep import Job, jobs_for

# The search starts at the committed headroom grid's val-best point of each setting
# (docs/results/tiny/headroom.md, seeds 0-2; "uniform" where stratified itself was best).
GRID_BEST = {
    "a_se": [0.5, 0.5],
    "gh_c4": [0.3, 0.7],
    "b_se": [0.6, 0.4],
    "a_b_se": [2 / 7, 3 / 7, 2 / 7],
    "cc_gh_w": [3 / 7, 2 / 7, 2 / 7],
    "slimpajama_all": [1 / 7] * 7,
}
REQUIRED = ("a_b_se", "cc_gh_w", "slimpajama_all")  # the minimum; the m = 2 settings follow


def fmt_p(p: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.{DIGITS}f}".rstrip("0").rstrip(".") for x in canonical(p)) + "]"


@dataclass
class PointRuns:
    """One mixture's runs in one setting: val and test avg ppl per seed (seed order), or None if missing."""

    setting: str
    p: np.ndarray
    jobs: list[Job]
    val: np.ndarray | None = None
    test: np.ndarray | None = None

    def read(self) -> bool:
        if not all(j.refresh() for j in self.jobs):
            return False
        summaries = [json.loads((j.dirs[0] / "summary.json").read_text()) for j in self.jobs]
        self.val = np.array([s["val/avg_ppl"] for s in summaries], dtype=np.float64)
        self.test = np.array([s["test/avg_ppl"] for s in summaries], dtype=np.float64)
        return True


@dataclass
class Search:
    """A setting's search: its state and every point it evaluated, in order (the trace)."""

    setting: str
    state: SearchState
    trace: list[dict] = field(default_factory=list)
    centre_runs: PointRuns | None = None
    start_runs: PointRuns | None = None
    seeds: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    complete: bool = True  # False: it stopped at missing runs (--no-run, or a failed run), not by its rule


def point_runs(
    setting: str, p: np.ndarray, seeds: Sequence[int], base: list[str], results_dir: Path
) -> PointRuns:
    overrides = [
        [*base, "method=static", f"method.mixer.proportions={fmt_p(p)}", f"groups={setting}", f"seed={s}"]
        for s in seeds
    ]
    return PointRuns(setting, canonical(p), jobs_for(overrides, results_dir, "sensitivity"))


def _run(points: list[PointRuns], results_dir: Path, n_jobs: int, run: bool) -> None:
    """Train what the points lack (all settings at once), then read every point's results."""
    jobs = [j for pt in points for j in pt.jobs]
    pending = [j for j in jobs if not j.done]
    if run and pending:
        run_inprocess("table2", pending, results_dir, n_jobs=n_jobs)
    for pt in points:
        pt.read()


def _record(search: Search, pt: PointRuns, role: str, accepted: bool) -> None:
    search.trace.append({
        "setting": search.setting, "iteration": search.state.iters, "step": round(search.state.step, 6),
        "role": role, "p": " ".join(f"{x:.4f}" for x in pt.p), "accepted": accepted,
        "val_avg_ppl": float(np.mean(pt.val)) if pt.val is not None else float("nan"),
        "test_avg_ppl": float(np.mean(pt.test)) if pt.test is not None else float("nan"),
    })  # fmt: skip


def refine(
    settings: Sequence[str],
    seeds: Sequence[int],
    base: list[str],
    results_dir: Path,
    n_jobs: int = 2,
    run: bool = True,
    log: Callable[[str], None] = print,
    max_iters: int | None = None,
) -> list[Search]:
    """Run every setting's search to its stop; `base` holds the scale and results_dir overrides. With
    run=False a search stops at the first point whose runs are missing (then it is not `complete`).
    max_iters: fewer iterations than the pre-registered rule's (tests)."""

    def rule(m: int) -> SearchRule:
        r = rule_for(m)
        return r if max_iters is None else replace(r, max_iters=min(r.max_iters, max_iters))

    searches = []
    for s in settings:
        start = np.asarray(GRID_BEST[s], dtype=np.float64)
        searches.append(Search(s, SearchState(canonical(start), rule(len(start)).step)))
    centres = [point_runs(x.setting, x.state.centre, seeds, base, results_dir) for x in searches]
    _run(centres, results_dir, n_jobs, run)
    for x, c in zip(searches, centres, strict=True):
        x.centre_runs = x.start_runs = c
        x.seeds, x.groups = list(seeds), [str(g) for g in c.jobs[0].cfg.groups.names]
        _record(x, c, "start", True)
    while True:
        for x in searches:
            if x.centre_runs.val is None and not x.state.done:
                x.state.done, x.complete = True, False
        active = [x for x in searches if not x.state.done]
        if not active:
            return searches
        cands = {
            x.setting: [point_runs(x.setting, q, seeds, base, results_dir) for q in neighbours(
                x.state.centre, x.state.step, rule(len(x.state.centre)).floor)]
            for x in active
        }  # fmt: skip
        _run([pt for pts in cands.values() for pt in pts], results_dir, n_jobs, run)
        for x in active:
            pts = cands[x.setting]
            if any(pt.val is None for pt in pts):
                log(f"[refine] {x.setting}: runs missing at iteration {x.state.iters}; stopped there")
                x.state.done, x.complete = True, False
                continue
            best = choose(x.centre_runs.val, [pt.val for pt in pts])
            for i, pt in enumerate(pts):
                _record(x, pt, "candidate", i == best)
            moved = pts[best] if best is not None else None
            x.state.advance(rule(len(x.state.centre)), None if moved is None else moved.p)
            if moved is not None:
                x.centre_runs = moved
            log(
                f"[refine] {x.setting}: iteration {x.state.iters}, "
                + (f"moved to {fmt_p(moved.p)}" if moved is not None else f"no move, step {x.state.step:.4f}")
                + (" (stopped)" if x.state.done else "")
            )


def trace_frame(searches: list[Search]) -> pd.DataFrame:
    """Every evaluated point of every search, in order."""
    return pd.DataFrame([row for x in searches for row in x.trace])
