"""Reproduce the paper's tables end to end: sweep -> runs -> table.

    python -m aioli_repro.reproduce table2 --scale tiny|paper|auto [--seeds N] [--launcher L] [overrides...]
    python -m aioli_repro.reproduce table3 --scale tiny|paper|auto [--fraction 0.5] [--prior-steps N]
    python -m aioli_repro.reproduce table2 --scale tiny --dry-run   # the job list and what is done
    python -m aioli_repro.reproduce post --scale tiny|paper          # Table 2's rows for later methods
    python -m aioli_repro.reproduce detect-scale                    # what --scale auto picks, and why
    python -m aioli_repro.reproduce table2 --scale paper --launcher slurm [hydra.launcher.partition=P]
    python -m aioli_repro.reproduce table2 --scale paper --status   # pending / running / done / failed
    python -m aioli_repro.reproduce table2 --scale paper --collect  # the table from what has finished

1. The sweep: every (setting x method x seed) of the experiment configs `conf/experiment/table2.yaml`
   (m = 2, 3) and `table2_m7.yaml` (m = 7, fewer seeds), or `table3*.yaml` for the restricted setting,
   expanded exactly as Hydra's basic sweeper expands them. Pipelines whose summary already exists are
   skipped; every other one runs its stages, and finished stages inside it are reused (by config hash).
   Launchers:
     inprocess          (default) through the pipeline API, one progress line per pipeline: in this
                        process, or --n-jobs worker processes (default: one per CPU core at scale
                        tiny, 1 otherwise); the fastest on a CPU
     local              Hydra multirun, basic launcher (`python -m aioli_repro.run -m experiment=...`)
     local_parallel     Hydra multirun with joblib, --n-jobs pipelines at a time, one torch thread each
     slurm              submit and exit (`pipeline.submit`): one sbatch job per pending pipeline, with
                        the resources of slurm_rtx6000ada for m = 2, 3 and slurm_a100 for m = 7
                        (`hydra.launcher.<field>=V` for every job, `hydra.launcher.<launcher>.<field>=V`
                        for one node type), DML / DoReMi as `--dependency=afterok:` jobs of the grid /
                        stratified job they reuse; record in <results-dir>/slurm/submitted.json. Run it
                        again to resubmit what failed (queued and finished jobs are skipped); follow the
                        sweep with --status and build the table with --collect
     slurm_rtx6000ada / slurm_a100    Hydra multirun with submitit (blocking), one of the two for every job
   With a Hydra launcher, the methods run in two phases (stratified, grid, skillit, doge, aioli; then
   dml and doremi, which reuse grid's sweep and the stratified run), so parallel jobs never wait on a
   stage another job is training.
   --status (any launcher): per job pending / running / done / failed / not submitted, and totals, from
   the results directory (summary.json = done), submitted.json, squeue and sacct. --collect: the table
   from the finished pipelines (missing cells are "—") and how many cells are missing; exit 0, also when
   nothing has finished yet (then no table is written).
2. `results.load.load_runs` reads the pipelines of exactly this job list (summary.json, or W&B offline runs).
3. `results.tables.build_table2` / `build_table3` -> `<out-dir>/table2.{csv,md,png}` (+ `table2_vs_paper.md`).
4. The table and the wall time are printed.

`--scale tiny` is the CPU miniature `conf/scale/miniature.yaml` (docs/miniature.md: synthetic groups, the
paper's proportions, 5 / 3 seeds); `--scale smoke` is `conf/scale/table_smoke.yaml` (128-step runs, 1 seed);
`--scale paper` is `conf/scale/paper.yaml` (Pythia-160m on SlimPajama-6B, 5 / 3 seeds); `auto` picks
paper when a CUDA GPU is present and tiny otherwise. Any other name is a `conf/scale/` file.
Extra positional arguments are Hydra overrides applied to every job (e.g. `train.max_steps=20`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aioli_repro.pipeline.cost import sweep_cost
from aioli_repro.pipeline.launch import default_n_jobs, fmt_seconds, run_hydra, run_inprocess
from aioli_repro.pipeline.submit import cell_counts, status_lines, submit
from aioli_repro.pipeline.sweep import (
    LAUNCHERS,
    budget_line,
    default_seeds,
    detect_scale,
    is_hydra_override,
    job_configs,
    plan,
    resolve_scale,
)
from aioli_repro.results.reports import build


# -- CLI -------------------------------------------------------------------------------------------------
def _csv(s: str | None) -> list[str] | None:
    return [x for x in s.split(",") if x] if s else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aioli_repro.reproduce",
        description="Reproduce the paper's Table 2 / 3: run the sweep (resuming), then build the table.",
    )
    p.add_argument("table", choices=["table2", "table3", "headroom", "post", "detect-scale"])
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. train.max_steps=20")
    p.add_argument("--scale", default="auto", help="tiny | paper | auto (paper if a CUDA GPU is present)")
    p.add_argument("--seeds", type=int, default=None, help="seeds for m = 2, 3 (default: paper 5, tiny 1)")
    p.add_argument(
        "--seeds-m7", type=int, default=None, help="seeds for m = 7 (paper default: min(--seeds, 3))"
    )
    p.add_argument(
        "--baseline-seeds", type=int, default=None, help="at most this many seeds for rows other than "
        "stratified and the Aioli arms (tiny default: 3)",
    )  # fmt: skip
    p.add_argument("--settings", default=None, help="comma list, e.g. a_se,gh_c4 (default: all six)")
    p.add_argument("--methods", default=None, help="comma list of methods (table3: baselines)")
    p.add_argument("--results-dir", default="results/runs", help="stage and pipeline outputs")
    p.add_argument("--out-dir", default="results", help="where table2.{csv,md,png} go")
    p.add_argument("--launcher", default="inprocess", choices=LAUNCHERS)
    p.add_argument(
        "--n-jobs",
        type=int,
        default=None,
        help="pipelines at a time (inprocess, local_parallel); inprocess default: one per CPU core at "
        "scale tiny, 1 otherwise",
    )
    p.add_argument("--source", default="auto", choices=["auto", "summary", "wandb"], help="load_runs source")
    p.add_argument("--fraction", type=float, default=None, help="table3: fraction of steps to learn p (0.5)")
    p.add_argument(
        "--prior-steps", type=int, default=None, help="table3: steps on p before Aioli (one round)"
    )
    p.add_argument("--no-run", action="store_true", help="only build the table from finished pipelines")
    p.add_argument("--dry-run", action="store_true", help="print the job list (done / pending) and exit")
    p.add_argument(
        "--status",
        action="store_true",
        help="per job: pending / running / done / failed / not submitted (results dir, squeue, sacct)",
    )
    p.add_argument(
        "--collect",
        action="store_true",
        help="build the table from the finished pipelines (as --no-run) and say how many cells are missing",
    )
    p.add_argument("--verbose", action="store_true", help="progress bars and every stage line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Plan the table's jobs, then one of: list them (--dry-run), report them (--status), submit them
    (--launcher slurm), or run what is pending and build the table (--collect / --no-run: build only)."""
    args = parser().parse_intermixed_args(argv)
    if args.table == "detect-scale":
        scale, why = detect_scale()
        print(scale)
        print(f"# {why}", file=sys.stderr)
        return 0
    os.environ.setdefault("WANDB_SILENT", "true")
    # W&B's console capture (the default) makes each CPU training step ~10x slower here (measured: 40 tiny
    # steps 64 s with it, 7 s without); the runs' output is in metrics.jsonl / summary.json anyway
    os.environ.setdefault("WANDB_CONSOLE", "off")
    t0 = time.time()
    sweep = _plan(args)
    if args.dry_run:
        for j in sweep.jobs:
            print(f"{'done   ' if j.done else 'pending'} {j.label:<34} {' '.join(j.overrides)}")
        print(sweep_cost(args.table, job_configs(sweep.jobs)).line())
        return 0
    if args.status:
        print("\n".join(status_lines(args.table, sweep.jobs, sweep.results_dir)), flush=True)
        return 0
    if args.collect:
        args.no_run = True
        if not any(j.done for j in sweep.jobs):
            print(
                f"[reproduce] --collect: none of the {len(sweep.jobs)} {sweep.unit} has finished yet under "
                f"{sweep.results_dir}: no table to build (see --status)",
                flush=True,
            )
            return 0
    if sweep.pending and not args.no_run and args.launcher == "slurm":
        return _submit(args, sweep)
    failures = _run_pending(args, sweep)
    run_s = time.time() - t0
    _build_and_report(args, sweep, argv, failures, t0, run_s)
    for job, err in failures:
        print(f"[reproduce] FAILED {job.label if job else ''}: {err}", file=sys.stderr)
    return 1 if failures else 0


