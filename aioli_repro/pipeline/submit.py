"""A sweep on a SLURM cluster without a process that waits for it: submit, follow, collect.

    python -m aioli_repro.reproduce table2 --scale paper --launcher slurm hydra.launcher.partition=P
    python -m aioli_repro.reproduce table2 --scale paper --status     # pending / running / done / failed
    python -m aioli_repro.reproduce table2 --scale paper --collect    # the table from what has finished

`submit` writes one sbatch script per pending pipeline job (a `sweep.Job`: one setting x method x seed;
Table 3: the base and +Aioli pipelines of one baseline) to `<results_dir>/slurm/scripts/<run key>.sbatch`,
submits each with `sbatch --parsable` and returns: nothing here waits for a job. Each script runs the
job's pipeline entry point with exactly its overrides, `srun python -m <ENTRYPOINT[table]> <overrides>`, as
the in-process worker composes it (`progress=false` unless --verbose). Its resources come from the
matching submitit launcher config, `conf/hydra/launcher/<SLURM_BY_EXPERIMENT[experiment]>.yaml` (m = 2, 3:
slurm_rtx6000ada, m = 7: slurm_a100): partition, account, qos, constraint, gres or gpus_per_node, nodes,
tasks_per_node, cpus_per_task, mem_gb, timeout_min, additional_parameters and the setup lines.
`hydra.launcher.<field>=V` on the command line sets a field for every job, and
`hydra.launcher.<launcher>.<field>=V` (e.g. `hydra.launcher.slurm_a100.partition=a100`) for the jobs of one
launcher only; the submitit-only fields (max_num_timeout, array_parallelism, submitit_folder, name) do not
apply here.

Preemption and time limits: `--signal=<trainer.requeue_signal>@<signal_delay_s>` (SIGUSR2 by default, as
submitit sends; `aioli_repro.training.slurm`) and `--requeue`. The training code saves a checkpoint at the
next step boundary on that signal and `scontrol requeue`s its own job; the requeued job (same id, same log
file, `--open-mode=append`) re-runs the pipeline, which skips finished stages and resumes the interrupted one.
The run is a job step (`srun`) because sbatch signals the job steps, not the batch shell.

Dependencies are SLURM dependencies. A method that reuses another method's stages (`sweep.DEPENDS_ON`:
DML reuses grid's sweep, DoReMi the stratified run as its reference, for the same setting and seed) is
submitted with `--dependency=afterok:<id of that job> --kill-on-invalid-dep=yes` when that job is
submitted now or still queued from an earlier submit, and without a dependency when it has finished (or is
not part of this sweep: then the dependent job trains those stages itself). If the prerequisite fails,
SLURM cancels the dependent job, and the next submit resubmits both. Skill-It's graph runs and Table 3's
+Aioli pipeline are stages inside one pipeline job, run in order by that job: they need no SLURM dependency.

`<results_dir>/slurm/submitted.json` (written atomically after every sbatch, merged with earlier submits,
keyed by the job's first pipeline directory name) records per job its run keys, stage hash, overrides,
SLURM job id, dependency, script, launcher and time, and the ids of earlier submissions of it. A second
submit skips jobs that are done (every pipeline has its summary.json) and jobs whose SLURM job is still
pending or running (`squeue -h -o "%i %T" -j <ids>`), and resubmits the others (failed, cancelled, timed
out, or gone from the queue without a summary). `status` tells pending / running / done / failed / not
submitted from the same files, squeue and, when present, `sacct -n -P -o JobID,State -j <ids>`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aioli_repro.fileio import atomic_write_json, file_lock
from aioli_repro.pipeline.sbatch import (
    job_command,
    job_key,
    launcher_of,
    launcher_options,
    launcher_overrides,
    requeue_signal,
    sbatch_script,
    slurm_dir,
)
from aioli_repro.pipeline.sweep import (
    DEPENDS_ON,
    LATE_METHODS,
    Job,
)

# squeue's %T states: waiting to start, and started (anything else is a finished job still listed)
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD"}
STARTED = {
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "RESIZING",
}
STATES = ("done", "running", "pending", "failed", "not submitted", "submitted")  # the last: no squeue


def record_path(results_dir: str | Path) -> Path:
    return slurm_dir(results_dir) / "submitted.json"


def stage_hash(job: Job) -> str:
    """The pipeline's stage hash, the last part of its directory name (Table 3: shared by both variants)."""
    return job.keys[0].rsplit("-", 1)[-1]


