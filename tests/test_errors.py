"""Bad input: one clear error naming the field, a non-zero exit, no traceback, nothing lost.

Every bad input is checked in-process (the error is one of `USER_ERRORS`, which both entry points
turn into one `error: ...` line and exit status 2) in the default suite, and through the real
command line in the slow suite. A few representative CLI checks stay in the default suite.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config

from aioli_repro.data.source import DataError
from aioli_repro.mixing.static import Stratified
from aioli_repro.training.checkpointing import CheckpointError
from aioli_repro.training.module import NonFiniteLossError
from aioli_repro.training.preflight import USER_ERRORS
from aioli_repro.training.run import run_training

ROOT = Path(__file__).resolve().parents[1]
BASE = ["scale=tiny", "logger=none", "progress=false", "num_threads=1"]


def _cfg(cache_dir: Path, *overrides: str):
    return compose_config(*BASE, f"cache_dir={cache_dir}", *overrides)


@pytest.fixture(scope="module")
def local_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders for the data-path cases: good groups, an empty root, a root with an empty group."""
    root = tmp_path_factory.mktemp("local_data")
    good, empty, hollow = root / "good", root / "empty", root / "hollow"
    for g in ("a", "b"):
        (good / g).mkdir(parents=True)
        for i in range(60):
            (good / g / f"{i}.txt").write_text(f"{g} document {i}: " + "some words here " * 40)
    empty.mkdir()
    (hollow / "a").mkdir(parents=True)
    (hollow / "b").mkdir()  # the empty group
    for i in range(60):
        (hollow / "a" / f"{i}.txt").write_text("text " * 200)
    return {"good": good, "empty": empty, "hollow": hollow, "missing": root / "does-not-exist"}


# name -> (overrides with {placeholders}, substrings the one-line message must contain)
BAD_INPUTS: dict[str, tuple[list[str], list[str]]] = {
    "unknown_group": (["groups.names=[arxiv,bogus]"], ["groups:", "unknown group 'bogus'", "allowed:"]),
    "proportions_negative": (
        ["method=static", "method.mixer.proportions=[-0.5,1.5]"],
        ["method.mixer.proportions", ">= 0"],
    ),
    "proportions_nan": (
        ["method=static", "method.mixer.proportions=[nan,0.5]"],
        ["method.mixer.proportions", "finite"],
    ),
    "proportions_inf": (
        ["method=static", "method.mixer.proportions=[inf,0.5]"],
        ["method.mixer.proportions", "finite"],
    ),
    "proportions_wrong_length": (
        ["method=static", "method.mixer.proportions=[0.2,0.3,0.5]"],
        ["method.mixer.proportions", "expected 2 values"],
    ),
    "proportions_not_summing_to_1": (
        ["method=static", "method.mixer.proportions=[0.5,0.6]"],
        ["method.mixer.proportions", "sum to 1", "1.1"],
    ),
    "data_path_missing": (
        ["data=local", "data.source.root={missing}", "groups.names=[a,b]"],
        ["data.source.root", "does not exist"],
    ),
    "data_path_empty": (
        ["data=local", "data.source.root={empty}", "groups.names=[a,b]"],
        ["data.source.root", "has no group subfolders"],
    ),
    "empty_group": (
        ["data=local", "data.source.root={hollow}", "groups.names=[a,b]"],
        ["group 'b'", "is empty"],
    ),
    "context_longer_than_model": (
        ["train.context_length=4096"],
        ["train.context_length", "4096", "model.context_length=256"],
    ),
    "tokenizer_vocab_exceeds_model": (
        ["model.vocab_size=128"],
        ["data.tokenizer", "257 ids", "model.vocab_size"],
    ),
    "aioli_schedule_not_divisible": (
        ["method=aioli", "method.mixer.update_steps=7", "train.max_steps=600"],
        ["method.mixer.update_steps", "does not divide", "Allowed values", "100"],
    ),
    "missing_reference_stage": (
        ["method=doremi", "method.mixer.reference_checkpoint={missing}/checkpoints/final.ckpt"],
        ["method.mixer.reference_checkpoint", "missing prerequisite stage", "does-not-exist"],
    ),
    "no_reference_stage_given": (["method=doremi"], ["method.mixer.reference_checkpoint", "prerequisite"]),
    "missing_skills_graph_stage": (["method=skillit"], ["method.mixer.graph", "skills graph"]),
    "bad_method_option": (["method=skillit", "method.mixer.eta=-1"], ["method.mixer.eta", "> 0"]),
    "unknown_mixer_class": (
        ["method.mixer._target_=aioli_repro.mixing.nope.Nope"],
        ["method.mixer._target_"],
    ),
    "unknown_composition": (["train.composition=bogus"], ["train.composition", "allowed"]),
}


