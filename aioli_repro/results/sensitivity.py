"""Aioli's sensitivity arms (issue 25; docs/miniature.md, "Sensitivity study"): tables, hypotheses S1–S5.

Each arm changes one thing in Aioli (η, the update rule, normalising A, the number of rounds, the probe
evaluation set). Per (setting, arm): the paired Δ test avg ppl against stratified (seeds 0–4) and
against the refined optimum p* (seeds 0–2), the share of the headroom it recovers, how noisy its probe
signal was (|β| / se), and where its final mixture ended relative to uniform and to p*.
All intervals are `stats.paired` (95% t over common seeds); a difference is a claim only when its
interval excludes 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from aioli_repro.results.probe_noise import noise_table, round_records
from aioli_repro.results.stats import Paired, fmt_paired, paired
from aioli_repro.results.tables import TIDY_COLUMNS, by_seed, present_settings, to_markdown

REFERENCE = "stratified"
NULL = "aioli_null"
# pipeline method name -> row label, in the table's row order (stratified first: the reference)
ARM_LABELS = {
    "stratified": "stratified (reference)",
    "aioli": "released (η 1×)",
    "aioli_eta3x": "released, η 3×",
    "aioli_eta10x": "released, η 10×",
    "aioli_eta30x": "released, η 30×",
    "aioli_mult": "Alg. 1 (η 1×)",
    "aioli_mult_eta3x": "Alg. 1, η 3×",
    "aioli_mult_eta10x": "Alg. 1, η 10×",
    "aioli_mult_eta30x": "Alg. 1, η 30×",
    "aioli_rawA": "A not normalised (η 1×)",
    "aioli_rawA_eta30x": "A not normalised, η 30×",
    "aioli_t2x": "2× rounds, fixed δ",
    "aioli_evalall": "probe eval on the whole val split",
    "aioli_null": "null (η = 0)",
}
ARMS = tuple(ARM_LABELS)
ETA_ARMS = ("aioli", "aioli_eta3x", "aioli_eta10x", "aioli_eta30x")  # S1: the released rule's η ladder
STUDY_SETTINGS = ("A/B/SE", "CC/GH/W")  # the two settings the hypotheses are stated for
S5_RATIO = 1.2


@dataclass(frozen=True)
class Optimum:
    """The refined static optimum of one setting: its mixture p* (group order) and test avg ppl per seed."""

    p: np.ndarray
    test: pd.Series  # index = seed


# -- per-run pieces ----------------------------------------------------------------------------------
def final_p(row: pd.Series, groups: tuple[str, ...]) -> np.ndarray:
    """The run's final exploitation mixture in `groups` order (stratified: uniform; no history: nan)."""
    m = len(groups)
    if row["method"] == REFERENCE:  # stratified trains on uniform and keeps no method history
        return np.full(m, 1 / m)
    summary = json.loads(Path(str(row["path"])).read_text())
    history = summary.get("method_history") or []
    if not history:
        return np.full(m, np.nan)
    # reorder by name: a summary's own group order is the one its p list follows
    own = dict(zip(summary["groups"], map(float, history[-1]["p"])))
    return np.array([own[g] for g in groups], dtype=np.float64)


def l1(a: np.ndarray, b: np.ndarray) -> float:
    """Σ |a − b| (nan when either has a nan)."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).sum())


def _paired_fields(prefix: str, p: Paired | None) -> dict:
    """The numbers of one paired difference as flat columns (nan when there is no common seed)."""
    if p is None:
        return {f"{prefix}_{k}": math.nan for k in ("mean", "sd", "lo", "hi")} | {
            f"{prefix}_n": 0,
            f"{prefix}_verdict": "",
        }
    return {f"{prefix}_mean": p.mean, f"{prefix}_sd": p.sd, f"{prefix}_lo": p.lo, f"{prefix}_hi": p.hi,
            f"{prefix}_n": p.n, f"{prefix}_verdict": p.verdict}  # fmt: skip


def _as_paired(row: pd.Series, prefix: str) -> Paired | None:
    """Rebuild the Paired a row's `prefix_*` columns came from (None when it had no seed in common)."""
    if int(row[f"{prefix}_n"]) == 0:
        return None
    return Paired(*(float(row[f"{prefix}_{k}"]) for k in ("mean", "sd", "lo", "hi")), int(row[f"{prefix}_n"]))


