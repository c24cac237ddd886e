"""Exact resume, determinism, SLURM requeue, atomic files and idempotent pipelines (docs/reliability.md).

Every resume test compares a killed-and-resumed run with an uninterrupted one and asserts bitwise
equality of the numbers a table is built from (final val/test losses, the proportions trajectory,
learned proportions, delivered sequences, periodic val losses) and of `metrics.jsonl`.

Default suite: in-process kills (an exception, or a real SIGTERM/SIGUSR2 sent to the test process,
which Lightning and our handlers turn into a clean stop). Slow suite (`make test-slow`): the kill
matrix over every online method with real SIGTERM/SIGKILL in subprocesses of the CLI entry points.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_config
from omegaconf import open_dict

from aioli_repro.pipeline.recipes import run_method
from aioli_repro.pipeline.stage import read_summary
from aioli_repro.training.callbacks import RunInterrupted
from aioli_repro.training.checkpointing import AtomicCheckpointIO
from aioli_repro.training.module import MixingLM
from aioli_repro.training.run import run_training
from aioli_repro.training.slurm import slurm_setup

ROOT = Path(__file__).resolve().parents[1]

# What a results table is built from: all must match bitwise after a resume.
RESULT_KEYS = (
    "steps",
    "train_tokens",
    "test_loss",
    "val_loss",
    "test/avg_ppl",
    "val/avg_ppl",
    "trajectory",
    "val_history",
    "final_proportions",
    "learned_proportions",
    "delivered_sequences",
)

BASE = [
    "scale=tiny",
    "logger=none",
    "progress=false",
    "num_threads=1",
    "train.val_max_seqs=16",
    "train.test_max_seqs=16",
    "train.warmup_steps=4",  # the LR schedule passes warm-up and cosine within the run
]
STRATIFIED = ["train.max_steps=24", "train.checkpoint_every=4", "train.val_every=6", "train.log_every=4"]
# One Aioli round = 12 steps: probe intervals [0,3) [3,6), exploitation [6,12); then again from 12.
AIOLI = [
    *STRATIFIED,
    "method=aioli",
    "method.mixer.update_steps=12",
    "method.mixer.lp_rounds=1",
    "method.mixer.lp_steps=3",
]


def _j(x: object) -> object:
    return json.loads(json.dumps(x))  # tuples -> lists; floats round-trip exactly


def assert_same_results(a: dict, b: dict) -> None:
    for k in RESULT_KEYS:
        assert _j(a[k]) == _j(b[k]), (k, a[k], b[k])


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def compose_cfg(cache_dir: Path, *overrides: str):
    return compose_config(*BASE, f"cache_dir={cache_dir}", *overrides)


class Crash(Exception):
    pass


class Interrupt(L.Callback):
    """At the start of step k + 1 (global_step == k): raise (a crash) or signal this process."""

    def __init__(self, at: int, how: str | int) -> None:
        self.at, self.how, self.fired = at, how, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at and not self.fired:
            self.fired = True
            if self.how == "crash":
                raise Crash(f"crash in step {self.at + 1}")
            os.kill(os.getpid(), self.how)  # handled at the next bytecode, i.e. in the middle of the step


@pytest.fixture(scope="module")
def stratified_baseline(cache_dir, tmp_path_factory) -> tuple[dict, Path]:
    d = tmp_path_factory.mktemp("stratified_baseline")
    return run_training(compose_cfg(cache_dir, *STRATIFIED), d), d


@pytest.fixture(scope="module")
def aioli_baseline(cache_dir, tmp_path_factory) -> tuple[dict, Path]:
    d = tmp_path_factory.mktemp("aioli_baseline")
    return run_training(compose_cfg(cache_dir, *AIOLI), d), d


# -- fast: in-process kills --------------------------------------------------------------------------
def test_crash_then_resume_is_bitwise(cache_dir, tmp_path, monkeypatch, stratified_baseline):
    # crash in step 11 (checkpoints every 4 steps): resumes from step 8 and redoes 9-10
    ref, ref_dir = stratified_baseline
    cfg = compose_cfg(cache_dir, *STRATIFIED)
    with pytest.raises(Crash):
        run_training(cfg, tmp_path, callbacks=[Interrupt(10, "crash")])
    assert not (tmp_path / "summary.json").exists()
    assert ckpt_step(tmp_path / "checkpoints" / "last.ckpt") == 8
    s = run_training(cfg, tmp_path)
    assert s["resumed_from"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert_same_results(ref, s)
    assert metrics_rows(tmp_path) == metrics_rows(ref_dir)  # rows after the checkpoint are not doubled


def test_sigterm_inside_learnparams_then_resume_is_bitwise(cache_dir, tmp_path, monkeypatch, aioli_baseline):
    # SIGTERM arrives during step 5, inside the second probe interval [3, 6) of round 0: the run saves
    # at the end of step 5 (not a periodic step), exits 143 without a summary, and resumes from there.
    ref, ref_dir = aioli_baseline
    cfg = compose_cfg(cache_dir, *AIOLI)
    with pytest.raises(RunInterrupted) as exc:
        run_training(cfg, tmp_path, callbacks=[Interrupt(4, signal.SIGTERM)])
    assert exc.value.code == 128 + signal.SIGTERM and exc.value.step == 5
    assert not (tmp_path / "summary.json").exists()
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 5
    method = next(v for k, v in ckpt["callbacks"].items() if "MixingCallback" in k)["method"]
    assert method["round"] == 0 and method["n_drops"] == 1 and method["prev_tau"] == 1  # mid-LearnParams
    s = run_training(cfg, tmp_path)
    assert s["resumed_from"] == str(last)
    assert_same_results(ref, s)
    assert metrics_rows(tmp_path) == metrics_rows(ref_dir)


def test_checkpoint_holds_the_whole_state(aioli_baseline):
    _, d = aioli_baseline
    ckpt = torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 24
    assert ckpt["optimizer_states"][0]["state"]  # AdamW moments
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 24
    assert any(k.startswith("model.") for k in ckpt["state_dict"])
    sampler = ckpt["MixtureDataModule"]["sampler"]
    assert {"rng", "epoch", "pos", "deficit", "delivered", "proportions", "composition"} <= set(sampler)
    cb = next(v for k, v in ckpt["callbacks"].items() if "MixingCallback" in k)
    m = cb["method"]
    assert {"round", "G", "prev", "counts", "logw", "p", "A_ema", "rng", "last_validated"} <= set(m)
    assert m["round"] == 1 and len(m["history"]) == 2 and cb["trajectory"]
    extra = ckpt["aioli_repro"]
    assert {"python", "numpy", "torch"} <= set(extra["rng"])
    assert extra["tokens_seen"] == 24 * 8 * 256 and extra["identity"]
    assert not list((d / "checkpoints").glob("*.tmp-*"))


def test_kill_after_training_before_summary(cache_dir, tmp_path, monkeypatch, aioli_baseline):
    # killed during the final test evaluation: last.ckpt is at max_steps, so fit restores and returns at
    # once (Lightning never calls on_train_start); the method state must still be restored
    ref, ref_dir = aioli_baseline
    cfg = compose_cfg(cache_dir, *AIOLI)
    evaluate = MixingLM.evaluate

    def dies_in_test_eval(self, split, *args, **kwargs):
        if split == "test":
            raise Crash("killed in the final evaluation")
        return evaluate(self, split, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(MixingLM, "evaluate", dies_in_test_eval)
        with pytest.raises(Crash):
            run_training(cfg, tmp_path)
    assert not (tmp_path / "summary.json").exists()
    s = run_training(cfg, tmp_path)
    assert s["resumed_from"] is not None
    assert_same_results(ref, s)
    assert metrics_rows(tmp_path) == metrics_rows(ref_dir)


def test_same_seed_identical_different_seed_differs(cache_dir, tmp_path, stratified_baseline):
    ref, _ = stratified_baseline
    again = run_training(compose_cfg(cache_dir, *STRATIFIED), tmp_path / "same")
    assert_same_results(ref, again)
    other = run_training(compose_cfg(cache_dir, *STRATIFIED, "seed=1"), tmp_path / "other")
    assert other["test_loss"] != ref["test_loss"]
    assert other["delivered_sequences"] != ref["delivered_sequences"]  # the sampler reseeds too


def test_resume_refuses_a_different_config(cache_dir, tmp_path, monkeypatch, stratified_baseline):
    from aioli_repro.config import ConfigError

    cfg = compose_cfg(cache_dir, *STRATIFIED)
    with pytest.raises(Crash):
        run_training(cfg, tmp_path, callbacks=[Interrupt(5, "crash")])
    changed = compose_cfg(cache_dir, *STRATIFIED, "train.lr=1e-3")
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.002 -> 0\.001"):
        run_training(changed, tmp_path)
    assert ckpt_step(tmp_path / "checkpoints" / "last.ckpt") == 4  # untouched
    # keys that do not change the results may differ: the resume goes on, bitwise
    free = ["train.checkpoint_every=3", "data.rebuild_on_mismatch=true"]
    s = run_training(compose_cfg(cache_dir, *STRATIFIED, *free), tmp_path)
    assert s["resumed_from"] is not None
    assert_same_results(stratified_baseline[0], s)


# -- SLURM ----------------------------------------------------------------------------------------
SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "aioli",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def _clear_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)


def test_slurm_requeue_is_configured_from_the_environment(cache_dir, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    cfg = compose_cfg(cache_dir, *STRATIFIED)
    _clear_slurm(monkeypatch)
    assert slurm_setup(cfg) == ([], None)
    for k, v in SLURM_ENV.items():
        monkeypatch.setenv(k, v)
    plugins, sig = slurm_setup(cfg)
    assert sig == signal.SIGUSR2  # what submitit sends too: one requeue path
    (env,) = plugins
    # Lightning's own handler would save mid-step from inside the signal handler: ours saves at the boundary
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    trainer = L.Trainer(plugins=[AtomicCheckpointIO(), *plugins], logger=False, enable_progress_bar=False)
    assert trainer._accelerator_connector.cluster_environment is env
    with open_dict(cfg):
        cfg.trainer.slurm_requeue = False
        assert slurm_setup(cfg)[1] is None
        cfg.trainer.slurm_requeue = True
        cfg.trainer.requeue_signal = "USR2"
    assert slurm_setup(cfg)[1] == signal.SIGUSR2
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    from aioli_repro.training.slurm import slurm_job_id

    assert slurm_job_id() == "77_3"


def test_slurm_requeue_signal_saves_requeues_and_resumes_bitwise(
    cache_dir, tmp_path, monkeypatch, stratified_baseline
):
    ref, ref_dir = stratified_baseline
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "scontrol").chmod(0o755)
    _clear_slurm(monkeypatch)
    for k, v in SLURM_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_cfg(cache_dir, *STRATIFIED)
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted) as exc:  # arrives during step 7
        run_training(cfg, run, callbacks=[Interrupt(6, signal.SIGUSR2)])
    assert exc.value.code == 128 + signal.SIGUSR2 and exc.value.requeue
    assert log.read_text().split() == ["requeue", "4242"]
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 7  # the step boundary, not a periodic step
    assert signal.getsignal(signal.SIGUSR2) in (signal.SIG_DFL, None)  # handler removed after the run
    s = run_training(cfg, run)
    assert_same_results(ref, s)
    assert metrics_rows(run) == metrics_rows(ref_dir)


def test_submitit_style_exit_mid_step_resumes_bitwise(cache_dir, tmp_path, monkeypatch, stratified_baseline):
    # conf/hydra/launcher/slurm_*: submitit handles SIGUSR2 itself (requeue, then sys.exit(-1) from the
    # signal handler, wherever the step is); the requeued job resumes from the last periodic checkpoint
    ref, ref_dir = stratified_baseline

    def submitit_like(signum, frame):
        sys.exit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        cfg = compose_cfg(cache_dir, *STRATIFIED)
        with pytest.raises(SystemExit):
            run_training(cfg, tmp_path, callbacks=[Interrupt(13, signal.SIGUSR2)])
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert ckpt_step(tmp_path / "checkpoints" / "last.ckpt") == 12
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))
    s = run_training(cfg, tmp_path)
    assert_same_results(ref, s)
    assert metrics_rows(tmp_path) == metrics_rows(ref_dir)


# -- atomic files and idempotent pipelines ------------------------------------------------------------
def test_checkpoint_write_is_atomic(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - pickling fails half-way through the write
        io.save_checkpoint({"step": 2, "w": torch.ones(1000), "bad": lambda: 0}, path)
    assert path.read_bytes() == good and not list(tmp_path.glob("*.tmp-*"))
    assert torch.load(path, weights_only=True)["step"] == 1


MICRO = [
    "train.max_steps=8",
    "train.checkpoint_every=4",
    "train.val_every=4",
    "train.log_every=4",
    "train.val_max_seqs=8",
    "train.test_max_seqs=8",
]


def test_pipeline_never_redoes_a_finished_stage_and_distrusts_a_torn_summary(cache_dir, tmp_path):
    # keep_checkpoints: the torn-summary stage below resumes from its last.ckpt (by default a finished
    # stage's last.ckpt is deleted, and the stage would retrain from step 0 to the same numbers)
    cfg = compose_cfg(cache_dir, "method=stratified", *MICRO, "keep_checkpoints=true")
    logs: list[str] = []
    first, path = run_method(cfg, tmp_path, log=logs.append)
    (stage_dir,) = [Path(s["dir"]) for s in first["stages"]]
    mtime = (stage_dir / "summary.json").stat().st_mtime_ns
    again, _ = run_method(cfg, tmp_path, log=logs.append)
    assert again["stages"][0]["reused"] and (stage_dir / "summary.json").stat().st_mtime_ns == mtime
    assert sum("training in" in line for line in logs) == 1
    # a torn summary.json (e.g. copied by hand, or a crash on a filesystem without atomic rename) is
    # not a finished stage: the stage resumes from its checkpoint (at max_steps: evaluation only)
    text = (stage_dir / "summary.json").read_text()
    (stage_dir / "summary.json").write_text(text[: len(text) // 2])
    assert read_summary(stage_dir) is None
    third, _ = run_method(cfg, tmp_path, log=logs.append)
    assert not third["stages"][0]["reused"] and third["resumed_from"] is not None
    assert_same_results(first, third)
    assert json.loads(path.read_text())["test/avg_ppl"] == first["test/avg_ppl"]


# -- the same train command again resumes; progress and timing cover the whole run ------------------------
def test_same_train_command_again_resumes_the_unfinished_run(
    cache_dir, tmp_path, stratified_baseline, capsys
):
    """`python -m aioli_repro.train ...` interrupted (SIGTERM) in Hydra's default folder, then the same
    command again: it finds the unfinished run, resumes it there from the saved step, and finishes
    with the uninterrupted run's numbers; its own new folder is removed."""
    ref, ref_dir = stratified_baseline
    cfg = compose_cfg(cache_dir, *STRATIFIED)
    old = tmp_path / "outputs" / "2000-01-01" / f"00-00-00-{cfg.run_name}"  # an earlier day
    with pytest.raises(RunInterrupted) as exc:
        run_training(cfg, old, callbacks=[Interrupt(9, signal.SIGTERM)])  # lands in step 10
    assert exc.value.step == 10 and "run the same command again" in capsys.readouterr().err
    clock = torch.load(old / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    clock = clock["aioli_repro"]["clock"]
    r = subprocess.run(
        [sys.executable, "-m", "aioli_repro.train", *BASE, f"cache_dir={cache_dir}", *STRATIFIED],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming outputs/2000-01-01/00-00-00-{cfg.run_name} from step 10" in r.stderr, r.stderr[-3000:]
    assert list((tmp_path / "outputs").glob("*/*")) == [old]
    assert len(list((tmp_path / "outputs").iterdir())) == 1  # today's (empty) date folder went too
    s = json.loads((old / "summary.json").read_text())
    assert s["resumed_from"] == str(old / "checkpoints" / "last.ckpt")
    assert_same_results(ref, s)
    assert metrics_rows(old) == metrics_rows(ref_dir)
    assert s["processes"] == 2 and s["wall_s"] > clock["wall_s"] and s["fit_s"] > clock["fit_s"]
    assert not list(tmp_path.rglob("*.log"))  # no (empty) Hydra job log


def test_resume_hint_is_the_truth():
    from types import SimpleNamespace

    from hydra.types import RunMode

    from aioli_repro.train import resume_hint

    def hc(mode: RunMode, hydra: list[str]) -> SimpleNamespace:
        overrides = SimpleNamespace(hydra=hydra, task=["method=aioli", "seed=1"])
        return SimpleNamespace(mode=mode, overrides=overrides)

    default = Path("/x/outputs/2024-05-01/10-11-12-aioli-a_se-s1")
    assert resume_hint(hc(RunMode.RUN, []), default, default, "aioli-a_se-s1").startswith(
        "run the same command again"
    )
    explicit = Path("/x/mine")
    assert "same command" in resume_hint(hc(RunMode.RUN, ["hydra.run.dir=/x/mine"]), explicit, explicit, "n")
    # a multirun job, or a run dir named by time: the same command would start elsewhere
    sweep = Path("/x/multirun/2024-05-01/10-11-12/0-aioli-a_se-s1")
    for h in (hc(RunMode.MULTIRUN, []), hc(RunMode.RUN, ["hydra.run.dir=/x/${now:%H}"])):
        hint = resume_hint(h, sweep, sweep, "aioli-a_se-s1")
        assert hint == f"resume with: python -m aioli_repro.train method=aioli seed=1 hydra.run.dir={sweep}"


class _BarProbe(L.Callback):
    """Records the training progress bar (total, initial, n, postfix) after every step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int | None, int, int, str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((trainer.global_step, bar.total, bar.initial, bar.n, str(bar.postfix)))


def test_progress_and_timing_cover_the_whole_run_after_a_resume(cache_dir, tmp_path, aioli_baseline):
    ref, _ = aioli_baseline
    cfg = compose_cfg(cache_dir, *AIOLI, "progress=true")
    with pytest.raises(RunInterrupted):  # saved at step 3, before the first periodic checkpoint (4)
        run_training(cfg, tmp_path, callbacks=[Interrupt(2, signal.SIGTERM)])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    clock = ckpt["aioli_repro"]["clock"]
    probe = _BarProbe()
    s = run_training(cfg, tmp_path, callbacks=[probe])
    assert_same_results(ref, s)
    # the periodic saves after the resume replace that last.ckpt (no last-v1.ckpt beside a stale one)
    assert [p.name for p in (tmp_path / "checkpoints").glob("last*")] == ["last.ckpt"]
    assert ckpt_step(tmp_path / "checkpoints" / "last.ckpt") == 24
    first, last = probe.seen[0], probe.seen[-1]
    assert first[1:3] == (24, 3)  # the whole run's total; the rate counts this process's steps
    assert last[0] == last[3] == 24
    # the trained mixture of round 1 (step 18: after its two probe intervals), not a probe
    p = s["trajectory"][-1]["p"]
    assert f"p={p['arxiv']:.2f}/{p['stackexchange']:.2f}" in last[4] and "probe" not in last[4]
    assert s["processes"] == 2 and s["wall_s"] > clock["wall_s"] and s["fit_s"] > clock["fit_s"]
    assert s["steps_per_s"] == 24 / s["fit_s"] and "all processes" in s["timing"]
    # the method's own evaluations are counted over the whole run, as in an uninterrupted one
    assert s["method_evals"] == ref["method_evals"] == 6 and 0 < s["method_eval_s"] < s["fit_s"]


def test_aioli_trajectory_names_groups_and_flags_probes(aioli_baseline):
    s, _ = aioli_baseline
    # rounds of 12 steps: probe intervals [0, 3) and [3, 6), then the trained mixture until 12
    steps = [(r["step"], r["probe"]) for r in s["trajectory"]]
    assert steps == [(0, True), (3, True), (6, False), (12, True), (15, True), (18, False)]
    assert all(list(r["p"]) == ["arxiv", "stackexchange"] for r in s["trajectory"])
    assert {r["p"]["arxiv"] for r in s["trajectory"] if r["probe"]} == {0.375, 0.625}  # q_j, f = 0.625
    trained = [r["p"] for r in s["trajectory"] if not r["probe"]]
    assert [h["p"] for h in s["method_history"]] == [[p["arxiv"], p["stackexchange"]] for p in trained]
    assert s["setting_key"] == "a_se"


def test_callback_state_of_earlier_checkpoints_still_loads():
    from aioli_repro.mixing.base import MixingContext
    from aioli_repro.mixing.static import Stratified
    from aioli_repro.training.callbacks import STATE_VERSION, MixingCallback

    old = {
        "method": {"p": [0.5, 0.5]},
        "trajectory": [(0, [0.5, 0.5])],
        "val_history": [],
        "last_p": [0.5, 0.5],
    }
    method = Stratified()
    method.setup(MixingContext(["a", "b"], max_steps=10, batch_size=2, seed=0))
    cb = MixingCallback(method, method_ready=True)
    cb.load_state_dict(old)  # version 1: no probe flags, no evaluation time
    assert cb.trajectory == [(0, [0.5, 0.5], False)] and cb.method_evals == 0
    state = cb.state_dict()
    assert state["version"] == STATE_VERSION == 2 and state["trajectory"] == [[0, [0.5, 0.5], False]]


# -- slow: the kill matrix with real signals, in subprocesses of the CLI --------------------------------
KILL_WRAPPER = """
import os, runpy, signal, sys
import lightning as L

AT, SIG = int(os.environ["KILL_AT"]), getattr(signal, os.environ["KILL_SIG"])
ONLY = os.environ.get("KILL_METHOD")


class _Kill(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        name = getattr(getattr(pl_module, "mixing_method", None), "name", None)
        if trainer.global_step == AT and (not ONLY or name == ONLY):
            os.kill(os.getpid(), SIG)  # lands in the middle of step AT + 1


_init = L.Trainer.__init__


def _patched(self, *a, callbacks=None, **k):
    _init(self, *a, callbacks=[*(callbacks or []), _Kill()], **k)


L.Trainer.__init__ = _patched
mod = sys.argv[1]
sys.argv = [mod, *sys.argv[2:]]
runpy.run_module(mod, run_name="__main__", alter_sys=True)
"""

MATRIX_COMMON = ["train.max_steps=40", "train.checkpoint_every=5", "train.val_every=10", "train.log_every=5"]
# (method, overrides). Aioli: rounds of 20 steps, probe intervals [0,3) [3,6) and [20,23) [23,26).
MATRIX_METHODS = {
    "stratified": [],
    "aioli": [
        "method=aioli",
        "method.mixer.update_steps=20",
        "method.mixer.lp_rounds=1",
        "method.mixer.lp_steps=3",
    ],
    "skillit": [
        "method=skillit",
        "method.mixer.graph=[[0.5,0.1],[0.2,0.4]]",
        "method.mixer.update_steps=10",
        "method.mixer.eval_every=5",
    ],
    "doremi": ["method=doremi"],  # + the stratified baseline's final.ckpt as reference
    "doge": ["method=doge", "train.max_steps=20"],
}
# (method, signal, k): the signal lands in step k + 1. SIGKILL resumes from the last periodic
# checkpoint (multiple of 5 <= k); SIGTERM from a boundary checkpoint at step k + 1.
KILL_MATRIX = [
    ("stratified", "SIGKILL", 17),
    ("stratified", "SIGTERM", 8),
    ("aioli", "SIGKILL", 7),  # resumes from 5: inside probe interval [3, 6)
    ("aioli", "SIGTERM", 5),  # saves at 6: the last LearnParams evaluation of round 0
    ("aioli", "SIGTERM", 20),  # saves at 21: inside probe interval [20, 23) of round 1
    ("aioli", "SIGKILL", 22),  # resumes from 20: the round boundary (L^0 of round 1 already taken)
    ("skillit", "SIGKILL", 12),  # resumes from 10: right after an update
    ("skillit", "SIGTERM", 14),  # saves at 15: an eval step between updates
    ("doremi", "SIGKILL", 13),
    ("doremi", "SIGTERM", 6),
    ("doge", "SIGKILL", 11),
    ("doge", "SIGTERM", 3),
]


def _train_cli(args: list[str], cwd: Path, env: dict | None = None, wrapper: Path | None = None):
    cmd = [sys.executable, *([str(wrapper)] if wrapper else ["-m"]), "aioli_repro.train", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def cli_baselines(cache_dir, tmp_path_factory):
    """Uninterrupted CLI runs per method, made on first use."""
    root = tmp_path_factory.mktemp("cli_baselines")
    done: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in done:
            d = root / method
            r = _train_cli(_matrix_args(method, cache_dir, d, get), ROOT)
            assert r.returncode == 0, r.stderr[-3000:]
            done[method] = d
        return done[method]

    return get


def _matrix_args(method: str, cache_dir: Path, run_dir: Path, baselines) -> list[str]:
    args = [*BASE, f"cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *MATRIX_COMMON]
    args += MATRIX_METHODS[method]
    if method == "doremi":
        ref = baselines("stratified") / "checkpoints" / "final.ckpt"
        args.append(f"method.mixer.reference_checkpoint={ref}")
    return args


@pytest.mark.slow
@pytest.mark.parametrize(("method", "sig", "k"), KILL_MATRIX, ids=[f"{m}-{s}-{k}" for m, s, k in KILL_MATRIX])
def test_kill_matrix_resumes_bitwise(method, sig, k, cache_dir, tmp_path, cli_baselines):
    ref_dir = cli_baselines(method)
    wrapper = tmp_path / "kill_wrapper.py"
    wrapper.write_text(KILL_WRAPPER)
    run_dir = tmp_path / "run"
    args = _matrix_args(method, cache_dir, run_dir, cli_baselines)
    env = {**os.environ, "KILL_AT": str(k), "KILL_SIG": sig}
    r = _train_cli(args, ROOT, env=env, wrapper=wrapper)
    assert r.returncode == (-9 if sig == "SIGKILL" else 143), (r.returncode, r.stderr[-3000:])
    assert not (run_dir / "summary.json").exists()
    expected = k + 1 if sig == "SIGTERM" else (k // 5) * 5
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == expected
    if sig == "SIGTERM":
        assert f"stopped after step {k + 1}" in r.stderr and "Traceback" not in r.stderr
    r2 = _train_cli(args, ROOT)  # the same command again
    assert r2.returncode == 0, r2.stderr[-3000:]
    a = json.loads((ref_dir / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert b["resumed_from"] is not None
    assert_same_results(a, b)
    assert metrics_rows(run_dir) == metrics_rows(ref_dir)


def _run_cli(results: Path, cache_dir: Path, *extra: str) -> subprocess.Popen:
    args = [*BASE, f"cache_dir={cache_dir}", f"results_dir={results}", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "aioli_repro.run", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(proc: subprocess.Popen, results: Path, pattern: str, step: int, sig: int) -> None:
    """Send `sig` once some stage matching `pattern` has logged a row at or past `step`."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        for f in results.glob(f"{pattern}/metrics.jsonl"):
            rows = [json.loads(x) for x in f.read_text().splitlines() if x.endswith("}")]
            if any((r.get("step") or 0) >= step for r in rows):
                proc.send_signal(sig)
                proc.communicate(timeout=600)
                return
        time.sleep(0.05)
    raise AssertionError(f"the run ended before step {step}: {proc.communicate()[1][-2000:]}")


PIPELINE_KILLS = [
    ("aioli", "aioli-a_se-run-*", 7, signal.SIGKILL),
    ("aioli", "aioli-a_se-run-*", 23, signal.SIGTERM),
    ("doremi", "doremi-a_se-proxy-*", 12, signal.SIGKILL),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "pattern", "step", "sig"),
    PIPELINE_KILLS,
    ids=[f"{m}-{s.name}-{k}" for m, _, k, s in PIPELINE_KILLS],
)
def test_run_command_killed_externally_then_rerun(method, pattern, step, sig, cache_dir, tmp_path):
    """`python -m aioli_repro.run` killed by another process at an arbitrary point, then run again."""
    extra = [f"method={method}", *MATRIX_COMMON, "hp.doremi.proxy_steps=40"]
    if method == "aioli":
        extra += ["hp.aioli.update_steps=20", "hp.aioli.lp_rounds=1", "hp.aioli.lp_steps=3"]
    ref = _run_cli(tmp_path / "ref", cache_dir, *extra)
    out, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err[-3000:]
    killed = _run_cli(tmp_path / "res", cache_dir, *extra)
    _kill_when(killed, tmp_path / "res", pattern, step, sig)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGTERM), killed.returncode
    (stage,) = list((tmp_path / "res").glob(pattern))
    assert not (stage / "summary.json").exists()
    again = _run_cli(tmp_path / "res", cache_dir, *extra)
    out, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-3000:]
    summaries = f"{method}-a_se-pipeline-*/summary.json"
    (a,) = [json.loads(p.read_text()) for p in (tmp_path / "ref").glob(summaries)]
    (b,) = [json.loads(p.read_text()) for p in (tmp_path / "res").glob(summaries)]
    assert_same_results(a, b)
    resumed = json.loads((stage / "summary.json").read_text())
    assert resumed["resumed_from"] is not None
    (ref_stage,) = list((tmp_path / "ref").glob(pattern))
    assert metrics_rows(stage) == metrics_rows(ref_stage)


