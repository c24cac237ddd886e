"""One training run: `python -m aioli_repro.train [hydra overrides]`.

Builds (or reuses) the packed data cache, the decoder, the mixing method and Lightning's Trainer,
trains, evaluates per-group val/test loss, and writes `summary.json` + `metrics.jsonl` in the run
directory. `run_training(cfg, run_dir)` is the same thing callable in-process (pipelines use it).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from aioli_repro.callback import MixingCallback, RunInterrupted, RunProgressBar, StepBoundaryCheckpoint
from aioli_repro.config import ConfigError, validate_config
from aioli_repro.data.cache import build_packed
from aioli_repro.data.datamodule import MixtureDataModule
from aioli_repro.data.sampler import ProportionError
from aioli_repro.data.source import DataError
from aioli_repro.data.tokenizer import build_tokenizer
from aioli_repro.evaluation import avg_ppl, group_perplexities, ppl_of_mean_loss
from aioli_repro.fileio import atomic_write, atomic_write_json, file_lock, is_locked
from aioli_repro.lm_module import MixingLM, NonFiniteLossError, OptimConfig, RunClock
from aioli_repro.mixing.base import MixingContext, MixingMethod
from aioli_repro.model import ModelConfig, load_decoder_state
from aioli_repro.pipeline.stage import stage_identity
from aioli_repro.run_logging import JsonlLogger, make_wandb_logger


class CheckpointError(RuntimeError):
    """A run directory's checkpoint cannot be resumed from (truncated or corrupt file)."""


class RunDirInUse(RuntimeError):
    """Another process is training in the same run directory."""


# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, once per fit: nothing a user can act
# on, and it repeats for every stage of a sweep.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# ...and advertises a cloud logger at every Trainer construction (once per stage of a sweep).
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip")
)

USER_ERRORS = (ConfigError, DataError, ProportionError, NonFiniteLossError, CheckpointError, RunDirInUse)

# Config keys that may change between a run and its resume without changing what it computes.
_RESUME_FREE = {
    "train": ("checkpoint_every",),
    "trainer": ("slurm_requeue", "requeue_signal"),
    "data": ("verify_checksums", "rebuild_on_mismatch"),
}


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file next to the target, fsync, rename.

    Lightning's own save writes through an fsspec transaction whose temporary file lives in the
    system temp dir, so on a cluster (/tmp local, runs on a shared filesystem) the final move is a
    copy, and a kill during it leaves a truncated `last.ckpt`. Local paths only.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint: storage_options is not supported")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def check_checkpoint_readable(path: Path) -> None:
    """Cheap integrity check (the zip directory at the end of the file) before Lightning unpickles it."""
    try:
        with zipfile.ZipFile(path) as z:
            ok = any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"resume: {path} is not a readable checkpoint ({e}); it was damaged outside this code "
            "(checkpoints are written atomically). Delete it to restart from step 0, or restore a copy"
        ) from e
    if not ok:
        raise CheckpointError(f"resume: {path} is not a torch checkpoint (no data.pkl); delete it to restart")


def run_identity(cfg: DictConfig, extras: dict | None) -> dict:
    """What determines a run's results: the pipeline's stage identity minus keys free to change on resume."""
    ident = stage_identity(cfg, extras)
    for section, free in _RESUME_FREE.items():
        if isinstance(ident.get(section), dict):
            ident[section] = {k: v for k, v in ident[section].items() if k not in free}
    return ident


