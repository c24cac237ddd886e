"""Where the later methods' mixtures land (issue 26, hypothesis P6): each method's p, mean over seeds,
and its L1 distance to the token prior (RegMix's and Olmix's centre), to the refined optimum p* (where
`make sensitivity` measured one) and to the uniform (stratified) mixture.

Written by `reproduce post` as `table2_post_mixtures.{csv,md}`; the CSV is the tidy long form of the
study tables (setting, arm, statistic, seed, value, lo, hi)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from aioli_repro.results.tables import MISSING, POST_LABELS, REFINED, TIDY_COLUMNS, to_markdown

PRIOR = "Token prior"


def final_mixture(row: pd.Series) -> dict[str, float]:
    """The mixture a run trained on at the end: the offline methods' learned p, else the final p."""
    learned = row.get("learned_proportions")
    return dict(learned) if isinstance(learned, dict) and learned else dict(row["proportions"])


def refined_optima(refined_csv: pd.DataFrame) -> dict[str, dict[str, float]]:
    """p* per setting from `refined_headroom.csv` (rows `p/<group>` of the refined arm)."""
    t = refined_csv[(refined_csv["arm"] == REFINED) & refined_csv["statistic"].str.startswith("p/")]
    out = {}
    for setting, g in t.groupby("setting"):
        out[setting] = {stat[2:]: float(v) for stat, v in zip(g["statistic"], g["value"])}
    return out


def _l1(p: dict[str, float], q: dict[str, float]) -> float:
    return float(sum(abs(p[g] - q.get(g, 0.0)) for g in p))


def mixture_distances(
    df: pd.DataFrame, priors: dict[str, dict[str, float]], optima: dict[str, dict[str, float]]
) -> pd.DataFrame:
    """Tidy rows per (setting, method): per seed its L1 to the prior / p* / uniform, and the means of
    those and of each group's weight over seeds; the prior and p* themselves as their own arms."""
    rows = []
    for setting, prior in priors.items():
        rows += [(setting, PRIOR, f"p/{g}", None, w) for g, w in prior.items()]
        if setting in optima:
            rows += [(setting, REFINED, f"p/{g}", None, w) for g, w in optima[setting].items()]
        for method, label in POST_LABELS.items():
            runs = df[(df["setting"] == setting) & (df["method"] == method)]
            if runs.empty:
                continue
            ps = [(int(r["seed"]), final_mixture(r)) for _, r in runs.iterrows()]
            uniform = {g: 1.0 / len(prior) for g in prior}
            targets = {"l1_prior": prior, "l1_uniform": uniform}
            if setting in optima:
                targets["l1_optimum"] = optima[setting]
            for stat, q in targets.items():
                per_seed = [_l1(p, q) for _, p in ps]
                rows += [(setting, label, stat, seed, v) for (seed, _), v in zip(ps, per_seed)]
                rows.append((setting, label, stat, None, float(np.mean(per_seed))))
            rows += [(setting, label, f"p/{g}", None, float(np.mean([p[g] for _, p in ps]))) for g in prior]
    out = pd.DataFrame(rows, columns=["setting", "arm", "statistic", "seed", "value"])
    return out.assign(lo=np.nan, hi=np.nan)[TIDY_COLUMNS]


def mixtures_markdown(tidy: pd.DataFrame) -> str:
    """One row per (setting, arm): its mean p and its mean L1 distances."""
    means = tidy[tidy["seed"].isna()]
    lines = []
    for (setting, arm), g in means.groupby(["setting", "arm"], sort=False):
        stat = dict(zip(g["statistic"], g["value"]))
        p = " / ".join(f"{v:.3f}" for k, v in stat.items() if k.startswith("p/"))
        keys = ("l1_prior", "l1_optimum", "l1_uniform")
        cell = {k: f"{stat[k]:.3f}" if k in stat else MISSING for k in keys}
        lines.append({"Setting": setting, "Arm": arm, "p (mean over seeds)": p, **cell})
    table = pd.DataFrame(lines).rename(
        columns={"l1_prior": "L1 to prior", "l1_optimum": "L1 to p*", "l1_uniform": "L1 to uniform"}
    )
    groups = {s: [k[2:] for k in g["statistic"] if k.startswith("p/")] for s, g in means.groupby("setting")}
    order = "; ".join(f"{s}: {', '.join(dict.fromkeys(gs))}" for s, gs in groups.items())
    return (
        "**Where the later methods' mixtures land** (p: the mixture of the final run, mean over seeds; "
        "L1: mean over seeds of each seed's distance)\n\n"
        f"{to_markdown(table.set_index('Setting'), 'Setting')}\n\n"
        f"Group order: {order}. Token prior: each group's share of the training tokens (RegMix's and Olmix's "
        f"centre, ADO's prior). {REFINED}: p* of `refined_headroom.csv` (`make sensitivity`).\n"
    )
