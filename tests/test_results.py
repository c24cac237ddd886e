"""Results layer: pipeline W&B runs (offline), both offline readers, load_runs sources, paper tables."""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aioli_repro.results import load as results
from aioli_repro.results import tables, wandb_offline
from aioli_repro.training import pipeline_run_log

SETTINGS = {"A/SE": ["arxiv", "stackexchange"], "A/B/SE": ["arxiv", "book", "stackexchange"]}
METHODS = {"stratified": 0, "grid": 10, "aioli": 0}  # method -> extra runs
SEEDS = (0, 1)
# test avg ppl offsets vs stratified: grid wins on A/SE only, aioli wins on both
OFFSET = {("grid", "A/SE"): (-0.30, -0.10), ("grid", "A/B/SE"): (0.20, 0.40),
          ("aioli", "A/SE"): (-0.25, -0.35), ("aioli", "A/B/SE"): (-0.50, -0.10)}  # fmt: skip


def fake_summary(setting: str, method: str, seed: int, traj_len: int = 6) -> dict:
    """A pipeline summary in the exact schema of recipes.run_method (on top of train.run_training's)."""
    groups = SETTINGS[setting]
    m = len(groups)
    rng = np.random.default_rng(zlib.crc32(f"{setting}{method}{seed}".encode()))
    base = 2.6 + 0.3 * np.arange(m) + 0.01 * seed
    off = 0.0 if method == "stratified" else OFFSET[(method, setting)][seed]
    # shift every group's ppl by `off` so the avg ppl moves by exactly `off`
    test_ppl = np.exp(base) + off
    test_loss = np.log(test_ppl)
    val_loss = test_loss + rng.normal(0, 0.01, m)
    p = rng.dirichlet(np.ones(m)) if method != "stratified" else np.full(m, 1 / m)
    steps = np.linspace(0, 600, traj_len).astype(int)
    traj = [
        [int(s), (np.full(m, 1 / m) * (1 - i / traj_len) + p * i / traj_len).tolist()]
        for i, s in enumerate(steps)
    ]
    traj.append([600, p.tolist()])  # same step twice: the logger keeps the last
    tokens = 600 * 8 * 256
    run_dir = f"/results/{method}-run-{seed}{setting}"
    stages = [{"name": "run", "dir": run_dir, "train_tokens": tokens, "reused": False}]
    stages += [
        {"name": f"sweep{i}", "dir": f"{run_dir}-{i}", "train_tokens": tokens, "reused": False}
        for i in range(METHODS[method])
    ]
    named = dict(zip(groups, map(float, p)))
    return {
        "setting": setting, "groups": groups, "method": method, "seed": seed, "data": "synthetic",
        "scale": "tiny", "steps": 600, "train_tokens": tokens,
        "val_loss": dict(zip(groups, map(float, val_loss))),
        "test_loss": dict(zip(groups, map(float, test_loss))),
        "val_ppl": dict(zip(groups, map(float, np.exp(val_loss)))),
        "test_ppl": dict(zip(groups, map(float, test_ppl))),
        "val/avg_ppl": float(np.exp(val_loss).mean()), "test/avg_ppl": float(test_ppl.mean()),
        "test/ppl_of_mean_loss": float(np.exp(test_loss.mean())),
        "loss_floor": {g: None for g in groups}, "final_proportions": named,
        "learned_proportions": None if method == "stratified" else named,
        "trajectory": traj, "val_history": [[0, val_loss.tolist()]],
        "delivered_sequences": {g: 100 for g in groups}, "resumed_from": None, "wall_s": 12.0, "fit_s": 10.0,
        "steps_per_s": 60.0, "run_dir": run_dir,
        "stages": stages, "total_tokens": tokens * len(stages), "extra_runs": len(stages) - 1,
        "final_run_dir": run_dir,
    }  # fmt: skip