def slurm_job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_setup(cfg: DictConfig) -> tuple[list, int | None]:
    """(Trainer plugins, requeue signal or None) for this process.

    Under SLURM, Lightning's default SLURMEnvironment(auto_requeue=True) saves an `hpc_ckpt_*.ckpt` from
    inside its SIGUSR1 handler, i.e. in the middle of a step (sampler already advanced, optimizer not),
    and prefers that file on the next start. We keep Lightning's SLURM environment with auto_requeue off
    and handle the requeue signal ourselves at the next step boundary (StepBoundaryCheckpoint), then
    `scontrol requeue` the job: the requeued job resumes exactly.
    """
    plugins: list = []
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer_cfg = cfg.get("trainer") or {}
    if slurm_job_id() is None or not bool(trainer_cfg.get("slurm_requeue", True)):
        return plugins, None
    name = str(trainer_cfg.get("requeue_signal", "SIGUSR1")).upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    allowed = ["SIGUSR1", "SIGUSR2", "SIGHUP", "SIGCONT"]
    if name not in allowed:
        raise ConfigError(f"trainer.requeue_signal: unknown value {name!r}; allowed: {allowed}")
    return plugins, int(getattr(signal, name))


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this job (array task aware); False, with a message, if that fails."""
    job = slurm_job_id()
    if job is None:
        return False
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"[aioli_repro] could not requeue SLURM job {job}: {e}", file=sys.stderr)
        return False
    if r.returncode != 0:
        err = r.stderr.strip()
        print(f"[aioli_repro] scontrol requeue {job} failed ({r.returncode}): {err}", file=sys.stderr)
        return False
    print(f"[aioli_repro] requeued SLURM job {job}", file=sys.stderr)
    return True


def check_prerequisites(method: MixingMethod) -> None:
    """Inputs produced by an earlier stage must exist before any work starts (DoReMi's reference)."""
    if hasattr(method, "reference_checkpoint") and getattr(method, "reference_model", None) is None:
        ref = method.reference_checkpoint
        if not ref:
            raise ConfigError(
                "method.mixer.reference_checkpoint: DoReMi needs the reference model's checkpoint (missing "
                "prerequisite stage); run `python -m aioli_repro.run method=doremi ...`, whose first stage "
                "trains it, or set method.mixer.reference_checkpoint=<run>/checkpoints/final.ckpt"
            )
        if not Path(ref).is_file():
            raise ConfigError(
                f"method.mixer.reference_checkpoint: missing prerequisite stage: {str(ref)!r} does not exist "
                "(the reference run has not finished, or the path is wrong)"
            )


def check_init_checkpoint(extras: dict | None) -> str | None:
    """A branch run starts from an earlier stage's weights (extras["init_checkpoint"]), which must exist."""
    init = (extras or {}).get("init_checkpoint")
    if init and not Path(init).is_file():
        raise ConfigError(
            f"init_checkpoint: missing prerequisite stage: {str(init)!r} does not exist (the parent run has "
            "not finished, or the path is wrong)"
        )
    return init or None


def build(node: DictConfig, field: str) -> Any:
    """`instantiate`, with a bad value or target reported as the user error it is (Hydra wraps them).

    Constructors raise DataError/ValueError/TypeError naming the field; Hydra turns those into a
    multi-line InstantiationException (exit 1, "set HYDRA_FULL_ERROR"), which the entry points would
    not recognise. Other exceptions propagate unchanged: they are bugs, and keep their traceback.
    """
    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, USER_ERRORS):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            msg = str(cause)
            raise ConfigError(msg if msg.startswith(field) else f"{field}: {msg}") from None
        if isinstance(cause, ImportError) or cause is None:
            raise ConfigError(f"{field}._target_: {' '.join(str(e).split())}") from None
        raise


@dataclass
class Preflight:
    """What `preflight` built and checked; `run_training` goes on from here."""

    groups: list[str]
    model_cfg: ModelConfig
    method: MixingMethod  # already set up for this run
    source: Any
    tokenizer: Any
    precision: str
    init_checkpoint: str | None
    plugins: list
    requeue_signal: int | None


