"""One training run: `python -m aioli_repro.train [hydra overrides]`.

Builds (or reuses) the packed data cache, the decoder, the mixing method and Lightning's Trainer,
trains, evaluates per-group val/test loss, and writes `summary.json` + `metrics.jsonl` in the run
directory. `run_training(cfg, run_dir)` is the same thing callable in-process (pipelines use it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from aioli_repro.callback import MixingCallback
from aioli_repro.config import ConfigError, validate_config
from aioli_repro.data.cache import build_packed
from aioli_repro.data.datamodule import MixtureDataModule
from aioli_repro.data.sampler import ProportionError
from aioli_repro.data.source import DataError
from aioli_repro.data.tokenizer import build_tokenizer
from aioli_repro.evaluation import avg_ppl, group_perplexities, ppl_of_mean_loss
from aioli_repro.lm_module import MixingLM, NonFiniteLossError, OptimConfig
from aioli_repro.mixing.base import MixingContext, MixingMethod
from aioli_repro.model import ModelConfig
from aioli_repro.run_logging import JsonlLogger, make_wandb_logger

USER_ERRORS = (ConfigError, DataError, ProportionError, NonFiniteLossError)


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def build_data(cfg: DictConfig) -> tuple[object, object]:
    """Instantiate the source and tokenizer, check groups and vocab, return the packed cache."""
    source = instantiate(cfg.data.source)
    groups = list(cfg.groups.names)
    source.check_groups(groups)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer: {cfg.data.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{cfg.model.vocab_size}; choose a larger model vocab or another tokenizer"
        )
    packed = build_packed(
        source,
        tokenizer,
        groups,
        cfg.train.context_length,
        cache_dir=cfg.cache_dir,
        seed=cfg.data.get("seed", 0),
        progress=cfg.get("progress", True),
    )
    return source, packed


def resolve_precision(value: str) -> str:
    if value == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return value


def run_training(
    cfg: DictConfig,
    run_dir: str | Path,
    method: MixingMethod | None = None,
    extras: dict | None = None,
) -> dict:
    """Train one run as configured; return (and write) its summary. Resumes from `run_dir/checkpoints/last.ckpt`."""
    validate_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    groups = list(cfg.groups.names)
    model_cfg: ModelConfig = instantiate(cfg.model)
    method = method if method is not None else instantiate(cfg.method.mixer)
    t = cfg.train
    # Validate the method's options against the run before any data is packed (setup runs again in fit).
    try:
        method.setup(MixingContext(groups, int(t.max_steps), int(t.batch_size), int(cfg.seed), dict(extras or {})))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    _, packed = build_data(cfg)
    dm = MixtureDataModule(
        packed,
        batch_size=t.batch_size,
        seed=int(cfg.seed),
        composition=t.composition,
        val_max_seqs=t.val_max_seqs,
        test_max_seqs=t.test_max_seqs,
    )
    optim = OptimConfig(
        lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, grad_clip=t.grad_clip
    )
    module = MixingLM(
        model_cfg,
        groups,
        max_steps=t.max_steps,
        optim=optim,
        eval_batch_size=t.eval_batch_size,
        log_every=t.log_every,
        compile=bool(t.get("compile", False)),
    )
    mixing = MixingCallback(method, extras=extras, val_every=int(t.val_every or 0))
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[L.Callback] = [mixing]
    if t.checkpoint_every:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=ckpt_dir, every_n_train_steps=int(t.checkpoint_every), save_last=True, save_top_k=0
            )
        )
    if cfg.get("progress", True):
        callbacks.append(L.pytorch.callbacks.TQDMProgressBar(refresh_rate=int(cfg.get("progress_refresh", 20))))

    flat_cfg = OmegaConf.to_container(cfg, resolve=True)
    loggers: list = [JsonlLogger(run_dir)]
    wb = cfg.logger.wandb
    wandb_logger = make_wandb_logger(run_dir, flat_cfg, wb.project, wb.mode, cfg.get("run_name"), wb.entity)
    if wandb_logger is not None:
        loggers.append(wandb_logger)

    trainer = L.Trainer(
        max_steps=t.max_steps,
        precision=resolve_precision(cfg.trainer.precision),
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        logger=loggers,
        callbacks=callbacks,
        log_every_n_steps=t.log_every,
        enable_checkpointing=bool(t.checkpoint_every),
        enable_progress_bar=bool(cfg.get("progress", True)),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=bool(cfg.trainer.get("deterministic", False)),
        default_root_dir=str(run_dir),
    )
    last = ckpt_dir / "last.ckpt"
    resumed_from = str(last) if last.exists() else None
    t_fit = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=resumed_from)
    fit_s = time.time() - t_fit
    # the final weights, for later stages (DoReMi's reference model)
    trainer.save_checkpoint(ckpt_dir / "final.ckpt", weights_only=True)

    val = module.evaluate("val")
    test = module.evaluate("test")
    step = int(trainer.global_step)
    tokens = step * t.batch_size * t.context_length
    summary = {
        "setting": cfg.groups.get("label", "/".join(groups)),
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
        "learned_proportions": (
            None if method.final_proportions() is None else dict(zip(groups, map(float, method.final_proportions())))
        ),
        "trajectory": mixing.trajectory,
        "val_history": mixing.val_history,
        "delivered_sequences": dict(zip(groups, map(int, dm.sampler.delivered))),
        "resumed_from": resumed_from,
        "wall_s": time.time() - t0,
        "fit_s": fit_s,
        "steps_per_s": (step / fit_s) if fit_s > 0 else None,
        "run_dir": str(run_dir),
    }
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
    if wandb_logger is not None:
        for k in ("test/avg_ppl", "val/avg_ppl", "test/ppl_of_mean_loss", "train_tokens", "total_tokens"):
            wandb_logger.experiment.summary[k] = summary[k]
        wandb_logger.experiment.summary["summary_json"] = json.dumps(
            {k: v for k, v in summary.items() if k not in ("trajectory", "val_history")}
        )
        wandb_logger.experiment.finish()
    for logger in loggers:
        logger.finalize("success")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    _atomic_write_json(run_dir / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    """A small per-group table for the terminal."""
    lines = [f"{summary['method']} on {summary['setting']} ({summary['data']}), seed {summary['seed']}:"]
    lines.append(f"  {'group':<16}{'val loss':>10}{'test loss':>11}{'test ppl':>11}{'floor':>9}")
    for g in summary["groups"]:
        floor = summary["loss_floor"].get(g)
        fl = f"{floor:9.3f}" if floor is not None else f"{'-':>9}"
        lines.append(
            f"  {g:<16}{summary['val_loss'][g]:>10.4f}{summary['test_loss'][g]:>11.4f}{summary['test_ppl'][g]:>11.3f}{fl}"
        )
    lines.append(f"  test/avg_ppl = {summary['test/avg_ppl']:.4f}   (exp of mean loss {summary['test/ppl_of_mean_loss']:.4f})")
    p = ", ".join(f"{g}={v:.3f}" for g, v in summary["final_proportions"].items())
    lines.append(f"  final proportions: {p}")
    lines.append(f"  {summary['steps']} steps, {summary['train_tokens']:,} tokens, {summary['wall_s']:.1f} s")
    return "\n".join(lines)


def user_error_exit(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_training(cfg, run_dir)
    except USER_ERRORS as e:
        user_error_exit(e)
    print(format_summary(summary))
    print(f"summary: {run_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
