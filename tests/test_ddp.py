"""Multi-device DDP on CPU (gloo, 2 processes): one run on 2 × 4 rows is the run on 1 × 8 rows.

Each rank takes its slice of the same global batch, the per-group statistics and val/test losses are
reduced, and the proportions are decided once for all ranks. What can differ is the order of the fp32
gradient and loss reductions, so losses match to that tolerance; the data each step trains on, and so the
proportions of a method that does not learn from the losses, match exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from test_resume import KILL_WRAPPER, assert_same_results, ckpt_step, metrics_rows

from aioli_repro.config import ConfigError
from aioli_repro.training.preflight import check_devices, device_count
from aioli_repro.world import launch_rank

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "scale=tiny",
    "logger=none",
    "progress=false",
    "num_threads=1",
    "train.batch_size=8",
    "train.log_every=1",
    "train.warmup_steps=3",
    "train.val_max_seqs=16",
    "train.test_max_seqs=16",
]
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
METHODS = {
    "stratified": ["train.max_steps=12", "train.checkpoint_every=0"],
    # two rounds of 10 steps, LearnParams probes in [0, 2), [2, 4), [10, 12), [12, 14)
    "aioli": [
        "method=aioli",
        "train.max_steps=20",
        "train.checkpoint_every=0",
        "method.mixer.update_steps=10",
        "method.mixer.lp_rounds=1",
        "method.mixer.lp_steps=2",
    ],
    "doge": ["method=doge", "train.max_steps=10", "train.checkpoint_every=0"],
}


def _train(
    args: list[str], env: dict | None = None, wrapper: Path | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *([str(wrapper)] if wrapper else ["-m"]), "aioli_repro.train", *args]
    full_env = {**os.environ, **(env or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        full_env.pop(key, None)  # a plain command: Lightning starts the second process itself
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def _pair(method: str, cache_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The same run on one device (batch 8) and on two (4 rows each)."""
    dirs = []
    for name, extra in (("one", []), ("two", DDP)):
        d = tmp_path / name
        r = _train([*BASE, f"cache_dir={cache_dir}", f"hydra.run.dir={d}", *METHODS[method], *extra])
        assert r.returncode == 0, r.stderr[-3000:]
        dirs.append(d)
    return dirs[0], dirs[1]


def _train_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics_rows(run_dir) if "train/loss" in r}


def _trajectory(summary: dict) -> tuple[list, np.ndarray]:
    steps = [(t["step"], t["probe"]) for t in summary["trajectory"]]
    return steps, np.array([list(t["p"].values()) for t in summary["trajectory"]])


def assert_matches_one_device(one: Path, two: Path, p_atol: float) -> None:
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    ra, rb = _train_rows(one), _train_rows(two)
    assert sorted(ra) == sorted(rb) == list(range(1, a["steps"] + 1))
    for s in ra:  # per-step loss of the whole global batch, per group and overall
        for k in ra[s]:
            if k.startswith("train/loss"):
                assert rb[s][k] == pytest.approx(ra[s][k], rel=2e-5, abs=1e-6), (s, k)
        assert rb[s]["train/tokens"] == ra[s]["train/tokens"]
    assert a["delivered_sequences"] == b["delivered_sequences"]
    assert a["train_tokens"] == b["train_tokens"]
    for split in ("val_loss", "test_loss"):
        assert b[split] == pytest.approx(a[split], rel=2e-5), split
    (sa, pa), (sb, pb) = _trajectory(a), _trajectory(b)
    assert sa == sb  # the proportions change at the same steps, probes at the same steps
    np.testing.assert_allclose(pb, pa, rtol=0, atol=p_atol)
    # rank 1 wrote nothing of its own: the run folder holds what a one-device run's holds
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_two_processes_train_the_one_device_run(cache_dir: Path, tmp_path: Path) -> None:
    one, two = _pair("stratified", cache_dir, tmp_path)
    assert_matches_one_device(one, two, p_atol=0.0)  # stratified: the batches are the same, exactly