def preflight(
    cfg: DictConfig, method: MixingMethod | None = None, extras: dict | None = None, check_inputs: bool = True
) -> Preflight:
    """Every check that bad input can fail, before any folder is created or any work is done: the
    config, the method's options against this run (constructed and set up), the data source's groups,
    the tokenizer against the model, and (`check_inputs`) the files earlier stages produce; a pipeline
    checks its plan before those exist."""
    validate_config(cfg)
    groups = list(cfg.groups.names)
    model_cfg: ModelConfig = build(cfg.model, "model")
    method = method if method is not None else build(cfg.method.mixer, "method.mixer")
    t = cfg.train
    try:
        ctx = MixingContext(groups, int(t.max_steps), int(t.batch_size), int(cfg.seed), dict(extras or {}))
        method.setup(ctx)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    init_checkpoint = None
    if check_inputs:
        check_prerequisites(method)
        init_checkpoint = check_init_checkpoint(extras)
    plugins, requeue_signal = slurm_setup(cfg)
    source, tokenizer = check_data(cfg, groups)
    precision = resolve_precision(str(cfg.trainer.precision))
    return Preflight(
        groups, model_cfg, method, source, tokenizer, precision, init_checkpoint, plugins, requeue_signal
    )


def check_data(cfg: DictConfig, groups: list[str]) -> tuple[Any, Any]:
    """Instantiate the source and tokenizer; check the groups and the vocabulary (no data is read)."""
    source = build(cfg.data.source, "data.source")
    source.validate(groups)  # every group listed and counted (data=local): one error naming all bad ones
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer: {cfg.data.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{cfg.model.vocab_size}; choose a larger model vocab or another tokenizer"
        )
    return source, tokenizer


def report_data(source: Any, groups: list[str], progress: bool = True) -> None:
    """Own folders (data=local): the files each group uses and skips, and why, once per command."""
    if progress and callable(getattr(source, "report", None)):
        from aioli_repro.data.local import format_report

        print(format_report(source.report(groups)), file=sys.stderr)


def pack_data(cfg: DictConfig, source: Any, tokenizer: Any, groups: list[str]) -> Any:
    """The packed-token cache for this run (built on first use)."""
    try:
        return _build_packed(cfg, source, tokenizer, groups)
    except DataError as e:
        if "rebuild_on_mismatch" not in str(e):
            raise
        plus = "" if "rebuild_on_mismatch" in cfg.data else "+"
        raise DataError(f"{e} (command line: {plus}data.rebuild_on_mismatch=true)") from None


def build_data(cfg: DictConfig) -> tuple[object, object]:
    """Instantiate the source and tokenizer, check groups and vocab, return the packed cache."""
    groups = list(cfg.groups.names)
    source, tokenizer = check_data(cfg, groups)
    return source, pack_data(cfg, source, tokenizer, groups)


def _build_packed(cfg: DictConfig, source: object, tokenizer: object, groups: list[str]) -> object:
    return build_packed(
        source,
        tokenizer,
        groups,
        cfg.train.context_length,
        cache_dir=cfg.cache_dir,
        seed=cfg.data.get("seed", 0),
        progress=cfg.get("progress", True),
        # sha256 of every file used (about 1 s per GB): a flipped bit must not reach a results table
        verify_checksums=bool(cfg.data.get("verify_checksums", True)),
        rebuild_on_mismatch=bool(cfg.data.get("rebuild_on_mismatch", False)),
    )


def allow_tf32() -> None:
    """On CUDA, let fp32 matmuls left outside bf16 autocast use TF32 (Ampere and later).

    Called for mixed-precision runs only, which already trade exactness for speed; a run asking for
    precision=32 keeps full fp32."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def resolve_precision(value: str) -> str:
    if value == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return value


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
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _run_dir_lock(run_dir):
            return _run_training(cfg, run_dir, checked, extras, clock, resume_hint, list(callbacks or []))
    except BaseException:
        if created:  # failed before writing anything (e.g. while reading the data): no empty folder
            remove_if_unused(run_dir)
        raise


@contextmanager
def _run_dir_lock(run_dir: Path) -> Iterator[None]:
    """One training process per run directory (two would interleave logs and overwrite checkpoints).

    Non-blocking, unlike the pipeline's stage lock (which waits, then reuses the finished stage): two
    plain train commands that land in one directory (e.g. started in the same second) are a mistake.
    """
    with ExitStack() as held:
        try:
            held.enter_context(file_lock(run_dir / ".train.lock", blocking=False))
        except BlockingIOError:
            raise RunDirInUse(
                f"run directory {run_dir} is in use by another training process; wait for it to finish "
                "or pick another directory (hydra.run.dir=...)"
            ) from None
        yield


def _run_dir_busy(run_dir: Path) -> bool:
    """Is a training process holding `run_dir`'s lock right now?"""
    return is_locked(run_dir / ".train.lock")


