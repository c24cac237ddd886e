"""One small W&B run per finished pipeline: its headline numbers, config and proportion trajectory.

Dashboards then need no per-stage runs, and `aioli_repro.results.load` reads these runs (or the
pipeline `summary.json` files) back into one frame.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from aioli_repro.training.callbacks import trajectory_records
from aioli_repro.training.loggers import wandb_online_problem

KIND = "pipeline"  # config["kind"] that marks a pipeline run among the per-stage runs


def finite(v: Any) -> float | None:
    """A float, or None for missing/non-finite values (W&B's JSON cannot carry NaN/inf portably)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def pipeline_config(summary: dict, out_dir: str | Path | None = None) -> dict:
    """The W&B config of a pipeline run (what identifies it; numbers go to the summary)."""
    cfg = {
        "kind": KIND,
        "method": summary["method"],
        "setting": summary["setting"],
        "groups": list(summary["groups"]),
        "seed": int(summary["seed"]),
        "scale": summary.get("scale"),
        "data": summary.get("data"),
        "stages": [s["name"] for s in summary.get("stages", [])],
        "extra_runs": int(summary.get("extra_runs", 0)),
    }
    if out_dir is not None:
        cfg["pipeline_dir"] = str(out_dir)
    for key in ("variant", "base_method"):  # Table 3 (restricted setting) markers, when present
        if summary.get(key) is not None:
            cfg[key] = summary[key]
    return {k: v for k, v in cfg.items() if v is not None}


def flat_metrics(summary: dict) -> dict[str, float]:
    """The pipeline summary's numbers as flat W&B summary keys (non-finite values left out)."""
    out: dict[str, Any] = {
        "test/avg_ppl": summary.get("test/avg_ppl"),
        "val/avg_ppl": summary.get("val/avg_ppl"),
        "test/ppl_of_mean_loss": summary.get("test/ppl_of_mean_loss"),
    }
    for name, prefix in (
        ("test_loss", "test/loss"),
        ("val_loss", "val/loss"),
        ("test_ppl", "test/ppl"),
        ("final_proportions", "p"),
        ("learned_proportions", "learned"),
    ):
        for g, v in (summary.get(name) or {}).items():
            out[f"{prefix}/{g}"] = v
    out = {k: finite(v) for k, v in out.items()}
    for k in ("total_tokens", "train_tokens"):  # kept as ints so both sources give identical frames
        if summary.get(k) is not None:
            out[k] = int(summary[k])
    return {k: v for k, v in out.items() if v is not None}


def _trajectory_rows(summary: dict) -> list[tuple[int, dict[str, float]]]:
    """`p/<g>` rows by step; W&B drops non-increasing steps, so keep the last entry per step, sorted."""
    by_step: dict[int, dict[str, float]] = {}
    for rec in trajectory_records(summary):
        row = {f"p/{g}": finite(v) for g, v in rec["p"].items()}
        by_step[rec["step"]] = {k: v for k, v in row.items() if v is not None}
    return sorted(by_step.items())


def _settings(wandb: Any) -> Any:
    # No stats sampler, git probe, code/requirements upload or console capture: the run is a few
    # records, and these are what make wandb.init slow. Unknown fields (older wandb) are dropped.
    wanted = {
        "silent": True, "console": "off", "x_disable_stats": True, "x_disable_meta": True,
        "x_disable_machine_info": True, "disable_git": True, "save_code": False,
        "disable_job_creation": True, "x_save_requirements": False, "init_timeout": 30.0,
    }  # fmt: skip
    fields = getattr(wandb.Settings, "model_fields", None)
    if fields is not None:
        wanted = {k: v for k, v in wanted.items() if k in fields}
    return wandb.Settings(**wanted)


def log_pipeline_run(
    summary: dict,
    out_dir: str | Path,
    mode: str = "offline",
    project: str = "aioli_repro",
    entity: str | None = None,
) -> Path | None:
    """Write one W&B run for a finished pipeline under `out_dir/wandb`; return its run directory.

    `out_dir` should be the pipeline directory (the parent of its summary.json): it is recorded as
    `config.pipeline_dir` and names the run in `load_runs` (`run_key`). mode "online" falls back to
    offline when W&B is unreachable or not logged in; "disabled" logs nothing and returns None. A W&B
    failure is reported as a warning and returns None, so it never costs a finished pipeline.
    """
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"mode: unknown value {mode!r}; allowed: ['offline', 'online', 'disabled']")
    if mode == "disabled":
        return None
    import wandb

    problem = wandb_online_problem() if mode == "online" else None
    if problem is not None:
        print(f"[aioli_repro] W&B online mode unavailable ({problem}): logging the pipeline run offline.")
        mode = "offline"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = pipeline_config(summary, out_dir)
    name = f"{summary['method']}-{summary['setting']}-s{int(summary['seed'])}"
    kwargs: dict[str, Any] = dict(
        mode=mode, dir=str(out_dir), project=project, entity=entity, name=name, job_type=KIND,
        config=config, tags=[str(summary["method"]), str(summary["setting"]), str(summary.get("scale"))],
        settings=_settings(wandb),
    )  # fmt: skip
    try:
        # an independent run: never finish or replace a run the caller has open
        run = wandb.init(reinit="create_new", **kwargs)
        for step, row in _trajectory_rows(summary):
            run.log(row, step=step, commit=True)  # commit now, so the summary below is written last
        run.summary.update(flat_metrics(summary))
        run_id = run.id
        run_dir = Path(run.settings.sync_dir) if getattr(run.settings, "sync_dir", None) else None
        run.finish()
    except Exception as e:  # logging must not lose a finished pipeline
        warnings.warn(f"log_pipeline_run: W&B logging failed ({type(e).__name__}: {e})", stacklevel=2)
        return None
    if run_dir is None or not run_dir.exists():
        runs = sorted((out_dir / "wandb").glob(f"*run-*-{run_id}"))
        run_dir = runs[-1] if runs else out_dir / "wandb"
    return run_dir
