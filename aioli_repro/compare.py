"""Compare mixing methods on any finished runs: your own data, a paper setting, or a mix.

    python -m aioli_repro.compare RESULTS_DIR [--out DIR] [--source auto|summary|wandb] [--no-plots]

Reads every finished pipeline under RESULTS_DIR (`results.load.load_runs`), and for each (data, scale) writes:

    compare.md / compare.csv    every setting and method present: the difference from stratified paired
                                by seed with its 95% interval (the Table 2 logic,
                                `results.tables.build_comparison`), and per setting a per-group test
                                perplexity table
    compare.png                 the differences as bars with their intervals
    trajectories/<setting>/<method>-s<seed>.png   the mixture each run trained on, probes apart

Restricted-setting runs (Table 3) are left out: they are compared base against +Aioli by
`python -m aioli_repro.reproduce table3`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

from aioli_repro.results.load import RUN_KEYS, data_label, load_runs, newest_per_run
from aioli_repro.results.stats import fmt_paired, paired
from aioli_repro.results.tables import (
    MISSING,
    build_comparison,
    by_seed,
    method_label,
    plot_table,
    present_methods,
    present_settings,
    to_markdown,
)
from aioli_repro.results.trajectory_plot import plot_trajectory


def slug(text: str) -> str:
    """A file-name-safe version of a label (`code/docs/prose` -> `code_docs_prose`)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(text)).strip("_") or "x"


def group_table(d: pd.DataFrame, setting: str) -> pd.DataFrame:
    """Per method: mean test perplexity of each group over seeds, the average, and its paired Δ."""
    s = d[d["setting"] == setting]
    groups = list(s["groups"].iloc[0])
    ref = by_seed(s[s["method"] == "stratified"])
    cols = [*groups, "avg ppl", "Δ vs stratified", "seeds"]
    rows = []
    for m in present_methods(s["method"]):
        mine = s[s["method"] == m]
        row = {g: f"{mine[f'test_ppl/{g}'].mean():.3f}" for g in groups}
        sd = mine["test_avg_ppl"].std(ddof=1) if len(mine) > 1 else float("nan")
        row["avg ppl"] = f"{mine['test_avg_ppl'].mean():.3f}" + ("" if pd.isna(sd) else f" ± {sd:.3f}")
        x = by_seed(mine)
        row["Δ vs stratified"] = fmt_paired(paired(x, ref)) if m != "stratified" and len(ref) else MISSING
        row["seeds"] = str(len(mine))
        rows.append(pd.Series(row, name=method_label(m)))
    out = pd.DataFrame(rows, columns=cols)
    out.index.name = "Method"
    return out


def numbers(d: pd.DataFrame) -> pd.DataFrame:
    """compare.csv: one row per (setting, method) with the means behind every cell."""
    rows = []
    for setting in present_settings(d["setting"]):
        s = d[d["setting"] == setting]
        ref = by_seed(s[s["method"] == "stratified"])
        for m in present_methods(s["method"]):
            mine = s[s["method"] == m]
            row = {"data": mine["data"].iloc[0], "scale": mine["scale"].iloc[0], "setting": setting,
                   "method": m, "seeds": len(mine), "test_avg_ppl": mine["test_avg_ppl"].mean()}  # fmt: skip
            if m != "stratified" and len(ref):
                pd_ = paired(by_seed(mine), ref)
                row.update(delta=pd_.mean, lo=pd_.lo, hi=pd_.hi, n_paired=pd_.n, verdict=pd_.verdict)
            for g in mine["groups"].iloc[0]:
                row[f"test_ppl/{g}"] = mine[f"test_ppl/{g}"].mean()
            rows.append(row)
    return pd.DataFrame(rows)


