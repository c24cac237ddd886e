"""What each part of `python -m aioli_repro.gpu_check` measures, in the part's own process.

Every figure goes to the part's file (`PartOutput.put`) as soon as it is measured, so a part cut at its
time limit still reports what it had.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from aioli_repro.config import compose_train
from aioli_repro.timed_parts import PartOutput
from aioli_repro.training.device_settings import apply_process_settings, resolve_device_settings

if TYPE_CHECKING:
    from aioli_repro.gpu_check import Profile

QUIET = ["logger=none", "progress=false"]


def run_child_part(name: str, profile: Profile, out_dir: Path, out: PartOutput, rate: float | None) -> None:
    if name == "environment":
        _environment(profile, out)
    elif name == "gpu_tests":
        _gpu_tests(out)
    elif name in ("bench_eager", "bench_compiled"):
        _bench(profile, name == "bench_compiled", out)
    elif name.startswith("run:"):
        _run(profile, name.split(":", 1)[1], out_dir / "runs", out)
    elif name == "gpu_hours":
        _gpu_hours(profile, float(rate or 0), out_dir, out)
    else:
        raise SystemExit(f"gpu_check: unknown part {name!r}")


def _peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch (CUDA), else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _environment(profile: Profile, out: PartOutput) -> None:
    from aioli_repro.gpu_check import environment
    from aioli_repro.training.preflight import build_data

    out.put(**environment())
    cfg = compose_train([*profile.scale, *QUIET])
    out.put(settings=resolve_device_settings(cfg).as_dict())  # what trainer=default resolves to here
    t0 = time.time()
    build_data(cfg)  # the synthetic paper-context data cache, once, for the parts that follow
    out.put(data_s=time.time() - t0)


def _gpu_tests(out: PartOutput) -> None:
    """`pytest -m gpu` on the repository's tests (skipped where the package is installed without them)."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    if not (tests / "test_gpu.py").exists():
        out.put(note="no tests/ next to the package (installed without the repository): nothing to run")
        return
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "gpu",
        str(tests / "test_gpu.py"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tests.parent)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", proc.stdout)}
    out.put(**{k: counts.get(k, 0) for k in ("passed", "failed", "skipped")}, exit_code=proc.returncode)
    if proc.returncode not in (0, 5):
        raise SystemExit(f"pytest -m gpu failed:\n{proc.stdout[-3000:]}")


