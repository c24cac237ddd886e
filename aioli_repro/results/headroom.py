"""The headroom table: how much better than stratified the best static mixture is, per setting.

Reads the `headroom` pipelines (`Pipeline.headroom`: static runs on the same fixed grid for every seed).
The best static mixture is chosen once per setting, by the mean over seeds of val avg ppl (never test),
and its test avg ppl is then compared with stratified seed by seed (`stats.paired`). A setting whose
interval does not lie below 0 has no measurable headroom: a negative control, where a mixing method's
right answer is a tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from aioli_repro.results.stats import fmt_paired, paired
from aioli_repro.results.tables import by_seed

GRID_COLUMNS = ["setting", "seed", "point", "p", "val_avg_ppl", "test_avg_ppl"]


def load_grid(frame: pd.DataFrame) -> pd.DataFrame:
    """Every grid point of the headroom pipelines in a `load_runs` frame (summary source): one row per
    (setting, seed, point) with the mixture as text. Stratified runs of the same settings and seeds join
    as point -1, "uniform": stratified is itself a static mixture, so the best static mixture is never
    worse than it (the m = 7 cover has no near-uniform point)."""
    rows = []
    for r in frame[frame["method"] == "headroom"].itertuples(index=False):
        summary = json.loads(Path(str(r.path)).read_text())
        for i, pt in enumerate(summary.get("headroom_grid", [])):
            p = " ".join(f"{v:.3f}" for v in pt["p"].values())
            rows.append((r.setting, int(r.seed), i, p, float(pt["val/avg_ppl"]), float(pt["test/avg_ppl"])))
    grid = pd.DataFrame(rows, columns=GRID_COLUMNS)
    seeds = set(zip(grid["setting"], grid["seed"]))
    for r in frame[frame["method"] == "stratified"].itertuples(index=False):
        if (r.setting, int(r.seed)) in seeds:
            rows.append((r.setting, int(r.seed), -1, "uniform", float(r.val_avg_ppl), float(r.test_avg_ppl)))
    return pd.DataFrame(rows, columns=GRID_COLUMNS)


def best_static(grid: pd.DataFrame) -> pd.DataFrame:
    """Per setting, the point with the lowest mean val avg ppl over seeds: its rows (one per seed)."""
    if grid.empty:
        return grid.copy()
    mean_val = grid.groupby(["setting", "point"])["val_avg_ppl"].mean().reset_index()
    chosen = mean_val.loc[mean_val.groupby("setting")["val_avg_ppl"].idxmin(), ["setting", "point"]]
    return grid.merge(chosen, on=["setting", "point"]).sort_values(["setting", "seed"]).reset_index(drop=True)


def headroom_table(grid: pd.DataFrame, stratified: pd.DataFrame, settings: list[str]) -> pd.DataFrame:
    """One row per setting: grid size, seeds, best static p, stratified and best test avg ppl, the paired
    difference with its 95% interval, and the verdict (better = headroom beyond the noise)."""
    best = best_static(grid)
    rows = []
    for s in [x for x in settings if x in set(grid["setting"])]:
        b, ref = best[best["setting"] == s], by_seed(stratified[stratified["setting"] == s])
        pd_ = paired(by_seed(b), ref)
        g = grid[grid["setting"] == s]
        rows.append({
            "setting": s, "grid points": int((g["point"].unique() >= 0).sum()), "seeds": g["seed"].nunique(),
            "best static p": b["p"].iloc[0], "stratified": round(float(ref.mean()), 3) if len(ref) else None,
            "best static": round(float(by_seed(b).mean()), 3),
            "Δ [95% CI]": fmt_paired(pd_) if pd_ else "—", "verdict": pd_.verdict if pd_ else "no stratified",
            "delta": pd_.mean if pd_ else None, "lo": pd_.lo if pd_ else None, "hi": pd_.hi if pd_ else None,
        })  # fmt: skip
    return pd.DataFrame(rows)


def point_table(grid: pd.DataFrame, stratified: pd.DataFrame) -> pd.DataFrame:
    """Every grid point: mean val and test avg ppl over seeds and the mean paired test difference."""
    ref = stratified.set_index(["setting", "seed"])["test_avg_ppl"]
    g = grid.join(ref.rename("stratified"), on=["setting", "seed"])
    g["delta"] = g["test_avg_ppl"] - g["stratified"]
    out = g.groupby(["setting", "point", "p"], sort=False)[["val_avg_ppl", "test_avg_ppl", "delta"]].mean()
    return out.round(4).reset_index()