@pytest.mark.slow
def test_two_sweeps_share_cache_and_results_without_corruption(tmp_path):
    """Two identical pipelines start at once on a fresh cache and one results root."""
    cache, results = tmp_path / "cache", tmp_path / "results"
    extra = ["method=stratified", *MICRO]
    procs = [_run_cli(results, cache, *extra) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert sum(o.count("training in") for o, _ in outs) == 1  # the stage lock: trained once
    assert sum(o.count("already done") for o, _ in outs) == 1
    (summary,) = list(results.glob("stratified-a_se-pipeline-*/summary.json"))
    (stage,) = [p for p in results.glob("stratified-a_se-run-*") if p.is_dir()]
    final = json.loads(summary.read_text())
    assert final["test/avg_ppl"] == json.loads((stage / "summary.json").read_text())["test/avg_ppl"]
    from aioli_repro.data.cache import load_packed

    (root,) = [p for p in cache.iterdir() if p.is_dir()]
    load_packed(root, verify_checksums=True)  # every file matches its manifest checksum


# -- checkpoints written in the background (BackgroundCheckpointIO) -----------------------------------------
def _held_writes(monkeypatch: pytest.MonkeyPatch, release: threading.Event) -> list[str]:
    """Make every background write of last.ckpt wait for `release` (a deliberately slow disk)."""
    from aioli_repro.training import checkpointing

    write, held = checkpointing.atomic_write, []

    def slow(path, fn):
        if Path(path).name == "last.ckpt":
            held.append(threading.current_thread().name)
            assert release.wait(timeout=300), "the release event was never set"
        write(path, fn)

    monkeypatch.setattr(checkpointing, "atomic_write", slow)
    return held


def test_background_checkpoint_is_a_snapshot_and_reports_a_failed_write(tmp_path, monkeypatch):
    from aioli_repro.training.checkpointing import BackgroundCheckpointIO, CheckpointWriteError

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    history = [1.0]  # callback states hand out live lists
    ckpt = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "history": history}
    AtomicCheckpointIO().save_checkpoint(ckpt, tmp_path / "sync.ckpt")
    release = threading.Event()
    _held_writes(monkeypatch, release)
    io, last = BackgroundCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(ckpt, last)  # returns while the write waits
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on: weights and AdamW moments change in place
    opt.step()
    history.append(2.0)
    release.set()
    io.wait()
    sync, saved = (torch.load(p, weights_only=False) for p in (tmp_path / "sync.ckpt", last))
    assert saved["history"] == [1.0] and saved["state_dict"]._metadata == sync["state_dict"]._metadata
    for k, v in sync["state_dict"].items():
        assert torch.equal(saved["state_dict"][k], v) and not torch.equal(v, model.state_dict()[k])
    for i, s in sync["optimizer_states"][0]["state"].items():
        assert all(torch.equal(saved["optimizer_states"][0]["state"][i][k], v) for k, v in s.items())
    # a write that fails in the background is raised at the next save (or wait, or Lightning's teardown)
    good = last.read_bytes()
    io.save_checkpoint({"bad": lambda: 0}, last)  # the snapshot works; pickling it fails
    with pytest.raises(CheckpointWriteError, match=r"writing .*last\.ckpt in the background failed"):
        io.save_checkpoint(ckpt, last)
    assert last.read_bytes() == good and not list(tmp_path.glob("*.tmp-*"))
    io.save_checkpoint(ckpt, last)  # reported once; the next save works
    io.teardown()
    assert torch.load(last, weights_only=False)["history"] == [1.0, 2.0]


