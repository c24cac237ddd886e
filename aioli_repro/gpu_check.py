"""Check a GPU node before a sweep spends GPU-hours on it: `python -m aioli_repro.gpu_check`.

`make gpu-check` runs it.

At most about 8 minutes on one H100-class GPU, no network, synthetic data. Each part runs in its own
process under its own time limit (aioli_repro/timed_parts.py) and is appended to
`results/gpu_check/report.md` and `report.json` as soon as it ends; a part that runs out of time is
recorded as cut and the rest still run:

- environment: device, driver, torch / CUDA / Lightning versions, flash-attn, the resolved GPU settings;
- gpu_tests: `pytest -m gpu` (tests/test_gpu.py);
- bench_eager, bench_compiled: the paper-scale step (Pythia-160M, 8 x 2048, bf16-mixed): tokens/s, MFU,
  peak memory, Lightning/plain, ours/HF GPT-NeoX (eager only);
- run:stratified, run:aioli (3 rounds), run:doge, run:doremi: short `scale=paper data=synthetic` runs with
  the paper's hyper-parameters and checkpointing: steps/s, time against stratified, Aioli's evaluation
  share, checkpoint time and size, peak memory, test avg ppl, first and last train loss;
- gpu_hours: Tables 2 and 3 at the measured rate, beside the README's assumed 110 TFLOP/s;
- verdict: nothing crashed or was cut, every loss went down, Aioli <= 1.10x stratified.

Without CUDA it prints one line and exits 1; `--cpu-rehearsal` runs every part on the CPU with the tiny
model instead (the test suite does, end to end).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aioli_repro.timed_parts import CUT, FAILED, OK, Part, PartOutput, PartResult, PartSpec, Report, run_parts

AIOLI_MAX_RATIO = 1.10  # Aioli's wall-clock against stratified's, at the paper's hyper-parameters
RUN_METHODS = ("stratified", "aioli", "doge", "doremi")


@dataclass(frozen=True)
class Profile:
    """What the check runs: the paper scale on a GPU, or its tiny rehearsal on a CPU."""

    name: str
    scale: list[str]  # overrides of every run
    bench_steps: int
    run_steps: int
    aioli: list[str]  # Aioli's round schedule for run_steps (>= 3 rounds)
    limits: dict[str, float]  # seconds per part (run:* share "run")
    plan: list[str]  # reproduce options for the GPU-hours part

    def limit(self, part: str) -> float:
        return self.limits[part.split(":")[0]]


# Sum of the GPU limits: 15 + 90 + 60 + 90 + 4 x 45 + 40 = 475 s (under 8 minutes when every part is cut).
GPU = Profile(
    name="paper",
    scale=["scale=paper", "data=synthetic"],
    bench_steps=30,
    run_steps=300,
    aioli=["hp.aioli.update_steps=100"],  # 3 rounds of 100 steps; LearnParams 32 steps per round (m = 2)
    limits={
        "environment": 15,
        "gpu_tests": 90,
        "bench_eager": 60,
        "bench_compiled": 90,
        "run": 45,
        "gpu_hours": 40,
    },  # fmt: skip
    plan=[],
)
CPU = Profile(
    name="cpu-rehearsal",
    scale=["scale=tiny", "data=synthetic", "train.checkpoint_every=10", "train.val_every=10"],
    bench_steps=6,
    run_steps=24,
    aioli=["hp.aioli.update_steps=8", "hp.aioli.lp_rounds=1", "hp.aioli.lp_steps=2"],
    limits={
        "environment": 60,
        "gpu_tests": 120,
        "bench_eager": 120,
        "bench_compiled": 240,
        "run": 120,
        "gpu_hours": 120,
    },  # fmt: skip
    plan=["--settings", "a_se", "--methods", "stratified,aioli"],  # planning all of Table 2 takes ~30 s
)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default="results/gpu_check")
    ap.add_argument("--cpu-rehearsal", action="store_true", help="no GPU: every part on the CPU, tiny model")
    ap.add_argument("--skip", default="", help="comma list of parts to leave out (e.g. gpu_tests)")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # the child side of one part
    ap.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    profile = CPU if args.cpu_rehearsal else GPU
    if args.part:
        _child(args, profile)
        return 0
    if not torch.cuda.is_available() and not args.cpu_rehearsal:
        print(
            f"gpu-check: no CUDA GPU visible here (torch {torch.__version__}, torch.cuda.is_available() is "
            "False); run it on a GPU node, or add --cpu-rehearsal for the tiny CPU rehearsal",
            file=sys.stderr,
        )
        return 1
    return _check(args, profile)


def _check(args: argparse.Namespace, profile: Profile) -> int:
    out_dir = Path(args.out_dir)
    shutil.rmtree(out_dir / "runs", ignore_errors=True)  # a fresh check: no run resumes an old one
    header = {
        "command": "python -m aioli_repro.gpu_check" + (" --cpu-rehearsal" if args.cpu_rehearsal else ""),
        "profile": profile.name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
    }
    report = Report(out_dir / "report.json", out_dir / "report.md", header, "GPU node check")
    common = ["--out-dir", str(out_dir)] + (["--cpu-rehearsal"] if args.cpu_rehearsal else [])
    skip = {s for s in args.skip.split(",") if s}
    parts = _parts(profile, common, skip)
    results = run_parts("aioli_repro.gpu_check", parts, out_dir, lambda r: report.record(r, _describe(r)))
    lines, passed = verdict(results, timing_applies=not args.cpu_rehearsal)
    report.data["verdict"] = {"passed": passed, "lines": lines}
    report.record(PartResult("verdict", OK if passed else FAILED, 0.0, 0.0, {"passed": passed}))
    report.append_markdown("\n".join(f"- {line}" for line in lines))
    print("\n".join(lines))
    print(f"gpu-check: {'PASSED' if passed else 'FAILED'}; report: {out_dir / 'report.md'}")
    return 0 if passed else 1


def _parts(profile: Profile, common: list[str], skip: set[str]) -> list[PartSpec]:
    """The parts in order, less `skip`; gpu_hours needs a measured rate from an earlier part."""
    names = ["environment", "gpu_tests", "bench_eager", "bench_compiled", *(f"run:{m}" for m in RUN_METHODS)]
    parts: list[PartSpec] = [Part(n, profile.limit(n), common) for n in names if n not in skip]

    def gpu_hours(done: dict[str, PartResult]) -> Part | None:
        rate = _rate(done)
        return Part("gpu_hours", profile.limit("gpu_hours"), [*common, "--rate", str(rate)]) if rate else None

    return parts + ([] if "gpu_hours" in skip else [gpu_hours])


def _rate(done: dict[str, PartResult]) -> float | None:
    """Tokens/s of the stratified paper-config run (the rate a sweep trains at), else the eager bench's."""
    for name, key in (("run:stratified", "tokens_per_s"), ("bench_eager", "tokens_per_s")):
        r = done.get(name)
        if r is not None and r.figures.get(key):
            return float(r.figures[key])
    return None


