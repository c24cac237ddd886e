"""Paper tables from the `results.load_runs` frame: Table 2 (unrestricted) and Table 3 (restricted).

Each builder returns `(DataFrame of formatted cells, markdown)`; the numbers behind the cells are kept
as plain records in `table.attrs["cells"]` (used by `plot_table` and `paper_side_by_side`).
Convention of the paper: the Stratified row is absolute average test perplexity, every other row the
difference from stratified (negative is better).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

SETTINGS = ("A/SE", "GH/C4", "B/SE", "A/B/SE", "CC/GH/W", "SlimPajama")
# pipeline method name -> row label, in the paper's row order
METHOD_LABELS = {
    "stratified": "Stratified",
    "grid": "GS",
    "dml": "DML",
    "skillit": "Skill-It",
    "doremi": "DoReMi",
    "doge": "DoGE",
    "aioli": "Aioli",
}
BASELINES = ("grid", "dml", "skillit", "doremi", "doge")  # Table 3 rows
MISSING = "—"
BEATING = "# settings beating stratified"
EXTRA = "# extra runs"
TOKENS = "tokens"

# Paper Table 2 (v2 §6.1; reference/paper.md §4.1): Stratified = absolute avg test ppl, others = delta.
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "Stratified": {"A/SE": 16.532, "GH/C4": 35.991, "B/SE": 47.192, "A/B/SE": 35.114, "CC/GH/W": 41.583,
                   "SlimPajama": 26.426},
    "GS": {"A/SE": -0.399, "GH/C4": -0.407, "B/SE": -0.645, "A/B/SE": -0.247, "CC/GH/W": 0.298,
           "SlimPajama": 0.490},
    "DML": {"A/SE": -0.241, "GH/C4": -0.110, "B/SE": -0.644, "A/B/SE": -0.599, "CC/GH/W": 0.242,
            "SlimPajama": 1.641},
    "Skill-It": {"A/SE": -0.326, "GH/C4": 0.551, "B/SE": -0.728, "A/B/SE": -0.568, "CC/GH/W": -0.195,
                 "SlimPajama": -0.184},
    "DoReMi": {"A/SE": -0.307, "GH/C4": 5.303, "B/SE": -0.217, "A/B/SE": -0.393, "CC/GH/W": 6.898,
               "SlimPajama": 0.703},
    "DoGE": {"A/SE": 0.419, "GH/C4": 0.184, "B/SE": -0.678, "A/B/SE": 1.843, "CC/GH/W": 0.604,
             "SlimPajama": 0.949},
    "Aioli": {"A/SE": -0.205, "GH/C4": -0.340, "B/SE": -0.439, "A/B/SE": -0.226, "CC/GH/W": -0.196,
              "SlimPajama": -0.240},
}  # fmt: skip
PAPER_BEATING = {"GS": 4, "DML": 4, "Skill-It": 5, "DoReMi": 3, "DoGE": 1, "Aioli": 6}
PAPER_EXTRA_RUNS = {"Stratified": "0", "GS": "10", "DML": "10", "Skill-It": "m", "DoReMi": "2", "DoGE": "1",
                    "Aioli": "0"}  # fmt: skip
# Paper Table 3 (v2 §6.2): only aggregates are known; per-cell numbers were not found.
PAPER_TABLE3_SUMMARY = {"improved": 28, "comparisons": 30, "mean_gain": 1.202, "max_gain": 12.012}


def paper_table2() -> pd.DataFrame:
    """The paper's Table 2 as a numeric frame (rows = method labels) plus its two count columns."""
    t = pd.DataFrame(PAPER_TABLE2).T[list(SETTINGS)]
    t[BEATING] = pd.Series(PAPER_BEATING)
    t[EXTRA] = pd.Series(PAPER_EXTRA_RUNS)
    return t


# -- numbers -----------------------------------------------------------------------------------------
def _by_seed(d: pd.DataFrame) -> pd.Series:
    return d.set_index("seed")["test_avg_ppl"].astype(float).sort_index()