# -- the scheduler ---------------------------------------------------------------------------------------
@dataclass
class Queue:
    """What SLURM says about some job ids: squeue states, sacct states of the jobs squeue no longer
    lists, and why the states are unknown (no squeue, or it failed), if they are."""

    states: dict[str, str] = field(default_factory=dict)
    acct: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    acct_note: str | None = None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _ask(cmd: list[str], ok_stderr: str = "") -> tuple[str | None, str]:
    """(stdout, "") of a scheduler command, or (None, why not): missing, failed to start, or failed
    (a non-zero exit whose stderr contains `ok_stderr` counts as an answer)."""
    if shutil.which(cmd[0]) is None:
        return None, f"{cmd[0]} is not on PATH"
    try:
        r = _run(cmd)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{cmd[0]} failed: {e}"
    if r.returncode != 0 and not (ok_stderr and ok_stderr in r.stderr.lower()):
        return r.stdout, f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip()}"
    return r.stdout, ""


def query_scheduler(ids: Sequence[str]) -> Queue:
    ids = sorted(set(ids), key=lambda i: (len(i), i))
    q = Queue()
    if not ids:
        return q
    # "invalid job id": none of them is known any more, an answer
    out, err = _ask(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)], ok_stderr="invalid job id")
    if err:
        q.error = err + (" (no SLURM here)" if out is None and "not on PATH" in err else "")
        return q
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            q.states[parts[0]] = parts[1].upper()
    gone = [i for i in ids if q.states.get(i) not in QUEUED | STARTED]
    if not gone:
        return q
    out, err = _ask(["sacct", "-n", "-P", "-o", "JobID,State", "-j", ",".join(gone)])
    if out is None and "not on PATH" in err:
        err += ": a job that left the queue without a summary counts as failed"
    q.acct_note = err or q.acct_note
    for line in (out or "").splitlines():
        jid, _, state = line.partition("|")
        if jid and "." not in jid and state.strip():
            q.acct[jid.strip()] = state.split()[0].upper()  # "CANCELLED by 123" -> CANCELLED
    return q


def classify(job: Job, rec: dict | None, queue: Queue) -> tuple[str, str]:
    """(state, note) of one job: done / running / pending / failed / not submitted, or submitted (state
    unknown: no scheduler to ask). Call `job.refresh()` after querying the queue."""
    if job.done:
        return "done", ""
    if rec is None:
        return "not submitted", ""
    jid = str(rec["job_id"])
    if queue.error:
        return "submitted", ""
    state = queue.states.get(jid)
    if state in QUEUED:
        dep = rec.get("dependency")
        return "pending", ", ".join(x for x in (state if state != "PENDING" else "", dep or "") if x)
    if state in STARTED:
        return "running", state if state != "RUNNING" else ""
    final = state or queue.acct.get(jid)
    if final == "COMPLETED":
        return "failed", "COMPLETED without a pipeline summary"
    return "failed", final or "left the queue without a pipeline summary"


# -- submitted.json --------------------------------------------------------------------------------------
def load_records(results_dir: str | Path) -> dict[str, dict]:
    import json

    path = record_path(results_dir)
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text())["jobs"])
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(
            f"error: {path} is not a submit record ({type(e).__name__}: {e}); move it away"
        ) from e


def save_records(results_dir: str | Path, records: dict[str, dict]) -> None:
    atomic_write_json(record_path(results_dir), {"version": 1, "jobs": records}, indent=1)


@contextmanager
def _submit_lock(results_dir: Path) -> Iterator[None]:
    """One submit at a time per results directory (two would submit the same jobs twice)."""
    with ExitStack() as stack:
        try:
            stack.enter_context(file_lock(slurm_dir(results_dir) / ".submit.lock", blocking=False))
        except BlockingIOError:
            raise SystemExit(f"error: another submit to {slurm_dir(results_dir)} is running") from None
        yield


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- submit ------------------------------------------------------------------------------------------------
def _sbatch(script: Path, dependency: str | None) -> tuple[str, str]:
    """`sbatch --parsable [--dependency=...] script`: (job id, "") or ("", why it failed)."""
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"]
    cmd.append(str(script))
    try:
        r = _run(cmd)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "", f"sbatch failed: {e}"
    if r.returncode != 0:
        return "", f"sbatch exit status {r.returncode}: {r.stderr.strip()}"
    out = r.stdout.strip()
    jid = out.splitlines()[-1].split(";")[0].strip() if out else ""  # "<id>[;<cluster>]"
    return (jid, "") if jid.isdigit() else ("", f"sbatch printed no job id: {out!r}")