def write_pipeline(root: Path, summary: dict) -> Path:
    key = f"{summary['setting'].replace('/', '_')}{summary['seed']}"
    d = root / f"{summary['method']}-pipeline-{key}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("results")
    summaries, run_dirs, times = [], [], []
    for setting in SETTINGS:
        for method in METHODS:
            for seed in SEEDS:
                s = fake_summary(setting, method, seed)
                d = write_pipeline(root, s)
                t0 = time.perf_counter()
                run_dirs.append(pipeline_run_log.log_pipeline_run(s, d))
                times.append(time.perf_counter() - t0)
                summaries.append(s)
    # a per-stage directory with its own summary.json and a non-pipeline W&B run: both must be ignored
    stage = root / "stratified-run-abc"
    stage.mkdir()
    (stage / "summary.json").write_text(json.dumps(summaries[0]))
    import wandb

    run = wandb.init(mode="offline", dir=str(stage), project="t", config={"lr": 1e-3}, reinit="create_new",
                     settings=pipeline_run_log._settings(wandb))  # fmt: skip
    run.log({"train/loss": 3.0}, step=1)
    run.finish()
    print(f"\nlog_pipeline_run: first {times[0]:.2f} s, then mean {np.mean(times[1:]):.3f} s")
    return {"root": root, "summaries": summaries, "run_dirs": run_dirs, "times": times}


def _shared(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["path"])


# -- logging and loading ------------------------------------------------------------------------------
def test_log_pipeline_run_layout(logged: dict, tmp_path: Path) -> None:
    for d in logged["run_dirs"]:
        assert d is not None and d.parent.name == "wandb" and d.name.startswith("offline-run-")
        assert len(list(d.glob("run-*.wandb"))) == 1
    assert max(logged["times"]) < 60  # never hangs (W&B's init timeout is 30 s); speed: make bench
    assert pipeline_run_log.log_pipeline_run(logged["summaries"][0], tmp_path, mode="disabled") is None
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(ValueError, match="mode"):
        pipeline_run_log.log_pipeline_run(logged["summaries"][0], tmp_path, mode="cloud")


def test_logged_run_content(logged: dict) -> None:
    s, d = logged["summaries"][2], logged["run_dirs"][2]  # grid, A/SE, seed 0
    run = wandb_offline.read_run(d, reader="parser")
    assert run["meta"]["job_type"] == "pipeline" and run["meta"]["name"] == "grid-A/SE-s0"
    assert run["config"] == {
        "kind": "pipeline", "method": "grid", "setting": "A/SE", "groups": s["groups"], "seed": 0,
        "scale": "tiny", "data": "synthetic", "stages": ["run"] + [f"sweep{i}" for i in range(10)],
        "extra_runs": 10, "pipeline_dir": str(d.parent.parent),
    }  # fmt: skip
    summ = run["summary"]
    assert summ["test/avg_ppl"] == s["test/avg_ppl"] and summ["total_tokens"] == s["total_tokens"]
    for g in s["groups"]:
        assert summ[f"test/loss/{g}"] == s["test_loss"][g] and summ[f"val/loss/{g}"] == s["val_loss"][g]
        assert summ[f"test/ppl/{g}"] == s["test_ppl"][g]
        assert (
            summ[f"p/{g}"] == s["final_proportions"][g]
            and summ[f"learned/{g}"] == s["learned_proportions"][g]
        )
    steps = [row["_step"] for row in run["history"]]
    assert steps == sorted({t[0] for t in s["trajectory"]})  # unique, increasing; duplicate step -> last
    assert run["history"][-1] == {"_step": 600, **{f"p/{g}": v for g, v in s["final_proportions"].items()}}