@dataclass
class _Sweep:
    """The planned jobs of one table and what the messages say about them."""

    table: str
    jobs: list
    overrides: list[str]
    scale: str
    scale_cfg: str
    results_dir: Path

    @property
    def pending(self) -> list:
        return [j for j in self.jobs if not j.done]

    @property
    def unit(self) -> str:
        n = len(self.jobs)
        if self.table == "table3":
            return f"job{'s' * (n != 1)} (a base and a +aioli pipeline each)"
        return f"pipeline{'s' * (n != 1)}"


def _plan(args: argparse.Namespace) -> _Sweep:
    """The table's jobs at the scale and seeds asked for, and which are done; prints the one-line count."""
    table, overrides = args.table, list(args.overrides)
    if table == "table3":
        if args.fraction is not None:
            overrides.append(f"restricted.fraction={args.fraction}")
        if args.prior_steps is not None:
            overrides.append(f"restricted.prior_steps={args.prior_steps}")
    scale, scale_cfg = resolve_scale(args.scale)
    seeds, seeds_m7, baseline_seeds = default_seeds(
        scale_cfg, table, args.seeds, args.seeds_m7, args.baseline_seeds
    )
    results_dir = Path(args.results_dir).resolve()
    job_overrides = [o for o in overrides if not is_hydra_override(o)]
    if args.launcher == "inprocess" and len(job_overrides) < len(overrides):
        print("[reproduce] note: hydra.* overrides only apply to a Hydra launcher (--launcher); ignored")
    jobs = plan(
        table, scale_cfg, results_dir, seeds, seeds_m7, _csv(args.settings), _csv(args.methods),
        job_overrides, baseline_seeds,
    )  # fmt: skip
    sweep = _Sweep(table, jobs, overrides, scale, scale_cfg, results_dir)
    n, todo = len(jobs), len(sweep.pending)
    print(
        f"[reproduce] {table} at scale {scale} (conf/scale/{scale_cfg}.yaml): {n} {sweep.unit}, "
        f"{n - todo} done, {todo} to run; results in {results_dir}",
        flush=True,
    )
    return sweep


