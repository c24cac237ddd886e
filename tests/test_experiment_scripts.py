"""The wrapper scripts in experiments/: valid bash, clear errors, and the sweep they launch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "experiments").glob("*.sh"))
CLUSTER = ["paper_table2_slurm.sh", "paper_table3_slurm.sh", "paper_mixing_laws_slurm.sh"]


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "PARTITION"}
    full_env.update(PY=sys.executable, **env)
    return subprocess.run(
        ["bash", str(ROOT / "experiments" / script), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


def test_scripts_exist_and_parse() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"smoke_all.sh", "miniature.sh", *CLUSTER} <= names
    for p in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p.name}: {r.stderr}"


@pytest.mark.parametrize("script", CLUSTER)
def test_cluster_script_needs_partition(script: str) -> None:
    r = _run(script)
    assert r.returncode != 0
    assert "set PARTITION to your SLURM partition" in r.stderr


def test_paper_table2_script_plans_the_paper_sweep(tmp_path: Path) -> None:
    r = _run(
        "paper_table2_slurm.sh",
        "--dry-run",
        "--settings",
        "a_se,slimpajama_all",
        "--results-dir",
        str(tmp_path),
        PARTITION="gpu",
        SEEDS="5",
    )
    assert r.returncode == 0, r.stderr
    jobs = [line for line in r.stdout.splitlines() if line.startswith("pending ")]
    # 9 rows (7 methods, Aioli's Alg. 1 variant and null arm) x 5 seeds for A/SE, x 3 seeds for m = 7
    assert len(jobs) == 9 * 5 + 9 * 3
    assert all("scale=paper" in line for line in jobs)
    assert sum("groups=slimpajama_all" in line and "experiment=table2_m7" in line for line in jobs) == 27
    assert "[reproduce] cost (estimate" in r.stdout and "GPU-hours" in r.stdout  # the bill, up front


@pytest.mark.slow
def test_cluster_rehearsal_prepares_submits_every_table2_job_and_reports(tmp_path: Path) -> None:
    r = _run("cluster_rehearsal.sh", WORK=str(tmp_path / "rehearsal"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "7 packed" in r.stdout + r.stderr
    assert "[submit] 252 SLURM jobs submitted" in r.stdout
    assert "[status] totals: 0 done, 0 running, 252 pending, 0 failed, 0 not submitted" in r.stdout
    # DML after grid search, DoReMi after the stratified run
    assert "252 sbatch calls, 56 with --dependency=afterok" in r.stdout
