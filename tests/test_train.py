"""End-to-end tiny runs through Lightning: metrics bookkeeping, no-lag proportion changes, CLI errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from aioli_repro.mixing.base import MixingMethod, StepStats
from aioli_repro.training.run import run_training

ROOT = Path(__file__).resolve().parents[1]


def test_stratified_run_end_to_end(make_cfg, tmp_path):
    cfg = make_cfg(
        "train.max_steps=60", "train.val_every=20", "train.checkpoint_every=30", "train.log_every=10"
    )
    s = run_training(cfg, tmp_path)
    groups = ["arxiv", "stackexchange"]
    assert s["groups"] == groups and s["steps"] == 60
    assert s["train_tokens"] == 60 * 8 * 256
    # learning happened: an untrained byte model is at ln(320) ~ 5.77 nats
    for g in groups:
        assert s["test_loss"][g] < 4.5, s["test_loss"]
        floor = s["loss_floor"][g]
        assert floor is not None and 0 < floor < s["test_loss"][g]
        assert math.isclose(s["test_ppl"][g], math.exp(s["test_loss"][g]), rel_tol=1e-9)
    assert math.isclose(
        s["test/avg_ppl"], np.mean([math.exp(s["test_loss"][g]) for g in groups]), rel_tol=1e-9
    )
    assert math.isclose(
        s["test/ppl_of_mean_loss"], math.exp(np.mean([s["test_loss"][g] for g in groups])), rel_tol=1e-9
    )
    assert s["trajectory"] == [{"step": 0, "p": {"arxiv": 0.5, "stackexchange": 0.5}, "probe": False}]
    assert s["setting"] == "A/SE" and s["setting_key"] == "a_se"
    assert s["processes"] == 1 and 0 < s["fit_s"] < s["wall_s"] and s["steps_per_s"] == 60 / s["fit_s"]
    assert sum(s["delivered_sequences"].values()) == 60 * 8
    assert [h[0] for h in s["val_history"]] == [0, 20, 40]
    # val improves over the run
    assert np.mean(s["val_history"][-1][1]) < np.mean(s["val_history"][0][1]) - 0.5
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test/avg_ppl"] == s["test/avg_ppl"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss/arxiv" in r]
    assert len(train_rows) >= 5 and all(np.isfinite(r["train/loss/arxiv"]) for r in train_rows)
    assert any("test/avg_ppl" in r for r in rows)
    assert any("mix/p/arxiv" in r for r in rows)
    assert (tmp_path / "checkpoints" / "final.ckpt").exists()


class _SwitchAt(MixingMethod):
    """Uniform until step 5, then all group 1: records each step's realised group counts."""

    name = "switch"

    def __init__(self) -> None:
        self.counts: dict[int, list[float]] = {}

    def on_step_end(self, step: int, stats: StepStats) -> None:
        self.counts[step] = stats.count.tolist()
        if step == 5:
            self._p = np.array([0.0, 1.0])


def test_proportion_change_applies_to_the_very_next_step(make_cfg, tmp_path):
    cfg = make_cfg("train.max_steps=9", "train.val_every=0", "train.checkpoint_every=0")
    method = _SwitchAt()
    run_training(cfg, tmp_path, method=method)
    assert sorted(method.counts) == list(range(1, 10))
    assert any(method.counts[s][0] > 0 for s in range(1, 6))  # uniform phase draws both groups
    for s in range(6, 10):
        assert method.counts[s] == [0.0, 8.0], (s, method.counts[s])


def test_wandb_offline_run_writes_local_files(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = make_cfg("train.max_steps=5", "train.val_every=0", "train.checkpoint_every=0", wandb=True)
    run_training(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.suffix in (".yaml", ".json", ".jsonl", ".wandb", ".log"):
            assert b"x" * 40 not in f.read_bytes(), f


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aioli_repro.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_user_errors_are_one_line_no_traceback(tmp_path, cache_dir):
    common = [
        "scale=tiny",
        "logger=none",
        "progress=false",
        f"cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path}/r",
    ]
    for args, needle in [
        (["groups.names=[arxiv,bogus]"], "unknown group 'bogus'"),
        (["method=static", "method.mixer.proportions=[0.5,0.6]"], "method.mixer.proportions"),
        (["train.context_length=4096"], "train.context_length"),
    ]:
        r = _cli(*common, *args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert needle in r.stderr, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