def _bench(profile: Profile, compiled: bool, out: PartOutput) -> None:
    """The paper-scale training step: tokens/s, MFU, peak memory, Lightning/plain, ours/HF (eager)."""
    from aioli_repro import bench
    from aioli_repro.training.preflight import build_data

    cfg = compose_train([*profile.scale, *QUIET, *(["train.compile=true"] if compiled else [])])
    apply_process_settings(resolve_device_settings(cfg))
    _, packed = build_data(cfg)
    device = bench.default_device()
    bench.step_throughput(cfg, packed, profile.bench_steps, 1, device, out)
    name = bench._device_name(device)
    out.put(**bench.memory_and_mfu(cfg, out.figures["tokens_per_s"], device, name))
    if not compiled:
        out.put(ours_vs_hf=bench.bench_hf(cfg, max(6, profile.bench_steps // 5), device))


class CheckpointTimer(L.Callback):
    """Time the training thread spends on checkpoints: taking each snapshot (save_checkpoint) and
    waiting for a background write (before the next save, at teardown, before the summary)."""

    def __init__(self) -> None:
        self.seconds, self.saves, self._inside = 0.0, 0, False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        io.save_checkpoint = self._timed(io.save_checkpoint, count=True)
        if hasattr(io, "wait"):  # BackgroundCheckpointIO
            io.wait = self._timed(io.wait, count=False)

    def _timed(self, fn: Callable[..., Any], count: bool) -> Callable[..., Any]:
        def timed(*args: object, **kwargs: object) -> Any:
            if self._inside:  # a save's own wait for the write before it: timed by the save
                return fn(*args, **kwargs)
            t0, self._inside = time.perf_counter(), True
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside = False
                self.seconds += time.perf_counter() - t0
                self.saves += count

        return timed


def _run(profile: Profile, method: str, runs: Path, out: PartOutput) -> None:
    """A short paper-config run of `method`: speed, checkpoint cost, memory, perplexity, loss curve."""
    from aioli_repro.training.run import run_training

    overrides = [*profile.scale, *QUIET, f"method={method}", f"train.max_steps={profile.run_steps}"]
    overrides += profile.aioli if method == "aioli" else []
    reference = runs / "stratified" / "checkpoints" / "final.ckpt"
    extras = {"reference_checkpoint": str(reference)} if method == "doremi" else None
    timer = CheckpointTimer()
    cfg = compose_train(overrides)
    s = run_training(cfg, runs / method, extras=extras, callbacks=[timer])
    t = cfg.train
    ckpt_bytes = sum(f.stat().st_size for f in (runs / method / "checkpoints").glob("*.ckpt"))
    first, last = _train_losses(runs / method)
    out.put(
        steps=s["steps"],
        fit_s=s["fit_s"],
        wall_s=s["wall_s"],
        steps_per_s=s["steps"] / s["fit_s"],
        tokens_per_s=s["steps"] * t.batch_size * t.context_length / s["fit_s"],
        method_eval_share=s["method_eval_s"] / s["fit_s"],
        method_evals=s["method_evals"],
        checkpoint_s=timer.seconds,
        checkpoint_saves=timer.saves,
        checkpoint_share=timer.seconds / s["wall_s"],
        checkpoint_gb=ckpt_bytes / 1e9,
        peak_mem_gib=_peak_memory_gib(),
        test_avg_ppl=s["test/avg_ppl"],
        first_train_loss=first,
        last_train_loss=last,
    )
    strat = runs / "stratified" / "summary.json"
    if method != "stratified" and strat.exists():
        out.put(vs_stratified=s["fit_s"] / json.loads(strat.read_text())["fit_s"])


def _train_losses(run_dir: Path) -> tuple[float, float]:
    """Mean per-group train loss of the first and the last logging window (DoGE and DoReMi backpropagate
    a reweighted loss, so the per-group losses are what compares across methods)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_group = [[v for k, v in r.items() if k.startswith("train/loss/")] for r in rows]
    per_group = [g for g in per_group if g]
    return sum(per_group[0]) / len(per_group[0]), sum(per_group[-1]) / len(per_group[-1])


def _gpu_hours(profile: Profile, rate: float, out_dir: Path, out: PartOutput) -> None:
    """GPU-hours of Tables 2 and 3 at the measured training rate, beside the assumed sustained FLOP/s.

    The cost model counts 6 N tokens FLOPs (N = 12 L d^2 + 2 V d, pipeline/cost.py); the measured rate
    in those FLOPs is 6 N(measured model) x tokens/s, so both columns use the same FLOP count."""
    from aioli_repro import reproduce
    from aioli_repro.pipeline.cost import SUSTAINED_FLOPS, model_parameters, sweep_cost
    from aioli_repro.pipeline.sweep import job_configs

    measured = compose_train([*profile.scale, *QUIET])
    sustained = 6 * model_parameters(measured.model) * rate
    out.put(
        tokens_per_s=rate, measured_flops=sustained, assumed_flops=SUSTAINED_FLOPS, plan_options=profile.plan
    )
    for table in ("table2", "table3"):
        argv = [table, "--scale", "paper", "--results-dir", str(out_dir / "plan"), *profile.plan]
        sweep = reproduce._plan(reproduce.parser().parse_intermixed_args(argv))
        cost = sweep_cost(table, job_configs(sweep.jobs))
        out.put(**{
            f"{table}_runs": cost.runs,
            f"{table}_flops": cost.flops,
            f"{table}_gpu_hours_assumed": cost.gpu_hours,
            f"{table}_gpu_hours_measured": cost.flops / sustained / 3600,
        })  # fmt: skip
