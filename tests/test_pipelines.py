"""Method pipelines end to end on a micro budget: stages run, are shared, and are never redone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aioli_repro.pipeline.recipes import run_method

MICRO = [
    "train.max_steps=12",
    "train.val_every=6",
    "train.checkpoint_every=6",
    "train.val_max_seqs=8",
    "train.test_max_seqs=8",
    "train.warmup_steps=2",
    "num_threads=1",
    "hp.aioli.update_steps=12",
    "hp.aioli.lp_rounds=1",
    "hp.aioli.lp_steps=2",
    "hp.aioli.eval_max_seqs=4",
    "hp.skillit.update_steps=6",
    "hp.skillit.eval_every=3",
    "hp.skillit.graph_steps=6",
    "hp.grid.n_runs=3",
    "hp.doremi.proxy_steps=12",
    "hp.doge.proxy_steps=12",
]


def _run(make_cfg, results, method: str, *extra: str) -> tuple[dict, object]:
    cfg = make_cfg(f"method={method}", *MICRO, *extra)
    return run_method(cfg, results, log=lambda s: None)


def _check_final(summary: dict, groups: list[str]) -> None:
    assert summary["groups"] == groups
    assert np.isfinite(summary["test/avg_ppl"]) and summary["test/avg_ppl"] > 1
    assert summary["test/avg_ppl"] == pytest.approx(
        np.mean([np.exp(summary["test_loss"][g]) for g in groups])
    )
    assert summary["total_tokens"] == sum({s["dir"]: s["train_tokens"] for s in summary["stages"]}.values())


def test_stratified_and_doremi_share_the_reference(make_cfg, tmp_path):
    strat, path = _run(make_cfg, tmp_path, "stratified")
    assert json.loads(path.read_text())["test/avg_ppl"] == strat["test/avg_ppl"]
    assert strat["extra_runs"] == 0 and strat["total_tokens"] == 12 * 8 * 256
    doremi, _ = _run(make_cfg, tmp_path, "doremi")
    _check_final(doremi, ["arxiv", "stackexchange"])
    names = [s["name"] for s in doremi["stages"]]
    assert names == ["run", "proxy", "final"]
    ref = doremi["stages"][0]
    assert ref["reused"] and ref["dir"] == strat["run_dir"]  # the reference IS the stratified baseline
    assert doremi["extra_runs"] == 2
    p = np.array(list(doremi["learned_proportions"].values()))
    assert p.sum() == pytest.approx(1.0) and np.all(p > 0)
    assert doremi["final_proportions"] == pytest.approx(doremi["learned_proportions"])
    # a re-run recomputes nothing
    again, _ = _run(make_cfg, tmp_path, "doremi")
    assert all(s["reused"] for s in again["stages"])
    assert again["test/avg_ppl"] == doremi["test/avg_ppl"]


def test_aioli_pipeline_single_online_run(make_cfg, tmp_path):
    s, _ = _run(make_cfg, tmp_path, "aioli")
    _check_final(s, ["arxiv", "stackexchange"])
    assert s["extra_runs"] == 0
    # LearnParams probes first (smoothed one-hot mixtures), then the learned mixture
    traj = s["trajectory"]
    probes = [tuple(r["p"].values()) for r in traj if r["probe"]]
    assert probes == [(0.625, 0.375), (0.375, 0.625)] or probes == [(0.375, 0.625), (0.625, 0.375)]
    assert not traj[-1]["probe"] and len(traj) >= 3
    # one round, m = 2: L^0 and one evaluation after each probe interval, timed inside the fit
    assert s["method_evals"] == 3 and 0 < s["method_eval_s"] < s["fit_s"]


def test_grid_and_dml_share_one_sweep(make_cfg, tmp_path):
    grid, _ = _run(make_cfg, tmp_path, "grid")
    _check_final(grid, ["arxiv", "stackexchange"])
    assert grid["extra_runs"] == 3  # the paper counts every sweep run
    dml, _ = _run(make_cfg, tmp_path, "dml")
    _check_final(dml, ["arxiv", "stackexchange"])
    sweep_dirs = {s["dir"] for s in grid["stages"]}
    assert sweep_dirs <= {s["dir"] for s in dml["stages"]}
    assert all(s["reused"] for s in dml["stages"] if s["dir"] in sweep_dirs)
    assert dml["extra_runs"] == 3 and np.isfinite(dml["law_fit"]["r2"])
    # grid's winner has the lowest average validation perplexity among the sweep runs
    sweeps = [json.loads((Path(d) / "summary.json").read_text()) for d in sweep_dirs]
    best = min(sweeps, key=lambda s: s["val/avg_ppl"])
    assert grid["run_dir"] == best["run_dir"]


@pytest.mark.parametrize("method", ["skillit", "doge", "aioli_static", "aioli_diagonal"])
def test_other_pipelines_end_to_end(make_cfg, tmp_path, method):
    s, _ = _run(make_cfg, tmp_path, method, "groups=a_b_se")
    _check_final(s, ["arxiv", "book", "stackexchange"])
    if method == "skillit":
        assert s["extra_runs"] == 3 and np.asarray(s["skills_graph"]).shape == (3, 3)
    if method == "doge":
        assert s["extra_runs"] == 1 and sum(s["learned_proportions"].values()) == pytest.approx(1.0)


def test_dynamic_law_branch_sweep_starts_from_the_stratified_run(make_cfg, tmp_path):
    strat, _ = _run(make_cfg, tmp_path, "stratified")
    s, _ = _run(
        make_cfg,
        tmp_path,
        "dynamic_law",
        "method.pipeline.n_children=4",
        "method.pipeline.branch_fraction=0.25",
    )
    law = s["dynamic_law"]
    groups = ["arxiv", "stackexchange"]
    assert s["stages"][0]["reused"] and s["stages"][0]["dir"] == strat["run_dir"]  # the parent is shared
    assert [st["name"] for st in s["stages"][1:]] == [f"branch{k}" for k in range(4)]
    assert law["branch_steps"] == 3 and np.asarray(law["P"]).shape == (4, 2)
    # every child starts from the parent's final weights: its step-0 val loss is the parent's final val
    np.testing.assert_allclose(law["L_before"], [[strat["val_loss"][g] for g in groups]] * 4, rtol=1e-6)
    A = np.asarray(law["A"])
    assert A.shape == (2, 2) and np.all(np.isfinite(A)) and np.isfinite(law["r2"]) and law["mse"] >= 0
    # the fit reproduces the children's losses as L_after = L_before - P A^T up to its residual
    pred = np.asarray(law["L_before"]) - np.asarray(law["P"]) @ A.T
    assert np.mean((np.asarray(law["L_after"]) - pred) ** 2) == pytest.approx(law["mse"])
    # children moved: a branch run trained on a different mixture reaches different losses
    assert np.ptp(np.asarray(law["L_after"])[:, 0]) > 0


def test_branch_run_without_its_parent_checkpoint_is_a_clear_error(tmp_path):
    from aioli_repro.config import ConfigError
    from aioli_repro.training.preflight import check_init_checkpoint

    assert check_init_checkpoint({}) is None
    with pytest.raises(ConfigError, match="init_checkpoint: missing prerequisite stage"):
        check_init_checkpoint({"init_checkpoint": str(tmp_path / "parent" / "final.ckpt")})
