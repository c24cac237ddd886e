"""What the commands print and leave on disk: help, the mixture on the console, stage folder names, and no
debris (folders, "training in" lines) when a run fails on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config

from aioli_repro.pipeline.recipes import derive, run_method, static_mixer
from aioli_repro.pipeline.stage import Stage, stage_hash
from aioli_repro.training.callbacks import MixAnnouncer
from aioli_repro.training.preflight import USER_ERRORS

ROOT = Path(__file__).resolve().parents[1]
BASE = ["scale=tiny", "logger=none", "progress=false", "num_threads=1", "train.max_steps=4"]


def _cfg(cache_dir: Path, *overrides: str):
    return compose_config(*BASE, f"cache_dir={cache_dir}", *overrides)


def _cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


# -- --help ---------------------------------------------------------------------------------------------
COMMANDS = [
    "python -m aioli_repro.train\n",
    "python -m aioli_repro.train method=aioli groups=gh_c4",
    "python -m aioli_repro.train data=local data.source.root=PATH 'groups.names=[code,docs,prose]'",
    "python -m aioli_repro.run method=aioli groups=gh_c4 seed=1",
]


@pytest.mark.parametrize("module", ["aioli_repro.train", "aioli_repro.run"])
def test_help_is_usage_examples_and_config_groups(module, tmp_path):
    r = _cli(module, ["--help"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.startswith(f"usage: python -m {module} ")
    for command in COMMANDS:
        assert command in out, (command, out)
    assert "method: ado, aioli, aioli_diagonal" in out and "groups: a_b_se, a_se" in out  # Hydra's groups
    assert "cache_dir:" not in out and "train:" not in out  # no config dump
    assert not (tmp_path / "outputs").exists()


# -- bad input: nothing started, nothing left -------------------------------------------------------------
PIPELINE_FAILURES = {
    "bad_mixture": (["method=static", "method.mixer.proportions=[0.5,0.6]"], "sum to 1"),
    # Skill-It's own options are checked before its graph stages train
    "bad_later_stage_option": (["method=skillit", "method.mixer.eta=-1"], "method.mixer.eta"),
    "bad_aioli_schedule": (["method=aioli", "method.mixer.update_steps=3"], "update_steps"),
    "bad_data": (
        ["data=local", "data.source.root=/does/not/exist", "groups.names=[a,b]"],
        "data.source.root",
    ),
    "bad_config": (["train.composition=bogus"], "train.composition"),
    "bad_grid_groups": (["method=grid", "groups.names=[arxiv,bogus]"], "unknown group"),
}


@pytest.mark.parametrize("name", list(PIPELINE_FAILURES))
def test_failing_pipeline_says_nothing_and_leaves_no_stage_folder(name, cache_dir, tmp_path):
    overrides, needle = PIPELINE_FAILURES[name]
    logs: list[str] = []
    with pytest.raises((*USER_ERRORS, ValueError), match=needle.replace(".", r"\.")):
        run_method(_cfg(cache_dir, *overrides), tmp_path / "results", log=logs.append)
    assert not any("training in" in line for line in logs), logs
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())


def test_failing_commands_leave_no_output_folder(cache_dir, tmp_path):
    """Hydra creates outputs/<date>/<time>-<run name> before the run starts: a failed run removes it."""
    args = [*BASE, f"cache_dir={cache_dir}", f"results_dir={tmp_path}/results"]
    bad = ["method=static", "method.mixer.proportions=[0.5,0.6]"]
    for module in ("aioli_repro.train", "aioli_repro.run"):
        r = _cli(module, [*args, *bad], tmp_path)
        assert r.returncode == 2 and "sum to 1" in r.stderr, r.stderr[-2000:]
        assert "training in" not in r.stdout + r.stderr
    assert not (tmp_path / "outputs").exists()  # nor the empty layout root
    assert not (tmp_path / "results").exists()


# -- the mixture on the console -------------------------------------------------------------------------
def test_mix_lines_are_throttled_to_about_twenty_a_run(capsys):
    a = MixAnnouncer(["a", "b"], max_steps=1000)
    for step in range(1000):  # a method that changes p every step (DoReMi, DoGE)
        x = 0.2 + 0.6 * step / 999
        a.observe(step, np.array([x, 1 - x]))
    a.flush()
    err = capsys.readouterr().err.splitlines()
    assert err == a.lines and 18 <= len(a.lines) <= 21
    assert a.lines[0] == "[mix] step 0: a=0.20 b=0.80" and a.lines[-1] == "[mix] step 999: a=0.80 b=0.20"
    b = MixAnnouncer(["a", "b"], max_steps=100)
    for step, p in [(0, 0.5), (10, 0.501), (20, 0.6), (21, 0.7)]:  # invisible at 2 decimals; too soon
        b.observe(step, np.array([p, 1 - p]), "loss weights")
    assert b.lines == [
        "[mix] step 0 (loss weights): a=0.50 b=0.50",
        "[mix] step 20 (loss weights): a=0.60 b=0.40",
    ]
    b.flush()
    assert b.lines[-1] == "[mix] step 21 (loss weights): a=0.70 b=0.30"


def test_a_run_prints_its_mixture_changes(make_cfg, tmp_path, capsys):
    from aioli_repro.training.run import run_training

    cfg = make_cfg(
        "method=aioli",
        "train.max_steps=24",
        "train.val_every=0",
        "train.checkpoint_every=0",
        "train.val_max_seqs=8",
        "train.test_max_seqs=8",
        "method.mixer.update_steps=12",
        "method.mixer.lp_rounds=1",
        "method.mixer.lp_steps=2",
    )
    s = run_training(cfg, tmp_path)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[mix]")]
    trained = [r for r in s["trajectory"] if not r["probe"]]  # one per round, never a probe
    assert [r["step"] for r in trained] == [4, 16]
    shown = [int(x.split()[2].rstrip(":")) for x in lines]
    assert shown[0] == 4 and set(shown) <= {4, 16}  # round 1's only if visible at two decimals
    p = trained[0]["p"]
    assert lines[0] == f"[mix] step 4: arxiv={p['arxiv']:.2f} stackexchange={p['stackexchange']:.2f}"


# -- stage folders ----------------------------------------------------------------------------------------
def test_stage_folder_names_the_setting_and_finds_earlier_names(cache_dir, tmp_path):
    cfg = _cfg(cache_dir, "groups=gh_c4")
    stage = Stage("sweep3", derive(cfg, "sweep", static_mixer([0.25, 0.75])))
    h = stage_hash(stage.cfg)
    assert stage.directory(tmp_path) == tmp_path / f"sweep-gh_c4-sweep3-{h}"
    legacy = tmp_path / f"sweep-sweep3-{h}"  # written before the setting key was in the name
    legacy.mkdir()
    assert stage.directory(tmp_path) == legacy
