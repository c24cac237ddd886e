"""Run logging: a plain `metrics.jsonl` logger (always on) and W&B (offline by default).

Notebooks and tables read `metrics.jsonl` / `summary.json` first, so nothing depends on W&B's binary
offline format or on the network.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

# Never written into configs or logs.
_SECRET_KEYS = ("WANDB_API_KEY",)


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class JsonlLogger(Logger):
    """Appends one JSON object per `log_metrics` call to `<run_dir>/metrics.jsonl`."""

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._fh = None

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved config is saved by the entry point

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", buffering=1)  # noqa: SIM115 - kept open for the run
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def make_wandb_logger(
    run_dir: Path, cfg: dict, project: str, mode: str, name: str | None, entity: str | None
):
    """A Lightning WandbLogger; `mode` is offline (default), online, or disabled.

    Online mode falls back to offline, with a message, when W&B cannot be reached or no API key is set,
    so a cluster node without network never hangs on it.
    """
    from lightning.pytorch.loggers import WandbLogger

    if mode not in ("offline", "online", "disabled"):
        raise ValueError(
            f"logger.wandb.mode: unknown value {mode!r}; allowed: ['offline', 'online', 'disabled']"
        )
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")
    if mode == "online" and not _wandb_reachable():
        print(
            "[aioli_repro] W&B is unreachable or not logged in: logging offline instead "
            "(sync later with `wandb sync`)."
        )
        mode = "offline"
    safe_cfg = {k: v for k, v in cfg.items() if k not in _SECRET_KEYS}
    return WandbLogger(
        save_dir=str(run_dir),
        project=project,
        entity=entity,
        name=name,
        offline=(mode == "offline"),
        config=safe_cfg,
    )


def _wandb_reachable(timeout: float = 5.0) -> bool:
    import socket

    try:
        import wandb

        if not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
            return False
    except Exception:
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