def _delta(x: pd.Series, ref: pd.Series) -> tuple[float, float, int, bool]:
    """(mean, std, n, paired): paired over seeds when every seed of x has a reference run, else a
    difference of means (no std)."""
    if set(x.index) <= set(ref.index):
        diff = x - ref.loc[x.index]
        std = float(diff.std(ddof=1)) if len(diff) > 1 else float("nan")
        return float(diff.mean()), std, len(diff), True
    return float(x.mean() - ref.mean()), float("nan"), len(x), False


def _stats(x: pd.Series) -> tuple[float, float, int]:
    return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else float("nan")), len(x)


def _check_unique(d: pd.DataFrame, keys: list[str]) -> None:
    dup = d[d.duplicated(keys, keep=False)]
    if len(dup):
        rows = sorted({tuple(r) for r in dup[keys].itertuples(index=False)})
        raise ValueError(
            f"several runs for the same {keys}: {rows[:5]}; filter the frame (e.g. by data or hp)"
        )


def _scale_rows(df: pd.DataFrame, scale: str | None) -> pd.DataFrame:
    if scale is None:
        return df
    d = df[df["scale"] == scale]
    if d.empty:
        raise ValueError(
            f"no runs at scale {scale!r}; scales present: {sorted(df['scale'].dropna().unique())}"
        )
    if d["data"].nunique() > 1:
        raise ValueError(
            f"runs at scale {scale!r} come from several data sources {sorted(d['data'].unique())}; "
            "filter the frame to one before building a table"
        )
    return d


def table2_cells(df: pd.DataFrame, scale: str | None = None) -> pd.DataFrame:
    """Long numeric form of Table 2: row, method, setting, kind (abs | delta), mean, std, n, paired."""
    d = _scale_rows(df, scale)
    if "variant" in d:
        d = d[d["variant"].isna()]  # restricted-setting runs belong to Table 3
    d = d[d["method"].isin(list(METHOD_LABELS))]
    _check_unique(d, ["setting", "method", "seed"])
    cells = []
    for setting in SETTINGS:
        ref = _by_seed(d[(d["setting"] == setting) & (d["method"] == "stratified")])
        for method, label in METHOD_LABELS.items():
            x = _by_seed(d[(d["setting"] == setting) & (d["method"] == method)])
            if x.empty or ref.empty:
                continue
            if method == "stratified":  # the reference row: absolute values
                kind, (mean, std, n), paired = "abs", _stats(x), True
            else:
                kind, (mean, std, n, paired) = "delta", _delta(x, ref)
            cell = dict(row=label, method=method, setting=setting, kind=kind, mean=mean, std=std, n=n)
            cells.append({**cell, "paired": paired})
    return pd.DataFrame(cells, columns=["row", "method", "setting", "kind", "mean", "std", "n", "paired"])


# -- formatting --------------------------------------------------------------------------------------
def _fmt(mean: float, std: float, signed: bool, paired: bool = True) -> str:
    s = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    if not math.isnan(std):
        s += f" ± {std:.3f}"
    return s if paired else s + "†"


def _human(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _seeds_text(ns: list[int]) -> str:
    if not ns:
        return "no runs"
    lo, hi = min(ns), max(ns)
    return f"{lo} seed{'s' if lo > 1 else ''}" if lo == hi else f"{lo}–{hi} seeds per cell"


def to_markdown(table: pd.DataFrame, index_label: str = "Method") -> str:
    """A GitHub-markdown table of a frame of strings (no `tabulate` dependency)."""
    head = [index_label, *map(str, table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx), *map(str, row.tolist())]) + " |")
    return "\n".join(lines)


