"""`python -m aioli_repro.sensitivity` end to end at the smoke scale (slow): the references, one search
iteration, the oracle pairs and four arms train; every table is written from them, the oracle's two runs
of a pair train identically, and a --no-run rebuild gives the same files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from aioli_repro.pipeline.refine import GRID_BEST
from aioli_repro.sensitivity import main

pytestmark = pytest.mark.slow

ARMS = "stratified,aioli,aioli_eta30x,aioli_null"


def test_the_study_runs_and_rebuilds(tmp_path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = [
        "--scale", "smoke", "--results-dir", str(runs), "--out-dir", str(out), "--search-settings", "a_b_se",
        "--search-seeds", "2", "--arm-methods", ARMS, "--max-search-iters", "1", "hp.aioli.lp_steps=1",
    ]  # fmt: skip
    assert main([*args, "--search-only"]) == 0  # the first half: the references and the search
    assert sorted(f.name for f in out.iterdir()) == [
        "refined_headroom.csv", "refined_headroom.md", "refined_headroom_trace.csv"
    ]  # fmt: skip
    first_trace = (out / "refined_headroom_trace.csv").read_bytes()
    assert main(args) == 0  # the second half reuses the search and adds the oracle and the arms
    assert (out / "refined_headroom_trace.csv").read_bytes() == first_trace
    refined = pd.read_csv(out / "refined_headroom.csv")
    grid_p = refined[(refined["arm"] == "Best static (grid)") & refined["statistic"].str.startswith("p/")]
    assert np.allclose(grid_p["value"].to_numpy(), GRID_BEST["a_b_se"], atol=1e-6)
    assert (refined["statistic"] == "test_avg_ppl").sum() == 4  # grid and refined, 2 seeds each
    trace = pd.read_csv(out / "refined_headroom_trace.csv")
    assert list(trace["role"]) == ["start"] + ["candidate"] * 6  # the start, then the 2m moves of 1/7
    blocks = pd.read_csv(out / "oracle_blocks.csv")
    # t0 = 16 only (64 + 96 probe steps do not fit in 128), 2 settings x 2 seeds x 8 blocks of 4 sweeps
    assert len(blocks) == 32 and set(blocks["t0"]) == {16}
    assert blocks["train_equal"].all()  # the full and the capped run trained the same batches and losses
    assert blocks["r"].between(-1, 1).all() and blocks["sign_agree"].between(0, 1).all()
    arms = pd.read_csv(out / "sensitivity.csv")
    assert set(arms["arm"]) == set(ARMS.split(","))
    null_l1 = arms[(arms["arm"] == "aioli_null") & (arms["statistic"] == "l1_final_p_uniform")]["value"]
    assert len(null_l1) == 2 and np.allclose(null_l1, 0.0, atol=1e-9)  # eta = 0 never leaves uniform
    assert "| A/B/SE |" in (out / "sensitivity_verdict.md").read_text()
    before = {f: (out / f).read_bytes() for f in ("refined_headroom.csv", "sensitivity.csv", "oracle.csv")}
    assert main([*args, "--no-run", "--out-dir", str(tmp_path / "again")]) == 0
    assert {f: (tmp_path / "again" / f).read_bytes() for f in before} == before