def block_markdown(d: pd.DataFrame, data: str, scale: str) -> tuple[str, object]:
    """The markdown section of one (data, scale) block, and its comparison table (for the plot)."""
    label = data_label(d)
    title = f"Methods compared (scale: {scale}, data: {label}"
    md = [f"## {label}, scale {scale}\n"]
    if (d["method"] == "stratified").any():
        tab, table_md = build_comparison(d, scale, label, title=title)
        md.append(table_md)
    else:
        tab = None
        md.append("No stratified runs here, so no differences: only the per-group tables below.\n")
    for setting in present_settings(d["setting"]):
        md.append(f"\n**{setting}: test perplexity per group** (mean over seeds)\n")
        md.append(to_markdown(group_table(d, setting)) + "\n")
    return "\n".join(md), tab


def plot_runs(d: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One trajectory PNG per run whose summary.json is on disk."""
    paths = []
    for path in d["path"]:
        p = Path(str(path))
        if p.name != "summary.json" or not p.exists():
            continue
        s = json.loads(p.read_text())
        name = f"{slug(s['method'])}-s{int(s['seed'])}.png"
        paths.append(plot_trajectory(s, out_dir / "trajectories" / slug(s["setting"]) / name))
    return paths


def compare(results_dir: str | Path, out_dir: str | Path, source: str = "auto", plots: bool = True) -> dict:
    """Write the comparison of every finished run under `results_dir`; return {what: path(s)}."""
    df = load_runs(results_dir, source=source)
    if df.empty:
        raise SystemExit(f"error: no finished pipelines under {results_dir} (source {source})")
    restricted = df[df["variant"].notna()]
    df, dropped = newest_per_run(df[df["variant"].isna()], ["data", "scale", *RUN_KEYS])
    if dropped:  # e.g. a search's static runs: one mixture per folder compares them
        print(f"[compare] {dropped} older runs of an already listed setting, method and seed left out")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = list(df.groupby(["data", "scale"], dropna=False, sort=True))
    sections, csv_parts, paths = [], [], {"plots": []}
    for (data, scale), d in blocks:
        md, tab = block_markdown(d, str(data), str(scale))
        sections.append(md)
        csv_parts.append(numbers(d))
        suffix = "" if len(blocks) == 1 else f"-{slug(data)}-{slug(scale)}"
        if tab is not None and any(c["kind"] == "delta" for c in tab.attrs["cells"]):
            paths[f"png{suffix}"] = plot_table(tab, out / f"compare{suffix}.png")
        if plots:
            paths["plots"] += plot_runs(d, out)
    note = (
        f"\n{len(restricted)} restricted-setting runs left out (see `reproduce table3`).\n"
        if len(restricted)
        else ""
    )
    if dropped:
        note += (
            f"\n{dropped} older runs of a setting, method and seed already listed were left out (the newest "
            "wins): runs of one method with other options or mixtures belong in a folder of their own.\n"
        )
    paths["md"] = out / "compare.md"
    paths["md"].write_text(f"# Comparison of the runs under {results_dir}\n\n" + "\n".join(sections) + note)
    paths["csv"] = out / "compare.csv"
    pd.concat(csv_parts, ignore_index=True).to_csv(paths["csv"], index=False)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m aioli_repro.compare",
        description="Compare mixing methods on every finished run under RESULTS_DIR: tables and plots.",
        epilog="example: python -m aioli_repro.compare results/runs --out results/compare",
    )
    p.add_argument("results_dir", help="a results directory (python -m aioli_repro.run ... results_dir=...)")
    p.add_argument("--out", default=None, help="where compare.{md,csv,png} go (default: RESULTS_DIR/compare)")
    p.add_argument("--source", default="auto", choices=["auto", "summary", "wandb"], help="what to read")
    p.add_argument("--no-plots", action="store_true", help="skip the per-run trajectory plots")
    a = p.parse_args(argv)
    if not Path(a.results_dir).is_dir():
        raise SystemExit(f"error: {a.results_dir} is not a directory")
    paths = compare(a.results_dir, a.out or Path(a.results_dir) / "compare", a.source, not a.no_plots)
    print(paths["md"].read_text())
    print(f"wrote {paths['md']}, {paths['csv']} and {len(paths['plots'])} trajectory plots", file=sys.stderr)


if __name__ == "__main__":
    main()
