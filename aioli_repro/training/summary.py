"""A finished run's summary: what it is built from, how it is logged and printed."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from omegaconf import DictConfig

from aioli_repro.data.datamodule import MixtureDataModule
from aioli_repro.training.callbacks import MixingCallback
from aioli_repro.training.evaluation import avg_ppl, group_perplexities, ppl_of_mean_loss
from aioli_repro.training.loggers import JsonlLogger
from aioli_repro.training.module import MixingLM
from aioli_repro.training.preflight import Preflight

# What the timing fields of a summary cover (a resumed run is several processes).
TIMING_NOTE = (
    "wall_s (data preparation to summary), fit_s (training loop) and method_eval_s (the method's own "
    "validation passes, part of fit_s) add up all processes of the run, an interrupted one up to its last "
    "checkpoint; steps_per_s = steps / fit_s"
)


@dataclass
class RunSummary:
    """What one finished run reports; `summary.json` is `to_json()` (the only place its layout is made)."""

    setting: str
    setting_key: str | None
    groups: list[str]
    method: str
    seed: int
    data: str
    scale: str
    steps: int
    train_tokens: int
    total_tokens: int
    val_loss: dict[str, float]
    test_loss: dict[str, float]
    val_ppl: dict[str, float]
    test_ppl: dict[str, float]
    val_avg_ppl: float
    test_avg_ppl: float
    test_ppl_of_mean_loss: float
    loss_floor: dict[str, float | None]
    final_proportions: dict[str, float]
    learned_proportions: dict[str, float] | None
    # one record per change of the sampling proportions; probe: Aioli's LearnParams mixtures
    trajectory: list[dict]
    val_history: list
    # Aioli: one record per round (A, beta and its per-sweep standard error, P, p)
    method_history: list[dict] | None
    delivered_sequences: dict[str, int]
    resumed_from: str | None
    processes: int
    wall_s: float
    fit_s: float
    steps_per_s: float | None
    method_eval_s: float
    method_evals: int
    timing: str
    run_dir: str

    # fields whose JSON key is a metric path rather than the field name
    JSON_KEYS: ClassVar[dict[str, str]] = {
        "val_avg_ppl": "val/avg_ppl",
        "test_avg_ppl": "test/avg_ppl",
        "test_ppl_of_mean_loss": "test/ppl_of_mean_loss",
    }

    def to_json(self) -> dict[str, Any]:
        return {self.JSON_KEYS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        return cls(**{f.name: data.get(cls.JSON_KEYS.get(f.name, f.name)) for f in fields(cls)})


def summarise(
    cfg: DictConfig,
    checked: Preflight,
    trainer: L.Trainer,
    module: MixingLM,
    mixing: MixingCallback,
    dm: MixtureDataModule,
    packed: Any,
    resumed_from: str | None,
    run_dir: Path,
) -> RunSummary:
    """Evaluate the trained model on val and test and gather the run's numbers."""
    groups, method, t = checked.groups, checked.method, cfg.train
    val, test = module.evaluate("val"), module.evaluate("test")
    step = int(trainer.global_step)
    tokens = step * t.batch_size * t.context_length
    learned = method.final_proportions()
    fit_s = module.clock.fit_s()

    def by_group(values: Any, kind: type = float) -> dict:
        return dict(zip(groups, map(kind, values)))

    return RunSummary(
        setting=cfg.groups.get("label", "/".join(groups)),
        setting_key=cfg.groups.get("key"),
        groups=groups,
        method=cfg.method.name,
        seed=int(cfg.seed),
        data=cfg.data.get("label", "unknown"),
        scale=cfg.get("scale_name", "custom"),
        steps=step,
        train_tokens=tokens,
        total_tokens=tokens,
        val_loss=by_group(val),
        test_loss=by_group(test),
        val_ppl=by_group(group_perplexities(val)),
        test_ppl=by_group(group_perplexities(test)),
        val_avg_ppl=avg_ppl(val),
        test_avg_ppl=avg_ppl(test),
        test_ppl_of_mean_loss=ppl_of_mean_loss(test),
        loss_floor={g: packed.loss_floor(g, "test") for g in groups},
        final_proportions=by_group(method.proportions()),
        learned_proportions=None if learned is None else by_group(learned),
        trajectory=mixing.summary_trajectory(),
        val_history=mixing.val_history,
        method_history=method.history() if callable(getattr(method, "history", None)) else None,
        delivered_sequences=by_group(dm.sampler.delivered, int),
        resumed_from=resumed_from,
        processes=module.clock.prior_processes + 1,
        wall_s=module.clock.wall_s(),
        fit_s=fit_s,
        steps_per_s=(step / fit_s) if fit_s > 0 else None,
        method_eval_s=mixing.method_eval_s,
        method_evals=mixing.method_evals,
        timing=TIMING_NOTE,
        run_dir=str(run_dir),
    )


def log_summary(loggers: list, summary: dict) -> None:
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