def test_summary_and_wandb_sources_agree(logged: dict) -> None:
    a = results.load_runs(logged["root"], source="summary")
    b = results.load_runs(logged["root"], source="wandb")
    n = len(SETTINGS) * len(METHODS) * len(SEEDS)
    assert len(a) == len(b) == n
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(_shared(a), _shared(b), check_exact=False, rtol=0, atol=1e-9)
    assert all(p.endswith("summary.json") for p in a["path"]) and all(p.endswith(".wandb") for p in b["path"])
    # per-group columns: NaN for groups the setting does not have
    row = a[(a["setting"] == "A/SE") & (a["method"] == "aioli") & (a["seed"] == 1)].iloc[0]
    s = next(x for x in logged["summaries"] if (x["setting"], x["method"], x["seed"]) == ("A/SE", "aioli", 1))
    assert math.isnan(row["test_loss/book"]) and row["test_loss/arxiv"] == s["test_loss"]["arxiv"]
    assert row["groups"] == ("arxiv", "stackexchange") and row["proportions"] == s["final_proportions"]
    assert row["total_tokens"] == s["total_tokens"] and row["extra_runs"] == 0 and row["stage"] == "final"
    assert results.load_runs(logged["root"]).equals(a)  # auto prefers summary files


def test_auto_without_summaries_reads_wandb(logged: dict, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(logged["root"], root, symlinks=True)
    for f in root.rglob("summary.json"):
        f.unlink()
    a = results.load_runs(logged["root"], source="summary")
    b = results.load_runs(root, source="auto")
    pd.testing.assert_frame_equal(_shared(a), _shared(b), check_exact=False, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="source"):
        results.load_runs(root, source="sql")


def test_online_falls_back_to_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_run_log, "wandb_online_problem", lambda timeout=5.0: "offline in this test")
    d = pipeline_run_log.log_pipeline_run(fake_summary("A/SE", "grid", 1), tmp_path, mode="online")
    assert d is not None and d.name.startswith("offline-run-")


def test_pipeline_logged_twice_is_one_row(tmp_path: Path) -> None:
    s = fake_summary("A/SE", "aioli", 0)
    d = write_pipeline(tmp_path, s)
    pipeline_run_log.log_pipeline_run(s, d)
    pipeline_run_log.log_pipeline_run(s, d)
    assert len(list((d / "wandb").glob("offline-run-*"))) == 2
    assert len(results.load_runs(tmp_path, source="wandb")) == 1


# -- offline readers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """A run whose .wandb file spans several 32 KiB blocks (records split FIRST/MIDDLE/LAST)."""
    s = fake_summary("A/B/SE", "aioli", 0, traj_len=400)
    d = write_pipeline(tmp_path_factory.mktemp("long"), s)
    return s, pipeline_run_log.log_pipeline_run(s, d)


def test_parser_reads_multi_block_file(long_run: tuple[dict, Path]) -> None:
    s, d = long_run
    f = wandb_offline.find_run_file(d)
    assert f.stat().st_size > 2 * wandb_offline.BLOCK
    run = wandb_offline.read_run_parser(f)
    assert len(run["history"]) == len({t[0] for t in s["trajectory"]})
    assert run["summary"]["test/avg_ppl"] == s["test/avg_ppl"]
    assert wandb_offline.read_config(f)["kind"] == "pipeline"
    assert wandb_offline.find_run_file(d.parent) == f  # a wandb/ directory -> its newest run


def test_leet_and_parser_agree(long_run: tuple[dict, Path]) -> None:
    _, d = long_run
    parsed = wandb_offline.read_run(d, reader="parser")
    if not wandb_offline.leet_available():
        pytest.skip("this wandb has no `leet inspect` CLI")
    t0 = time.perf_counter()
    leet = wandb_offline.read_run(d, reader="leet")
    print(f"\nleet read: {time.perf_counter() - t0:.2f} s")
    for key in ("config", "summary", "history"):
        assert leet[key] == parsed[key], key
    for key in ("run_id", "name", "project", "job_type", "state"):
        assert leet["meta"][key] == parsed["meta"][key], key


