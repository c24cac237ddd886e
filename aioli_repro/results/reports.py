"""A paper table's files from a finished sweep: table, plot, claims, probe noise, headroom, run manifest."""

from __future__ import annotations

from pathlib import Path

from aioli_repro.pipeline.sweep import Job


# -- tables ----------------------------------------------------------------------------------------------
def load_frame(jobs: list[Job], results_dir: Path, source: str = "auto"):
    """The `load_runs` frame restricted to this job list's pipelines."""
    from aioli_repro.results.load import load_runs

    keys = {k for j in jobs for k in j.keys}
    df = load_runs(results_dir, source=source)
    return df[df["run_key"].isin(keys)].reset_index(drop=True)


def manifest_path(out_dir: str | Path, table: str) -> Path:
    return Path(out_dir) / f"{table}_runs.json"


def write_manifest(jobs: list[Job], out_dir: Path, table: str, results_dir: Path) -> Path:
    """`<out_dir>/<table>_runs.json`: the pipelines (run keys) the table was built from, for the notebooks."""
    import json

    path = manifest_path(out_dir, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "table": table,
        "scale": str(jobs[0].meta["scale_name"]),
        "results_dir": str(results_dir),
        "run_keys": sorted({k for j in jobs for k in j.keys}),
    }
    path.write_text(json.dumps(body, indent=1))
    return path


def select_runs(df, table: str, out_dir: str | Path | None = None, scale: str | None = None):
    """The rows of a `load_runs` frame that make up `table` ("table2" | "table2_post" | "table3"):
    (frame, scale, note).

    With `<out_dir>/<table>_runs.json` (written by the driver) the frame is cut to exactly those
    pipelines. Otherwise: the rows of one scale (`scale`, else the only one, else "paper" if present,
    else the most frequent), and where a (setting, method, seed, variant) appears more than once (runs
    of different budgets in one results directory) the newest file wins.
    """
    import json

    from aioli_repro.results.load import newest_per_run

    d = df[df["variant"].isna()] if table in ("table2", "table2_post") else df[df["variant"].notna()]
    note = ""
    mpath = manifest_path(out_dir, table) if out_dir is not None else None
    if mpath is not None and mpath.exists():
        man = json.loads(mpath.read_text())
        cut = d[d["run_key"].isin(set(man["run_keys"]))]
        if len(cut):
            note = f"runs listed in {mpath} ({len(cut)} of {len(man['run_keys'])} pipelines found)"
            return cut.reset_index(drop=True), str(man["scale"]), note
    if d.empty:
        return d, scale, "no runs"
    if scale is None:
        scales = d["scale"].value_counts()
        scale = "paper" if "paper" in scales.index else str(scales.index[0])
    d = d[d["scale"] == scale].copy()
    d, dropped = newest_per_run(d)
    note = f"all runs at scale {scale!r}" + (f" ({dropped} older duplicates dropped)" if dropped else "")
    return d.sort_values(["setting", "method", "seed"]).reset_index(drop=True), scale, note


def build(
    table: str, jobs: list[Job], scale: str, results_dir: Path, out_dir: Path, source: str, footer: str = ""
) -> tuple[object, str, dict[str, Path]]:
    """Build, write and return (table frame, markdown, {what: path})."""
    import pandas as pd

    from aioli_repro.results.load import data_label
    from aioli_repro.results.tables import (
        build_table2,
        build_table3,
        paper_side_by_side,
        plot_table,
        write_table,
    )

    df = load_frame(jobs, results_dir, source)
    if df.empty:
        raise SystemExit(f"error: no finished pipelines of this sweep under {results_dir} (source {source})")
    scale_name = str(jobs[0].meta["scale_name"])
    label = data_label(df)
    if table == "headroom":
        return build_headroom(df, scale_name, label, out_dir, footer)
    paths: dict[str, Path] = {}
    if table in ("table2", "post"):
        best = headroom_runs(results_dir, scale_name)
        refined = refined_runs(out_dir)
        smoke = scale_name == "table_smoke"
        tab, md = build_table2(df, scale_name, label, best, smoke, refined, post=table == "post")
        table = "table2" if table == "table2" else "table2_post"
    else:
        tab, md = build_table3(df, scale=scale_name, data_label=label)
    md = md + ("\n" + footer + "\n" if footer else "")
    paths["csv"], paths["md"] = write_table(tab, md, out_dir, table)
    paths["runs"] = write_manifest(jobs, out_dir, table, results_dir)
    if any(c.get("kind") == "delta" for c in tab.attrs.get("cells", [])):
        paths["png"] = plot_table(tab, out_dir / f"{table}.png")
    else:  # e.g. stratified only: no differences to draw
        print(f"[reproduce] no plot: {table} has no difference cells yet")
    if table == "table2_post":
        paths.update(write_post_mixtures(df, jobs, out_dir))
    if table == "table2":
        paths.update(write_probe_noise(df, out_dir))
        from aioli_repro.results.claims import claims_markdown

        paths["claims_md"] = out_dir / "claims.md"
        paths["claims_md"].write_text(claims_markdown(df, pd.DataFrame(tab.attrs["cells"])))
        if set(df["data"].dropna()) == {"slimpajama"}:  # the paper's numbers are about SlimPajama only
            side, side_md = paper_side_by_side(tab)
            paths["vs_paper_md"] = out_dir / "table2_vs_paper.md"
            paths["vs_paper_md"].write_text(side_md)
            paths["vs_paper_csv"] = out_dir / "table2_vs_paper.csv"
            side.to_csv(paths["vs_paper_csv"])
    return tab, md, paths