def _noise_by_arm(frame: pd.DataFrame) -> dict[tuple[str, str], tuple[float, float]]:
    """(setting, arm) -> (median |β|/se, share |β| > 2 se) over the arm's rounds, seeds and entries."""
    records = round_records(frame, tuple(a for a in ARMS if a != REFERENCE))
    out = {}
    for arm, rec in records.groupby("method", sort=False):
        for r in noise_table(rec).to_dict("records"):
            out[(r["setting"], arm)] = (float(r["median |beta| / se"]), float(r["share |beta| > 2 se"]))
    return out


def _setting_groups(d: pd.DataFrame) -> tuple[str, ...]:
    """The setting's group order (p* and every final p follow it): the stratified run's, else the first."""
    ref = d[d["method"] == REFERENCE]
    return tuple((ref if len(ref) else d).iloc[0]["groups"])


# -- 1. the numbers ----------------------------------------------------------------------------------
def arm_stats(frame: pd.DataFrame, optimum: dict[str, Optimum]) -> pd.DataFrame:
    """One row per (setting, arm) present: paired Δs, headroom share, probe noise, final p and its L1s.

    Object columns keep what later steps need: `groups`, `p_final` (mean over seeds), `p_star`,
    `test_by_seed` and `delta_by_seed` (dicts seed -> value).
    """
    d = frame[frame["method"].isin(ARMS)]
    if "variant" in d:
        d = d[d["variant"].isna()]  # restricted-setting runs are another study
    noise = _noise_by_arm(d)
    rows = []
    for setting in present_settings(d["setting"]):
        ds = d[d["setting"] == setting]
        groups = _setting_groups(ds)
        m = len(groups)
        u = np.full(m, 1 / m)
        ref = by_seed(ds[ds["method"] == REFERENCE])
        opt = optimum.get(setting)
        p_star = np.asarray(opt.p, np.float64) if opt is not None else np.full(m, np.nan)
        d_opt = paired(opt.test, ref) if opt is not None and len(ref) else None
        headroom = d_opt.mean if d_opt is not None and d_opt.mean < 0 else math.nan  # no headroom: no share
        for arm in ARMS:
            da = ds[ds["method"] == arm].sort_values("seed")
            if da.empty:
                continue
            x = by_seed(da)
            d_ref = paired(x, ref) if len(ref) else None
            d_star = paired(x, opt.test) if opt is not None else None
            ps = np.stack([final_p(r, groups) for _, r in da.iterrows()])
            p_mean = ps.mean(axis=0)
            l1_seed_star = np.array([l1(p, p_star) for p in ps])
            common = sorted(set(x.index) & set(ref.index))
            rows.append({
                "setting": setting, "arm": arm, "label": ARM_LABELS[arm], "n": len(x),
                **_paired_fields("d_strat", d_ref), **_paired_fields("d_opt", d_star),
                "d_headroom": d_opt.mean if d_opt is not None else math.nan,
                "share": d_ref.mean / headroom if d_ref is not None else math.nan,
                "beta_se": noise.get((setting, arm), (math.nan,) * 2)[0],
                "share_2se": noise.get((setting, arm), (math.nan,) * 2)[1],
                "l1_u": l1(p_mean, u), "l1_pstar": l1(p_mean, p_star), "l1_u_pstar": l1(u, p_star),
                # how far each seed's p moved, averaged (S1): the mean p's distance hides opposite moves
                "l1_u_seed_mean": float(np.mean([l1(p, u) for p in ps])),
                "moved_toward": bool(l1(p_mean, p_star) < l1(u, p_star)),
                "n_toward": int((l1_seed_star < l1(u, p_star)).sum()),
                "groups": groups, "p_final": p_mean, "p_star": p_star,
                "test_by_seed": x.to_dict(),
                "delta_by_seed": {s: float(x[s] - ref[s]) for s in common},
            })  # fmt: skip
    return pd.DataFrame(rows)


