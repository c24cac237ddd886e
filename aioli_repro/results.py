"""Results layer: one small W&B run per finished pipeline, and one tidy frame of all pipelines.

`log_pipeline_run` writes a pipeline's headline numbers (config + flat summary + proportion trajectory)
as its own W&B run, so dashboards do not need the per-stage runs. `load_runs` returns the same frame
from the pipeline `summary.json` files, from offline `.wandb` files (read with `wandb_offline`), or from
the W&B server (`load_runs_online`), so tables and notebooks work the same way on every machine.
"""

from __future__ import annotations

import json
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from aioli_repro import wandb_offline
from aioli_repro.callback import trajectory_records

SOURCES = ("auto", "summary", "wandb", "online")
KIND = "pipeline"  # config["kind"] that marks a pipeline run among the per-stage runs
# Leading columns of the frame; per-group columns (test_loss/<g>, val_loss/<g>, test_ppl/<g>) follow.
BASE_COLUMNS = [
    "setting", "method", "seed", "scale", "data", "groups", "variant", "base_method",
    "test_avg_ppl", "val_avg_ppl", "test_ppl_of_mean_loss", "total_tokens", "train_tokens", "extra_runs",
    "proportions", "learned_proportions", "stage", "run_key",
]  # fmt: skip
GROUP_METRICS = (("test_loss", "test/loss"), ("val_loss", "val/loss"), ("test_ppl", "test/ppl"))


# -- logging -----------------------------------------------------------------------------------------
def _finite(v: Any) -> float | None:
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
    out = {k: _finite(v) for k, v in out.items()}
    for k in ("total_tokens", "train_tokens"):  # kept as ints so both sources give identical frames
        if summary.get(k) is not None:
            out[k] = int(summary[k])
    return {k: v for k, v in out.items() if v is not None}


def _trajectory_rows(summary: dict) -> list[tuple[int, dict[str, float]]]:
    """`p/<g>` rows by step; W&B drops non-increasing steps, so keep the last entry per step, sorted."""
    by_step: dict[int, dict[str, float]] = {}
    for rec in trajectory_records(summary):
        row = {f"p/{g}": _finite(v) for g, v in rec["p"].items()}
        by_step[rec["step"]] = {k: v for k, v in row.items() if v is not None}
    return sorted(by_step.items())


def _wandb_reachable(timeout: float = 5.0) -> bool:
    try:
        import wandb

        # prompt=False, verify=False: only asks whether a key is configured (no network, no prompt)
        if not (os.environ.get("WANDB_API_KEY") or wandb.login(prompt=False, verify=False)):
            return False
    except Exception:
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


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

    if mode == "online" and not _wandb_reachable():
        print("[aioli_repro] W&B is unreachable or not logged in: logging the pipeline run offline.")
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


# -- loading -----------------------------------------------------------------------------------------
def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def summary_row(s: dict, path: str, run_key: str) -> dict:
    """One frame row from a pipeline summary dict (or one rebuilt from W&B by `_summary_from_wandb`)."""
    groups = tuple(s["groups"])
    learned = s.get("learned_proportions")
    row: dict[str, Any] = {
        "setting": s["setting"],
        "method": s["method"],
        "seed": int(s["seed"]),
        "scale": s.get("scale"),
        "data": s.get("data"),
        "groups": groups,
        "variant": s.get("variant"),
        "base_method": s.get("base_method"),
        "test_avg_ppl": _num(s.get("test/avg_ppl")),
        "val_avg_ppl": _num(s.get("val/avg_ppl")),
        "test_ppl_of_mean_loss": _num(s.get("test/ppl_of_mean_loss")),
        "total_tokens": _int(s.get("total_tokens")),
        "train_tokens": _int(s.get("train_tokens")),
        "extra_runs": _int(s.get("extra_runs")),
        "proportions": {g: _num((s.get("final_proportions") or {}).get(g)) for g in groups},
        "learned_proportions": {g: _num(learned.get(g)) for g in groups} if learned else None,
        "stage": "final",
        "run_key": run_key,
        "path": path,
    }
    for col, _ in GROUP_METRICS:
        for g in groups:
            row[f"{col}/{g}"] = _num((s.get(col) or {}).get(g))
    return row


def _summary_from_wandb(config: dict, summary: dict) -> dict:
    """Invert `pipeline_config` + `flat_metrics` into the pipeline-summary shape `summary_row` reads."""
    groups = list(config["groups"])

    def per(prefix: str) -> dict:
        return {g: summary.get(f"{prefix}/{g}") for g in groups}

    learned = {g: summary[f"learned/{g}"] for g in groups if f"learned/{g}" in summary}
    s = {
        k: config.get(k)
        for k in ("setting", "method", "seed", "scale", "data", "extra_runs", "variant", "base_method")
    }
    s.update(
        {
            k: summary.get(k)
            for k in ("test/avg_ppl", "val/avg_ppl", "test/ppl_of_mean_loss", "total_tokens", "train_tokens")
        }
    )
    s.update(groups=groups, final_proportions=per("p"), learned_proportions=learned or None)
    for col, prefix in GROUP_METRICS:
        s[col] = per(prefix)
    return s