def _run_training(
    cfg: DictConfig,
    run_dir: Path,
    checked: Preflight,
    extras: dict | None,
    clock: RunClock,
    resume_hint: str | None,
    extra_callbacks: list[L.Callback],
) -> dict:
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    if checked.precision.startswith("bf16"):
        allow_tf32()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if last.exists():
        check_checkpoint_readable(last)
    for leftover in ckpt_dir.glob("*.tmp-*"):  # from a save killed half-way (never renamed into place)
        leftover.unlink(missing_ok=True)
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
    trainer = L.Trainer(
        max_steps=t.max_steps,
        precision=checked.precision,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        logger=loggers,
        callbacks=[*_callbacks(cfg, mixing, boundary, ckpt_dir), *extra_callbacks],
        log_every_n_steps=t.log_every,
        enable_checkpointing=bool(t.checkpoint_every),
        enable_progress_bar=bool(cfg.get("progress", True)),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=bool(cfg.trainer.get("deterministic", False)),
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO(), *checked.plugins],
    )
    resumed_from = str(last) if last.exists() else None
    if checked.init_checkpoint and resumed_from is None:  # a resumed branch run has its weights in last.ckpt
        module.model.load_state_dict(load_decoder_state(checked.init_checkpoint))
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True).encode()
    atomic_write(run_dir / "config.yaml", lambda f: f.write(config_yaml))
    _fit(trainer, module, dm, resumed_from, last, resume_hint)
    # the final weights, for later stages (DoReMi's reference model)
    trainer.save_checkpoint(ckpt_dir / "final.ckpt", weights_only=True)
    summary = _summary(cfg, extras, checked, trainer, module, mixing, dm, packed, resumed_from, run_dir)
    _finish_loggers(loggers, summary)
    atomic_write_json(run_dir / "summary.json", summary)  # last: its presence marks the run finished
    return summary


