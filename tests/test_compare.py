"""`python -m aioli_repro.compare`: every method and setting present, cells equal to the runs' numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aioli_repro import compare
from aioli_repro.results.stats import paired
from aioli_repro.results.tables import by_seed


def _summary(setting: str, groups: list[str], method: str, seed: int, ppl: list[float], data: str) -> dict:
    steps = 100
    traj = [{"step": 0, "p": dict(zip(groups, [1 / len(groups)] * len(groups))), "probe": False}]
    traj += [
        {"step": 10 + i, "p": {g: float(g == h) for g in groups}, "probe": True} for i, h in enumerate(groups)
    ]
    w = np.linspace(0.2, 0.8, len(groups))
    traj += [{"step": 50, "p": dict(zip(groups, (w / w.sum()).tolist())), "probe": False}]
    return {
        "setting": setting, "groups": groups, "method": method, "seed": seed, "data": data, "scale": "custom",
        "steps": steps, "test/avg_ppl": float(np.mean(ppl)), "val/avg_ppl": float(np.mean(ppl)) + 0.1,
        "test/ppl_of_mean_loss": float(np.exp(np.mean(np.log(ppl)))),
        "test_ppl": dict(zip(groups, ppl)), "test_loss": dict(zip(groups, np.log(ppl).tolist())),
        "val_loss": dict(zip(groups, np.log(ppl).tolist())), "final_proportions": traj[-1]["p"],
        "learned_proportions": None, "total_tokens": 1000, "train_tokens": 1000, "extra_runs": 0,
        "stages": [{"name": "run"}], "trajectory": traj,
    }  # fmt: skip


def _write(root: Path, s: dict) -> None:
    d = root / f"{s['method']}-pipeline-{s['setting'].replace('/', '_')}{s['seed']}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(s))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "runs"
    for setting, groups in (
        ("code/docs/prose", ["code", "docs", "prose"]),
        ("A/SE", ["arxiv", "stackexchange"]),
    ):
        for method, shift in (("stratified", 0.0), ("aioli", -0.5), ("static", 0.3), ("aioli_diagonal", 0.0)):
            for seed in range(3):
                ppl = (10 + shift + rng.normal(0, 0.05, len(groups)) + np.arange(len(groups))).tolist()
                _write(root, _summary(setting, groups, method, seed, ppl, "local"))
    return root


def test_compare_writes_every_method_and_setting(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    paths = compare.compare(results, out)
    md = paths["md"].read_text()
    for label in ("code/docs/prose", "A/SE", "Stratified", "Aioli", "static", "aioli_diagonal", "prose"):
        assert label in md
    nums = pd.read_csv(paths["csv"])
    assert set(nums["setting"]) == {"code/docs/prose", "A/SE"}
    assert set(nums["method"]) == {"stratified", "aioli", "static", "aioli_diagonal"}
    # the CSV's numbers are the runs' numbers, and the Δ is the paired Table 2 logic
    with open(next(results.glob("aioli-pipeline-code_docs_prose1/summary.json"))) as f:
        one = json.load(f)
    runs = [json.loads(p.read_text()) for p in results.glob("*/summary.json")]
    keys = ("setting", "method", "seed")
    frame = pd.DataFrame(
        [
            {**{k: r[k] for k in keys}, "test_avg_ppl": r["test/avg_ppl"], "docs": r["test_ppl"].get("docs")}
            for r in runs
        ]
    )
    mine = frame[(frame["setting"] == one["setting"]) & (frame["method"] == "aioli")]
    ref = frame[(frame["setting"] == one["setting"]) & (frame["method"] == "stratified")]
    row = nums[(nums["setting"] == "code/docs/prose") & (nums["method"] == "aioli")].iloc[0]
    assert row["test_avg_ppl"] == pytest.approx(mine["test_avg_ppl"].mean())
    assert row["test_ppl/docs"] == pytest.approx(mine["docs"].mean())
    expect = paired(by_seed(mine), by_seed(ref))
    assert (row["delta"], row["lo"], row["hi"], row["verdict"]) == pytest.approx(
        (expect.mean, expect.lo, expect.hi, expect.verdict)
    )
    assert row["verdict"] == "better" and row["delta"] == pytest.approx(-0.5, abs=0.1)
    # one trajectory plot per run, filed under the setting's name, and the differences plot
    assert len(paths["plots"]) == 24
    assert (out / "trajectories" / "code_docs_prose" / "aioli-s2.png").exists()
    assert paths["png"].exists()


def test_trained_mixture_is_drawn_apart_from_probes() -> None:
    from aioli_repro.results.trajectory_plot import step_curve
    from aioli_repro.training.callbacks import trajectory_records

    s = _summary("A/SE", ["arxiv", "stackexchange"], "aioli", 0, [10.0, 11.0], "local")
    steps, p = step_curve(trajectory_records(s), s["groups"], s["steps"])
    assert steps.tolist() == [0, 50, 100]  # the probe steps (10, 11) are not part of the trained curve
    assert p[0].tolist() == [0.5, 0.5] and p[1].sum() == pytest.approx(1.0)
    old = {**s, "trajectory": [[0, [0.5, 0.5]], [5, [0.4, 0.6]]]}  # summaries written before names
    assert trajectory_records(old)[1] == {
        "step": 5,
        "p": {"arxiv": 0.4, "stackexchange": 0.6},
        "probe": False,
    }


def test_compare_cli_errors_on_empty_dir(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit, match="no finished pipelines"):
        compare.main([str(tmp_path)])


def test_several_runs_of_one_method_and_seed_keep_the_newest(tmp_path: Path, capsys) -> None:
    # e.g. a search's static runs at several mixtures: the newest per (setting, method, seed) is compared,
    # and the report says how many were left out, instead of stopping on a traceback
    import os

    root = tmp_path / "runs"
    groups = ["arxiv", "stackexchange"]
    for seed in range(2):
        _write(root, _summary("A/SE", groups, "stratified", seed, [10.0, 11.0], "local"))
    for i, ppl in enumerate(([12.0, 13.0], [9.0, 10.0])):
        s = _summary("A/SE", groups, "static", 0, ppl, "local")
        d = root / f"static-pipeline-{i}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(s))
        os.utime(d / "summary.json", (1e9 + i, 1e9 + i))  # the second one is the newer
    paths = compare.compare(root, tmp_path / "cmp", plots=False)
    csv = pd.read_csv(paths["csv"])
    row = csv[(csv["method"] == "static")].iloc[0]
    assert row["seeds"] == 1 and row["test_avg_ppl"] == pytest.approx(9.5)
    note = "1 older runs of a setting, method and seed already listed were left out"
    assert note in paths["md"].read_text()
    assert "1 older runs" in capsys.readouterr().out