class _StateAt(L.Callback):
    """Copies of the weights and AdamW moments at the end of the given steps; sets `done` after `done_at`."""

    def __init__(self, steps: tuple[int, ...], done_at: int, done: threading.Event) -> None:
        self.steps, self.done_at, self.done, self.states = steps, done_at, done, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps:
            opt = trainer.optimizers[0].state_dict()["state"]
            moments = [s["exp_avg"].clone() for s in opt.values()]
            self.states[step] = ({k: v.clone() for k, v in pl_module.state_dict().items()}, moments)
        if step == self.done_at:
            self.done.set()


def test_checkpoint_snapshot_is_taken_at_the_step_of_the_save(cache_dir, tmp_path, monkeypatch):
    # the write of step 4 is held until step 6 has trained: the file still holds step 4's state
    release = threading.Event()
    held = _held_writes(monkeypatch, release)
    probe = _StateAt((4, 6), done_at=6, done=release)
    cfg = compose_cfg(cache_dir, "train.max_steps=6", "train.checkpoint_every=4", "train.val_every=0")
    run_training(cfg, tmp_path, callbacks=[probe])
    assert held == ["checkpoint-writer"]  # written off the training thread, while steps 5-6 trained
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    (w4, m4), (w6, _) = probe.states[4], probe.states[6]
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in w4.items())
    assert not all(torch.equal(w4[k], w6[k]) for k in w4)  # training did change them meanwhile
    saved = [s["exp_avg"] for s in ckpt["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(saved, m4, strict=True))


def test_checkpoint_writes_per_run_and_none_twice_at_max_steps(cache_dir, tmp_path, monkeypatch):
    # 12 steps, checkpoint_every=4: last.ckpt at 4, 8 and 12 (once, although 12 is also max_steps), then
    # the weights-only final.ckpt that later stages load; all on the writer thread
    writes: list[tuple[str, int, bool, str]] = []
    save = AtomicCheckpointIO.save_checkpoint

    def counted(self, checkpoint, path, storage_options=None):
        name = threading.current_thread().name
        writes.append((Path(path).name, checkpoint["global_step"], "optimizer_states" in checkpoint, name))
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", counted)
    cfg = compose_cfg(cache_dir, "train.max_steps=12", "train.checkpoint_every=4", "train.val_every=0")
    run_training(cfg, tmp_path)
    assert [w[:3] for w in writes] == [
        ("last.ckpt", 4, True),
        ("last.ckpt", 8, True),
        ("last.ckpt", 12, True),
        ("final.ckpt", 12, False),
    ]
    assert {w[3] for w in writes} == {"checkpoint-writer"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["final.ckpt", "last.ckpt"]


ASYNC_KILL_WRAPPER = """
import os, runpy, signal, sys, threading, time
import lightning as L
import torch

SLOW_AT, KILL_AT = int(os.environ["SLOW_AT"]), int(os.environ["KILL_AT"])
in_flight = threading.Event()
_save = torch.save


def _slow_save(obj, f, *a, **k):
    _save(obj, f, *a, **k)
    if threading.current_thread().name == "checkpoint-writer" and obj.get("global_step") == SLOW_AT:
        f.flush()
        in_flight.set()
        time.sleep(600)  # a slow disk: written, not yet fsync'd nor renamed


class _Kill(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == KILL_AT:
            assert in_flight.wait(timeout=300)
            os.kill(os.getpid(), signal.SIGKILL)


def _patched(self, *a, callbacks=None, **k):
    _init(self, *a, callbacks=[*(callbacks or []), _Kill()], **k)


torch.save = _slow_save
_init = L.Trainer.__init__
L.Trainer.__init__ = _patched
mod = sys.argv[1]
sys.argv = [mod, *sys.argv[2:]]
runpy.run_module(mod, run_name="__main__", alter_sys=True)
"""


def test_sigkill_during_a_background_write_resumes_bitwise(cache_dir, tmp_path, stratified_baseline):
    # last.ckpt of step 8 is being written when SIGKILL lands (in step 11): the same command again finds
    # step 4's complete last.ckpt and the torn temporary file, removes the latter and resumes from step 4
    ref, ref_dir = stratified_baseline
    wrapper = tmp_path / "async_kill_wrapper.py"
    wrapper.write_text(ASYNC_KILL_WRAPPER)
    run_dir = tmp_path / "run"
    args = [*BASE, f"cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *STRATIFIED]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLOW_AT": "8", "KILL_AT": "10"}
    r = _train_cli(args, ROOT, env=env, wrapper=wrapper)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert ckpt_step(ckpts / "last.ckpt") == 4 and list(ckpts.glob("last.ckpt.tmp-*"))
    r = _train_cli(args, ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["resumed_from"] == str(ckpts / "last.ckpt")
    assert_same_results(ref, s)
    assert metrics_rows(run_dir) == metrics_rows(ref_dir)
    assert not list(ckpts.glob("*.tmp-*"))