def _fill(overrides: list[str], dirs: dict[str, Path]) -> list[str]:
    return [o.format(**{k: str(v) for k, v in dirs.items()}) for o in overrides]


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_user_error_naming_the_field(name, cache_dir, local_dirs, tmp_path):
    overrides, needles = BAD_INPUTS[name]
    steps = [] if any(o.startswith("train.max_steps=") for o in overrides) else ["train.max_steps=4"]
    cfg = _cfg(cache_dir, *steps, *_fill(overrides, local_dirs))
    with pytest.raises(USER_ERRORS) as exc:
        run_training(cfg, tmp_path / "run")
    msg = str(exc.value)
    for needle in needles:
        assert needle in msg, (name, needle, msg)
    assert not (tmp_path / "run").exists()  # found before the run directory is made


def _cli(module: str, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )


def _assert_one_line_error(r: subprocess.CompletedProcess, needles: list[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_cli_exits_2_with_one_line(name, cache_dir, local_dirs, tmp_path):
    overrides, needles = BAD_INPUTS[name]
    args = [*BASE, f"cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}/run", *_fill(overrides, local_dirs)]
    _assert_one_line_error(_cli("aioli_repro.train", args, tmp_path), needles)
    assert not (tmp_path / "run" / "summary.json").exists()


# A few through the real command lines in the default suite.
@pytest.mark.parametrize(
    ("module", "name"),
    [("aioli_repro.run", "proportions_not_summing_to_1"), ("aioli_repro.train", "data_path_missing")],
)
def test_cli_representatives(module, name, cache_dir, local_dirs, tmp_path):
    overrides, needles = BAD_INPUTS[name]
    args = [
        *BASE,
        f"cache_dir={cache_dir}",
        f"results_dir={tmp_path}/results",
        f"hydra.run.dir={tmp_path}/run",
    ]
    _assert_one_line_error(_cli(module, [*args, *_fill(overrides, local_dirs)], tmp_path), needles)
    assert not (tmp_path / "run").exists() and not (tmp_path / "results").exists()  # no debris


# No setting (`groups=[]` selects none: no groups.key for run_name, which Hydra's run folder is named
# after) or a bad list of groups, through every entry point that composes conf/train.yaml.
@pytest.mark.parametrize(
    ("module", "override"),
    [
        ("aioli_repro.train", "groups=[]"),
        ("aioli_repro.run", "groups=[]"),
        ("aioli_repro.run", "groups.names=[]"),
        pytest.param("aioli_repro.restricted", "groups=[]", marks=pytest.mark.slow),
        pytest.param("aioli_repro.prepare", "groups=[]", marks=pytest.mark.slow),
        pytest.param("aioli_repro.train", "~groups", marks=pytest.mark.slow),
        pytest.param("aioli_repro.train", "groups.names=arxiv", marks=pytest.mark.slow),
        pytest.param("aioli_repro.run", "groups.names=null", marks=pytest.mark.slow),
    ],
)
def test_no_groups_cli_exits_2_with_one_line_and_no_debris(module, override, cache_dir, tmp_path):
    r = _cli(module, [*BASE, f"cache_dir={cache_dir}", override], tmp_path)  # default run and results dirs
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: groups"), r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no outputs/, multirun/ or results/


def test_run_command_keeps_finished_stages_on_a_bad_stage(cache_dir, local_dirs, tmp_path):
    """Nothing lost: a pipeline stage that fails on bad input leaves earlier stages' results alone."""
    from aioli_repro.pipeline.recipes import run_method

    micro = ["train.max_steps=4", "train.checkpoint_every=2", "train.val_every=2", "train.val_max_seqs=4"]
    strat, _ = run_method(
        _cfg(cache_dir, "method=stratified", *micro, "train.test_max_seqs=4"), tmp_path, log=str
    )
    done = Path(strat["run_dir"]) / "summary.json"
    before = done.read_bytes()
    bad = _cfg(
        cache_dir, "method=static", "method.mixer.proportions=[0.5,0.6]", *micro, "train.test_max_seqs=4"
    )
    with pytest.raises(USER_ERRORS, match="sum to 1"):
        run_method(bad, tmp_path, log=str)
    assert done.read_bytes() == before


# -- NaN / inf during training ------------------------------------------------------------------------
class PoisonAt(Stratified):
    """Stratified, but the step computed at global_step == `at` gets a non-finite loss."""

    name = "poison"

    def __init__(self, at: int, value: float, group: int | None) -> None:
        self.at, self.value, self.group = at, value, group

    def training_loss(self, batch, seq_loss, ctx):
        if ctx.step == self.at:
            if self.group is None:  # every group's loss is fine, the method's combination is not
                return seq_loss.mean() * self.value
            with torch.no_grad():  # in place, so the module's per-group statistics see it too
                seq_loss[batch.group_ids == self.group] = self.value
        return seq_loss.mean()


@pytest.mark.parametrize(
    ("value", "group", "needle"),
    [
        (math.nan, 1, "in group(s) ['stackexchange']"),
        (math.inf, 0, "in group(s) ['arxiv']"),
        (math.nan, None, "in the method's training loss over group(s) ['arxiv', 'stackexchange']"),
    ],
)
def test_nonfinite_loss_stops_naming_step_and_group_and_keeps_last_good_checkpoint(
    value, group, needle, cache_dir, tmp_path
):
    cfg = _cfg(
        cache_dir, "train.max_steps=20", "train.checkpoint_every=5", "train.val_every=0", "train.log_every=5"
    )
    with pytest.raises(NonFiniteLossError) as exc:
        run_training(cfg, tmp_path, method=PoisonAt(12, value, group))
    msg = str(exc.value)
    assert "at step 13 " in msg and needle in msg and "(step 10)" in msg, msg
    assert not (tmp_path / "summary.json").exists()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize(("log_every", "ckpt_every"), [(10, 4), (2, 100)])
def test_nonfinite_loss_on_the_gpu_path_is_caught_before_any_checkpoint(
    log_every, ckpt_every, cache_dir, tmp_path, monkeypatch
):
    """The GPU path has no per-step host sync: the first bad step is kept on the device and raised at
    the next log point or checkpoint. On CPU with the GPU path's setting (settings.sync_free)."""
    import dataclasses

    import lightning as L

    class FakeCuda(L.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.settings = dataclasses.replace(pl_module.settings, sync_free=True)

    cfg = _cfg(
        cache_dir,
        "train.max_steps=12",
        f"train.checkpoint_every={ckpt_every}",
        "train.val_every=0",
        f"train.log_every={log_every}",
    )
    with pytest.raises(NonFiniteLossError, match=r"first at step 7 in group\(s\) \['stackexchange'\]"):
        run_training(cfg, tmp_path, method=PoisonAt(6, math.nan, 1), callbacks=[FakeCuda()])
    last = tmp_path / "checkpoints" / "last.ckpt"
    if ckpt_every == 4:  # the step-8 checkpoint was refused: step 4 is the last good one
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    else:
        assert not last.exists()


def test_diverging_run_cli_exits_2_and_keeps_checkpoint(cache_dir, tmp_path):
    # a learning rate of 1e30 without clipping: the loss is non-finite within a few steps
    args = [
        *BASE,
        f"cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path}/run",
        "train.max_steps=40",
        "train.checkpoint_every=1",
        "train.warmup_steps=1",
        "train.lr=1e30",
        "train.min_lr=0",
        "train.grad_clip=0",
    ]
    line = _assert_one_line_error(
        _cli("aioli_repro.train", args, tmp_path), ["non-finite training loss", "group(s)"]
    )
    step = int(line.split(" at step ")[1].split()[0])
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step - 1 and f"(step {step - 1})" in line
    assert not (tmp_path / "run" / "summary.json").exists()


def test_two_trainings_in_one_run_directory_is_an_error(cache_dir, tmp_path):
    import fcntl

    from aioli_repro.training.run_dirs import RunDirInUse

    with open(tmp_path / ".train.lock", "a+") as held:  # another process training here
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RunDirInUse, match="in use by another training process"):
            run_training(_cfg(cache_dir, "train.max_steps=4"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


# -- damaged files ---------------------------------------------------------------------------------
def test_corrupt_checkpoint_is_a_clear_error(cache_dir, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"last\.ckpt is not a readable checkpoint.*Delete it"):
        run_training(_cfg(cache_dir, "train.max_steps=4"), tmp_path)


def test_corrupt_data_cache_is_detected(local_dirs, tmp_path):
    cache = tmp_path / "cache"
    common = [
        "data=local",
        f"data.source.root={local_dirs['good']}",
        "groups.names=[a,b]",
        "train.max_steps=2",
    ]
    common += ["train.context_length=64", "train.val_every=0", "train.checkpoint_every=0"]
    run_training(_cfg(cache, *common), tmp_path / "first")
    (root,) = [p for p in cache.iterdir() if p.is_dir()]
    target = next(root.glob("b*/val.bin"))  # the group's folder: b, or b-<hash> (per-group caches)
    data = bytearray(target.read_bytes())
    data[0] ^= 1  # same size: only the checksum can tell
    target.write_bytes(bytes(data))
    with pytest.raises(
        DataError, match=r"b(-\w+)?/val\.bin does not match its sha256.*data\.rebuild_on_mismatch=true"
    ):
        run_training(_cfg(cache, *common), tmp_path / "second")
    os.truncate(target, 10)
    with pytest.raises(DataError, match=r"b(-\w+)?/val\.bin has 10 bytes"):
        run_training(_cfg(cache, *common), tmp_path / "third")
    s = run_training(_cfg(cache, *common, "data.rebuild_on_mismatch=true"), tmp_path / "fourth")
    assert np.isfinite(s["test/avg_ppl"])


def test_datamodule_refuses_a_checkpoint_from_other_data():
    from types import SimpleNamespace

    from aioli_repro.data.datamodule import MixtureDataModule

    arrays = {g: np.zeros((4, 8), dtype=np.uint16) for g in ("a", "b")}
    packed = SimpleNamespace(
        groups=["a", "b"], train=arrays, val=arrays, test=arrays, manifest={"key_hash": "k1"}
    )
    dm = MixtureDataModule(packed, batch_size=2, seed=0)
    state = dm.state_dict()
    assert state["data_key"] == "k1"
    dm.packed.manifest = {"key_hash": "k2"}
    with pytest.raises(DataError, match="data cache k1.*cache k2"):
        dm.load_state_dict(state)
    dm.packed.manifest = {"key_hash": "k1"}
    state["sampler"]["group_sizes"] = [5, 4]
    with pytest.raises(DataError, match="group sizes"):
        dm.load_state_dict(state)


# -- W&B unreachable in online mode ---------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:9", "http://10.255.255.1:81", "https://10.255.255.1:8443"])
def test_wandb_unreachable_falls_back_to_offline_quickly(url, tmp_path, monkeypatch, capsys):
    from aioli_repro.training.loggers import make_wandb_logger

    # refused at once / dropped or answered by a proxy that cannot forward / TLS that does not verify
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    t0 = time.time()
    logger = make_wandb_logger(tmp_path, {"seed": 0}, "aioli_repro", "online", "t", None)
    assert time.time() - t0 < 10
    assert logger is not None and logger._offline
    assert "logging offline instead" in capsys.readouterr().out


def test_wandb_unreachable_run_completes_offline(cache_dir, tmp_path):
    env = {**os.environ, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "f" * 40}
    env.pop("WANDB_MODE", None)  # conftest forces offline; this test needs online mode to be asked for
    args = [
        "scale=tiny",
        "progress=false",
        "num_threads=1",
        f"cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path}/run",
        "logger.wandb.mode=online",
        "train.max_steps=2",
        "train.val_every=0",
        "train.val_max_seqs=4",
        "train.test_max_seqs=4",
    ]
    t0 = time.time()
    r = _cli("aioli_repro.train", args, tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "logging offline instead" in r.stdout
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert time.time() - t0 < 300  # never hangs on the network


_LOG_THEN_TRAIN = """
import sys
from pathlib import Path
from aioli_repro.training.loggers import make_wandb_logger
from aioli_repro.training.pipeline_run_log import log_pipeline_run
out = Path(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from test_results import fake_summary
summary = fake_summary("A/SE", "stratified", 0)
assert log_pipeline_run(summary, out / "pipeline") is not None
logger = make_wandb_logger(out / "run", {"seed": 0}, "aioli_repro", "offline", "t", None)
logger.experiment.log({"x": 1.0})
logger.experiment.finish()
"""


def test_offline_run_after_a_pipeline_log_needs_no_key(tmp_path):
    # A worker process logs one pipeline's run, then trains the next pipeline: W&B has been set up
    # by then, so an offline mode asked only through WANDB_MODE came too late and W&B asked for a key.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc key
    r = subprocess.run(
        [sys.executable, "-c", _LOG_THEN_TRAIN, str(tmp_path), str(Path(__file__).parent)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1