def build_table2(df: pd.DataFrame, scale: str, data_label: str) -> tuple[pd.DataFrame, str]:
    """Table 2 for the runs at `scale`: rows = methods, columns = the six settings + three summaries.

    data_label describes the data source for the header (e.g. "synthetic groups — not SlimPajama").
    Cells: Stratified = mean ± std (over seeds) of test avg ppl; others = delta vs stratified, paired
    over seeds (std of the per-seed differences) or, marked †, a difference of means. Std is omitted
    for a single seed; missing cells are "—".
    """
    cells = table2_cells(df, scale)
    d = _scale_rows(df, scale)
    if "variant" in d:
        d = d[d["variant"].isna()]
    cols = [*SETTINGS, BEATING, EXTRA, TOKENS]
    table = pd.DataFrame(MISSING, index=list(METHOD_LABELS.values()), columns=cols, dtype=object)
    table.index.name = "Method"
    for c in cells.itertuples(index=False):
        table.loc[c.row, c.setting] = _fmt(c.mean, c.std, c.kind == "delta", c.paired)
    for method, label in METHOD_LABELS.items():
        mine = cells[cells["method"] == method]
        if method != "stratified" and len(mine):
            table.loc[label, BEATING] = str(int((mine["mean"] < 0).sum()))
        runs = d[d["method"] == method]
        if len(runs):
            table.loc[label, EXTRA] = f"{round(float(runs['extra_runs'].mean()), 2):g}"
            table.loc[label, TOKENS] = _human(float(runs["total_tokens"].mean()))
    table.attrs.update(cells=cells.to_dict("records"), scale=scale, data_label=data_label)
    header = f"**Table 2 (scale: {scale}, data: {data_label}; {_seeds_text(cells['n'].tolist())})**"
    notes = (
        "Stratified: absolute average test perplexity (mean ± std over seeds). Other rows: difference "
        "from stratified, paired over seeds (negative is better). "
        f"{BEATING}: settings with a negative mean difference. {EXTRA}: mean number of runs besides the "
        f"final one. {TOKENS}: mean training tokens over all stages."
    )
    if any(not c["paired"] for c in table.attrs["cells"]):
        notes += " †: seeds differ from stratified's, difference of means."
    return table, f"{header}\n\n{to_markdown(table)}\n\n{notes}\n"


