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

    def offset(self) -> int:
        """Bytes written so far: the file is line-buffered, so exactly the rows logged up to now."""
        return self.path.stat().st_size if self.path.exists() else 0

    def rewind(self, offset: int) -> None:
        """Drop the rows written after `offset` (a resumed run logs the steps after its checkpoint again)."""
        if self.path.exists() and self.path.stat().st_size > offset:
            os.truncate(self.path, offset)


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
    if mode == "online":
        problem = wandb_online_problem()
        if problem is not None:
            print(
                f"[aioli_repro] W&B online mode unavailable ({problem}): logging offline instead "
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
        # mode explicitly: Lightning asks for offline through WANDB_MODE, which W&B reads only when it
        # first sets up in a process; after an earlier wandb.init (a pipeline's run log in the same
        # worker) an offline run would then ask for an API key
        mode=mode,
        config=safe_cfg,
    )


def wandb_online_problem(timeout: float = 5.0) -> str | None:
    """Why online W&B logging would fail or hang here (None: it works), decided within ~`timeout` s.

    One authenticated GraphQL request (`viewer`), the call `wandb.init` makes first: a TCP connect is
    not enough, since proxies and firewalls often accept connections they cannot forward. A daemon
    thread bounds the whole check, DNS included (name resolution has no timeout of its own).
    """
    import base64
    import threading
    import urllib.error
    import urllib.request

    try:
        import wandb

        key = os.environ.get("WANDB_API_KEY") or wandb.api.api_key
    except Exception as e:  # a broken wandb install or settings file
        return f"wandb unusable: {type(e).__name__}"
    if not key:
        return "no API key: set WANDB_API_KEY or run `wandb login`"
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")
    auth = base64.b64encode(f"api:{key}".encode()).decode()
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": "query { viewer { id } }"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"},
    )
    result: list[str | None] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                body = json.loads(r.read(1 << 16) or b"{}")
            ok = isinstance(body, dict) and ((body.get("data") or {}).get("viewer") is not None)
            result.append(None if ok else f"{base} did not accept the API key")
        except urllib.error.HTTPError as e:
            rejected = e.code in (401, 403)
            result.append(f"{base} answered HTTP {e.code}" + (" (API key rejected)" if rejected else ""))
        except (urllib.error.URLError, OSError, ValueError) as e:
            result.append(f"cannot reach {base}: {getattr(e, 'reason', e)}")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return result[0] if result else f"no answer from {base} within {timeout:g} s"


def _wandb_reachable(timeout: float = 5.0) -> bool:
    return wandb_online_problem(timeout) is None