def _frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a frame with a fixed column order and a deterministic row order."""
    df = pd.DataFrame(rows)
    group_cols = sorted({c for r in rows for c in r if "/" in c}, key=lambda c: (c.split("/")[0], c))
    for c in [*BASE_COLUMNS, "path"]:
        if c not in df:
            df[c] = pd.Series(dtype=object)
    df = df[[*BASE_COLUMNS, *group_cols, "path"]]
    if len(df):
        df = df.sort_values(["setting", "method", "seed", "run_key"], kind="stable").reset_index(drop=True)
    return df


def _walk(root: Path, match: Any) -> list[Path]:
    """Files under root for which match(dirpath, filename) holds; os.walk never follows `latest-run` links."""
    out = []
    for dirpath, _, files in os.walk(root):
        out += [Path(dirpath) / f for f in files if match(Path(dirpath), f)]
    return sorted(out)


def _summary_files(root: Path) -> list[Path]:
    return _walk(root, lambda d, f: f == "summary.json" and "-pipeline-" in d.name)


def _wandb_files(root: Path) -> list[Path]:
    return _walk(root, lambda d, f: f.startswith("run-") and f.endswith(".wandb"))


def _load_summaries(root: Path) -> pd.DataFrame:
    rows = []
    for f in _summary_files(root):
        s = json.loads(f.read_text())
        if "stages" not in s:  # a per-stage summary inside a directory that happens to match
            continue
        rows.append(summary_row(s, str(f), f.parent.name))
    return _frame(rows)


def _pipeline_config(f: Path) -> dict | None:
    """The config of a pipeline run, or None for any other run (per-stage runs, unreadable files)."""
    try:
        cfg = wandb_offline.read_config(f)
    except wandb_offline.WandbFormatError:
        try:  # a newer file format: ask the CLI
            cfg = wandb_offline.read_run(f, reader="leet")["config"]
        except Exception as e:  # one broken stage run must not hide every pipeline
            warnings.warn(f"load_runs: cannot read {f} ({type(e).__name__}: {e}); skipped", stacklevel=3)
            return None
    return cfg if cfg.get("kind") == KIND else None


def _load_wandb(root: Path, reader: str = "parser") -> pd.DataFrame:
    newest: dict[str, tuple[float, dict]] = {}
    for f in _wandb_files(root):
        if _pipeline_config(f) is None:
            continue
        try:
            run = wandb_offline.read_run(f, reader=reader)
        except wandb_offline.WandbFormatError:
            run = wandb_offline.read_run(f, reader="leet")
        cfg, summ = run["config"], run["summary"]
        if "test/avg_ppl" not in summ:
            warnings.warn(f"load_runs: {f} has no test/avg_ppl (unfinished W&B run?); skipped", stacklevel=3)
            continue
        key = Path(cfg.get("pipeline_dir", f.parent.parent.parent)).name
        row = summary_row(_summary_from_wandb(cfg, summ), str(f), key)
        # a pipeline logged twice (re-run after all stages were reused): the newest run wins
        stamp = f.stat().st_mtime
        if key not in newest or stamp >= newest[key][0]:
            newest[key] = (stamp, row)
    return _frame([row for _, row in newest.values()])


def data_label(df: pd.DataFrame) -> str:
    """The data sources of a frame's runs, as a table header says them."""
    data = sorted(str(x) for x in df["data"].dropna().unique())
    if data == ["synthetic"]:
        return "synthetic groups (aioli_repro.data.synthetic), not SlimPajama"
    if data == ["slimpajama"]:
        return "SlimPajama-6B"
    return ", ".join(data) or "unknown"


def load_runs_online(entity: str | None, project: str, timeout: int = 30) -> pd.DataFrame:
    """The same frame from pipeline runs on the W&B server (needs network and a login)."""
    try:
        import wandb

        api = wandb.Api(timeout=timeout)
        path = f"{entity}/{project}" if entity else project
        runs = list(api.runs(path, filters={"config.kind": KIND}))
    except ImportError as e:
        raise RuntimeError("load_runs_online needs the wandb package (`pip install wandb`)") from e
    except Exception as e:  # no network, no API key, unknown project: say which, not a traceback
        raise RuntimeError(
            f"load_runs_online: could not list W&B runs of {entity or '<default entity>'}/{project} "
            f"({type(e).__name__}: {e}). Log in with `wandb login` and check network access, or read the "
            "local files with load_runs(root, 'summary' or 'wandb')."
        ) from e
    rows = []
    for run in runs:
        if getattr(run, "state", "finished") != "finished":
            continue
        cfg = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
        raw = getattr(run.summary, "_json_dict", None)
        summ = dict(raw) if raw is not None else {k: run.summary[k] for k in run.summary.keys()}
        if "test/avg_ppl" not in summ:
            continue
        key = Path(cfg.get("pipeline_dir", run.id)).name
        rows.append(summary_row(_summary_from_wandb(cfg, summ), run.url, key))
    return _frame(rows)


def load_runs(
    root: str | Path | None = None,
    source: str = "auto",
    entity: str | None = None,
    project: str | None = None,
    reader: str = "parser",
) -> pd.DataFrame:
    """One row per pipeline run under `root` (see `BASE_COLUMNS` and the per-group columns).

    source: "summary" (pipeline summary.json files), "wandb" (offline pipeline runs logged by
    `log_pipeline_run`), "auto" (summary files if any, else wandb), or "online" (the W&B server;
    also chosen when root is None and a project is given). reader: how offline runs are decoded;
    the in-process "parser" is the default because a leet subprocess per run costs ~1 s; files it
    cannot decode go through the leet CLI.
    """
    if source not in SOURCES:
        raise ValueError(f"source: unknown value {source!r}; allowed: {list(SOURCES)}")
    if source == "online" or (root is None and project is not None):
        if project is None:
            raise ValueError("load_runs: source 'online' needs project= (and usually entity=)")
        return load_runs_online(entity, project)
    if root is None:
        raise ValueError("load_runs: give root (a results directory) or project= for online runs")
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"load_runs: {root} does not exist")
    if source == "summary" or (source == "auto" and _summary_files(root)):
        return _load_summaries(root)
    return _load_wandb(root, reader)
