"""The report runner of `make bench` and `make gpu-check`: each part in its own process, under its own
limit, its figures kept as they come, even when the part is cut or crashes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from aioli_repro.timed_parts import CUT, FAILED, OK, Part, Report, run_part, run_parts

# A part's process: writes one figure, then does what --mode says.
CHILD = """
import argparse, sys, time
from aioli_repro.timed_parts import PartOutput
ap = argparse.ArgumentParser()
ap.add_argument("--part"); ap.add_argument("--part-out"); ap.add_argument("--mode")
a = ap.parse_args()
out = PartOutput(a.part_out)
out.put(first=1.5)
if a.mode == "hang":
    time.sleep(60)
if a.mode == "crash":
    raise RuntimeError("the part broke here")
out.put(second=[1, 2])
"""


@pytest.fixture
def child_module(tmp_path: Path, monkeypatch) -> str:
    pkg = tmp_path / "mods"
    pkg.mkdir()
    (pkg / "fake_part.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", f"{pkg}:{Path(__file__).resolve().parents[1]}")
    return "fake_part"


def test_a_part_that_finishes_is_ok_with_every_figure(child_module: str, tmp_path: Path) -> None:
    r = run_part(child_module, Part("a", 60, ["--mode", "ok"]), tmp_path)
    assert r.status == OK and r.figures == {"first": 1.5, "second": [1, 2]} and r.error is None


def test_a_part_past_its_limit_is_cut_and_keeps_what_it_measured(child_module: str, tmp_path: Path) -> None:
    t0 = time.time()
    r = run_part(child_module, Part("slow", 3, ["--mode", "hang"]), tmp_path)
    assert r.status == CUT and r.figures == {"first": 1.5}
    assert time.time() - t0 < 20  # killed at the limit, not after the 60 s sleep
    assert "3 s" in r.error


def test_a_crashing_part_is_failed_with_the_end_of_its_output(child_module: str, tmp_path: Path) -> None:
    r = run_part(child_module, Part("bad", 60, ["--mode", "crash"]), tmp_path)
    assert r.status == FAILED and r.figures == {"first": 1.5}
    assert "RuntimeError: the part broke here" in r.error


def test_the_report_is_written_after_every_part(child_module: str, tmp_path: Path) -> None:
    seen = []

    def later(done):  # a part that depends on an earlier one's figures
        seen.append(json.loads((tmp_path / "r.json").read_text())["parts"]["a"]["status"])
        return Part("b", 60, ["--mode", "crash"]) if done["a"].figures["first"] == 1.5 else None

    report = Report(tmp_path / "r.json", tmp_path / "r.md", {"device": "test"}, "Check")
    parts = [Part("a", 60, ["--mode", "ok"]), later, lambda d: None]
    results = run_parts(child_module, parts, tmp_path, lambda r: report.record(r))
    assert list(results) == ["a", "b"] and seen == ["ok"]  # a was on disk before b started
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["device"] == "test" and saved["parts"]["b"]["status"] == "failed"
    assert saved["parts"]["a"]["second"] == [1, 2]
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("# Check") and "## a: ok" in md and "## b: failed" in md
