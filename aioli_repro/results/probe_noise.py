"""How noisy Aioli's probe signal is: β (the loss drop a probe causes) against its standard error.

Each round measures β_ij (eval group i, probe j) in k independent sweeps; `Aioli` records their mean
(`beta`) and standard error (`beta_se` = sd over sweeps / √k) in the run summary's `method_history`.
The update can only follow the data where |β| is larger than its standard error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from aioli_repro.results.tables import SETTINGS


def round_records(frame: pd.DataFrame, methods: tuple[str, ...] = ("aioli",)) -> pd.DataFrame:
    """One row per (setting, seed, round, i, j) of the Aioli pipelines in a `load_runs` frame: beta, se."""
    rows = []
    for r in frame[frame["method"].isin(methods)].itertuples(index=False):
        history = json.loads(Path(str(r.path)).read_text()).get("method_history") or []
        for h in history:
            beta = np.asarray(h["beta"], dtype=np.float64)
            se = np.asarray(h.get("beta_se") or np.full_like(beta, np.nan), dtype=np.float64)
            for (i, j), b in np.ndenumerate(beta):
                rows.append(
                    (r.setting, r.method, int(r.seed), int(h["round"]), i, j, float(b), float(se[i, j]))
                )
    return pd.DataFrame(rows, columns=["setting", "method", "seed", "round", "i", "j", "beta", "se"])


def noise_table(records: pd.DataFrame) -> pd.DataFrame:
    """Per setting: rounds, median |β|, median SE, their ratio, and the share of entries with |β| > 2 SE."""
    out = []
    for setting, d in records.groupby("setting", sort=False):
        d = d.dropna(subset=["se"])
        absb = d["beta"].abs()
        out.append({
            "setting": setting, "runs": d[["method", "seed"]].drop_duplicates().shape[0],
            "rounds": d.groupby(["method", "seed"])["round"].nunique().mean(),
            "median |beta|": absb.median(), "median se": d["se"].median(),
            "median |beta| / se": float((absb / d["se"]).median()),
            "share |beta| > 2 se": float((absb > 2 * d["se"]).mean()),
        })  # fmt: skip
    order = {s: i for i, s in enumerate(SETTINGS)}
    return pd.DataFrame(out).sort_values("setting", key=lambda c: c.map(order), kind="stable")