# -- 2. long form ------------------------------------------------------------------------------------
# statistic name -> (value column, lo column, hi column) of the one-per-arm statistics
_SCALARS = {
    "n_seeds": ("n", None, None),
    "delta_vs_stratified": ("d_strat_mean", "d_strat_lo", "d_strat_hi"),
    "delta_vs_optimum": ("d_opt_mean", "d_opt_lo", "d_opt_hi"),
    "optimum_delta_vs_stratified": ("d_headroom", None, None),
    "share_of_headroom": ("share", None, None),
    "median_abs_beta_over_se": ("beta_se", None, None),
    "share_abs_beta_gt_2se": ("share_2se", None, None),
    "l1_final_p_uniform": ("l1_u", None, None),
    "l1_final_p_optimum": ("l1_pstar", None, None),
    "l1_uniform_optimum": ("l1_u_pstar", None, None),
    "mean_seed_l1_final_p_uniform": ("l1_u_seed_mean", None, None),
    "moved_toward_optimum": ("moved_toward", None, None),
    "n_seeds_toward_optimum": ("n_toward", None, None),
}


def tidy(stats: pd.DataFrame) -> pd.DataFrame:
    """Long form (setting, arm, statistic, seed, value, lo, hi): one row per statistic (seed empty), the
    final p per group (`final_p/<group>`), then per seed the arm's test avg ppl and its Δ vs stratified."""
    out = []
    nan = math.nan
    for r in stats.to_dict("records"):
        key = (r["setting"], r["arm"])
        for name, (v, lo, hi) in _SCALARS.items():
            out.append((*key, name, None, float(r[v]), r[lo] if lo else nan, r[hi] if hi else nan))
        out += [(*key, f"final_p/{g}", None, float(p), nan, nan) for g, p in zip(r["groups"], r["p_final"])]
        out += [(*key, "test_avg_ppl", s, float(v), nan, nan) for s, v in r["test_by_seed"].items()]
        out += [(*key, "delta_vs_stratified", s, float(v), nan, nan) for s, v in r["delta_by_seed"].items()]
    t = pd.DataFrame(out, columns=TIDY_COLUMNS)
    t["seed"] = t["seed"].astype("Int64")  # empty for the per-arm statistics
    return t


# -- 3. markdown -------------------------------------------------------------------------------------
def _fmt_p(p: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:.3f}" for x in p) + ")"


