"""`python -m aioli_repro.gpu_check` (`make gpu-check`): one line without CUDA, and its CPU rehearsal end
to end (every part in its own process, the report written part by part, the verdict)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aioli_repro import gpu_check
from aioli_repro.timed_parts import OK, PartResult

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_1(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "aioli_repro.gpu_check", "--out-dir", str(tmp_path / "gc")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--cpu-rehearsal" in lines[0], r.stderr
    assert not (tmp_path / "gc").exists()


def _rehearse(tmp_path: Path, cache_dir: Path, skip: str, monkeypatch) -> tuple[int, dict, str]:
    monkeypatch.setenv("AIOLI_CACHE", str(cache_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "gc"
    rc = gpu_check.main(["--cpu-rehearsal", "--out-dir", str(out), "--skip", skip])
    return rc, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_cpu_rehearsal_runs_every_part_and_writes_the_report(tmp_path, cache_dir, monkeypatch) -> None:
    # the compiled bench (inductor on a CPU) and the GPU tests (a pytest inside pytest) run in the slow
    # test below, to keep the default suite short
    rc, report, md = _rehearse(tmp_path, cache_dir, "bench_compiled,gpu_tests", monkeypatch)
    parts = report["parts"]
    expected = {"environment", "bench_eager", "gpu_hours", "verdict"}
    assert set(parts) == expected | {f"run:{m}" for m in gpu_check.RUN_METHODS}
    assert all(p["status"] == "ok" for p in parts.values()), {k: p["error"] for k, p in parts.items()}
    assert rc == 0 and report["verdict"]["passed"]
    env = parts["environment"]
    assert env["torch"] == torch.__version__ and env["settings"]["precision"] == "32-true"
    bench = parts["bench_eager"]
    assert bench["tokens_per_s"] > 0 and bench["lightning_vs_plain"] > 0 and bench["mfu"] is None
    for m in gpu_check.RUN_METHODS:
        run = parts[f"run:{m}"]
        assert run["steps"] == gpu_check.CPU.run_steps and run["steps_per_s"] > 0
        assert run["last_train_loss"] < run["first_train_loss"] - 0.3, run  # ~5.7 nats untrained
        assert run["checkpoint_saves"] >= 3 and run["checkpoint_gb"] > 0  # periodic, last and final
        assert 0 <= run["checkpoint_share"] < 1 and run["test_avg_ppl"] > 1
        assert m == "stratified" or run["vs_stratified"] > 0
    assert parts["run:aioli"]["method_evals"] >= 3 * 2  # 3 rounds of LearnParams probes, m = 2
    hours = parts["gpu_hours"]
    assert hours["table2_gpu_hours_measured"] > hours["table2_gpu_hours_assumed"] > 0  # a CPU is slower
    assert hours["table3_runs"] > 0
    for name in expected - {"verdict"}:
        assert f"## {name}: ok" in md
    assert "PASS: nothing crashed or was cut" in md and "INFO (not judged in a CPU rehearsal): Aioli" in md


@pytest.mark.slow
def test_cpu_rehearsal_of_the_gpu_tests_and_the_compiled_bench(tmp_path, cache_dir, monkeypatch) -> None:
    _, report, _ = _rehearse(tmp_path, cache_dir, "run:stratified,run:aioli,run:doge,run:doremi", monkeypatch)
    parts = report["parts"]
    assert all(p["status"] == "ok" for n, p in parts.items() if n != "verdict"), parts
    assert parts["gpu_tests"]["skipped"] >= 4 and parts["gpu_tests"]["failed"] == 0  # no CUDA: skipped
    compiled = parts["bench_compiled"]
    assert compiled["compile"] is True and compiled["tokens_per_s"] > 0
    assert parts["gpu_hours"]["tokens_per_s"] == parts["bench_eager"]["tokens_per_s"]  # no run: the bench's
    assert "FAIL: the loss went down in every run (no run)" in report["verdict"]["lines"]


def test_the_verdict_fails_on_a_cut_part_a_flat_loss_or_a_slow_aioli() -> None:
    def run(first: float, last: float, ratio: float | None = None) -> dict:
        return {
            "first_train_loss": first,
            "last_train_loss": last,
            **({"vs_stratified": ratio} if ratio else {}),
        }

    ok = {
        "run:stratified": PartResult("run:stratified", OK, 1, 9, run(5.0, 4.0)),
        "run:aioli": PartResult("run:aioli", OK, 1, 9, run(5.0, 4.0, 1.04)),
    }
    lines, passed = gpu_check.verdict(ok)
    assert passed and all(line.startswith("PASS") for line in lines)
    slow = {**ok, "run:aioli": PartResult("run:aioli", OK, 1, 9, run(5.0, 4.0, 1.2))}
    assert not gpu_check.verdict(slow)[1] and gpu_check.verdict(slow, timing_applies=False)[1]
    flat = {**ok, "run:stratified": PartResult("run:stratified", OK, 1, 9, run(5.0, 5.1))}
    assert not gpu_check.verdict(flat)[1]
    cut = {**ok, "bench_compiled": PartResult("bench_compiled", "cut", 9, 9, {})}
    lines, passed = gpu_check.verdict(cut)
    assert not passed and "bench_compiled (cut)" in lines[0]
