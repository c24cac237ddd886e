"""Paper tables from the `results.load.load_runs` frame: Table 2 (unrestricted) and Table 3 (restricted).

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

from aioli_repro.results.stats import LEVEL, Paired, fmt_paired, paired, wins_text

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
    "aioli_mult": "Aioli (Alg. 1)",
    "aioli_null": "Aioli null (η = 0)",
}
# Methods published after the paper (issue 26; docs/methods.md): Table 2's rows of `reproduce post`
POST_LABELS = {
    "regmix": "RegMix",
    "regmix_linear": "RegMix (linear)",
    "olmix": "Olmix",
    "mixmin": "MixMin",
    "ado": "ADO",
    "unimax": "UniMax",
}
# the long form of every study table's CSV (sensitivity, oracle, refined headroom): one value per row
TIDY_COLUMNS = ["setting", "arm", "statistic", "seed", "value", "lo", "hi"]
HEADROOM = "Best static (grid)"  # the headroom grid's val-best point (`make headroom`)
REFINED = "Best static (refined)"  # the local search's optimum from that point (`make sensitivity`)
BASELINES = ("grid", "dml", "skillit", "doremi", "doge")  # Table 3 rows
MISSING = "—"
BEATING = "# settings beating stratified (W/T/L)"
SEEDS = "seeds"
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
def by_seed(d: pd.DataFrame) -> pd.Series:
    """Test avg ppl indexed by seed (the series `stats.paired` pairs)."""
    return d.set_index("seed")["test_avg_ppl"].astype(float).sort_index()


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


def _cell(
    row: str, method: str, setting: str, kind: str, mean: float, sd: float, n: int, pd_: Paired | None = None
) -> dict:
    lo, hi, verdict = (pd_.lo, pd_.hi, pd_.verdict) if pd_ is not None else (float("nan"),) * 2 + ("",)
    return dict(row=row, method=method, setting=setting, kind=kind, mean=mean, std=sd, n=n, lo=lo, hi=hi,
                verdict=verdict)  # fmt: skip


CELL_COLUMNS = ["row", "method", "setting", "kind", "mean", "std", "n", "lo", "hi", "verdict"]


def method_label(method: str) -> str:
    """A method's row label: the paper's name where it has one, else the pipeline name (`static`, ...)."""
    return METHOD_LABELS.get(method) or POST_LABELS.get(method, method)


def present_settings(labels: object) -> list[str]:
    """Setting labels in table order: the paper's six first (in its order), then any others, sorted."""
    have = set(map(str, labels))
    return [s for s in SETTINGS if s in have] + sorted(have - set(SETTINGS))


def present_methods(methods: object) -> list[str]:
    """Method names in row order: the paper's rows first (in its order), then any others, sorted."""
    have = set(map(str, methods))
    known = [*METHOD_LABELS, *POST_LABELS]
    return [m for m in known if m in have] + sorted(have - set(known))