def _submit(args: argparse.Namespace, sweep: _Sweep) -> int:
    """The cluster path: submit every pending job and return (nothing here waits for them)."""
    failures = submit(args.table, sweep.jobs, sweep.results_dir, "slurm", sweep.overrides, args.verbose)
    print(
        "[reproduce] nothing waits for the jobs. Follow the sweep: the same command with --status; build "
        "the table from what has finished: the same command with --collect"
        + ("; run the same command again to submit the rest" if failures else ""),
        flush=True,
    )
    for job, err in failures:
        print(f"[reproduce] FAILED {job.label}: {err}", file=sys.stderr)
    return 1 if failures else 0


def _run_pending(args: argparse.Namespace, sweep: _Sweep) -> list:
    """Train the pending jobs here (in-process pool) or through a Hydra launcher; return the failures."""
    if not sweep.pending or args.no_run:
        return []
    if args.launcher == "inprocess":
        n_jobs = args.n_jobs or default_n_jobs(sweep.scale_cfg)
        return run_inprocess(args.table, sweep.jobs, sweep.results_dir, args.verbose, n_jobs)
    return run_hydra(args.table, sweep.jobs, args.launcher, sweep.results_dir, args.n_jobs, sweep.overrides)


def _build_and_report(
    args: argparse.Namespace,
    sweep: _Sweep,
    argv: Sequence[str] | None,
    failures: list,
    t0: float,
    run_s: float,
) -> None:
    """The table's files from whatever finished, and the wall-time line."""
    jobs, n, unit, pending = sweep.jobs, len(sweep.jobs), sweep.unit, sweep.pending
    done = sum(j.done for j in jobs)
    footer = (
        f"{budget_line(jobs)}. Runs: {sweep.results_dir} ({done} of {n} {unit} finished). "
        f"Built by `python -m aioli_repro.reproduce {' '.join(argv if argv is not None else sys.argv[1:])}`."
    )
    _, md, paths = build(
        args.table, jobs, sweep.scale, sweep.results_dir, Path(args.out_dir), args.source, footer
    )
    print()
    print(md)
    for what, path in paths.items():
        print(f"[reproduce] {what}: {path}")
    trained = 0 if args.no_run else len(pending) - len(failures)
    print(
        f"[reproduce] wall time {fmt_seconds(time.time() - t0)} ({time.time() - t0:.1f} s; "
        f"sweep {run_s:.1f} s): "
        f"{n} {unit}, {n - len(pending)} already done, {max(trained, 0)} run now"
        + (
            f", {len(pending)} not run ({'--collect' if args.collect else '--no-run'})"
            if args.no_run and pending
            else ""
        )
        + (f", {len(failures)} failed" if failures else ""),
        flush=True,
    )
    if args.collect:
        cells, missing, partial = cell_counts(jobs)
        print(
            f"[reproduce] --collect: {sum(j.done for j in jobs)} of {n} {unit} finished; {missing} of "
            f"{cells} cells (setting x method) have no finished run (shown as —)"
            + (f", {partial} more have fewer seeds than planned" if partial else ""),
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
