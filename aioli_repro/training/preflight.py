"""Every check bad input can fail, before any folder exists: config, method, data, tokenizer, inputs."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from aioli_repro.config import ConfigError, validate_config
from aioli_repro.data.cache import build_packed
from aioli_repro.data.sampler import ProportionError
from aioli_repro.data.source import DataError
from aioli_repro.data.tokenizer import build_tokenizer
from aioli_repro.mixing.base import MixingContext, MixingMethod
from aioli_repro.model import ModelConfig
from aioli_repro.training.checkpointing import CheckpointError
from aioli_repro.training.device_settings import DeviceSettings, resolve_device_settings
from aioli_repro.training.module import NonFiniteLossError
from aioli_repro.training.run_dirs import RunDirInUse
from aioli_repro.training.slurm import slurm_setup

USER_ERRORS = (ConfigError, DataError, ProportionError, NonFiniteLossError, CheckpointError, RunDirInUse)


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
    settings: DeviceSettings  # precision, fused AdamW, TF32, compile: what differs on a GPU
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
    check_devices(cfg)
    groups = list(cfg.groups.names)
    model_cfg: ModelConfig = build(cfg.model, "model")
    warn_if_slow_on_cpu(cfg, model_cfg)
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
    settings = resolve_device_settings(cfg)
    return Preflight(
        groups, model_cfg, method, source, tokenizer, settings, init_checkpoint, plugins, requeue_signal
    )


def check_devices(cfg: DictConfig) -> None:
    """The accelerator asked for exists here, and a multi-device run is one DDP can train exactly (one
    line, not a traceback)."""
    tr = cfg.trainer
    if str(tr.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator: {tr.accelerator!r} but no CUDA GPU is visible on this machine; use "
            "trainer=default (CPU here, the GPU where there is one) or run on a GPU node"
        )
    n = device_count(tr.devices)
    if n == 1:
        return
    strategy = str(tr.get("strategy") or "auto")
    if strategy != "auto" and (not strategy.startswith("ddp") or any(k in strategy for k in _SPAWNING)):
        raise ConfigError(
            f"trainer.strategy: {strategy!r} with trainer.devices={tr.devices!r}: a multi-device run uses "
            "DDP with one process per device (trainer.strategy=ddp or auto); spawned and "
            "sharded strategies are not supported"
        )
    batch = int(cfg.train.batch_size)
    if n is not None and batch % n:
        raise ConfigError(
            f"train.batch_size: {batch} does not split evenly over trainer.devices={tr.devices!r}: the batch "
            f"is the global one (each device takes batch_size / devices rows); use a multiple of {n}"
        )


_SPAWNING = ("spawn", "fork", "notebook")


def device_count(devices: object) -> int | None:
    """How many devices `trainer.devices` names (None: decided by Lightning at run time, e.g. 'auto')."""
    if isinstance(devices, int):
        return None if devices == -1 else devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        return device_count(int(devices))
    if isinstance(devices, str):
        return None if devices in ("auto", "-1") else len([d for d in devices.split(",") if d.strip()])
    return len(list(devices))


_CPU_FLOPS = 1e11  # a generous multi-core CPU in fp32 (FLOP/s), for the projection below
_warned_slow: set[str] = set()


def warn_if_slow_on_cpu(cfg: DictConfig, model_cfg: ModelConfig) -> None:
    """A paper-size run on a CPU: say once, with the projected time, before it starts."""
    if torch.cuda.is_available() or str(cfg.trainer.accelerator) not in ("auto", "cpu"):
        return
    d, layers, t = model_cfg.d_model, model_cfg.n_layer, cfg.train
    params = 12 * layers * d * d + 2 * model_cfg.vocab_size * d
    flops = 6 * params * int(t.batch_size) * int(t.context_length) * int(t.max_steps)
    hours = flops / _CPU_FLOPS / 3600
    key = f"{params}-{t.max_steps}"
    if hours < 1 or key in _warned_slow:
        return
    _warned_slow.add(key)
    size, steps, rate = f"{params / 1e6:.0f}M", int(t.max_steps), f"{_CPU_FLOPS / 1e9:.0f} GFLOP/s"
    print(
        f"[aioli_repro] warning: no GPU here: a {size}-parameter run of {steps} steps needs about "
        f"{hours:,.0f} h on a CPU even at {rate} (scale={cfg.get('scale_name')}); the CPU scales are "
        "scale=miniature / smoke",
        file=sys.stderr,
    )


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
        raise DataError(f"{e} (command line: data.rebuild_on_mismatch=true)") from None


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
        # sha256 of every file used (about 1 s per GB; a file `make prepare` hashed: its size and mtime)
        verify_checksums=bool(cfg.data.get("verify_checksums", True)),
        rebuild_on_mismatch=bool(cfg.data.get("rebuild_on_mismatch", False)),
    )