def _build_module(cfg: DictConfig, checked: Preflight) -> MixingLM:
    t = cfg.train
    optim = OptimConfig(
        lr=t.lr,
        min_lr=t.min_lr,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
    )
    return MixingLM(
        checked.model_cfg,
        checked.groups,
        max_steps=t.max_steps,
        optim=optim,
        eval_batch_size=t.eval_batch_size,
        log_every=t.log_every,
        compile=bool(t.get("compile", False)),
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
        trainer.fit(module, datamodule=dm, ckpt_path=resumed_from)
    except SIGTERMException:
        raise _interrupted(signal.SIGTERM, trainer, last, resume_hint) from None
    except RunInterrupted as e:  # the requeue signal: checkpoint written at the step boundary
        requeued = requeue_slurm_job() if trainer.is_global_zero else False
        raise _interrupted(e.signum, trainer, last, resume_hint, requeued) from None
    except NonFiniteLossError as e:
        kept = (
            f"; last good checkpoint: {last} (step {module.last_checkpoint_step})"
            if last.exists() and module.last_checkpoint_step is not None
            else "; no checkpoint was written before it"
        )
        raise NonFiniteLossError(f"{e}{kept}") from None
    module.clock.fit_end = time.time()


# What the timing fields of a summary cover (a resumed run is several processes).
TIMING_NOTE = (
    "wall_s (data preparation to summary), fit_s (training loop) and method_eval_s (the method's own "
    "validation passes, part of fit_s) add up all processes of the run, an interrupted one up to its last "
    "checkpoint; steps_per_s = steps / fit_s"
)


def _summary(
    cfg: DictConfig,
    extras: dict | None,
    checked: Preflight,
    trainer: L.Trainer,
    module: MixingLM,
    mixing: MixingCallback,
    dm: MixtureDataModule,
    packed: Any,
    resumed_from: str | None,
    run_dir: Path,
) -> dict:
    groups, method, t = checked.groups, checked.method, cfg.train
    val = module.evaluate("val")
    test = module.evaluate("test")
    step = int(trainer.global_step)
    tokens = step * t.batch_size * t.context_length
    learned = method.final_proportions()
    fit_s = module.clock.fit_s()
    return {
        "setting": cfg.groups.get("label", "/".join(groups)),
        "setting_key": cfg.groups.get("key"),
        "groups": groups,
        "method": cfg.method.name,
        "seed": int(cfg.seed),
        "data": cfg.data.get("label", "unknown"),
        "scale": cfg.get("scale_name", "custom"),
        "steps": step,
        "train_tokens": tokens,
        "total_tokens": tokens + int((extras or {}).get("prior_tokens", 0)),
        "val_loss": dict(zip(groups, map(float, val))),
        "test_loss": dict(zip(groups, map(float, test))),
        "val_ppl": dict(zip(groups, map(float, group_perplexities(val)))),
        "test_ppl": dict(zip(groups, map(float, group_perplexities(test)))),
        "val/avg_ppl": avg_ppl(val),
        "test/avg_ppl": avg_ppl(test),
        "test/ppl_of_mean_loss": ppl_of_mean_loss(test),
        "loss_floor": {g: packed.loss_floor(g, "test") for g in groups},
        "final_proportions": dict(zip(groups, map(float, method.proportions()))),
        "learned_proportions": (None if learned is None else dict(zip(groups, map(float, learned)))),
        # one record per change of the sampling proportions; probe: Aioli's LearnParams mixtures
        "trajectory": mixing.summary_trajectory(),
        "val_history": mixing.val_history,
        # Aioli: one record per round (A, beta and its per-sweep standard error, P, p)
        "method_history": method.history() if callable(getattr(method, "history", None)) else None,
        "delivered_sequences": dict(zip(groups, map(int, dm.sampler.delivered))),
        "resumed_from": resumed_from,
        "processes": module.clock.prior_processes + 1,
        "wall_s": module.clock.wall_s(),
        "fit_s": fit_s,
        "steps_per_s": (step / fit_s) if fit_s > 0 else None,
        "method_eval_s": mixing.method_eval_s,
        "method_evals": mixing.method_evals,
        "timing": TIMING_NOTE,
        "run_dir": str(run_dir),
    }


def _finish_loggers(loggers: list, summary: dict) -> None:
    step = summary["steps"]
    for logger in loggers:
        logger.log_metrics(
            {
                **{f"test/loss/{g}": v for g, v in summary["test_loss"].items()},
                **{f"test/ppl/{g}": v for g, v in summary["test_ppl"].items()},
                **{f"val/loss/{g}": v for g, v in summary["val_loss"].items()},
                "test/avg_ppl": summary["test/avg_ppl"],
                "val/avg_ppl": summary["val/avg_ppl"],
                "test/ppl_of_mean_loss": summary["test/ppl_of_mean_loss"],
            },
            step=step,
        )
    wandb_logger = next((lg for lg in loggers if not isinstance(lg, JsonlLogger)), None)
    if wandb_logger is not None:
        for k in ("test/avg_ppl", "val/avg_ppl", "test/ppl_of_mean_loss", "train_tokens", "total_tokens"):
            wandb_logger.experiment.summary[k] = summary[k]
        wandb_logger.experiment.summary["summary_json"] = json.dumps(
            {k: v for k, v in summary.items() if k not in ("trajectory", "val_history", "method_history")}
        )
        wandb_logger.experiment.finish()
    for logger in loggers:
        logger.finalize("success")


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
    print(f"[aioli_repro] {name}: stopped after step {step}; {where}; {how}", file=sys.stderr)
    return RunInterrupted(signum, step, saved, requeue=requeued)


# -- run directories of `python -m aioli_repro.train` ---------------------------------------------------
@dataclass
class UnfinishedRun:
    run_dir: Path
    step: int


_DATE_DIR = re.compile(r"\d{4}-\d{2}-\d{2}")
# what a run directory holds before the run writes anything: Hydra's record, the training lock
UNUSED_RUN_FILES = frozenset({".hydra", ".train.lock"})


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it (as the user typed outputs/...)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def default_layout(run_dir: Path, run_name: str) -> bool:
    """Is `run_dir` `<root>/<date>/<time>-<run_name>` (conf/train.yaml's hydra.run.dir)?"""
    time_dir = re.fullmatch(r"\d{2}-\d{2}-\d{2}-" + re.escape(run_name), run_dir.name)
    return bool(time_dir and _DATE_DIR.fullmatch(run_dir.parent.name))


def find_unfinished_run(cfg: DictConfig, fresh: Path, extras: dict | None = None) -> UnfinishedRun | None:
    """The newest earlier run of the same command that did not finish: a directory
    `<root>/<date>/<time>-<run_name>` beside `fresh` with `checkpoints/last.ckpt`, no `summary.json`, the
    same run identity (read from the checkpoint, as a resume checks it) and no process training in it.

    Candidates that cannot be resumed safely (another process trains in it, an unreadable checkpoint)
    are named on stderr and left alone.
    """
    run_name = str(cfg.run_name)
    want = json.loads(json.dumps(run_identity(cfg, extras), sort_keys=True, default=str))
    for d in sorted(fresh.parent.parent.glob(f"*/*-{glob.escape(run_name)}"), reverse=True):
        last = d / "checkpoints" / "last.ckpt"
        if d == fresh or not default_layout(d, run_name) or not last.is_file():
            continue
        if (d / "summary.json").exists():
            continue
        head = _checkpoint_head(last)
        if head is None or head[0] != want:
            continue  # unreadable (said), or another config under the same name
        if _run_dir_busy(d):
            print(f"[aioli_repro] not resuming {_shown(d)}: another process trains in it", file=sys.stderr)
            continue
        return UnfinishedRun(d, head[1])
    return None


def _checkpoint_head(last: Path) -> tuple[dict | None, int] | None:
    """(run identity, step) of a checkpoint, read without loading its tensors; None if unreadable."""
    try:
        check_checkpoint_readable(last)
        ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        identity = ckpt["aioli_repro"]["identity"]
        return (None if identity is None else json.loads(identity)), int(ckpt["global_step"])
    except Exception as e:  # noqa: BLE001 - whatever the damage: say so and leave the run alone
        print(f"[aioli_repro] not resuming {_shown(last)}: unreadable checkpoint ({e})", file=sys.stderr)
        return None


def remove_if_unused(
    run_dir: Path, parent_too: bool = False, unused: frozenset[str] = UNUSED_RUN_FILES
) -> None:
    """Remove a run directory that holds nothing the run wrote (only names in `unused`: Hydra's
    `.hydra`, the lock file), and with `parent_too` its parent (a date folder) if that is then empty."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or any(p.name not in unused for p in run_dir.iterdir()):
        return
    for p in run_dir.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # another process may have written there meanwhile
        run_dir.rmdir()
        if parent_too:
            run_dir.parent.rmdir()


def format_summary(summary: dict) -> str:
    """A small per-group table for the terminal."""
    lines = [f"{summary['method']} on {summary['setting']} ({summary['data']}), seed {summary['seed']}:"]
    lines.append(f"  {'group':<16}{'val loss':>10}{'test loss':>11}{'test ppl':>11}{'floor':>9}")
    for g in summary["groups"]:
        floor = summary["loss_floor"].get(g)
        fl = f"{floor:9.3f}" if floor is not None else f"{'-':>9}"
        lines.append(
            f"  {g:<16}{summary['val_loss'][g]:>10.4f}{summary['test_loss'][g]:>11.4f}"
            f"{summary['test_ppl'][g]:>11.3f}{fl}"
        )
    lines.append(
        f"  test/avg_ppl = {summary['test/avg_ppl']:.4f}   "
        f"(exp of mean loss {summary['test/ppl_of_mean_loss']:.4f})"
    )
    p = ", ".join(f"{g}={v:.3f}" for g, v in summary["final_proportions"].items())
    lines.append(f"  final proportions: {p}")
    lines.append(f"  {summary['steps']} steps, {summary['train_tokens']:,} tokens, {summary['wall_s']:.1f} s")
    return "\n".join(lines)


def user_error_exit(e: Exception) -> None:
    """One line on stderr (no traceback) and exit status 2."""
    msg = " ".join(str(e).split())
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _explicit_run_dir(hc: Any) -> str | None:
    """The `hydra.run.dir=...` given on the command line, if any."""
    given = [o.split("=", 1) for o in hc.overrides.hydra]
    values = [kv[1] for kv in given if len(kv) == 2 and kv[0].lstrip("+") == "hydra.run.dir"]
    return values[-1] if values else None


def _same_command_finds(hc: Any, fresh: Path, run_name: str) -> bool:
    """Does running this command again land in the same run directory (directly, or by the lookup)?"""
    from hydra.types import RunMode

    if hc.mode != RunMode.RUN:
        return False  # a multirun job's folder is under a new sweep folder every time
    explicit = _explicit_run_dir(hc)
    if explicit is not None:
        return "${" not in explicit  # e.g. ${now:...}: a new folder every time
    return default_layout(fresh, run_name)


def resume_hint(hc: Any, fresh: Path, run_dir: Path, run_name: str) -> str:
    """The interruption message's advice: the same command if it finds `run_dir` again, else the exact
    command that does."""
    if _same_command_finds(hc, fresh, run_name):
        return f"run the same command again to resume it (in {_shown(run_dir)})"
    args = [*hc.overrides.task, f"hydra.run.dir={run_dir}"]
    return f"resume with: python -m aioli_repro.train {shlex.join(args)}"


def _resume_target(cfg: DictConfig, hc: Any, fresh: Path) -> Path:
    """Where this command trains: an unfinished earlier run of the same command, or Hydra's new folder."""
    run_name = str(cfg.run_name)
    if _explicit_run_dir(hc) is not None or not _same_command_finds(hc, fresh, run_name):
        return fresh  # an explicit run dir resumes by itself (run_training finds its checkpoint)
    found = find_unfinished_run(cfg, fresh)
    if found is None:
        return fresh
    print(f"[aioli_repro] resuming {_shown(found.run_dir)} from step {found.step}", file=sys.stderr)
    remove_if_unused(fresh, parent_too=True)
    return found.run_dir


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    fresh = Path(hc.runtime.output_dir)
    try:
        checked = preflight(cfg)
        report_data(checked.source, checked.groups, bool(cfg.get("progress", True)))
        run_dir = _resume_target(cfg, hc, fresh)
        hint = resume_hint(hc, fresh, run_dir, str(cfg.run_name))
        summary = run_training(cfg, run_dir, checked=checked, resume_hint=hint)
    except USER_ERRORS as e:
        user_error_exit(e)
    finally:  # a run that failed before writing anything leaves no folder behind
        remove_if_unused(fresh, parent_too=default_layout(fresh, str(cfg.run_name)))
    print(format_summary(summary))
    print(f"summary: {run_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