def write_probe_noise(df, out_dir: Path) -> dict[str, Path]:
    """beta_noise.{csv,md}: Aioli's probe signal |β| against its standard error, per setting."""
    from aioli_repro.results.probe_noise import noise_table, round_records
    from aioli_repro.results.tables import to_markdown

    have = df[df["path"].map(lambda p: str(p).endswith("summary.json") and Path(str(p)).exists())]
    records = round_records(have, ("aioli", "aioli_null", "aioli_mult"))
    if records.empty:
        return {}
    tab = noise_table(records).round(5)
    csv, md = out_dir / "beta_noise.csv", out_dir / "beta_noise.md"
    tab.to_csv(csv, index=False)
    md.write_text(
        "**Aioli's probe signal against its noise** (β: loss drop per probe interval; se: standard error "
        "over the k sweeps of a round; all Aioli arms, all rounds and seeds)\n\n"
        f"{to_markdown(tab.set_index('setting'), 'Setting')}\n"
    )
    return {"beta_noise_csv": csv, "beta_noise_md": md}


def write_post_mixtures(df, jobs: list[Job], out_dir: Path) -> dict[str, Path]:
    """table2_post_mixtures.{csv,md}: the later methods' mixtures against the token prior and p*."""
    import pandas as pd

    from aioli_repro.pipeline.token_counts import token_prior
    from aioli_repro.results.post_mixtures import mixture_distances, mixtures_markdown, refined_optima

    priors = {}
    for job in jobs:  # one token count per setting (the packed-token cache is built already)
        if job.meta["label"] not in priors:  # the table's setting label, e.g. A/SE
            names = list(job.cfg.groups.names)
            priors[job.meta["label"]] = dict(zip(names, token_prior(job.cfg).tolist()))
    refined = Path(out_dir) / "refined_headroom.csv"
    optima = refined_optima(pd.read_csv(refined)) if refined.exists() else {}
    tidy = mixture_distances(df, priors, optima)
    csv, md = out_dir / "table2_post_mixtures.csv", out_dir / "table2_post_mixtures.md"
    tidy.round(6).to_csv(csv, index=False)
    md.write_text(mixtures_markdown(tidy))
    return {"mixtures_csv": csv, "mixtures_md": md}


def refined_runs(out_dir: Path):
    """The refined optimum's test avg ppl per (setting, seed) from `<out_dir>/refined_headroom.csv`
    (written by `python -m aioli_repro.sensitivity`), or None when the study has not written one there."""
    import pandas as pd

    from aioli_repro.results.tables import REFINED

    path = Path(out_dir) / "refined_headroom.csv"
    if not path.exists():
        return None
    t = pd.read_csv(path)
    t = t[(t["arm"] == REFINED) & (t["statistic"] == "test_avg_ppl")]
    return t.rename(columns={"value": "test_avg_ppl"})[["setting", "seed", "test_avg_ppl"]].astype(
        {"seed": int}
    )


def headroom_runs(results_dir: Path, scale_name: str):
    """The best static mixture's per-seed rows (`results.headroom.best_static`) of the headroom
    pipelines at this scale under results_dir, or None when `make headroom` has not run there."""
    from aioli_repro.results.headroom import best_static, load_grid
    from aioli_repro.results.load import load_runs

    if not any(results_dir.glob("headroom-*pipeline-*/summary.json")):
        return None
    runs = load_runs(results_dir, source="summary")
    mine = runs[runs["method"].isin(["headroom", "stratified"]) & (runs["scale"] == scale_name)]
    mine = mine[mine["variant"].isna()]
    best = best_static(load_grid(mine))
    return best if len(best) else None


def build_headroom(
    df, scale_name: str, label: str, out_dir: Path, footer: str
) -> tuple[object, str, dict[str, Path]]:
    """headroom.{csv,md} (one row per setting) and headroom_points.csv (every grid point)."""
    from aioli_repro.results.headroom import headroom_table, load_grid, point_table
    from aioli_repro.results.tables import SETTINGS, to_markdown

    grid, strat = load_grid(df), df[df["method"] == "stratified"]
    tab = headroom_table(grid, strat, list(SETTINGS))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "headroom.csv", "md": out_dir / "headroom.md"}
    tab.to_csv(paths["csv"], index=False)
    paths["points_csv"] = out_dir / "headroom_points.csv"
    point_table(grid, strat).to_csv(paths["points_csv"], index=False)
    shown = tab.drop(columns=["delta", "lo", "hi"]).set_index("setting")
    md = (
        f"**Headroom: the best static mixture vs stratified (scale: {scale_name}, data: {label})**\n\n"
        f"{to_markdown(shown, 'Setting')}\n\nBest static p: the grid point with the lowest mean val avg ppl "
        "over seeds, uniform (stratified) included. Δ: its test avg ppl − stratified's, paired by seed, with "
        "the 95% t-interval; "
        "`better` = headroom beyond the noise, otherwise none measurable (a negative control).\n"
        + ("\n" + footer + "\n" if footer else "")
    )
    paths["md"].write_text(md)
    return tab, md, paths
