"""GPU path end to end (skipped without CUDA): bf16-mixed Lightning runs, fused AdamW, TF32, compile.

CI has no GPU; these run on a GPU machine with `make test ARGS="-m gpu"`.
"""

from __future__ import annotations

import pytest
import torch
from test_gpu_settings_on_cpu import ClipProbe

from aioli_repro.training.run import run_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _run(make_cfg, tmp_path, *overrides: str) -> dict:
    cfg = make_cfg(
        "trainer=gpu", "train.max_steps=40", "train.val_every=20", "train.checkpoint_every=0", *overrides
    )
    return run_training(cfg, tmp_path)


def test_bf16_run_learns_and_uses_the_gpu_path(make_cfg, tmp_path):
    s = _run(make_cfg, tmp_path)
    # an untrained byte model is at ln(320) ~ 5.77 nats
    assert all(v < 4.8 for v in s["test_loss"].values()), s["test_loss"]
    assert torch.backends.cuda.matmul.allow_tf32  # set by run_training for bf16-mixed runs
    assert s["steps"] == 40


@pytest.mark.slow
def test_compiled_run_matches_eager(make_cfg, tmp_path):
    eager = _run(make_cfg, tmp_path / "eager")
    compiled = _run(make_cfg, tmp_path / "compiled", "train.compile=true")
    for g, v in eager["test_loss"].items():
        assert abs(compiled["test_loss"][g] - v) < 0.05, (g, v, compiled["test_loss"][g])


def test_aioli_run_on_gpu(make_cfg, tmp_path):
    s = _run(make_cfg, tmp_path, "method=aioli", "train.max_steps=100")
    assert s["method_evals"] > 0
    p = list(s["trajectory"][-1]["p"].values())
    assert abs(sum(p) - 1) < 1e-6 and min(p) > 0


def test_fused_adamw_clips_the_global_norm_on_the_gpu(make_cfg, tmp_path):
    """The step-1 crash of 60daca0 (fused AdamW + norm clipping under bf16-mixed), on the device."""
    probe = ClipProbe()
    cfg = make_cfg("trainer=gpu", "train.max_steps=10", "train.checkpoint_every=5", "train.grad_clip=0.05")
    s = run_training(cfg, tmp_path, callbacks=[probe])
    assert probe.fused and probe.precision == "bf16-mixed" and s["steps"] == 10
    assert min(probe.pre) > 0.5 and max(probe.post) == pytest.approx(0.05, rel=1e-3)