def test_auto_reader_falls_back_to_parser(
    long_run: tuple[dict, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, d = long_run

    def missing(*args: str, timeout: float) -> str:
        raise FileNotFoundError("no leet here")

    monkeypatch.setattr(wandb_offline, "_leet", missing)
    assert wandb_offline.read_run(d) == wandb_offline.read_run(d, reader="parser")
    with pytest.raises(FileNotFoundError):
        wandb_offline.read_run(d, reader="leet")


def test_parser_rejects_corrupt_files(long_run: tuple[dict, Path], tmp_path: Path) -> None:
    data = bytearray(wandb_offline.find_run_file(long_run[1]).read_bytes())
    bad_header = tmp_path / "run-h.wandb"
    bad_header.write_bytes(b"XXXX" + bytes(data[4:]))
    with pytest.raises(wandb_offline.WandbFormatError, match="header"):
        wandb_offline.read_run_parser(bad_header)
    data[200] ^= 0xFF  # inside an early record's payload
    bad_crc = tmp_path / "run-c.wandb"
    bad_crc.write_bytes(bytes(data))
    with pytest.raises(wandb_offline.WandbFormatError, match="crc"):
        wandb_offline.read_run_parser(bad_crc)


# -- tables --------------------------------------------------------------------------------------------
def _ci(diff: np.ndarray) -> tuple[float, float]:
    from scipy.stats import t

    half = t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
    return diff.mean() - half, diff.mean() + half


def test_build_table2_numbers(logged: dict) -> None:
    df = results.load_runs(logged["root"], source="summary")
    table, md = tables.build_table2(df, "tiny", "synthetic groups — not SlimPajama")
    ppl = {(s["setting"], s["method"], s["seed"]): s["test/avg_ppl"] for s in logged["summaries"]}
    cells = {(c["row"], c["setting"]): c for c in table.attrs["cells"]}
    for setting in SETTINGS:
        strat = np.array([ppl[(setting, "stratified", k)] for k in SEEDS])
        c = cells[("Stratified", setting)]
        assert c["kind"] == "abs" and c["n"] == 2
        assert c["mean"] == pytest.approx(strat.mean(), abs=1e-12)
        assert c["std"] == pytest.approx(strat.std(ddof=1), abs=1e-12)
        assert table.loc["Stratified", setting] == f"{strat.mean():.3f} ± {strat.std(ddof=1):.3f}"
        for method, label in (("grid", "GS"), ("aioli", "Aioli")):
            diff = np.array([ppl[(setting, method, k)] for k in SEEDS]) - strat
            c = cells[(label, setting)]
            lo, hi = _ci(diff)
            assert c["mean"] == pytest.approx(diff.mean(), abs=1e-12)
            assert (c["lo"], c["hi"]) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
            assert c["mean"] == pytest.approx(np.mean(OFFSET[(method, setting)]), abs=1e-9)
            # two seeds: t(1) = 12.7, so every interval here contains 0 and every cell is a tie
            assert c["verdict"] == "tie" and lo < 0 < hi
            assert table.loc[label, setting] == f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
    # by the sign of the mean GS would "beat" stratified once and Aioli twice: ties are ties
    assert (
        table.loc["GS", tables.BEATING] == "0 (0/2/0)" and table.loc["Aioli", tables.BEATING] == "0 (0/2/0)"
    )
    assert table.loc["GS", tables.SEEDS] == "2" and table.loc["GS", tables.EXTRA] == "10"
    assert table.loc["Aioli", tables.EXTRA] == "0"
    assert table.loc["GS", tables.TOKENS] == "13.5M" and table.loc["Aioli", tables.TOKENS] == "1.2M"
    assert (table.loc["DML"] == tables.MISSING).all() and table.loc["Aioli", "SlimPajama"] == tables.MISSING
    assert list(table.index) == ["Stratified", "GS", "DML", "Skill-It", "DoReMi", "DoGE", "Aioli",
                                 "Aioli (Alg. 1)", "Aioli null (η = 0)"]  # fmt: skip
    assert md.startswith("**Table 2 (scale: tiny, data: synthetic groups — not SlimPajama; 2 seeds)**")
    for label in tables.SETTINGS:
        assert f"| {label} |" in md.splitlines()[2]
    with pytest.raises(ValueError, match="scale"):
        tables.build_table2(df, "paper", "x")


def test_table2_single_seed_has_no_interval_and_side_by_side(logged: dict, tmp_path: Path) -> None:
    df = results.load_runs(logged["root"], source="summary")
    one = df[(df["seed"] == 0) | (df["method"] != "stratified")]  # stratified has seed 0 only
    table, md = tables.build_table2(one, "tiny", "synthetic", smoke=True)
    # Aioli has seeds 0 and 1 but only seed 0 is shared with stratified: paired on it, no interval
    assert table.loc["Aioli", "A/SE"] == "-0.250" and table.loc["Aioli", tables.SEEDS] == "1"
    assert table.loc["Aioli", tables.BEATING] == "0 (0/2/0)"
    assert md.startswith("**Table 2 (SMOKE TEST, not a result") and "1 seed" in md.splitlines()[0]
    side, side_md = tables.paper_side_by_side(table)
    assert side.loc["Aioli", "CC/GH/W paper"] == "-0.196" and side.loc["Stratified", "A/SE paper"] == "16.532"
    assert side.loc["GS", "A/SE ours"] == table.loc["GS", "A/SE"]
    assert "not comparable" in side_md
    csv, mdp = tables.write_table(table, md, tmp_path, "table2")
    back = pd.read_csv(csv, index_col=0)
    assert list(back.columns) == list(table.columns) and mdp.read_text() == md
    png = tables.plot_table(table, tmp_path / "table2.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper_table2_constants() -> None:
    paper = tables.paper_table2()
    assert list(paper.columns[:6]) == ["A/SE", "GH/C4", "B/SE", "A/B/SE", "CC/GH/W", "SlimPajama"]
    # the abstract's figures: Aioli's mean gain 0.274, DoReMi up to 6.9 worse
    assert float(paper.loc["Aioli", list(tables.SETTINGS)].mean()) == pytest.approx(-0.2743, abs=1e-4)
    assert float(paper.loc["DoReMi", list(tables.SETTINGS)].max()) == 6.898
    for label, n in tables.PAPER_BEATING.items():
        assert int((paper.loc[label, list(tables.SETTINGS)] < 0).sum()) == n
    assert tables.PAPER_EXTRA_RUNS["Skill-It"] == "m" and tables.PAPER_EXTRA_RUNS["DoReMi"] == "2"


def test_build_table3() -> None:
    rows = []
    for base in ("grid", "doremi"):
        for variant, ppl in (("base", 20.0), ("+aioli", 19.5 if base == "grid" else 20.3)):
            for seed in SEEDS:
                rows.append({"setting": "A/SE", "method": "restricted", "seed": seed, "scale": "tiny",
                             "data": "synthetic", "variant": variant, "base_method": base,
                             "test_avg_ppl": ppl + 0.1 * seed})  # fmt: skip
    df = pd.DataFrame(rows)
    table, md = tables.build_table3(df, "tiny", "synthetic")
    # every seed moves by the same amount: the intervals have zero width and exclude 0
    assert table.loc["GS", "A/SE Δ"] == "-0.500 [-0.500, -0.500] better"
    assert table.loc["DoReMi", "A/SE Δ"] == "+0.300 [+0.300, +0.300] worse"
    assert table.loc["GS", "A/SE base"] == "20.050 ± 0.071"
    col = "# settings improved (W/T/L)"
    assert table.loc["GS", col] == "1 (1/0/0)" and table.loc["DoReMi", col] == "0 (0/0/1)"
    assert table.loc["DML", "A/SE Δ"] == tables.MISSING
    assert "improves 1 of 2 comparisons" in md and md.startswith("**Table 3 (restricted setting; scale: tiny")