def paper_side_by_side(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Our Table 2 numbers next to the paper's, per setting (meaningful at the paper's scale)."""
    ours = {(c["row"], c["setting"]): c for c in table.attrs.get("cells", [])}
    cols = [f"{s} {who}" for s in SETTINGS for who in ("ours", "paper")]
    out = pd.DataFrame(MISSING, index=list(METHOD_LABELS.values()), columns=cols, dtype=object)
    out.index.name = "Method"
    for label in out.index:
        signed = label != "Stratified"
        for s in SETTINGS:
            paper = PAPER_TABLE2[label][s]
            out.loc[label, f"{s} paper"] = f"{paper:+.3f}" if signed else f"{paper:.3f}"
            if (label, s) in ours:
                c = ours[(label, s)]
                out.loc[label, f"{s} ours"] = _fmt(c["mean"], c["std"], signed, c["paired"])
    scale = table.attrs.get("scale", "?")
    header = f"**Table 2, ours vs paper (scale: {scale}, data: {table.attrs.get('data_label', '?')})**"
    note = "Stratified row: absolute average test perplexity; other rows: difference from stratified."
    if scale != "paper":
        note += f" Our runs are at scale {scale!r}, so absolute numbers are not comparable to the paper's."
    return out, f"{header}\n\n{to_markdown(out)}\n\n{note}\n"


def build_table3(
    df: pd.DataFrame, scale: str | None = None, data_label: str | None = None
) -> tuple[pd.DataFrame, str]:
    """Table 3 (restricted setting): per baseline and setting, the method alone, "method + Aioli" and
    their difference (paired over seeds; negative = Aioli helps).

    Uses rows with `variant` in {"base", "+aioli"} and the baseline's pipeline name in `base_method`.
    """
    d = _scale_rows(df, scale)
    if "variant" not in d or "base_method" not in d:
        raise ValueError("build_table3: the frame needs `variant` and `base_method` columns")
    d = d[d["variant"].isin(["base", "+aioli"]) & d["base_method"].notna()]
    _check_unique(d, ["setting", "base_method", "variant", "seed"])
    cols = [f"{s} {part}" for s in SETTINGS for part in ("base", "+Aioli", "Δ")] + ["# settings improved"]
    rows = [METHOD_LABELS[m] for m in BASELINES]
    table = pd.DataFrame(MISSING, index=rows, columns=cols, dtype=object)
    table.index.name = "Method"
    cells, ns = [], []
    for m in BASELINES:
        label, improved, have = METHOD_LABELS[m], 0, False
        for s in SETTINGS:
            sub = d[(d["setting"] == s) & (d["base_method"] == m)]
            base, plus = _by_seed(sub[sub["variant"] == "base"]), _by_seed(sub[sub["variant"] == "+aioli"])
            for part, x in (("base", base), ("+Aioli", plus)):
                if len(x):
                    mean, std, n = _stats(x)
                    table.loc[label, f"{s} {part}"] = _fmt(mean, std, signed=False)
                    ns.append(n)
            if len(base) and len(plus):
                mean, std, n, paired = _delta(plus, base)
                table.loc[label, f"{s} Δ"] = _fmt(mean, std, True, paired)
                cells.append(
                    dict(row=label, method=m, setting=s, kind="delta", mean=mean, std=std, n=n, paired=paired)
                )
                improved += int(mean < 0)
                have = True
        if have:
            table.loc[label, "# settings improved"] = str(improved)
    table.attrs.update(cells=cells, scale=scale, data_label=data_label)
    deltas = np.array([c["mean"] for c in cells])
    header = (
        f"**Table 3 (restricted setting; scale: {scale or 'all'}, data: {data_label or 'as loaded'}; "
        f"{_seeds_text(ns)})**"
    )
    p = PAPER_TABLE3_SUMMARY
    summary = (
        f"+Aioli improves {int((deltas < 0).sum())} of {len(deltas)} comparisons"
        + (f", by {-deltas.mean():.3f} on average (max {-deltas.min():.3f})" if len(deltas) else "")
        + f". Paper: {p['improved']} of {p['comparisons']}, average {p['mean_gain']}, max {p['max_gain']}."
    )
    return table, f"{header}\n\n{to_markdown(table)}\n\nΔ = (+Aioli) − base, test avg ppl. {summary}\n"


# -- output ------------------------------------------------------------------------------------------
def write_table(table_df: pd.DataFrame, markdown: str, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write `<name>.csv` (the formatted cells) and `<name>.md`; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{name}.csv", out / f"{name}.md"
    table_df.to_csv(csv, index=True, index_label=table_df.index.name or "Method")
    md.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return csv, md


def plot_table(table: pd.DataFrame, out_path: str | Path, title: str | None = None) -> Path:
    """A PNG bar chart of the delta cells (per method, per setting) of a built table, with ±std bars."""
    # Figure + Agg canvas, not pyplot: no global backend switch (safe inside notebooks and headless)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = pd.DataFrame(table.attrs.get("cells", []))
    if cells.empty or "kind" not in cells:
        raise ValueError(
            "plot_table: the table has no numeric cells (build it with build_table2/build_table3)"
        )
    cells = cells[cells["kind"] == "delta"]
    settings = [s for s in SETTINGS if s in set(cells["setting"])]
    rows = list(dict.fromkeys(cells["row"]))
    fig = Figure(figsize=(max(6.0, 1.6 * len(settings) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(settings))
    for i, row in enumerate(rows):
        c = cells[cells["row"] == row].set_index("setting").reindex(settings)
        ax.bar(
            x + (i - (len(rows) - 1) / 2) * width,
            c["mean"],
            width,
            yerr=c["std"].fillna(0.0),
            label=row,
            capsize=2,
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, settings)
    ax.set_ylabel("Δ test avg ppl (negative is better)")
    scale = table.attrs.get("scale")
    ax.set_title(title or f"Difference in average test perplexity (scale: {scale})")
    ax.legend(fontsize=8, ncols=min(len(rows), 4))
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