def _record(
    table: str,
    job: Job,
    results_dir: Path,
    verbose: bool,
    rec: dict | None,
    note: str,
    jid: str,
    dependency: str | None,
    launcher: str,
    script: Path,
) -> dict:
    """submitted.json's entry for a job just submitted (earlier submissions kept under `previous`)."""
    previous = list(rec.get("previous", [])) if rec else []
    if rec:
        previous.append({"job_id": rec["job_id"], "submitted_at": rec.get("submitted_at"), "state": note})
    return {
        "table": table,
        "experiment": job.experiment,
        "label": job.label,
        "setting": job.setting,
        "method": job.method,
        "seed": job.seed,
        "run_keys": job.keys,
        "stage_hash": stage_hash(job),
        "overrides": list(job.overrides),
        "job_id": jid,
        "dependency": dependency,
        "launcher": launcher,
        "script": str(script),
        "command": job_command(table, job, results_dir, verbose),
        "submitted_at": _now(),
        "previous": previous,
    }


def submit(
    table: str,
    jobs: list[Job],
    results_dir: Path,
    launcher: str = "slurm",
    extra: Sequence[str] = (),
    verbose: bool = False,
    log: Callable[[str], None] = print,
) -> list[tuple[Job, str]]:
    """Submit every job of `jobs` that is neither done nor queued, with its dependency; return at once.
    Returns [(job, error)] for a failed sbatch (the submit stops at the first one)."""
    results_dir = Path(results_dir)
    if shutil.which("sbatch") is None:
        raise SystemExit(
            "error: --launcher slurm submits with sbatch, which is not on PATH: run this on a SLURM login "
            "node (or choose another --launcher)"
        )
    options = _options_for(jobs, launcher, extra, log)
    sdir = slurm_dir(results_dir)
    (sdir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch does not create the log folder
    (sdir / "scripts").mkdir(parents=True, exist_ok=True)
    with _submit_lock(results_dir):
        records = load_records(results_dir)
        queue = query_scheduler([str(records[job_key(j)]["job_id"]) for j in jobs if job_key(j) in records])
        for j in jobs:
            j.refresh()
        if queue.error and any(not j.done and job_key(j) in records for j in jobs):
            log(f"[submit] warning: {queue.error}: jobs submitted before are not resubmitted")
        run = _Submission(table, jobs, results_dir, launcher, options, verbose, log, records, queue)
        # the methods that reuse another job's stages go last, so their dependency has a job id
        order = [j for j in jobs if j.method not in LATE_METHODS] + [
            j for j in jobs if j.method in LATE_METHODS
        ]
        for job in order:
            if not run.one(job):
                break
    counts, n = run.counts, len(jobs)
    new = counts["submitted"] + counts["resubmitted"]
    log(
        f"[submit] {new} SLURM job{'s' * (new != 1)} submitted"
        + (f" ({counts['resubmitted']} resubmitted)" if counts["resubmitted"] else "")
        + f", {counts['queued']} already queued, {counts['done']} done, of {n}; "
        f"scripts and logs in {sdir}, record {record_path(results_dir)}"
    )
    return run.failures


def _options_for(jobs: list[Job], launcher: str, extra: Sequence[str], log: Callable[[str], None]) -> dict:
    """Each launcher's fields with the command line's overrides, saying what does not apply."""
    _, ignored = launcher_overrides(extra)
    if ignored:
        log(f"[submit] note: not launcher fields, ignored by sbatch jobs: {' '.join(ignored)}")
    options = {
        name: launcher_options(name, extra) for name in dict.fromkeys(launcher_of(j, launcher) for j in jobs)
    }
    for name, opts in options.items():
        if not opts.get("partition"):
            log(
                f"[submit] note: {name}: no partition set (hydra.launcher.partition=P, or "
                f"hydra.launcher.{name}.partition=P): the cluster's default partition"
            )
    return options


@dataclass
class _Submission:
    """One submit pass: the records and queue it started from, and what it has submitted so far."""

    table: str
    jobs: list[Job]
    results_dir: Path
    launcher: str
    options: dict
    verbose: bool
    log: Callable[[str], None]
    records: dict[str, dict]
    queue: Queue
    active: dict[str, str] = field(default_factory=dict)  # job key -> SLURM id of its queued/submitted job
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("done", "queued", "submitted", "resubmitted"), 0)
    )
    signals: dict[str, str | None] = field(default_factory=dict)
    failures: list[tuple[Job, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_cell = {(j.experiment, j.setting, j.seed, j.method): j for j in self.jobs}
        self.number = {id(j): i for i, j in enumerate(self.jobs, 1)}

    def _dependency_id(self, job: Job) -> str | None:
        dep = self.by_cell.get((job.experiment, job.setting, job.seed, DEPENDS_ON.get(job.method, "")))
        return self.active.get(job_key(dep)) if dep is not None and not dep.done else None

    def one(self, job: Job) -> bool:
        """Submit `job` unless it is done or queued; False after a failed sbatch (stop submitting)."""
        key, rec = job_key(job), self.records.get(job_key(job))
        state, note = classify(job, rec, self.queue)
        if state == "done":
            self.counts["done"] += 1
            return True
        dep_id = self._dependency_id(job)
        if state in ("pending", "running", "submitted"):
            self.counts["queued"] += 1
            self.active[key] = str(rec["job_id"])
            old_dep = rec.get("dependency")
            if state == "pending" and old_dep and dep_id and old_dep != f"afterok:{dep_id}":
                self.log(
                    f"[submit] note: {job.label} ({rec['job_id']}) waits on a failed job ({old_dep}): "
                    "SLURM cancels it (--kill-on-invalid-dep); submit again after that"
                )
            return True
        return self._sbatch(job, key, rec, note, dep_id)

    def _sbatch(self, job: Job, key: str, rec: dict | None, note: str, dep_id: str | None) -> bool:
        dependency = f"afterok:{dep_id}" if dep_id else None
        name = launcher_of(job, self.launcher)
        if job.experiment not in self.signals:
            self.signals[job.experiment] = requeue_signal(job)
        script = slurm_dir(self.results_dir) / "scripts" / f"{key}.sbatch"
        opts, signal = self.options[name], self.signals[job.experiment]
        script.write_text(sbatch_script(self.table, job, self.results_dir, name, opts, signal, self.verbose))
        jid, err = _sbatch(script, dependency)
        if err:
            self.failures.append((job, err))
            self.log(f"[submit] FAILED {job.label}: {err} (script {script}); stopping")
            return False
        self.records[key] = _record(
            self.table, job, self.results_dir, self.verbose, rec, note, jid, dependency, name, script
        )
        save_records(self.results_dir, self.records)  # after every sbatch: a crash never loses a job id
        self.active[key] = jid
        self.counts["resubmitted" if rec else "submitted"] += 1
        again = f", resubmitted after {rec['job_id']} ({note})" if rec else ""
        after = f", after {dep_id}" if dep_id else ""
        n, i = len(self.jobs), self.number[id(job)]
        self.log(f"[{i:>{len(str(n))}}/{n}] {job.label}: submitted as {jid} ({name}{after}{again})")
        return True


# -- status --------------------------------------------------------------------------------------------
def status(jobs: list[Job], results_dir: Path) -> tuple[list[tuple[Job, str, str, str]], Queue]:
    """[(job, state, SLURM id or '', note)] for every job, and what the scheduler said."""
    records = load_records(results_dir)
    queue = query_scheduler([str(records[job_key(j)]["job_id"]) for j in jobs if job_key(j) in records])
    rows = []
    for j in jobs:
        j.refresh()  # after the query: a job that finished meanwhile is done, not failed
        rec = records.get(job_key(j))
        state, note = classify(j, rec, queue)
        rows.append((j, state, str(rec["job_id"]) if rec else "", note))
    return rows, queue


def totals_line(states: Sequence[str]) -> str:
    shown = [s for s in STATES if s != "submitted" or s in states]
    parts = [
        f"{sum(x == s for x in states)} {s if s != 'submitted' else 'submitted (state unknown)'}"
        for s in shown
    ]
    return ", ".join(parts) + f" ({len(states)} jobs)"


def status_lines(table: str, jobs: list[Job], results_dir: Path) -> list[str]:
    rows, queue = status(jobs, results_dir)
    path = record_path(results_dir)
    src = [str(path) if path.exists() else f"{path} (none yet)", "summary.json files"]
    if queue.error:
        src.append(f"no scheduler: {queue.error}; what the files say")
    else:
        src.append("squeue" + (", sacct" if queue.acct else ""))
    lines = [f"[status] {table}: {len(jobs)} jobs; from {'; '.join(src)}"]
    if queue.acct_note:
        lines.append(f"[status] note: {queue.acct_note}")
    width = max(len(j.label) for j in jobs)
    lines.append(f"{'state':<14} {'job':<{width}}  {'slurm id':>9}  note")
    for j, state, jid, note in rows:
        lines.append(f"{state:<14} {j.label:<{width}}  {jid:>9}  {note}".rstrip())
    for experiment in dict.fromkeys(j.experiment for j in jobs):
        mine = [s for j, s, _, _ in rows if j.experiment == experiment]
        lines.append(f"[status] {experiment}: {totals_line(mine)}")
    lines.append(f"[status] totals: {totals_line([s for _, s, _, _ in rows])}")
    return lines


def cell_counts(jobs: list[Job]) -> tuple[int, int, int]:
    """(cells, cells with no finished seed, cells with some but not all seeds) of the sweep, a cell being
    one (setting, method): one table cell (Table 3: its base, +Aioli and Δ columns)."""
    cells: dict[tuple[str, str], list[bool]] = {}
    for j in jobs:
        cells.setdefault((j.setting, j.method), []).append(j.done)
    missing = sum(not any(v) for v in cells.values())
    partial = sum(any(v) and not all(v) for v in cells.values())
    return len(cells), missing, partial
