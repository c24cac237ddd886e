"""The non-blocking cluster sweep (`pipeline.submit`, `reproduce --launcher slurm / --status / --collect`)
against fake `sbatch`, `squeue` and `sacct` executables first on PATH: nothing is trained, nothing waits."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from aioli_repro import reproduce
from aioli_repro.pipeline import sbatch, submit, sweep

FAKE_SBATCH = r"""#!/bin/bash
# records its argv (tab-separated) and a copy of the script, prints the next job id
d="$(cd "$(dirname "$0")" && pwd)"
n=$(( $(cat "$d/next_id") + 1 ))
echo "$n" > "$d/next_id"
{ printf '%s' "$n"; printf '\t%s' "$@"; printf '\n'; } >> "$d/sbatch.log"
cp "${@: -1}" "$d/scripts/$n.sbatch"
echo "$n"
"""
FAKE_SQUEUE = r"""#!/bin/bash
d="$(cd "$(dirname "$0")" && pwd)"
{ printf 'squeue'; printf '\t%s' "$@"; printf '\n'; } >> "$d/queries.log"
cat "$d/squeue.txt" 2>/dev/null
exit 0
"""
FAKE_SACCT = r"""#!/bin/bash
d="$(cd "$(dirname "$0")" && pwd)"
{ printf 'sacct'; printf '\t%s' "$@"; printf '\n'; } >> "$d/queries.log"
cat "$d/sacct.txt" 2>/dev/null
exit 0
"""


def _fake_bin(root: Path) -> Path:
    bin_dir = root / "bin"
    (bin_dir / "scripts").mkdir(parents=True)
    (bin_dir / "next_id").write_text("1000\n")
    for name, body in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("sacct", FAKE_SACCT)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _calls(bin_dir: Path) -> list[dict]:
    """[{id, argv, script (the sbatch file as submitted), path}] of every fake sbatch call."""
    log = bin_dir / "sbatch.log"
    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        jid, *argv = line.split("\t")
        out.append(
            {
                "id": jid,
                "argv": argv,
                "path": argv[-1],
                "script": (bin_dir / "scripts" / f"{jid}.sbatch").read_text(),
            }
        )
    return out


def _driver(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    rc = reproduce.main(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A fake SLURM on PATH, a results directory, and the smoke Table 2 plan (composed once, then cached
    under the results directory, so every driver call below plans in milliseconds)."""
    root = tmp_path_factory.mktemp("cluster")
    bin_dir = _fake_bin(root)
    runs, out = root / "runs", root / "tables"
    common = ["table2", "--scale", "smoke", "--results-dir", str(runs), "--out-dir", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        mp.setenv("AIOLI_CACHE", str(root / "cache"))
        jobs = sweep.plan("table2", "table_smoke", runs.resolve(), 1, 1, None, None, [], 1)
        yield {"bin": bin_dir, "runs": runs, "out": out, "common": common, "jobs": jobs}


def _cell(jobs: list, method: str, setting: str, seed: int = 0):
    return next(j for j in jobs if (j.method, j.setting, j.seed) == (method, setting, seed))


def test_submit_status_collect_cycle(cluster: dict, capsys: pytest.CaptureFixture) -> None:
    bin_dir, runs, common, jobs = cluster["bin"], cluster["runs"], cluster["common"], cluster["jobs"]
    assert len(jobs) == 54 and not any(j.done for j in jobs)
    parts = ["hydra.launcher.partition=gpu-ada", "hydra.launcher.slurm_a100.partition=gpu-a100"]

    # 1. submit: one sbatch per pending job, then return at once (the jobs never finish here)
    t = time.time()
    rc, log = _driver(capsys, *common, "--launcher", "slurm", *parts)
    assert rc == 0, log
    assert time.time() - t < 20, "the submit must not wait for its jobs"
    assert "54 SLURM jobs submitted, 0 already queued, 0 done, of 54" in log
    assert not list(runs.glob("*-pipeline-*")), "nothing may train on the submitting machine"
    calls = _calls(bin_dir)
    by_key = {Path(c["path"]).name.removesuffix(".sbatch"): c for c in calls}
    assert len(calls) == len(by_key) == 54 and set(by_key) == {j.keys[0] for j in jobs}
    for j in jobs:
        c = by_key[j.keys[0]]
        assert c["argv"][0] == "--parsable"
        lines = c["script"].splitlines()
        sb = [x.removeprefix("#SBATCH ") for x in lines if x.startswith("#SBATCH ")]
        assert "--signal=USR2@300" in sb and "--requeue" in sb and "--open-mode=append" in sb
        assert "--gpus-per-node=1" in sb and "--nodes=1" in sb
        cpus = 16 if j.experiment == "table2_m7" else 8
        if j.experiment == "table2_m7":  # slurm_a100
            want = {"--partition=gpu-a100", "--mem=128G", "--time=1-00:00:00", "--cpus-per-task=16"}
        else:  # slurm_rtx6000ada
            want = {"--partition=gpu-ada", "--mem=64G", "--time=12:00:00", "--cpus-per-task=8"}
        assert want <= set(sb), (j.label, sb)
        assert f"--output={runs.resolve() / 'slurm' / 'logs' / j.keys[0]}-%j.out" in sb
        assert "export WANDB_MODE=offline" in c["script"] and f"export OMP_NUM_THREADS={cpus}" in lines
        cmd = shlex.split(lines[-1])
        srun = ["srun", "--ntasks=1", f"--cpus-per-task={cpus}"]
        assert cmd == [*srun, sys.executable, "-m", "aioli_repro.run", *j.overrides, "progress=false"]
        assert f"results_dir={runs.resolve()}" in j.overrides
    # DML after grid, DoReMi after stratified: same setting and seed; nothing else has a dependency
    for j in jobs:
        argv = by_key[j.keys[0]]["argv"]
        deps = [a for a in argv if a.startswith("--dependency=")]
        if j.method in sweep.DEPENDS_ON:
            prereq = _cell(jobs, sweep.DEPENDS_ON[j.method], j.setting, j.seed)
            assert deps == [f"--dependency=afterok:{by_key[prereq.keys[0]]['id']}"], (j.label, argv)
            assert "--kill-on-invalid-dep=yes" in argv
            assert int(by_key[prereq.keys[0]]["id"]) < int(by_key[j.keys[0]]["id"])
        else:
            assert deps == [], (j.label, argv)
    record = json.loads((runs / "slurm" / "submitted.json").read_text())["jobs"]
    assert set(record) == set(by_key)
    dml = _cell(jobs, "dml", "a_se")
    r = record[dml.keys[0]]
    assert r["job_id"] == by_key[dml.keys[0]]["id"] and r["run_keys"] == dml.keys
    assert r["dependency"] == f"afterok:{by_key[_cell(jobs, 'grid', 'a_se').keys[0]]['id']}"
    assert r["stage_hash"] == dml.keys[0].rsplit("-", 1)[1] and r["overrides"] == dml.overrides
    assert Path(r["script"]).exists() and r["submitted_at"] and r["launcher"] == "slurm_rtx6000ada"

    # 2. again, all of them queued: nothing is submitted twice
    ids = {k: c["id"] for k, c in by_key.items()}
    (bin_dir / "squeue.txt").write_text("".join(f"{i} PENDING\n" for i in ids.values()))
    rc, log = _driver(capsys, *common, "--launcher", "slurm", *parts)
    assert rc == 0 and "0 SLURM jobs submitted, 54 already queued" in log, log
    assert len(_calls(bin_dir)) == 54
    assert "-o\t%i %T\t-j" in (bin_dir / "queries.log").read_text()

    # 3. a failed stratified run (its DoReMi cancelled by SLURM) and a timed-out Aioli run are resubmitted,
    # DoReMi after the new stratified job; a DoReMi still waiting on a failed stratified job is left to
    # SLURM (--kill-on-invalid-dep), with a note
    strat, doremi, aioli, strat2 = (
        _cell(jobs, m, s)
        for m, s in [
            ("stratified", "gh_c4"),
            ("doremi", "gh_c4"),
            ("aioli", "b_se"),
            ("stratified", "a_b_se"),
        ]
    )
    gone = {
        ids[strat.keys[0]]: "FAILED",
        ids[doremi.keys[0]]: "CANCELLED by 0",
        ids[aioli.keys[0]]: "TIMEOUT",
        ids[strat2.keys[0]]: "NODE_FAIL",
    }
    (bin_dir / "squeue.txt").write_text("".join(f"{i} PENDING\n" for i in ids.values() if i not in gone))
    (bin_dir / "sacct.txt").write_text("".join(f"{i}|{s}\n{i}.batch|{s}\n" for i, s in gone.items()))
    rc, log = _driver(capsys, *common, "--launcher", "slurm", *parts)
    assert rc == 0 and "4 SLURM jobs submitted (4 resubmitted), 50 already queued" in log, log
    assert "A/B/SE doremi seed 0" in log and "waits on a failed job" in log
    new = _calls(bin_dir)[54:]
    order = [strat.keys[0], aioli.keys[0], strat2.keys[0], doremi.keys[0]]
    assert [Path(c["path"]).name.removesuffix(".sbatch") for c in new] == order
    assert f"--dependency=afterok:{new[0]['id']}" in new[3]["argv"]
    record = json.loads((runs / "slurm" / "submitted.json").read_text())["jobs"]
    assert record[strat.keys[0]]["job_id"] == new[0]["id"]
    assert record[strat.keys[0]]["previous"][0]["job_id"] == ids[strat.keys[0]]
    assert record[strat.keys[0]]["previous"][0]["state"] == "FAILED"
    ids.update({Path(c["path"]).name.removesuffix(".sbatch"): c["id"] for c in new})

    # 4. --collect with nothing finished: a clear message, exit 0, no table
    rc, log = _driver(capsys, *common, "--collect")
    assert rc == 0 and "none of the 54 pipelines has finished yet" in log, log
    assert not (cluster["out"] / "table2.md").exists()

    # 5. --status: 5 running, one finished (summary.json), one failed, one never submitted, the rest pending
    running = [_cell(jobs, m, "a_se") for m in ("stratified", "grid", "skillit", "doge", "aioli")]
    done, failed = _cell(jobs, "aioli", "slimpajama_all"), _cell(jobs, "doge", "cc_gh_w")
    unsubmitted = _cell(jobs, "aioli_null", "b_se")
    states = {ids[j.keys[0]]: "RUNNING" for j in running}
    (bin_dir / "squeue.txt").write_text(
        "".join(
            f"{i} {states.get(i, 'PENDING')}\n"
            for k, i in ids.items()
            if k not in (failed.keys[0], done.keys[0])
        )
    )
    (bin_dir / "sacct.txt").write_text(
        f"{ids[failed.keys[0]]}|OUT_OF_MEMORY\n{ids[done.keys[0]]}|COMPLETED\n"
    )
    done.dirs[0].mkdir(parents=True)
    (done.dirs[0] / "summary.json").write_text("{}")
    rec_path = runs / "slurm" / "submitted.json"
    body = json.loads(rec_path.read_text())
    del body["jobs"][unsubmitted.keys[0]]
    rec_path.write_text(json.dumps(body))
    rc, log = _driver(capsys, *common, "--status")
    assert rc == 0, log
    assert "[status] totals: 1 done, 5 running, 46 pending, 1 failed, 1 not submitted (54 jobs)" in log, log
    assert "[status] table2_m7: 1 done, 0 running, 8 pending, 0 failed, 0 not submitted (9 jobs)" in log
    rows = {line[15:].split("  ")[0].strip(): line for line in log.splitlines() if line[:14].strip() in
            submit.STATES}  # fmt: skip
    assert rows[failed.label].startswith("failed") and "OUT_OF_MEMORY" in rows[failed.label]
    assert rows[dml.label].startswith("pending") and "afterok:" in rows[dml.label]
    assert rows[running[0].label].startswith("running") and rows[done.label].startswith("done")
    assert rows[unsubmitted.label].startswith("not submitted")
    assert not list(runs.glob("*-pipeline-*/*.ckpt"))


# -- units, on hand-made jobs (no composing) ---------------------------------------------------------------
def _job(root: Path, method: str, setting: str = "a_se", experiment: str = "table2", signal: str = "SIGUSR2"):
    ov = [
        f"groups={setting}",
        f"method={method}",
        "seed=0",
        f"experiment={experiment}",
        f"results_dir={root}",
    ]
    cfg = OmegaConf.create({"trainer": {"requeue_signal": signal, "slurm_requeue": signal != "off"}})
    meta = {"setting": setting, "label": setting.upper(), "method": method, "seed": 0}
    return sweep.Job(experiment, ov, [root / f"{method}-{setting}-pipeline-0123456789ab"], meta, _cfg=cfg)


def test_launcher_fields_signal_and_no_scheduler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = sbatch.launcher_options(
        "slurm_a100",
        ["hydra.launcher.timeout_min=90", "hydra.launcher.slurm_rtx6000ada.mem_gb=1",
         "hydra.launcher.additional_parameters.mail_type=FAIL", "~hydra.launcher.gpus_per_node",
         "hydra.launcher.gres=gpu:a100:1", "hydra.sweep.dir=x"],
    )  # fmt: skip
    flags = sbatch.sbatch_options(opts, "USR2")
    assert {
        "--time=01:30:00",
        "--mem=128G",
        "--mail-type=FAIL",
        "--gres=gpu:a100:1",
        "--signal=USR2@300",
    } <= set(flags)
    assert not any(f.startswith("--gpus-per-node") or f.startswith("--partition") for f in flags)
    with pytest.raises(SystemExit, match="no such launcher field"):
        sbatch.launcher_options("slurm_a100", ["hydra.launcher.partiton=gpu"])
    assert sbatch.launcher_overrides(["hydra.sweep.dir=x", "seed=1"])[1] == ["hydra.sweep.dir=x"]
    # the training code's signal, or none when it does not handle one (SIGUSR2 would kill the run)
    assert sbatch.requeue_signal(_job(tmp_path, "grid")) == "USR2"
    assert sbatch.requeue_signal(_job(tmp_path, "grid", signal="off")) is None
    script = sbatch.sbatch_script(
        "table2", _job(tmp_path, "grid", signal="off"), tmp_path, "slurm_a100", opts, None
    )
    assert "--signal" not in script and "#SBATCH --requeue" in script
    # no scheduler at all: submit refuses, status says so and shows what the files say
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    jobs = [_job(tmp_path, "grid"), _job(tmp_path, "dml")]
    with pytest.raises(SystemExit, match="sbatch, which is not on PATH"):
        submit.submit("table2", jobs, tmp_path)
    submit.save_records(tmp_path, {jobs[0].keys[0]: {"job_id": "7"}})
    lines = submit.status_lines("table2", jobs, tmp_path)
    assert "no scheduler: squeue is not on PATH" in lines[0]
    assert lines[-1] == "[status] totals: 0 done, 0 running, 0 pending, 0 failed, 1 not submitted, " \
        "1 submitted (state unknown) (2 jobs)"  # fmt: skip
    assert submit.cell_counts(jobs) == (2, 2, 0)


def test_a_multi_gpu_job_gets_one_task_per_gpu(tmp_path: Path) -> None:
    """trainer.devices=N: N tasks and N GPUs on the node, and the run started as N tasks (DDP ranks), under
    our sbatch scripts and under submitit (the launcher configs interpolate the job's device count)."""
    opts = sbatch.launcher_options("slurm_a100")
    for devices in (None, 2):
        job = _job(tmp_path, "stratified")
        if devices is not None:
            job._cfg.trainer.devices = devices
        n = devices or 1
        script = sbatch.sbatch_script("table2", job, tmp_path, "slurm_a100", opts, "USR2")
        assert f"#SBATCH --ntasks-per-node={n}\n" in script and f"#SBATCH --gpus-per-node={n}\n" in script
        assert f"srun --ntasks={n} " in script
    hydra_cfg = compose_config(
        "hydra/launcher=slurm_a100", "trainer.devices=4", "cache_dir=/tmp/x", hydra_cfg=True
    )
    assert (hydra_cfg.hydra.launcher.tasks_per_node, hydra_cfg.hydra.launcher.gpus_per_node) == (4, 4)
