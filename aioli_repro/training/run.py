"""One training run, callable in-process: `run_training(cfg, run_dir)` (the CLI is `aioli_repro.train`).

Builds (or reuses) the packed data cache, the decoder, the mixing method and Lightning's Trainer,
trains, evaluates per-group val/test loss, and writes `summary.json` + `metrics.jsonl` in the run
directory. Pipelines and the CLI both call it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from aioli_repro import world
from aioli_repro.data.datamodule import MixtureDataModule
from aioli_repro.fileio import atomic_write, atomic_write_json
from aioli_repro.mixing.base import MixingMethod
from aioli_repro.model import load_decoder_state
from aioli_repro.training.callbacks import (
    MixingCallback,
    RunInterrupted,
    RunProgressBar,
    StepBoundaryCheckpoint,
)
from aioli_repro.training.checkpointing import (
    BackgroundCheckpointIO,
    check_checkpoint_readable,
    wait_for_checkpoint,
)
from aioli_repro.training.device_settings import apply_process_settings
from aioli_repro.training.identity import run_identity
from aioli_repro.training.loggers import JsonlLogger, make_wandb_logger
from aioli_repro.training.module import MixingLM, NonFiniteLossError, OptimConfig, RunClock
from aioli_repro.training.preflight import Preflight, pack_data, preflight
from aioli_repro.training.run_dirs import remove_if_unused, run_dir_lock
from aioli_repro.training.slurm import requeue_slurm_job
from aioli_repro.training.summary import log_summary, summarise

# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, once per fit: nothing a user can act
# on, and it repeats for every stage of a sweep.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

# ...and advertises a cloud logger at every Trainer construction (once per stage of a sweep).
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip")
)


def run_training(
    cfg: DictConfig,
    run_dir: str | Path,
    method: MixingMethod | None = None,
    extras: dict | None = None,
    *,
    checked: Preflight | None = None,
    resume_hint: str | None = None,
    callbacks: list[L.Callback] | None = None,
) -> dict:
    """Train one run as configured; return (and write) its summary.

    Resumes from `run_dir/checkpoints/last.ckpt` when it exists (bitwise on CPU); see docs/reliability.md.
    `checked`: `preflight(cfg, method, extras)` when the caller already ran it (nothing is checked
    twice); otherwise it runs here, before `run_dir` is created. `resume_hint`: what the message of an
    interrupted run tells the user to do (default: run the same command again). `callbacks`: extra
    Lightning callbacks, after the run's own (tests, instrumentation).
    """
    clock = RunClock()
    checked = checked if checked is not None else preflight(cfg, method, extras)
    run_dir = Path(run_dir)
    if not world.is_launch_zero():  # DDP: rank 0 holds the lock and writes; the others only train
        return _run_training(cfg, run_dir, checked, extras, clock, resume_hint, list(callbacks or []))
    os.environ[world.RUN_DIR_ENV] = str(run_dir.resolve())  # for the ranks Lightning starts
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_dir_lock(run_dir):
            return _run_training(cfg, run_dir, checked, extras, clock, resume_hint, list(callbacks or []))
    except BaseException:
        if created:  # failed before writing anything (e.g. while reading the data): no empty folder
            remove_if_unused(run_dir)
        raise


def _run_training(
    cfg: DictConfig,
    run_dir: Path,
    checked: Preflight,
    extras: dict | None,
    clock: RunClock,
    resume_hint: str | None,
    extra_callbacks: list[L.Callback],
) -> dict:
    """build -> fit (or resume) -> summarise."""
    _set_process_state(cfg, checked)
    last = _checkpoint_to_resume(run_dir / "checkpoints")
    run = _build(cfg, run_dir, checked, extras, clock, extra_callbacks, last)
    resumed_from = str(last) if last.exists() else None
    if checked.init_checkpoint and resumed_from is None:  # a resumed branch run has its weights in last.ckpt
        run.module.model.load_state_dict(load_decoder_state(checked.init_checkpoint))
    zero = world.is_launch_zero()
    if zero:
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True).encode()
        atomic_write(run_dir / "config.yaml", lambda f: f.write(config_yaml))
    _fit(run.trainer, run.module, run.dm, resumed_from, last, resume_hint)
    # the final weights, for later stages (DoReMi's reference model), written during the evaluation
    run.trainer.save_checkpoint(last.parent / "final.ckpt", weights_only=True)
    try:
        summary = summarise(
            cfg, checked, run.trainer, run.module, run.mixing, run.dm, run.packed, resumed_from, run_dir
        ).to_json()
    finally:
        wait_for_checkpoint(run.trainer, release=True)  # summary.json says final.ckpt is complete
    if zero:
        log_summary(run.loggers, summary)
        atomic_write_json(run_dir / "summary.json", summary)  # last: its presence marks the run finished
    world.barrier()  # no rank goes on (e.g. to a pipeline's next stage) before the summary exists
    return summary


def _set_process_state(cfg: DictConfig, checked: Preflight) -> None:
    """Threads, TF32 (CUDA mixed precision), and every seed (before anything draws a random number)."""
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    apply_process_settings(checked.settings)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)


def _checkpoint_to_resume(ckpt_dir: Path) -> Path:
    """`ckpt_dir/last.ckpt`, checked when it exists; debris of a save killed half-way is removed."""
    last = ckpt_dir / "last.ckpt"
    if last.exists():
        check_checkpoint_readable(last)
    for leftover in ckpt_dir.glob("*.tmp-*"):  # never renamed into place
        leftover.unlink(missing_ok=True)
    return last


@dataclass
class _Built:
    packed: Any
    dm: MixtureDataModule
    module: MixingLM
    mixing: MixingCallback
    loggers: list
    trainer: L.Trainer


def _build(
    cfg: DictConfig,
    run_dir: Path,
    checked: Preflight,
    extras: dict | None,
    clock: RunClock,
    extra_callbacks: list[L.Callback],
    last: Path,
) -> _Built:
    """Data, module, callbacks, loggers and Trainer, in the order that fixes the random streams."""
    t = cfg.train
    packed = pack_data(cfg, checked.source, checked.tokenizer, checked.groups)
    dm = MixtureDataModule(
        packed,
        batch_size=t.batch_size,
        seed=int(cfg.seed),
        composition=t.composition,
        val_max_seqs=t.val_max_seqs,
        test_max_seqs=t.test_max_seqs,
    )
    module = _build_module(cfg, checked)
    module.run_identity = run_identity(cfg, extras)
    module.clock = clock
    mixing = MixingCallback(checked.method, extras=extras, val_every=int(t.val_every or 0), method_ready=True)
    # after the MixingCallback (it saves post-step state); Lightning moves ModelCheckpoint last
    boundary = StepBoundaryCheckpoint(last if t.checkpoint_every else None, checked.requeue_signal)
    loggers = _loggers(cfg, run_dir)
    callbacks = [*_callbacks(cfg, mixing, boundary, last.parent), *extra_callbacks]
    trainer = _trainer(cfg, checked, loggers, callbacks, run_dir)
    return _Built(packed, dm, module, mixing, loggers, trainer)


def _trainer(
    cfg: DictConfig, checked: Preflight, loggers: list, callbacks: list[L.Callback], run_dir: Path
) -> L.Trainer:
    t = cfg.train
    return L.Trainer(
        max_steps=t.max_steps,
        precision=checked.settings.precision,
        accelerator=checked.settings.accelerator,
        devices=cfg.trainer.devices,
        strategy=str(cfg.trainer.get("strategy") or "auto"),
        logger=loggers,
        callbacks=callbacks,
        log_every_n_steps=t.log_every,
        gradient_clip_val=float(t.grad_clip) if t.grad_clip else None,
        gradient_clip_algorithm="norm",
        enable_checkpointing=bool(t.checkpoint_every),
        enable_progress_bar=bool(cfg.get("progress", True)),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=bool(cfg.trainer.get("deterministic", False)),
        default_root_dir=str(run_dir),
        plugins=[BackgroundCheckpointIO(), *checked.plugins],
    )


def _build_module(cfg: DictConfig, checked: Preflight) -> MixingLM:
    t = cfg.train
    optim = OptimConfig(
        lr=t.lr,
        min_lr=t.min_lr,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
    )
    return MixingLM(
        checked.model_cfg,
        checked.groups,
        max_steps=t.max_steps,
        optim=optim,
        eval_batch_size=t.eval_batch_size,
        log_every=t.log_every,
        settings=checked.settings,
        method=checked.method,
    )


def _callbacks(
    cfg: DictConfig, mixing: MixingCallback, boundary: StepBoundaryCheckpoint, ckpt_dir: Path
) -> list[L.Callback]:
    t = cfg.train
    callbacks: list[L.Callback] = [mixing, boundary]
    if t.checkpoint_every:
        # no version counter: a last.ckpt written by StepBoundaryCheckpoint before the first periodic save
        # is still the one to overwrite (Lightning would start a last-v1.ckpt, and a second resume would
        # go back to the stale last.ckpt)
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=ckpt_dir,
                every_n_train_steps=int(t.checkpoint_every),
                save_last=True,
                save_top_k=0,
                enable_version_counter=False,
            )
        )
    if cfg.get("progress", True):
        callbacks.append(RunProgressBar(mixing, refresh_s=float(cfg.get("progress_refresh", 1.0))))
    return callbacks


def _loggers(cfg: DictConfig, run_dir: Path) -> list:
    if not world.is_launch_zero():
        return []  # one metrics file and one W&B run per run: rank 0's
    loggers: list = [JsonlLogger(run_dir)]
    wb = cfg.logger.wandb
    flat_cfg = OmegaConf.to_container(cfg, resolve=True)
    wandb_logger = make_wandb_logger(run_dir, flat_cfg, wb.project, wb.mode, cfg.get("run_name"), wb.entity)
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    return loggers


def _fit(
    trainer: L.Trainer,
    module: MixingLM,
    dm: MixtureDataModule,
    resumed_from: str | None,
    last: Path,
    resume_hint: str | None,
) -> None:
    """trainer.fit, with a signal or a non-finite loss turned into the message the user needs."""
    module.clock.fit_start = time.time()
    try:
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=resumed_from)
        finally:  # (Lightning's teardown waits too) the messages below say last.ckpt is complete
            wait_for_checkpoint(trainer)
    except SIGTERMException:
        raise _interrupted(signal.SIGTERM, trainer, last, resume_hint) from None
    except RunInterrupted as e:  # the requeue signal (or SIGTERM under DDP): saved at the step boundary
        requeued = requeue_slurm_job() if e.requeue and trainer.is_global_zero else False
        raise _interrupted(e.signum, trainer, last, resume_hint, requeued) from None
    except NonFiniteLossError as e:
        kept = (
            f"; last good checkpoint: {last} (step {module.last_checkpoint_step})"
            if last.exists() and module.last_checkpoint_step is not None
            else "; no checkpoint was written before it"
        )
        raise NonFiniteLossError(f"{e}{kept}") from None
    module.clock.fit_end = time.time()


def _interrupted(
    signum: int, trainer: L.Trainer, last: Path, resume_hint: str | None, requeued: bool = False
) -> RunInterrupted:
    """Say where a signal stopped the run and how it resumes; the exit status is 128 + signum."""
    step = int(trainer.global_step)
    saved = last if last.exists() else None
    name = signal.Signals(signum).name
    if saved is None:
        where, how = "no checkpoint", "the same command starts it again from step 0"
    else:
        where = f"checkpoint {saved}"
        how = "the job was requeued" if requeued else (resume_hint or "run the same command again to resume")
    if trainer.is_global_zero:
        print(f"[aioli_repro] {name}: stopped after step {step}; {where}; {how}", file=sys.stderr)
    return RunInterrupted(signum, step, saved, requeue=requeued)
