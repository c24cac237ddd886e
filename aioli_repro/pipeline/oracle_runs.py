"""The oracle check's runs (issue 25, docs/miniature.md): one long LearnParams round from a model trained
t0 steps on the uniform mixture, evaluated on the whole val split (the oracle) and on the run's val cap
(whose 4-sweep blocks are the miniature-budget estimates).

Both runs are `method=aioli` pipelines with the restricted setting's prior phase (t0 steps on uniform) and
a single round (update_steps = max_steps − t0) of `SWEEPS` sweeps; only the evaluation differs, so their
training is identical. The analysis is `results.oracle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from aioli_repro.pipeline.sweep import Job, compose_job, jobs_for

SWEEPS = 32  # 8 blocks of the released k = 4
ALL_SEQS = 1_000_000  # more than any val split holds: every sequence


def round_starts(cfg: DictConfig) -> list[int]:
    """t0 = the end of warm-up and mid-run (pre-registered: 84 and 420 at the miniature's m = 3)."""
    return [int(cfg.train.warmup_steps), int(cfg.train.max_steps) // 2]


def oracle_overrides(cfg: DictConfig, t0: int, full: bool) -> list[str]:
    m = len(cfg.groups.names)
    prior = [round(1.0 / m, 6)] * m
    prior[-1] = round(1.0 - sum(prior[:-1]), 6)
    name = f"oracle_{'full' if full else 'cap'}_t{t0}"
    return [
        "method=aioli",
        f"method.name={name}",
        f"method.mixer.prior=[{','.join(map(str, prior))}]",
        f"method.mixer.prior_steps={t0}",
        f"method.mixer.update_steps={int(cfg.train.max_steps) - t0}",
        f"method.mixer.lp_rounds={SWEEPS}",
        f"method.mixer.eval_max_seqs={ALL_SEQS if full else 'null'}",
    ]


def oracle_jobs(
    settings: Sequence[str], seeds: Sequence[int], base: list[str], results_dir: Path
) -> tuple[list[Job], list[str]]:
    """(the jobs, one line per (setting, t0) skipped because a round of SWEEPS sweeps does not fit)."""
    overrides, skipped = [], []
    for setting in settings:
        cfg = compose_job([*base, "method=aioli", f"groups={setting}"])
        m, steps = len(cfg.groups.names), int(cfg.train.max_steps)
        for t0 in round_starts(cfg):
            need = SWEEPS * m * int(cfg.method.mixer.lp_steps)
            if need >= steps - t0:
                skipped.append(f"{setting} t0={t0}: {need} probe steps do not fit in {steps - t0}")
                continue
            for full in (True, False):
                head = [*base, f"groups={setting}", *oracle_overrides(cfg, t0, full)]
                overrides += [[*head, f"seed={s}"] for s in seeds]
    return jobs_for(overrides, results_dir, "sensitivity"), skipped