@pytest.mark.slow
@pytest.mark.parametrize("method", ["aioli", "doge"])
def test_adaptive_methods_under_ddp_match_one_device(method: str, cache_dir: Path, tmp_path: Path) -> None:
    # Aioli's and DoGE's proportions come from losses and gradients, which match to fp32 reduction order
    one, two = _pair(method, cache_dir, tmp_path)
    assert_matches_one_device(one, two, p_atol=1e-5)


@pytest.mark.slow
def test_ddp_resume_after_sigterm_is_exact(cache_dir: Path, tmp_path: Path) -> None:
    """SIGTERM to rank 0 in step 7: both ranks save at its end and stop; the same command resumes, and the
    run ends exactly as an uninterrupted two-process run."""
    args = ["train.max_steps=14", "train.checkpoint_every=100", f"cache_dir={cache_dir}", *DDP]
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = _train([*BASE, *args, f"hydra.run.dir={ref}"])
    assert r.returncode == 0, r.stderr[-3000:]
    wrapper = tmp_path / "kill_wrapper.py"
    wrapper.write_text(KILL_WRAPPER)
    r = _train(
        [*BASE, *args, f"hydra.run.dir={run}"], env={"KILL_AT": "6", "KILL_SIG": "SIGTERM"}, wrapper=wrapper
    )
    assert r.returncode == 143, (r.returncode, r.stderr[-3000:])
    assert "stopped after step 7" in r.stderr
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 7
    r = _train([*BASE, *args, f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert b["resumed_from"] is not None
    assert_same_results(a, b)
    assert metrics_rows(run) == metrics_rows(ref)


# rank 1 alone gets a NaN in the method's training loss (its per-group losses stay finite) in the step
# computed at global_step == NAN_AT. Lightning starts rank 1 with this same script and arguments.
NAN_WRAPPER = """
import os, runpy, sys
import torch.distributed as dist
from aioli_repro.mixing.static import Stratified

AT = int(os.environ["NAN_AT"])
_loss = Stratified.training_loss


def _nan_on_rank_1(self, batch, seq_loss, ctx):
    loss = _loss(self, batch, seq_loss, ctx)
    if dist.is_initialized() and dist.get_rank() == 1 and ctx.step == AT:
        return loss * float("nan")
    return loss


Stratified.training_loss = _nan_on_rank_1
if os.environ.get("FAKE_CUDA"):  # the GPU path's device-side bookkeeping (no host sync per step), on CPU
    import dataclasses

    from aioli_repro.training import preflight

    _resolve = preflight.resolve_device_settings
    preflight.resolve_device_settings = lambda cfg: dataclasses.replace(_resolve(cfg), sync_free=True)
if sys.argv[1:2] == ["aioli_repro.train"]:  # rank 0's command; rank 1's has the overrides only
    del sys.argv[1]
runpy.run_module("aioli_repro.train", run_name="__main__", alter_sys=False)  # __main__ stays this script
"""


@pytest.mark.parametrize(
    ("fake_cuda", "said"),
    [
        ("", "at step 5 in the method's training loss over group(s) ['arxiv', 'stackexchange']; stopped"),
        ("1", "first at step 5 in the method's training loss over group(s) ['arxiv', 'stackexchange']; no"),
    ],
    ids=["cpu", "gpu_path"],
)
def test_nonfinite_loss_on_one_rank_stops_every_rank_at_that_step(
    fake_cuda: str, said: str, cache_dir: Path, tmp_path: Path
) -> None:
    """A NaN loss on rank 1 only: both ranks stop at the same step with the same one-line error, instead
    of rank 0 going on into the next collective and waiting there (or failing) without a message. CPU:
    before the update; GPU path: at the next log point (every step here), before the step-6 checkpoint."""
    wrapper = tmp_path / "nan_wrapper.py"
    wrapper.write_text(NAN_WRAPPER)
    run = tmp_path / "run"
    args = [*BASE, f"cache_dir={cache_dir}", f"hydra.run.dir={run}", *DDP]
    args += ["train.max_steps=12", "train.checkpoint_every=2", "train.val_every=0"]
    env = {"NAN_AT": "4", "FAKE_CUDA": fake_cuda}
    r = _train(args, env=env, wrapper=wrapper, timeout=300)  # a hang fails here
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert lines, r.stderr[-3000:]
    # no rank's own loss value in it: the ranks' values differ
    assert all(x.startswith(f"error: non-finite training loss {said}") for x in lines), lines
    assert all(x.endswith("(step 4)") for x in lines), lines
    assert len(set(lines)) == 1  # every rank that reported says the same
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 4  # nothing written after the bad step
    assert not (run / "summary.json").exists()


# -- configuration, before any process starts -------------------------------------------------------
def test_devices_are_counted_as_lightning_reads_them() -> None:
    assert [device_count(d) for d in (1, 2, "2", "0,1,3", [0, 1], "auto", -1)] == [1, 2, 2, 3, 2, None, None]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.devices=3"], r"^train\.batch_size: \d+ does not split evenly over trainer\.devices=3"),
        (["trainer.devices=2", "trainer.strategy=ddp_spawn"], r"^trainer\.strategy: 'ddp_spawn' with"),
        (["trainer.devices=2", "trainer.strategy=fsdp"], r"^trainer\.strategy: 'fsdp' with"),
    ],
)
def test_multi_device_configs_ddp_cannot_train_exactly_are_refused(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_devices(compose_config("scale=tiny", "train.batch_size=8", "cache_dir=/tmp/x", *overrides))


def test_multi_device_configs_ddp_trains_pass() -> None:
    for extra in (
        ["trainer.devices=2"],
        ["trainer.devices=4", "trainer.strategy=ddp"],
        ["trainer.devices=1"],
    ):
        check_devices(compose_config("scale=tiny", "train.batch_size=8", "cache_dir=/tmp/x", *extra))


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, 1),  # a process Lightning started
        ({"LOCAL_RANK": "1", "NODE_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, 3),
        ({"RANK": "5", "LOCAL_RANK": "1"}, 5),  # torchrun
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, 3),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "LOCAL_RANK": "0"}, 0),  # one task per job
    ],
)
def test_the_launch_rank_is_read_before_lightning_starts(env: dict, rank: int, monkeypatch) -> None:
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key in ("SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_rank() == rank


@pytest.mark.slow
def test_a_doremi_pipeline_under_ddp_matches_one_device(cache_dir: Path, tmp_path: Path) -> None:
    """Three stages (reference, proxy, final) on two processes: rank 0 alone locks, writes and reports; the
    learned weights and the final run match the one-device pipeline."""
    common = [
        *BASE,
        f"cache_dir={cache_dir}",
        "method=doremi",
        "train.max_steps=12",
        "method.pipeline.proxy_steps=12",
        "method.pipeline.proxy_batch_size=8",
    ]
    out = {}
    for name, extra in (("one", []), ("two", DDP)):
        results = tmp_path / name
        cmd = [sys.executable, "-m", "aioli_repro.run", *common, f"results_dir={results}", *extra]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("summary: ") == 1  # one report, from rank 0
        (pipeline,) = results.glob("doremi-*-pipeline-*/summary.json")
        stages = sorted(p.name.rsplit("-", 1)[0] for p in results.iterdir())
        out[name] = (stages, json.loads(pipeline.read_text()))
    (stages_a, a), (stages_b, b) = out["one"], out["two"]
    # the same stages, and nothing else in the results folder; trainer.devices is part of a stage's hash
    # (the stage cache promises bitwise results, and DDP's reduction order differs in the last bits)
    assert (
        stages_a
        == stages_b
        == ["doremi-a_se-final", "doremi-a_se-pipeline", "doremi-a_se-proxy", "stratified-a_se-run"]
    )
    np.testing.assert_allclose(
        list(b["learned_proportions"].values()), list(a["learned_proportions"].values()), atol=1e-5
    )
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=2e-5)