def _fmt_num(x: float, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table_row(r: pd.Series) -> dict[str, str]:
    """One arm's formatted cells."""
    d_ref, d_star = _as_paired(r, "d_strat"), _as_paired(r, "d_opt")
    ref = r["arm"] == REFERENCE
    toward = ("yes" if r["moved_toward"] else "no") + f" ({int(r['n_toward'])}/{int(r['n'])})"
    return {
        "n": str(int(r["n"])),
        "Δ vs stratified [95% CI]": "reference" if ref else fmt_paired(d_ref) if d_ref else "—",
        "Δ vs p* [95% CI]": fmt_paired(d_star) if d_star else "—",
        "share of headroom": "—" if ref else _fmt_num(r["share"]),
        "median \\|β\\|/se (share > 2 se)": "—" if math.isnan(r["beta_se"])
        else f"{r['beta_se']:.2f} ({r['share_2se']:.0%})",
        "final p": _fmt_p(r["p_final"]),
        "L1(p, u)": _fmt_num(r["l1_u"], 3),
        "L1(p, p*)": _fmt_num(r["l1_pstar"], 3),
        "toward p*? (seeds)": toward if not math.isnan(r["l1_u_pstar"]) else "—",
    }  # fmt: skip


LEGEND = """\
Legend. Δ: test avg ppl of the arm minus the reference, paired by seed (negative is better), 95% t
interval; "better" / "worse" when the interval excludes 0, no suffix = tie. Δ vs stratified over the seeds
both have (0–4), Δ vs p* over p*'s seeds (0–2). Share of headroom: mean Δ vs stratified / p*'s mean Δ vs
stratified (— when p* is not better on average). |β|/se: median over rounds, seeds and (i, j) of the
probe's loss drop over its standard error; in brackets the share of entries with |β| > 2 se. Final p: the
last round's exploitation mixture, mean over seeds (stratified: uniform). L1(p, u), L1(p, p*): its
distance from uniform and from p*. Toward p*: L1(p, p*) < L1(u, p*); in brackets the seeds whose own final
p is closer to p* than uniform is."""


def _ordered(stats: pd.DataFrame, setting: str) -> pd.DataFrame:
    """The setting's rows in study order (stratified first, null last)."""
    s = stats[stats["setting"] == setting]
    return s.sort_values("arm", key=lambda c: c.map(ARMS.index), kind="stable").reset_index(drop=True)


def markdown(stats: pd.DataFrame, optimum: dict[str, Optimum]) -> str:
    """One table per setting (rows = arms in study order), p* and its Δ vs stratified above it, a legend."""
    parts = ["# Aioli sensitivity arms (issue 25)", ""]
    for setting in present_settings(stats["setting"]):
        s = _ordered(stats, setting)
        first = s.iloc[0]
        groups = ", ".join(first["groups"])
        parts.append(f"## {setting}")
        parts.append("")
        if setting in optimum:
            head = f"p* ({groups}) = {_fmt_p(np.asarray(optimum[setting].p, np.float64))}"
            head += f"; L1(u, p*) = {first['l1_u_pstar']:.3f}"
            if not math.isnan(first["d_headroom"]):
                head += f"; p*'s mean Δ vs stratified = {first['d_headroom']:+.3f}"
            parts.append(head + ".")
        else:
            parts.append(f"No refined optimum for {setting}: Δ vs p*, share and L1 to p* are empty.")
        parts.append("")
        cells = pd.DataFrame([_table_row(r) for _, r in s.iterrows()])
        cells.index = [ARM_LABELS[a] for a in s["arm"]]
        parts += [to_markdown(cells, "arm"), ""]
    parts.append(LEGEND)
    return "\n".join(parts) + "\n"


# -- 4. hypotheses -----------------------------------------------------------------------------------
def _row(stats: pd.DataFrame, setting: str, arm: str) -> pd.Series | None:
    hit = stats[(stats["setting"] == setting) & (stats["arm"] == arm)]
    return None if hit.empty else hit.iloc[0]


def _between(stats: pd.DataFrame, setting: str, arm: str, other: str) -> Paired | None:
    """arm − other paired by seed on test avg ppl (None when either arm is missing or no seed is shared)."""
    a, b = _row(stats, setting, arm), _row(stats, setting, other)
    if a is None or b is None:
        return None
    return paired(pd.Series(a["test_by_seed"]), pd.Series(b["test_by_seed"]))


def _verdict(fails: bool, missing: list[str]) -> str:
    # a failure anywhere decides; otherwise missing data leaves it open
    return "fails" if fails else f"undecided (missing: {', '.join(missing)})" if missing else "holds"


def _s1(stats: pd.DataFrame) -> str:
    notes, missing, fails = [], [], False
    for setting in STUDY_SETTINGS:
        vals = [_row(stats, setting, a) for a in ETA_ARMS]
        have = [(a, r["l1_u_seed_mean"]) for a, r in zip(ETA_ARMS, vals) if r is not None]
        missing += [f"{setting} {a}" for a, r in zip(ETA_ARMS, vals) if r is None]
        xs = [v for _, v in have]
        ok = all(b > a for a, b in zip(xs, xs[1:]))  # strictly growing over the arms present
        fails |= not ok
        if have:
            notes.append(
                f"{setting}: "
                + (" < " if ok else ", ").join(f"{a} {v:.3f}" for a, v in have)
                + ("" if ok else " (not monotone)")
            )
    return (f"S1 (η raises how far p moves; mean over seeds of L1(p_final, u), η 1×/3×/10×/30×): "
            f"{_verdict(fails, missing)} — " + ("; ".join(notes) or "no data"))  # fmt: skip


def _s2(stats: pd.DataFrame) -> str:
    notes, missing, fails = [], [], False
    for setting in STUDY_SETTINGS:
        s = stats[(stats["setting"] == setting) & (stats["arm"] != REFERENCE)]
        missing += [f"{setting} {a}" for a in ARMS[1:] if a not in set(s["arm"])]
        missing += [f"{setting} {a} (n<2)" for a in s.loc[s["d_strat_verdict"].isin(["n<2", ""]), "arm"]]
        better = list(s.loc[s["d_strat_verdict"] == "better", "arm"])
        high = list(s.loc[s["share"] > 0.5, "arm"])
        fails |= bool(better or high)
        if len(s):
            top = s.loc[s["share"].idxmax()] if s["share"].notna().any() else None
            best = s.loc[s["d_strat_mean"].fillna(math.inf).idxmin()]
            notes.append(f"{setting}: better than stratified: {', '.join(better) or 'none'}; share > 0.5: "
                         f"{', '.join(high) or 'none'}; lowest Δ {best['arm']} {best['d_strat_mean']:+.3f}; "
                         + (f"largest share {top['arm']} {top['share']:.2f}" if top is not None
                            else "no share (p* not better than stratified)"))  # fmt: skip
    return (
        f"S2 (no arm beats stratified, no share of the headroom above 0.5): {_verdict(fails, missing)} — "
        + ("; ".join(notes) or "no data")
    )


def _contains_zero_all(
    stats: pd.DataFrame, pairs: list[tuple[str, str]]
) -> tuple[bool, list[str], list[str]]:
    """Whether an `arm − other` interval excludes 0, what is missing, the numbers (both settings)."""
    notes, missing, fails = [], [], False
    for setting in STUDY_SETTINGS:
        for arm, other in pairs:
            p = _between(stats, setting, arm, other)
            if p is None or p.n < 2:
                missing.append(f"{setting} {arm} − {other}")
                continue
            fails |= p.verdict in ("better", "worse")
            notes.append(f"{setting} {arm} − {other}: {p.mean:+.3f} [{p.lo:+.3f}, {p.hi:+.3f}] (n={p.n})")
    return fails, missing, notes


def _s3(stats: pd.DataFrame) -> str:
    fails, missing, notes = _contains_zero_all(stats, [("aioli_rawA", NULL), ("aioli_rawA_eta30x", NULL)])
    return (f"S3 (A not normalised ties the null arm at η 1× and 30×; interval contains 0): "
            f"{_verdict(fails, missing)} — " + ("; ".join(notes) or "no data"))  # fmt: skip


def _s4(stats: pd.DataFrame) -> str:
    fails, missing, notes = _contains_zero_all(stats, [("aioli_t2x", "aioli")])
    return (f"S4 (2× rounds at fixed δ ties the released arm; interval contains 0): "
            f"{_verdict(fails, missing)} — " + ("; ".join(notes) or "no data"))  # fmt: skip


def _s5(stats: pd.DataFrame) -> str:
    notes, missing, large = [], [], []
    for setting in STUDY_SETTINGS:
        a, b = _row(stats, setting, "aioli_evalall"), _row(stats, setting, "aioli")
        if (
            a is None
            or b is None
            or math.isnan(a["beta_se"])
            or math.isnan(b["beta_se"])
            or b["beta_se"] == 0
        ):
            missing.append(f"{setting} median |β|/se of aioli_evalall or aioli")
            continue
        ratio = a["beta_se"] / b["beta_se"]
        large.append(ratio > S5_RATIO)
        notes.append(f"{setting}: {a['beta_se']:.2f} / {b['beta_se']:.2f} = {ratio:.2f}×")
    nums = "; ".join(notes) or "no data"
    head = f"S5 (whole-split probe evaluation raises median |β|/se by > {S5_RATIO}×)"
    if missing:
        return f"{head}: undecided (missing: {', '.join(missing)}) — {nums}"
    if all(large):
        return f"{head}: holds — evaluation noise is a large part of the estimate's noise; {nums}"
    if not any(large):
        return f"{head}: fails — the noise comes from the training batches; {nums}"
    return f"{head}: undecided (the settings disagree) — {nums}"


def hypotheses(stats: pd.DataFrame) -> list[str]:
    """S1–S5 as pre-registered in docs/miniature.md: a line each, holds / fails / undecided, with numbers."""
    return [f(stats) for f in (_s1, _s2, _s3, _s4, _s5)]


# -- 5. figure ---------------------------------------------------------------------------------------
def plot_final_p(stats: pd.DataFrame, optimum: dict[str, Optimum], path: str | Path) -> Path:
    """A PNG, one panel per setting: each arm's final p per group as dots (rows = arms), p* per group as a
    solid line in the group's colour, uniform as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = present_settings(stats["setting"])
    fig = Figure(figsize=(6.0 * max(len(settings), 1), 0.42 * len(ARMS) + 1.6))
    FigureCanvasAgg(fig)
    for k, setting in enumerate(settings):
        s = _ordered(stats, setting).set_index("arm")
        arms = list(s.index)
        groups = list(s.iloc[0]["groups"])
        ax = fig.add_subplot(1, len(settings), k + 1)
        y = np.arange(len(arms))[::-1]  # first arm on top
        colors = [f"C{j}" for j in range(len(groups))]
        for j, g in enumerate(groups):
            xs = [float(s.loc[a, "p_final"][j]) for a in arms]
            ax.scatter(xs, y + 0.12 * (j - (len(groups) - 1) / 2), color=colors[j], s=22, label=g, zorder=3)
            if setting in optimum:
                ax.axvline(float(np.asarray(optimum[setting].p)[j]), color=colors[j], lw=1.2, alpha=0.8)
        ax.axvline(1 / len(groups), color="0.3", ls="--", lw=1, label="uniform")
        ax.set_yticks(y, [ARM_LABELS[a] for a in arms], fontsize=8)
        ax.set_ylim(-0.7, len(arms) - 0.3)
        ax.set_xlabel("final proportion (mean over seeds)")
        note = " (solid lines: p*)" if setting in optimum else " (no p*)"
        ax.set_title(f"{setting}{note}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncols=len(groups) + 1)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


# -- 6. files ----------------------------------------------------------------------------------------
def write_sensitivity(
    stats: pd.DataFrame, optimum: dict[str, Optimum], out_dir: str | Path
) -> dict[str, Path]:
    """sensitivity.csv (tidy), sensitivity.md (tables + S1–S5), sensitivity_p.png under `out_dir`, from
    `arm_stats` (computed once by the caller, which the verdict also reads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "sensitivity.csv", "md": out / "sensitivity.md", "png": out / "sensitivity_p.png"}
    tidy(stats).to_csv(paths["csv"], index=False)
    lines = "\n".join(f"- {h}" for h in hypotheses(stats))
    paths["md"].write_text(
        markdown(stats, optimum) + "\n## Hypotheses (pre-registered S1–S5)\n\n" + lines + "\n"
    )
    plot_final_p(stats, optimum, paths["png"])
    return paths
