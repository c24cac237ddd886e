"""Why Aioli ties at the miniature (issue 25): the refined headroom, Aioli's sensitivity arms and the
oracle check of its estimator, end to end. Design and pre-registration: docs/miniature.md.

    python -m aioli_repro.sensitivity --scale tiny                 (make sensitivity SCALE=tiny)
    python -m aioli_repro.sensitivity --scale tiny --dry-run       what is done and what would run
    python -m aioli_repro.sensitivity --scale tiny --no-run        only the tables, from finished runs
    python -m aioli_repro.sensitivity --scale tiny --search-only   steps 1, 2 and the refined tables
                                                  (make sensitivity-search: the first half, on 2 cores)

1. stratified and Skill-It at seeds 0-2 in every searched setting (the references of the headroom);
2. the refined headroom: a local search from the grid's best point (`pipeline.refine`);
3. the oracle runs (`pipeline.oracle_runs`);
4. the sensitivity arms (`conf/experiment/sensitivity.yaml`: A/B/SE, CC/GH/W, 5 seeds);
5. the tables: `refined_headroom.{md,csv}`, `refined_headroom_trace.csv`, `sensitivity.{md,csv}`,
   `sensitivity_p.png`, `oracle.{md,csv}`, `oracle_blocks.csv`, `sensitivity_verdict.md`.
Every stage is cached by config hash, so a re-run resumes and, when all is done, rebuilds in seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from aioli_repro.pipeline.launch import default_n_jobs, fmt_seconds, run_inprocess
from aioli_repro.pipeline.oracle_runs import oracle_jobs
from aioli_repro.pipeline.refine import GRID_BEST, REQUIRED, Search, refine, trace_frame
from aioli_repro.pipeline.sweep import Job, default_seeds, plan, resolve_scale

ORACLE_SETTINGS = ("a_b_se", "cc_gh_w")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aioli_repro.sensitivity", description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. hp.aioli.lp_steps=1")
    p.add_argument(
        "--arm-methods", default=None, help="comma list: only these arms (default: every arm of the config)"
    )
    p.add_argument("--scale", default="tiny", help="tiny (the CPU miniature) or a conf/scale name")
    p.add_argument("--results-dir", default="results/runs", help="stage and pipeline outputs")
    p.add_argument("--out-dir", default="results", help="where the tables go")
    p.add_argument(
        "--search-settings", default=",".join(REQUIRED),
        help=f"settings to search (default: the required {','.join(REQUIRED)}; 'all': every setting)",
    )  # fmt: skip
    p.add_argument(
        "--search-seeds", type=int, default=3, help="seeds of every search point, Skill-It and the oracle (3)"
    )
    p.add_argument(
        "--max-search-iters", type=int, default=None, help="stop each search earlier than its rule (tests)"
    )
    p.add_argument("--n-jobs", type=int, default=None, help="pipelines at a time (default: one per core)")
    p.add_argument("--no-run", action="store_true", help="only build the tables from finished runs")
    p.add_argument(
        "--search-only", action="store_true",
        help="only the references and the refined search, and refined_headroom.*; a later run without it "
        "reuses them and adds the oracle and the arms (two commands of about half the time each)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print what is done and pending, then exit")
    return p


def _pending_line(what: str, jobs: list[Job]) -> str:
    done = sum(j.done for j in jobs)
    return f"[sensitivity] {what}: {len(jobs)} pipelines, {done} done, {len(jobs) - done} to run"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")  # W&B's console capture slows CPU steps ~10x
    t0 = time.time()
    _, scale_cfg = resolve_scale(args.scale)
    results_dir, out_dir = Path(args.results_dir).resolve(), Path(args.out_dir)
    search = list(GRID_BEST) if args.search_settings == "all" else args.search_settings.split(",")
    unknown = sorted(set(search) - set(GRID_BEST))
    if unknown:
        raise SystemExit(f"error: --search-settings: unknown {unknown}; allowed: {', '.join(GRID_BEST)}, all")
    base = [f"scale={scale_cfg}", f"results_dir={results_dir}", *args.overrides]
    seeds, _, _ = default_seeds(scale_cfg, "sensitivity", None, None)
    only = args.arm_methods.split(",") if args.arm_methods else None
    arms = plan("sensitivity", scale_cfg, results_dir, seeds, seeds, None, only, args.overrides, None)
    few = list(range(args.search_seeds))
    refs = plan(
        "table2", scale_cfg, results_dir, len(few), len(few), search, ["stratified", "skillit"],
        args.overrides, len(few),
    )  # fmt: skip
    oracle, skipped = oracle_jobs(ORACLE_SETTINGS, few, base, results_dir)
    for what, jobs in (("arms", arms), ("stratified + Skill-It", refs), ("oracle", oracle)):
        print(_pending_line(what, jobs), flush=True)
    for line in skipped:
        print(f"[sensitivity] oracle skipped: {line}", flush=True)
    if args.dry_run:
        return 0
    n_jobs = args.n_jobs or default_n_jobs(scale_cfg)
    failures = []
    # the references and the search first: every other table is read against the search's optimum
    if not args.no_run:
        failures += run_inprocess("table2", [j for j in refs if not j.done], results_dir, n_jobs=n_jobs)
    searches = refine(
        search, few, base, results_dir, n_jobs, run=not args.no_run, max_iters=args.max_search_iters
    )
    if args.search_only:
        arms, oracle = [], []
    if not args.no_run:
        for jobs in (oracle, arms):
            failures += run_inprocess("table2", [j for j in jobs if not j.done], results_dir, n_jobs=n_jobs)
    paths = build(arms, refs, oracle, searches, results_dir, out_dir, argv)
    for what, path in paths.items():
        print(f"[sensitivity] {what}: {path}")
    print(f"[sensitivity] wall time {fmt_seconds(time.time() - t0)}", flush=True)
    for job, err in failures:
        print(f"[sensitivity] FAILED {job.label if job else ''}: {err}", file=sys.stderr)
    return 1 if failures else 0


def build(
    arms: list[Job],
    refs: list[Job],
    oracle: list[Job],
    searches: list[Search],
    results_dir: Path,
    out_dir: Path,
    argv: Sequence[str] | None,
) -> dict[str, Path]:
    """Every table of the study from the finished runs."""
    from aioli_repro.results import oracle as oracle_tables
    from aioli_repro.results import refined_headroom, sensitivity
    from aioli_repro.results.explanation import verdict_markdown
    from aioli_repro.results.reports import load_frame
    from aioli_repro.results.tables import by_seed

    out_dir.mkdir(parents=True, exist_ok=True)
    frame = load_frame(arms + refs + oracle, results_dir, "summary")
    labels = {j.setting: j.meta["label"] for j in arms + refs}

    def per_seed(method: str) -> dict[str, pd.Series]:
        d = frame[(frame["method"] == method) & frame["seed"].isin(searches[0].seeds if searches else [])]
        return {s: by_seed(g) for s, g in d.groupby("setting")}

    results = [_search_result(x, labels) for x in searches if x.centre_runs.test is not None]
    strat, skill = per_seed("stratified"), per_seed("skillit")
    cmd = f"python -m aioli_repro.sensitivity {' '.join(argv if argv is not None else sys.argv[1:])}"
    footer = f"Runs: {results_dir}. Built by `{cmd}`."
    paths = {"refined headroom": out_dir / "refined_headroom.md"}
    paths["refined headroom"].write_text(refined_headroom.markdown(results, strat, skill, footer) + "\n")
    refined_headroom.tidy(results, strat, skill).to_csv(out_dir / "refined_headroom.csv", index=False)
    trace_frame(searches).to_csv(out_dir / "refined_headroom_trace.csv", index=False)
    if not arms and not oracle:  # --search-only: the other tables wait for their runs
        return paths
    optimum = {r.setting: sensitivity.Optimum(p=r.opt_p, test=r.opt_test) for r in results}
    arm_frame = frame[frame["run_key"].isin({k for j in arms for k in j.keys})]
    stats = sensitivity.arm_stats(arm_frame, optimum)
    paths.update(
        {f"sensitivity {k}": v for k, v in sensitivity.write_sensitivity(stats, optimum, out_dir).items()}
    )
    oracle_frame = frame[frame["run_key"].isin({k for j in oracle for k in j.keys})]
    eta = {labels[j.setting]: float(j.cfg.method.mixer.eta) for j in oracle}
    rows = oracle_tables.oracle_rows(oracle_frame, {k: v.p for k, v in optimum.items()}, eta)
    summary = oracle_tables.oracle_summary(rows)
    paths.update({f"oracle {k}": v for k, v in oracle_tables.write_oracle(rows, summary, out_dir).items()})
    verdict = out_dir / "sensitivity_verdict.md"
    verdict.write_text(verdict_markdown(summary, stats, footer) + "\n")
    paths["verdict"] = verdict
    return paths


def _search_result(x: Search, labels: dict[str, str]):
    from aioli_repro.results.refined_headroom import SearchResult

    return SearchResult(
        setting=labels.get(x.setting, x.setting),
        groups=x.groups,
        start_p=x.start_runs.p,
        start_test=pd.Series(x.start_runs.test, index=x.seeds),
        opt_p=x.centre_runs.p,
        opt_test=pd.Series(x.centre_runs.test, index=x.seeds),
        iterations=x.state.iters,
        points=len(x.trace),
        complete=x.complete,
    )


if __name__ == "__main__":
    sys.exit(main())