def table2_cells(
    df: pd.DataFrame,
    scale: str | None = None,
    headroom: pd.DataFrame | None = None,
    settings: list[str] | None = None,
    methods: list[str] | None = None,
    refined: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Long numeric form of Table 2: row, method, setting, kind (abs | delta), mean, std, n, lo, hi, verdict.

    Stratified is absolute (mean, sd over seeds); every other row is paired with stratified over the seeds
    both have (`stats.paired`: mean difference, sd of the differences, 95% interval, verdict). `headroom`
    (from `results.headroom.best_static`) adds the best static mixture's row: per-seed test avg ppl of
    the point chosen by mean val avg ppl; `refined` (setting, seed, test_avg_ppl) the refined optimum's
    row. `settings` / `methods`: which to include (default: every one present).
    """
    d = _scale_rows(df, scale)
    if "variant" in d:
        d = d[d["variant"].isna()]  # restricted-setting runs belong to Table 3
    methods = present_methods(d["method"]) if methods is None else list(methods)
    settings = present_settings(d["setting"]) if settings is None else list(settings)
    d = d[d["method"].isin(methods)]
    _check_unique(d, ["setting", "method", "seed"])
    cells = []
    for setting in settings:
        ref = by_seed(d[(d["setting"] == setting) & (d["method"] == "stratified")])
        if ref.empty:
            continue
        cells.append(_cell("Stratified", "stratified", setting, "abs", *_stats(ref)))
        others = [(m, method_label(m), by_seed(d[(d["setting"] == setting) & (d["method"] == m)]))
                  for m in methods if m != "stratified"]  # fmt: skip
        if headroom is not None and len(headroom):
            h = headroom[headroom["setting"] == setting]
            others.insert(0, ("headroom", HEADROOM, by_seed(h)))
        if refined is not None and len(refined):
            r = refined[refined["setting"] == setting]
            others.insert(1 if others and others[0][1] == HEADROOM else 0, ("refined", REFINED, by_seed(r)))
        for method, label, x in others:
            pd_ = paired(x, ref) if len(x) else None
            if pd_ is not None:
                cells.append(_cell(label, method, setting, "delta", pd_.mean, pd_.sd, pd_.n, pd_))
    return pd.DataFrame(cells, columns=CELL_COLUMNS)


# -- formatting --------------------------------------------------------------------------------------
def _fmt_cell(c: dict) -> str:
    """A table cell: absolute 'mean ± sd' (stratified) or the paired difference with its interval."""
    if c["kind"] == "abs":
        return f"{c['mean']:.3f}" + ("" if math.isnan(c["std"]) else f" ± {c['std']:.3f}")
    return fmt_paired(Paired(c["mean"], c["std"], c["lo"], c["hi"], int(c["n"])))


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


def build_table2(
    df: pd.DataFrame,
    scale: str,
    data_label: str,
    headroom: pd.DataFrame | None = None,
    smoke: bool = False,
    refined: pd.DataFrame | None = None,
    post: bool = False,
) -> tuple[pd.DataFrame, str]:
    """Table 2 for the runs at `scale`: the comparison table with the paper's six settings and rows
    (+ the headroom rows when `headroom` / `refined` are given). `smoke` labels the table as a smoke test.
    `post`: its rows for the methods published after the paper instead (`reproduce post`)."""
    what = "Table 2, methods published after the paper" if post else "Table 2"
    title = f"{what} ({'SMOKE TEST, not a result; ' if smoke else ''}scale: {scale}, data: {data_label}"
    methods = ["stratified", *POST_LABELS] if post else list(METHOD_LABELS)
    return build_comparison(df, scale, data_label, headroom, list(SETTINGS), methods, title, refined)


def build_comparison(
    df: pd.DataFrame,
    scale: str | None,
    data_label: str,
    headroom: pd.DataFrame | None = None,
    settings: list[str] | None = None,
    methods: list[str] | None = None,
    title: str | None = None,
    refined: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, str]:
    """Rows = methods (default: every one present), columns = settings (default: every one present) + seeds,
    W/T/L against stratified, extra runs, tokens. Table 2 is this with the paper's settings and rows."""
    d = _scale_rows(df, scale)
    if "variant" in d:
        d = d[d["variant"].isna()]
    methods = present_methods(d["method"]) if methods is None else list(methods)
    settings = present_settings(d["setting"]) if settings is None else list(settings)
    cells = table2_cells(d, None, headroom, settings, methods, refined)
    labels = [method_label(m) for m in methods]
    for row in (REFINED, HEADROOM):  # grid first, then refined, right after stratified
        if (cells["row"] == row).any():
            labels.insert(1, row)
    cols = [*settings, SEEDS, BEATING, EXTRA, TOKENS]
    table = pd.DataFrame(MISSING, index=labels, columns=cols, dtype=object)
    table.index.name = "Method"
    for c in cells.to_dict("records"):
        table.loc[c["row"], c["setting"]] = _fmt_cell(c)
    _fill_row_summaries(table, cells, d, labels, methods)
    table.attrs.update(cells=cells.to_dict("records"), scale=scale, data_label=data_label)
    return table, _comparison_markdown(table, cells, scale, data_label, title)


def _fill_row_summaries(
    table: pd.DataFrame, cells: pd.DataFrame, d: pd.DataFrame, labels: list[str], methods: list[str]
) -> None:
    """Each row's seeds, W/T/L against stratified, extra runs and tokens, in place."""
    for label in labels:
        mine = cells[cells["row"] == label]
        if len(mine):
            ns = sorted(set(mine["n"].astype(int)))
            table.loc[label, SEEDS] = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        if label != "Stratified" and len(mine):
            verdicts = mine["verdict"].tolist()
            table.loc[label, BEATING] = wins_text(verdicts)
    for method in methods:
        runs = d[d["method"] == method]
        if len(runs):
            table.loc[method_label(method), EXTRA] = f"{round(float(runs['extra_runs'].mean()), 2):g}"
            table.loc[method_label(method), TOKENS] = _human(float(runs["total_tokens"].mean()))


def _comparison_markdown(
    table: pd.DataFrame, cells: pd.DataFrame, scale: str | None, data_label: str, title: str | None
) -> str:
    """The comparison as Markdown: header, table, notes, and the headroom share where there is headroom."""
    title = title or f"Comparison (scale: {scale or 'all'}, data: {data_label}"
    header = f"**{title}; {_seeds_text(cells['n'].tolist())})**"
    pct = int(round(LEVEL * 100))
    notes = (
        "Stratified: absolute average test perplexity (mean ± sd over seeds). Other rows: difference from "
        f"stratified, paired over the seeds both have (same initialisation and data order), with its {pct}% "
        "t-interval; `better` / `worse` only where the interval excludes 0, otherwise a tie. "
        f"{BEATING}: settings where the interval lies below 0 (better / tie / worse). "
        f"{EXTRA}: mean number of runs besides the final one. {TOKENS}: mean training tokens over all stages."
    )
    if (cells["row"] == HEADROOM).any():
        notes += (
            f" {HEADROOM}: the static mixture of the headroom grid with the lowest mean val avg ppl over "
            "seeds, its test difference paired like the others (`make headroom`)."
        )
    if (cells["row"] == REFINED).any():
        notes += (
            f" {REFINED}: the optimum of a local search on the simplex started at the grid's best point, "
            "chosen on val (`make sensitivity`, `refined_headroom.md`); the headroom share below uses it."
        )
    md = f"{header}\n\n{to_markdown(table)}\n\n{notes}\n"
    share = headroom_share(cells)
    if share is not None:
        share_title = "**Share of the headroom captured** (method Δ / headroom Δ, mean differences)"
        md += f"\n{share_title}\n\n{to_markdown(share)}\n"
        md += (
            "\nOnly settings whose headroom interval lies below 0; elsewhere there is no headroom to capture "
            "(a negative control: the right answer is a tie with stratified).\n"
        )
    return md


def headroom_share(cells: pd.DataFrame) -> pd.DataFrame | None:
    """Per method and setting with significant headroom: the method's mean Δ over the headroom's mean Δ
    (the refined optimum's where a setting has one, else the grid's best point)."""
    better = cells[cells["row"].isin([HEADROOM, REFINED]) & (cells["verdict"] == "better")]
    better = better.assign(_grid=better["row"] == HEADROOM).sort_values("_grid", kind="stable")
    h = better.drop_duplicates("setting").set_index("setting")  # refined first: it wins where present
    if h.empty:
        return None
    present = set(cells["row"])  # the table's own method rows (Table 2's, or the later methods')
    rows = [label for m, label in {**METHOD_LABELS, **POST_LABELS}.items() if m != "stratified"]
    rows = [r for r in rows if r in present]
    out = pd.DataFrame(MISSING, index=rows, columns=list(h.index), dtype=object)
    out.index.name = "Method"
    for c in cells[cells["kind"] == "delta"].to_dict("records"):
        if c["row"] in rows and c["setting"] in h.index:
            share = round(c["mean"] / h.loc[c["setting"], "mean"], 2) + 0.0  # + 0.0: no "-0.00"
            out.loc[c["row"], c["setting"]] = f"{share:.2f}"
    return out


def paper_side_by_side(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Our Table 2 numbers next to the paper's, per setting (meaningful at the paper's scale)."""
    ours = {(c["row"], c["setting"]): c for c in table.attrs.get("cells", [])}
    cols = [f"{s} {who}" for s in SETTINGS for who in ("ours", "paper")]
    out = pd.DataFrame(MISSING, index=list(PAPER_TABLE2), columns=cols, dtype=object)
    out.index.name = "Method"
    for label in out.index:
        signed = label != "Stratified"
        for s in SETTINGS:
            paper = PAPER_TABLE2[label][s]
            out.loc[label, f"{s} paper"] = f"{paper:+.3f}" if signed else f"{paper:.3f}"
            if (label, s) in ours:
                c = ours[(label, s)]
                out.loc[label, f"{s} ours"] = _fmt_cell(c)
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
    cols = [f"{s} {part}" for s in SETTINGS for part in ("base", "+Aioli", "Δ")] + [
        "# settings improved (W/T/L)"
    ]
    rows = [METHOD_LABELS[m] for m in BASELINES]
    table = pd.DataFrame(MISSING, index=rows, columns=cols, dtype=object)
    table.index.name = "Method"
    cells, ns = [], []
    for m in BASELINES:
        label, verdicts = METHOD_LABELS[m], []
        for s in SETTINGS:
            sub = d[(d["setting"] == s) & (d["base_method"] == m)]
            base, plus = by_seed(sub[sub["variant"] == "base"]), by_seed(sub[sub["variant"] == "+aioli"])
            for part, x in (("base", base), ("+Aioli", plus)):
                if len(x):
                    c = _cell(label, m, s, "abs", *_stats(x))
                    table.loc[label, f"{s} {part}"] = _fmt_cell(c)
                    ns.append(c["n"])
            pd_ = paired(plus, base) if len(base) and len(plus) else None
            if pd_ is not None:
                c = _cell(label, m, s, "delta", pd_.mean, pd_.sd, pd_.n, pd_)
                table.loc[label, f"{s} Δ"] = _fmt_cell(c)
                cells.append(c)
                verdicts.append(pd_.verdict)
        if verdicts:
            table.loc[label, "# settings improved (W/T/L)"] = wins_text(verdicts)
    table.attrs.update(cells=cells, scale=scale, data_label=data_label)
    deltas = np.array([c["mean"] for c in cells])
    wins = sum(c["verdict"] == "better" for c in cells)
    header = (
        f"**Table 3 (restricted setting; scale: {scale or 'all'}, data: {data_label or 'as loaded'}; "
        f"{_seeds_text(ns)})**"
    )
    p = PAPER_TABLE3_SUMMARY
    summary = (
        f"+Aioli improves {wins} of {len(deltas)} comparisons with a 95% interval below 0 "
        f"({int((deltas < 0).sum())} by the sign of the mean)"
        + (f", by {-deltas.mean():.3f} on average (max {-deltas.min():.3f})" if len(deltas) else "")
        + f". Paper: {p['improved']} of {p['comparisons']}, average {p['mean_gain']}, max {p['max_gain']}."
    )
    note = "Δ = (+Aioli) − base, test avg ppl, paired over seeds with its 95% t-interval; ties are ties."
    return table, f"{header}\n\n{to_markdown(table)}\n\n{note} {summary}\n"


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
    """A PNG bar chart of a built table's delta cells (per method, per setting), with 95% interval bars."""
    # Figure + Agg canvas, not pyplot: no global backend switch (safe inside notebooks and headless)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = pd.DataFrame(table.attrs.get("cells", []))
    if cells.empty or "kind" not in cells:
        raise ValueError(
            "plot_table: the table has no numeric cells (build it with build_table2/build_table3)"
        )
    cells = cells[cells["kind"] == "delta"]
    settings = present_settings(cells["setting"])
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
            yerr=np.vstack([(c["mean"] - c["lo"]).fillna(0.0), (c["hi"] - c["mean"]).fillna(0.0)]),
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
