"""The table layer: experiment sweeps, launcher configs, the reproduce driver (in-process and through a
Hydra multirun), the restricted setting, and the notebooks (papermill, headless)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config

from aioli_repro import reproduce
from aioli_repro.config import ConfigError
from aioli_repro.pipeline import launch, recipes, restricted, sweep

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_23 = ["a_se", "gh_c4", "b_se", "a_b_se", "cc_gh_w"]
METHODS = ["stratified", "grid", "dml", "skillit", "doremi", "doge", "aioli", "aioli_mult", "aioli_null"]
BASELINES = ["grid", "dml", "skillit", "doremi", "doge"]
# a micro budget: 20 steps, Aioli rounds of 10 (LearnParams k*m*1 < 10 for m <= 3), a 3-point grid
MICRO = [
    "train.max_steps=20", "train.val_max_seqs=8", "train.test_max_seqs=16", "train.eval_batch_size=16",
    "hp.aioli.update_steps=10", "hp.aioli.lp_steps=1", "hp.aioli.eval_max_seqs=4", "hp.grid.n_runs=3",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _env(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the driver's jobs (and Hydra subprocesses) pack data into the session's cache
    monkeypatch.setenv("AIOLI_CACHE", str(cache_dir))
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def _compose(*overrides: str, hydra_cfg: bool = False):
    return compose_config(*overrides, "cache_dir=/tmp/unused", hydra_cfg=hydra_cfg)


def _cells(jobs) -> set[tuple[str, str, int]]:
    return {(j.setting, j.method, j.seed) for j in jobs}


# -- sweeps ------------------------------------------------------------------------------------------
def test_table2_sweep_expands_to_every_setting_method_seed(tmp_path: Path) -> None:
    jobs = sweep.plan("table2", "paper", tmp_path)
    expected = {(s, m, k) for s in SETTINGS_23 for m in METHODS for k in range(5)}
    expected |= {("slimpajama_all", m, k) for m in METHODS for k in range(3)}  # m = 7: 3 seeds
    assert len(jobs) == 5 * 9 * 5 + 9 * 3 == len(_cells(jobs))
    assert _cells(jobs) == expected
    assert {j.experiment for j in jobs if j.setting == "slimpajama_all"} == {"table2_m7"}
    # every job is a paper-scale config of its own setting, with its own pipeline directory
    j = next(j for j in jobs if (j.setting, j.method, j.seed) == ("b_se", "doge", 3))
    assert j.cfg.scale_name == "paper" and list(j.cfg.groups.names) == ["book", "stackexchange"]
    assert j.cfg.train.max_steps == 5000 and not j.done
    assert len({d for j in jobs for d in j.dirs}) == len(jobs)
    assert next(j for j in jobs if j.setting == "slimpajama_all").cfg.train.max_steps == 40000


@pytest.fixture(scope="module")
def tiny_jobs(tmp_path_factory: pytest.TempPathFactory) -> list:
    return sweep.plan("table2", "table_smoke", tmp_path_factory.mktemp("plan"), 1, 1)


def test_smoke_sweep_is_one_seed_and_its_aioli_schedule_fits(tiny_jobs: list) -> None:
    assert sweep.default_seeds("table_smoke", "table2", None, None) == (1, 1, 1)
    assert sweep.default_seeds("paper", "table2", None, None) == (None, None, None)  # configs' 5 and 3
    assert sweep.default_seeds("paper", "table2", 4, None) == (4, 3, None)
    # the miniature: 5 seeds for stratified and the Aioli arms everywhere, 3 for the other baselines
    assert sweep.default_seeds("miniature", "table2", None, None) == (5, 5, 3)
    assert sweep.default_seeds("miniature", "headroom", None, None) == (3, 3, 3)
    jobs = tiny_jobs
    assert len(jobs) == 6 * 9 and {j.seed for j in jobs} == {0}
    from aioli_repro.mixing.aioli import Aioli
    from aioli_repro.mixing.base import MixingContext

    for j in jobs:
        if j.method == "aioli":
            c = j.cfg
            mixer = Aioli(**{k: v for k, v in dict(c.method.mixer).items() if k != "_target_"})
            mixer.setup(MixingContext(list(c.groups.names), c.train.max_steps, c.train.batch_size, 0, {}))


def test_table3_sweep_and_selection(tmp_path: Path) -> None:
    jobs = sweep.plan("table3", "paper", tmp_path)
    assert len(jobs) == 5 * 5 * 5 + 5 * 3
    assert {j.method for j in jobs} == set(BASELINES)
    assert all(len(j.dirs) == 2 for j in jobs)  # base and +aioli pipelines
    seeds = sweep.default_seeds("paper", "table2", 2, None)[:2]  # --seeds 2: m = 7 gets min(2, 3)
    sub = sweep.plan("table2", "table_smoke", tmp_path, *seeds, ["a_se", "slimpajama_all"], ["aioli"])
    assert _cells(sub) == {("a_se", "aioli", 0), ("a_se", "aioli", 1), ("slimpajama_all", "aioli", 0),
                           ("slimpajama_all", "aioli", 1)}  # fmt: skip


def test_command_line_sweeps_replace_the_experiments_params() -> None:
    params = sweep.sweep_params("table2")
    assert params["seed"] == "range(0,5)"
    jobs = sweep.expand_overrides(params, ["experiment=table2", "groups=a_se", "seed=0,1"])
    assert len(jobs) == 9 * 2
    assert all("groups=a_se" in j and "experiment=table2" in j for j in jobs)


# -- launchers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("launcher, gpus, timeout", [("slurm_rtx6000ada", 1, 720), ("slurm_a100", 1, 1440)])
def test_slurm_launcher_configs_compose_with_overridable_fields(
    launcher: str, gpus: int, timeout: int
) -> None:
    c = _compose("experiment=table2", f"hydra/launcher={launcher}", hydra_cfg=True)
    lc = c.hydra.launcher
    assert lc._target_.endswith("SlurmLauncher")
    assert lc.gpus_per_node == gpus and lc.timeout_min == timeout
    for field in ("partition", "mem_gb", "cpus_per_task", "signal_delay_s", "max_num_timeout", "account"):
        assert field in lc
    assert lc.max_num_timeout > 0 and lc.signal_delay_s > 0  # requeue on time-out, time to checkpoint
    c = _compose(
        f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu-long", "hydra.launcher.timeout_min=30",
        "hydra.launcher.mem_gb=32", "hydra.launcher.cpus_per_task=4", "hydra.launcher.gpus_per_node=2",
        hydra_cfg=True,
    )  # fmt: skip
    lc = c.hydra.launcher
    assert (lc.partition, lc.timeout_min, lc.mem_gb, lc.cpus_per_task, lc.gpus_per_node) == (
        "gpu-long",
        30,
        32,
        4,
        2,
    )


def test_local_parallel_launcher_and_hydra_cli() -> None:
    c = _compose("hydra/launcher=local_parallel", "hydra.launcher.n_jobs=3", hydra_cfg=True)
    assert c.hydra.launcher._target_.endswith("JoblibLauncher") and c.hydra.launcher.n_jobs == 3
    # the Hydra CLI (as on a cluster login node) resolves the launcher config too
    out = subprocess.run(
        [sys.executable, "-m", "aioli_repro.run", "experiment=table2_m7", "hydra/launcher=slurm_a100",
         "hydra.launcher.partition=gpu", "--cfg", "hydra"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (
        "SlurmLauncher" in out.stdout
        and "partition: gpu" in out.stdout
        and "groups: slimpajama_all" in out.stdout
    )


def test_hydra_commands_split_node_types_and_phases(tiny_jobs: list, tmp_path: Path) -> None:
    jobs = tiny_jobs
    cmds = [c for c, _ in launch.hydra_commands("table2", jobs, "slurm", tmp_path, None, [])]
    assert len(cmds) == 4  # (m = 2, 3 | m = 7) x (phase 1 | dml, doremi)
    assert all(c[1:4] == ["-m", "aioli_repro.run", "-m"] for c in cmds)
    assert [next(a for a in c if a.startswith("hydra/launcher=")) for c in cmds] == [
        "hydra/launcher=slurm_rtx6000ada", "hydra/launcher=slurm_rtx6000ada",
        "hydra/launcher=slurm_a100", "hydra/launcher=slurm_a100",
    ]  # fmt: skip
    assert "method=dml,doremi" in cmds[1]
    assert "method=stratified,grid,skillit,doge,aioli,aioli_mult,aioli_null" in cmds[0]
    # launcher fields given on the driver's command line go to the Hydra command, after the launcher
    part = launch.hydra_commands("table2", jobs, "slurm", tmp_path, None, ["hydra.launcher.partition=gpu"])
    assert all(c[-1] == "hydra.launcher.partition=gpu" for c, _ in part)
    par = launch.hydra_commands("table2", jobs, "local_parallel", tmp_path, 2, [])
    cmd, env = par[0]
    assert "num_threads=1" in cmd and "hydra.launcher.n_jobs=2" in cmd and env["OMP_NUM_THREADS"] == "1"


# -- restricted setting ----------------------------------------------------------------------------
def test_restricted_options_shortening_and_checks() -> None:
    c = _compose("experiment=table3", "scale=table_smoke", "method=skillit", "groups=a_b_se")
    assert restricted.options(c) == (0.5, c.hp.aioli.update_steps)
    short = restricted.shortened(restricted.base_config(c), 0.5)
    assert short.train.max_steps == c.train.max_steps // 2
    assert short.method.pipeline.graph_steps == c.hp.skillit.graph_steps // 2
    assert "restricted" not in restricted.base_config(c)
    d = _compose("experiment=table3", "scale=table_smoke", "method=doremi")
    assert restricted.shortened(d, 0.5).method.pipeline.proxy_steps == d.hp.doremi.proxy_steps // 2
    restricted.check_aioli(restricted.base_config(c), restricted.options(c)[1])
    with pytest.raises(ConfigError, match="update_steps"):
        restricted.check_aioli(restricted.base_config(c), 30)  # 128 - 30 is not a multiple of 32
    bad = _compose("experiment=table3", "restricted.fraction=1.5")
    with pytest.raises(ConfigError, match="restricted.fraction"):
        restricted.options(bad)
    # the same run, launched from Table 2 or Table 3, has one hash
    from aioli_repro.pipeline.stage import stage_hash

    t2 = _compose("experiment=table2", "scale=table_smoke", "method=grid")
    t3 = _compose("experiment=table3", "scale=table_smoke", "method=grid")
    assert stage_hash(t2) == stage_hash(restricted.base_config(t3))


def test_time_average_of_a_trajectory() -> None:
    from aioli_repro.training.callbacks import trajectory_records

    groups = ["a", "b"]
    old = trajectory_records({"groups": groups, "trajectory": [(0, [0.5, 0.5]), (10, [1.0, 0.0])]})
    np.testing.assert_allclose(recipes.time_average(old, groups, 40), [0.875, 0.125])
    new = [{"step": 0, "p": {"a": 0.5, "b": 0.5}, "probe": False}, {"step": 30, "p": {"a": 0.0, "b": 1.0}}]
    np.testing.assert_allclose(
        recipes.time_average(trajectory_records({"groups": groups, "trajectory": new}), groups, 40),
        [0.375, 0.625],
    )
    np.testing.assert_allclose(recipes.time_average([], groups, 40), [0.5, 0.5])


# -- the driver, end to end ------------------------------------------------------------------------
def _driver(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    rc = reproduce.main(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


def _stage_mtimes(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("summary.json")}


@pytest.fixture(scope="module")
def micro_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reproduce")


def test_driver_table2_end_to_end_hydra_path_and_resume(
    micro_runs: Path, capsys: pytest.CaptureFixture
) -> None:
    runs, out = micro_runs / "runs", micro_runs / "tables"
    common = ["--scale", "smoke", "--results-dir", str(runs), "--out-dir", str(out), *MICRO]
    # 1. the cluster path: a Hydra multirun (basic launcher) of one pipeline
    rc, log = _driver(
        capsys, "table2", *common, "--settings", "a_se", "--methods", "stratified", "--launcher", "local",
        f"hydra.sweep.dir={micro_runs / 'multirun'}",
    )  # fmt: skip
    assert rc == 0, log
    assert "-m aioli_repro.run -m experiment=table2" in log
    assert len(list(runs.glob("stratified-a_se-pipeline-*/summary.json"))) == 1
    # 2. in-process: 2 settings x 3 methods; the Hydra job's pipeline counts as done (same hash)
    rc, log = _driver(
        capsys, "table2", *common, "--settings", "a_se,a_b_se", "--methods", "stratified,grid,aioli"
    )
    assert rc == 0, log
    assert "6 pipelines, 1 done, 5 to run" in log
    assert "A/SE stratified seed 0: already done" in log
    md = (out / "table2.md").read_text()
    assert md.startswith("**Table 2 (SMOKE TEST, not a result; scale: table_smoke, data: synthetic groups")
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    for label in ("Stratified", "GS", "Aioli"):
        cells = [c.strip() for c in rows[label].split("|")[2:-1]]
        assert cells[0] != "—" and cells[3] != "—", rows[label]  # A/SE and A/B/SE have numbers
        float(cells[0].split()[0])
    assert (out / "table2.png").stat().st_size > 0 and (out / "table2.csv").exists()
    assert json.loads((out / "table2_runs.json").read_text())["scale"] == "table_smoke"
    # 3. again: nothing trains, nothing is rewritten, same table
    before = _stage_mtimes(runs)
    rc, log2 = _driver(
        capsys, "table2", *common, "--settings", "a_se,a_b_se", "--methods", "stratified,grid,aioli"
    )
    assert rc == 0 and "6 pipelines, 6 done, 0 to run" in log2, log2
    assert "training in" not in log2 and "running" not in log2
    assert _stage_mtimes(runs) == before
    assert (out / "table2.md").read_text().split("\n\n")[1] == md.split("\n\n")[1]


def test_driver_table3_end_to_end(micro_runs: Path, capsys: pytest.CaptureFixture) -> None:
    runs, out = micro_runs / "runs", micro_runs / "tables"
    common = ["--scale", "smoke", "--results-dir", str(runs), "--out-dir", str(out), *MICRO]
    rc, log = _driver(capsys, "table3", *common, "--settings", "a_se", "--methods", "grid")
    assert rc == 0, log
    base = json.loads(next(runs.glob("grid-*restricted-base-pipeline-*/summary.json")).read_text())
    plus = json.loads(next(runs.glob("grid-*restricted-aioli-pipeline-*/summary.json")).read_text())
    assert (base["variant"], base["base_method"], plus["variant"], plus["base_method"]) == (
        "base",
        "grid",
        "+aioli",
        "grid",
    )
    assert base["learned_proportions"] == plus["learned_proportions"]
    assert plus["restricted"]["prior_steps"] == 10 and plus["restricted"]["learn_steps"] == 10
    # the shortened sweep runs are 10 steps; the full-length base run is the Table 2 sweep run at that point
    if (out / "table2_runs.json").exists():
        sweep_runs = [s for s in base["stages"] if Path(s["dir"]).name.startswith("sweep-a_se-sweep")]
        assert any(s["reused"] for s in sweep_runs if s["dir"] == base["run_dir"])
    assert plus["final_proportions"] and plus["steps"] == 20
    md = (out / "table3.md").read_text()
    gs = next(line for line in md.splitlines() if line.startswith("| GS "))
    assert gs.split("|")[2].strip() != "—" and gs.split("|")[4].strip() != "—"
    rc, log2 = _driver(capsys, "table3", *common, "--settings", "a_se", "--methods", "grid")
    assert (
        rc == 0
        and "1 job (a base and a +aioli pipeline each), 1 done, 0 to run" in log2
        and "training in" not in log2
    )


def test_parallel_workers_start_a_reusing_method_after_its_prerequisite(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # 2 worker processes, DoReMi listed first: it must wait for the stratified run it reuses as its
    # reference (not train it itself, nor block a worker on the stage lock), while Aioli runs meanwhile.
    runs = tmp_path / "runs"
    rc, log = _driver(
        capsys, "table2", "--scale", "smoke", "--results-dir", str(runs), "--out-dir", str(tmp_path),
        "--settings", "a_se", "--methods", "doremi,aioli,stratified", "--n-jobs", "2", *MICRO,
    )  # fmt: skip
    assert rc == 0, log
    assert "2 pipelines at a time" in log
    order = [line.split(": running")[0].split("] ")[1] for line in log.splitlines() if ": running" in line]
    assert order.index("A/SE doremi seed 0") > order.index("A/SE stratified seed 0")
    assert order.index("A/SE aioli seed 0") < order.index("A/SE doremi seed 0")
    doremi = next(line for line in log.splitlines() if "A/SE doremi seed 0: done" in line)
    assert "(2 stages trained, 1 reused;" in doremi  # proxy + final; the reference is stratified's run
    assert len(list(runs.glob("stratified-a_se-run-*/summary.json"))) == 1


# -- notebooks ---------------------------------------------------------------------------------------
def _papermill(nb: str, out_dir: Path, results_dir: Path, source: str = "auto") -> None:
    pm = pytest.importorskip("papermill")
    pm.execute_notebook(
        str(ROOT / "notebooks" / f"{nb}.ipynb"), str(out_dir / f"{nb}.out.ipynb"),
        parameters={"results_dir": str(results_dir), "out_dir": str(out_dir), "source": source},
        kernel_name="python3", cwd=str(ROOT), progress_bar=False, log_output=False,
    )  # fmt: skip


@pytest.mark.parametrize("nb", ["table2", "trajectories", "mixing_laws"])
def test_notebooks_execute(nb: str, micro_runs: Path, tmp_path: Path) -> None:
    if not (micro_runs / "tables" / "table2_runs.json").exists():
        pytest.skip("needs the runs of test_driver_table2_end_to_end_hydra_path_and_resume")
    shutil.copy(micro_runs / "tables" / "table2_runs.json", tmp_path)
    if nb == "mixing_laws":  # a branch sweep for the dynamic law, from the A/SE stratified run
        from aioli_repro.pipeline.recipes import run_method

        cfg = sweep.compose_job(
            ["experiment=table2", "scale=table_smoke", "groups=a_se", "method=dynamic_law", "seed=0", *MICRO,
             "method.pipeline.n_children=3", "method.pipeline.branch_fraction=0.1"]
        )  # fmt: skip
        run_method(cfg, micro_runs / "runs", log=lambda s: None)
    _papermill(nb, tmp_path, micro_runs / "runs")
    expected = {"table2": "table2.png", "trajectories": "trajectories.png", "mixing_laws": "mixing_laws.png"}[
        nb
    ]
    assert (tmp_path / expected).stat().st_size > 0
    if nb == "table2":
        ours = (micro_runs / "tables" / "table2.md").read_text().split("\n\n")[1]
        assert (tmp_path / "table2.md").read_text().split("\n\n")[1] == ours
    if nb == "mixing_laws":
        import pandas as pd

        fits = pd.read_csv(tmp_path / "mixing_laws.csv")
        assert set(fits["setting"]) == {"A/SE", "A/B/SE"} and fits["R2"].notna().all()
        dyn = pd.read_csv(tmp_path / "dynamic_law.csv")
        assert list(dyn["setting"]) == ["A/SE"] and dyn["R2"].notna().all() and (dyn["MSE"] >= 0).all()
        assert -1.0 <= float(dyn["sim Aioli"].iloc[0]) <= 1.0  # the micro sweep ran Aioli on A/SE
    if nb == "trajectories":
        assert list(tmp_path.glob("aioli_A_*.png"))


def test_table2_notebook_from_wandb_logs_alone(micro_runs: Path, tmp_path: Path) -> None:
    if not (micro_runs / "tables" / "table2_runs.json").exists():
        pytest.skip("needs the runs of test_driver_table2_end_to_end_hydra_path_and_resume")
    runs = tmp_path / "runs"
    shutil.copytree(micro_runs / "runs", runs, ignore=shutil.ignore_patterns("*.ckpt"))
    for p in runs.rglob("summary.json"):
        p.unlink()
    shutil.copy(micro_runs / "tables" / "table2_runs.json", tmp_path)
    _papermill("table2", tmp_path, runs, source="wandb")
    ours = (micro_runs / "tables" / "table2.md").read_text().split("\n\n")[1]
    assert (tmp_path / "table2.md").read_text().split("\n\n")[1] == ours


def test_table3_notebook_executes(micro_runs: Path, tmp_path: Path) -> None:
    if not (micro_runs / "tables" / "table3_runs.json").exists():
        pytest.skip("needs the runs of test_driver_table3_end_to_end")
    shutil.copy(micro_runs / "tables" / "table3_runs.json", tmp_path)
    _papermill("table3", tmp_path, micro_runs / "runs")
    assert "| GS |" in (tmp_path / "table3.md").read_text() and (tmp_path / "table3.png").exists()


@pytest.mark.slow
def test_local_parallel_multirun(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """joblib launcher, 2 jobs at a time, one torch thread each."""
    runs = tmp_path / "runs"
    rc, log = _driver(
        capsys, "table2", "--scale", "smoke", "--results-dir", str(runs), "--out-dir", str(tmp_path),
        "--settings", "a_se", "--methods", "stratified,aioli,doremi",
        "--launcher", "local_parallel", "--n-jobs", "2",
        *MICRO, f"hydra.sweep.dir={tmp_path / 'multirun'}",
    )  # fmt: skip
    assert rc == 0, log
    assert "hydra/launcher=local_parallel" in log and "num_threads=1" in log
    assert len(list(runs.glob("*-pipeline-*/summary.json"))) == 3
    assert os.path.getsize(tmp_path / "table2.md") > 0