# -- the verdict ----------------------------------------------------------------------------------
def verdict(results: dict[str, PartResult], timing_applies: bool = True) -> tuple[list[str], bool]:
    """Pass/fail lines against the stated thresholds, and whether all of them pass. The timing threshold
    is the paper config's on a GPU: a CPU rehearsal (a tiny model, where evaluation weighs far more)
    reports the ratio without judging it."""
    bad = [f"{n} ({r.status})" for n, r in results.items() if r.status in (CUT, FAILED)]
    checks = [(not bad, f"nothing crashed or was cut{': ' + ', '.join(bad) if bad else ''}")]
    runs = {n.split(":", 1)[1]: r.figures for n, r in results.items() if n.startswith("run:")}
    down = {m: f.get("last_train_loss", 1e9) < f.get("first_train_loss", 0) for m, f in runs.items()}
    curves = ", ".join(f"{m} {_loss(f, 'first')} -> {_loss(f, 'last')}" for m, f in runs.items())
    checks.append(
        (bool(down) and all(down.values()), f"the loss went down in every run ({curves or 'no run'})")
    )
    ratio = runs.get("aioli", {}).get("vs_stratified")
    shown = "—" if ratio is None else f"{ratio:.3f}x"
    ok = ratio is not None and ratio <= AIOLI_MAX_RATIO
    timing = f"Aioli <= {AIOLI_MAX_RATIO:.2f}x stratified (measured: {shown})"
    lines = [f"{'PASS' if ok else 'FAIL'}: {text}" for ok, text in checks]
    if not timing_applies:
        return [*lines, f"INFO (not judged in a CPU rehearsal): {timing}"], all(ok for ok, _ in checks)
    checks.append((ok, timing))
    return [*lines, f"{'PASS' if ok else 'FAIL'}: {timing}"], all(ok for ok, _ in checks)


def _loss(figures: dict, which: str) -> str:
    v = figures.get(f"{which}_train_loss")
    return "?" if v is None else f"{v:.2f}"


def _describe(r: PartResult) -> str:
    """A part's figures as a Markdown list (nested values as JSON)."""
    lines = []
    for k, v in r.figures.items():
        shown = f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (dict, list)) else v
        lines.append(f"- {k}: {shown}")
    return "\n".join(lines)


# -- the child side: one part in its own process --------------------------------------------------
def _child(args: argparse.Namespace, profile: Profile) -> None:
    from aioli_repro.gpu_check_parts import run_child_part

    run_child_part(args.part, profile, Path(args.out_dir), PartOutput(args.part_out), args.rate)


def environment() -> dict:
    """Device, driver, library versions and flash-attn."""
    import lightning

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": lightning.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            devices=torch.cuda.device_count(),
        )
        info["capability"] = f"{props.major}.{props.minor}"
        info["driver"] = _driver_version()
    else:
        info.update(device=f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)", driver=None)
    try:
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        info["flash_attn"] = None
    return info


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


if __name__ == "__main__":
    sys.exit(main())
