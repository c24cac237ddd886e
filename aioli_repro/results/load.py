"""One tidy frame of all finished pipelines, from wherever they were logged.

`load_runs` returns the same frame
from the pipeline `summary.json` files, from offline `.wandb` files (read with `wandb_offline`), or from
the W&B server (`load_runs_online`), so tables and notebooks work the same way on every machine.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from aioli_repro.results import wandb_offline
from aioli_repro.training.pipeline_run_log import KIND

SOURCES = ("auto", "summary", "wandb", "online")
# Leading columns of the frame; per-group columns (test_loss/<g>, val_loss/<g>, test_ppl/<g>) follow.
BASE_COLUMNS = [
    "setting", "method", "seed", "scale", "data", "groups", "variant", "base_method",
    "test_avg_ppl", "val_avg_ppl", "test_ppl_of_mean_loss", "total_tokens", "train_tokens", "extra_runs",
    "proportions", "learned_proportions", "stage", "run_key",
]  # fmt: skip
GROUP_METRICS = (("test_loss", "test/loss"), ("val_loss", "val/loss"), ("test_ppl", "test/ppl"))


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


RUN_KEYS = ["setting", "method", "seed", "variant", "base_method"]


def newest_per_run(d: pd.DataFrame, keys: list[str] | None = None) -> tuple[pd.DataFrame, int]:
    """One row per (setting, method, seed, variant, base method), the newest file winning (runs of
    other budgets or mixtures in one results folder), and how many older rows were dropped."""
    keys = [k for k in (keys or RUN_KEYS) if k in d.columns]
    mtime = [Path(p).stat().st_mtime if Path(str(p)).exists() else 0.0 for p in d["path"]]
    kept = d.assign(_mtime=mtime).sort_values("_mtime", kind="stable")
    kept = kept.drop_duplicates(keys, keep="last").drop(columns="_mtime")
    return kept, len(d) - len(kept)
