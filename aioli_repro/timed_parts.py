"""A report made of parts, each run in its own process under its own time limit, saved as it goes.

`make bench` and `make gpu-check` are long measurements on machines that are lent for minutes. So every
part runs as `python -m <module> --part NAME --part-out FILE ...` in a new process group:
- the child writes its figures to FILE as soon as it measures each one (`PartOutput.put`);
- the parent waits at most the part's `limit_s`, then kills the whole group, and records the part as
  "cut" with the figures it had written by then; a crash is "failed" with the end of its stderr;
- after every part the report's JSON is rewritten atomically (and its Markdown appended), so a report
  killed half-way still holds every part that finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioli_repro.fileio import atomic_write_json

OK, CUT, FAILED = "ok", "cut", "failed"


@dataclass
class Part:
    """One part: `argv` after `python -m <module>` (the runner adds --part and --part-out)."""

    name: str
    limit_s: float
    argv: list[str] = field(default_factory=list)


class PartOutput:
    """The child's side: figures written to the part's file one at a time, atomically."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.figures: dict[str, Any] = {}

    def put(self, **figures: Any) -> None:
        self.figures.update(figures)
        if self.path is not None:
            atomic_write_json(self.path, self.figures)


@dataclass
class PartResult:
    name: str
    status: str
    seconds: float
    limit_s: float
    figures: dict[str, Any]
    error: str | None = None

    def as_dict(self) -> dict:
        return {
            "status": self.status,
            "seconds": round(self.seconds, 1),
            "limit_s": self.limit_s,
            "error": self.error,
            **self.figures,
        }


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_part(module: str, part: Part, out_dir: Path) -> PartResult:
    """Run one part in a new process group; kill the group when it runs past its limit."""
    out = out_dir / f"part-{part.name.replace(':', '-')}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", module, "--part", part.name, "--part-out", str(out), *part.argv]
    log = out_dir / f"part-{part.name.replace(':', '-')}.log"
    t0 = time.time()
    with open(log, "w") as log_f:
        proc = subprocess.Popen(
            cmd,
            stdout=log_f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=part.limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    seconds = time.time() - t0
    figures = json.loads(out.read_text()) if out.exists() else {}
    if rc is None:
        return PartResult(
            part.name, CUT, seconds, part.limit_s, figures, f"cut at its limit of {part.limit_s:.0f} s"
        )
    if rc != 0:
        return PartResult(part.name, FAILED, seconds, part.limit_s, figures, _tail(log.read_text()))
    return PartResult(part.name, OK, seconds, part.limit_s, figures)


class Report:
    """The parent's side: `report.json` (every part so far) and `report.md` (a section per part)."""

    def __init__(self, json_path: Path, md_path: Path | None, header: dict[str, Any], title: str) -> None:
        self.json_path, self.md_path = Path(json_path), md_path
        self.data: dict[str, Any] = {**header, "parts": {}}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.json_path, self.data)
        if md_path is not None:
            lines = [f"# {title}", "", *(f"- {k}: {v}" for k, v in header.items()), ""]
            Path(md_path).write_text("\n".join(lines) + "\n")

    def record(self, result: PartResult, markdown: str = "") -> None:
        self.data["parts"][result.name] = result.as_dict()
        atomic_write_json(self.json_path, self.data)
        if self.md_path is not None:
            head = f"## {result.name}: {result.status} ({result.seconds:.0f} s of {result.limit_s:.0f} s)"
            body = [head, ""]
            if result.error:
                body += ["```", result.error, "```", ""]
            if markdown:
                body += [markdown.rstrip(), ""]
            with open(self.md_path, "a") as f:
                f.write("\n".join(body) + "\n")

    def append_markdown(self, text: str) -> None:
        if self.md_path is not None:
            with open(self.md_path, "a") as f:
                f.write(text.rstrip() + "\n")


PartSpec = Part | Callable[[dict[str, PartResult]], Part | None]


def run_parts(
    module: str,
    parts: list[PartSpec],
    out_dir: Path,
    record: Callable[[PartResult], None],
    progress: bool = True,
) -> dict[str, PartResult]:
    """Every part in order, its files in `out_dir`, each passed to `record` as soon as it ends (which
    saves it: a `Report`, or the bench's flat JSON); returns the results by name.

    A part may be a function of the results so far (a later part needs an earlier one's figures or
    files); it returns None to leave itself out."""
    results: dict[str, PartResult] = {}
    for i, spec in enumerate(parts, 1):
        part = spec(results) if callable(spec) else spec
        if part is None:
            continue
        if progress:
            print(f"[{module}] part {i}/{len(parts)}: {part.name} (limit {part.limit_s:.0f} s)", flush=True)
        result = run_part(module, part, out_dir)
        results[part.name] = result
        record(result)
        if progress:
            print(f"[{module}]   {part.name}: {result.status} in {result.seconds:.0f} s", flush=True)
    return results
