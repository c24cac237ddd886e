"""The GPU configuration, trained on the CPU: bf16-mixed, fused AdamW, norm clipping (and compile).

Every GPU run of main at 60daca0 stopped at its first optimizer step: Lightning's mixed-precision plugin
refuses to clip for a fused optimizer, and fused AdamW was only ever built on CUDA, so no CPU test met
it. `trainer=gpu trainer.accelerator=cpu` now trains with every setting a GPU run uses
(training/device_settings.py), and these tests assert numbers on real steps of the real MixingLM:
- the optimizer the run steps is fused, under bf16-mixed, and the gradients it sees are clipped to the
  global norm (the unclipped norm is above it);
- the clipped gradients equal those of an unfused reference bitwise (same forward, backward and
  clipping), and the weights after the first update agree to 1e-6 (fused and unfused AdamW's own
  difference is ~1e-7);
- under 16-mixed with a grad scaler (explicit plugin: Lightning maps 16-mixed to bf16 on a CPU), the
  fused run unscales before clipping and matches the unfused run to 1e-6;
- each method family (stratified, aioli, doge, doremi, skillit) trains with them and its loss goes down.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import MixedPrecision

from aioli_repro.training.clipping import clip_gradients_
from aioli_repro.training.device_settings import DeviceSettings, resolve_device_settings
from aioli_repro.training.run import run_training

GPU_ON_CPU = ["trainer=gpu", "trainer.accelerator=cpu"]
SHORT = [
    "train.checkpoint_every=0",
    "train.val_every=0",
    "train.val_max_seqs=8",
    "train.test_max_seqs=16",
    "train.warmup_steps=2",
    "train.log_every=2",
]
CLIP = 0.05  # far below the tiny model's gradient norm (~1-3), so every step is clipped


def _global_norm(optimizer: torch.optim.Optimizer) -> float:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


class ClipProbe(L.Callback):
    """Per step: the gradient norm before clipping and as the optimizer's step sees it; the clipped
    gradients and the weights after the first update; the optimizer and precision the run used."""

    def __init__(self) -> None:
        self.pre: list[float] = []
        self.post: list[float] = []
        self.first_grads: list[torch.Tensor] | None = None
        self.first_weights: list[torch.Tensor] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = trainer.optimizers[0]
        self.fused = bool(opt.defaults.get("fused"))
        self.precision = trainer.precision
        opt.register_step_post_hook(self._after_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self.pre.append(_global_norm(optimizer))

    def _after_step(self, opt, args, kwargs) -> None:  # noqa: ANN001
        # Lightning runs forward, backward and clipping inside optimizer.step(closure): after the step
        # the gradients are still those the update used (zero_grad comes later)
        params = [p for g in opt.param_groups for p in g["params"]]
        self.post.append(_global_norm(opt))
        if self.first_grads is None:
            self.first_grads = [p.grad.detach().clone() for p in params]
            self.first_weights = [p.detach().clone() for p in params]


def _train(make_cfg, run_dir: Path, *overrides: str, extras: dict | None = None) -> tuple[dict, ClipProbe]:
    probe = ClipProbe()
    cfg = make_cfg(*GPU_ON_CPU, *SHORT, *overrides)
    summary = run_training(cfg, run_dir, extras=extras, callbacks=[probe])
    return summary, probe


def _group_losses(run_dir: Path, row: int) -> list[float]:
    """The per-group mean train losses of one logging window (row 0: the first, -1: the last)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if any(k.startswith("train/loss/") for k in r)]
    return [v for k, v in sorted(rows[row].items()) if k.startswith("train/loss/")]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


# -- the settings, in one place -------------------------------------------------------------------
def test_trainer_gpu_resolves_every_gpu_setting_and_the_cpu_default_none(make_cfg, monkeypatch) -> None:
    gpu = resolve_device_settings(make_cfg(*GPU_ON_CPU))
    assert gpu == DeviceSettings("cpu", "bf16-mixed", True, True, False, False)
    assert gpu.autocast_dtype is torch.bfloat16 and not gpu.grad_scaler
    cpu = resolve_device_settings(make_cfg())
    assert cpu == DeviceSettings("cpu", "32-true", False, False, False, False)
    assert cpu.autocast_dtype is None
    # on a CUDA node the defaults ("auto") are the GPU path: a single place decides
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    auto = resolve_device_settings(make_cfg("train.compile=true"))
    assert auto == DeviceSettings("cuda", "bf16-mixed", True, True, True, False, sync_free=True)
    fp16 = resolve_device_settings(make_cfg("trainer.precision=16-mixed", "trainer.fused_optimizer=false"))
    assert fp16.grad_scaler and fp16.autocast_dtype is torch.float16 and not fp16.fused_adamw
    assert not resolve_device_settings(make_cfg("trainer.precision=32-true")).tf32  # full fp32 stays exact


# -- the crash, and clipping that matches the unfused reference -----------------------------------
def test_fused_adamw_clips_under_bf16_mixed_as_the_unfused_reference(make_cfg, tmp_path: Path) -> None:
    s, fused = _train(make_cfg, tmp_path / "fused", "train.max_steps=6", f"train.grad_clip={CLIP}")
    unfused = ["train.max_steps=6", f"train.grad_clip={CLIP}", "trainer.fused_optimizer=false"]
    _, ref = _train(make_cfg, tmp_path / "unfused", *unfused)
    assert fused.fused and not ref.fused
    assert fused.precision == ref.precision == "bf16-mixed"
    assert s["steps"] == 6 and len(fused.post) == 6
    # clipping happened, to the global norm, on every step
    assert min(fused.pre) > 10 * CLIP, fused.pre
    assert max(fused.post) == pytest.approx(CLIP, rel=1e-4), fused.post
    # the same clipped gradients reach the fused and the unfused step; the updates agree to 1e-6
    assert _max_diff(fused.first_grads, ref.first_grads) == 0.0
    assert _max_diff(fused.first_weights, ref.first_weights) < 1e-6
    assert fused.pre[0] == ref.pre[0]


def test_clipping_never_calls_lightnings_precision_plugin(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """Works with and without the upstream fix (lightning#21436): the plugin's clip_gradients, which
    raises for fused optimizers in 2.6.6 and is patched upstream, is not on our path at all."""

    def refuse(*args, **kwargs) -> None:
        raise AssertionError("MixedPrecision.clip_gradients was called")

    monkeypatch.setattr(MixedPrecision, "clip_gradients", refuse)
    _, probe = _train(make_cfg, tmp_path / "run", "train.max_steps=2", f"train.grad_clip={CLIP}")
    assert max(probe.post) == pytest.approx(CLIP, rel=1e-4)


def test_16_mixed_with_a_grad_scaler_unscales_before_clipping(make_cfg, tmp_path: Path) -> None:
    """fp16 + GradScaler + fused AdamW + clipping in Lightning on a CPU (explicit plugin), against the
    unfused run, where Lightning unscales itself. The clip value (100) lies between the true gradient
    norm (~1-3) and the scaled one (x 1024): clipping before unscaling would cut the step to 100 / 1024
    of its size, unscaling twice would shrink it 1024-fold; both runs must see the true gradients."""
    from aioli_repro.bench import QUIET_TRAINER, _make_dm  # the bench's Trainer options and DataModule
    from aioli_repro.mixing.static import Stratified
    from aioli_repro.training.callbacks import MixingCallback
    from aioli_repro.training.module import MixingLM, OptimConfig
    from aioli_repro.training.preflight import build_data

    cfg = make_cfg(*GPU_ON_CPU, *SHORT, "train.max_steps=2")
    _, packed = build_data(cfg)
    probes = []
    for fused in (True, False):
        torch.manual_seed(0)
        settings = DeviceSettings("cpu", "16-mixed", fused, False, False, False)
        optim = OptimConfig(lr=2e-3, warmup_steps=0)
        module = MixingLM(instantiate(cfg.model), list(cfg.groups.names), 2, optim=optim, settings=settings)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        probe = ClipProbe()
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=2,
            gradient_clip_val=100.0,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
            callbacks=[MixingCallback(Stratified()), probe],
            **QUIET_TRAINER,
        )
        trainer.fit(module, datamodule=_make_dm(cfg, packed))
        assert probe.fused is fused and scaler.get_scale() == 2.0**10  # no overflow: both steps taken
        probes.append(probe)
    fused, ref = probes
    assert 0.1 < ref.post[0] < 100.0, ref.post  # the true (unscaled, unclipped) gradient norm
    assert fused.post[0] == pytest.approx(ref.post[0], rel=1e-6)
    assert _max_diff(fused.first_grads, ref.first_grads) < 1e-6 * max(1.0, ref.post[0])
    assert _max_diff(fused.first_weights, ref.first_weights) < 1e-6


def test_clip_gradients_unscales_once_and_clips_the_global_norm() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(torch.ones(()))  # a backward through scaler.scale(loss) sets its scale
    grads = [torch.randn(8, 8) for _ in params]
    for p, g in zip(params, grads):
        p.grad = g * 256.0  # as a scaled backward leaves them
    clip_gradients_(opt, 0.5, "norm", scaler)
    norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * (0.5 / norm), rtol=1e-5, atol=1e-7)
    clip_gradients_(opt, 0.5, "norm", scaler)  # already unscaled this step: not divided again
    assert _global_norm(opt) == pytest.approx(0.5, rel=1e-5)
    clip_gradients_(opt, 0.01, "value", scaler)
    assert max(float(p.grad.abs().max()) for p in params) <= 0.01
    with pytest.raises(ValueError, match="norm"):
        clip_gradients_(opt, 1.0, "bogus")


# -- every method family with the GPU settings ----------------------------------------------------
METHODS = {
    "stratified": ["train.max_steps=20"],
    "aioli": [
        "method=aioli",
        "train.max_steps=20",
        "method.mixer.update_steps=10",
        "method.mixer.lp_rounds=1",
        "method.mixer.lp_steps=2",
    ],  # fmt: skip
    "doge": ["method=doge", "train.max_steps=12"],
    "doremi": ["method=doremi", "train.max_steps=20"],
    "skillit": [
        "method=skillit",
        "train.max_steps=20",
        "method.mixer.graph=[[1.0,0.2],[0.3,1.0]]",
        "method.mixer.update_steps=10",
        "method.mixer.eval_every=5",
    ],  # fmt: skip
}


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> str:
    """DoReMi's reference: a short stratified run's final weights."""
    from conftest import compose_config

    run_dir = tmp_path_factory.mktemp("reference")
    base = ["scale=tiny", f"cache_dir={cache_dir}", "progress=false", "num_threads=2", "logger=none"]
    run_training(compose_config(*base, *SHORT, "train.max_steps=10"), run_dir)
    return str(run_dir / "checkpoints" / "final.ckpt")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_with_the_gpu_settings(method, make_cfg, tmp_path, reference_checkpoint) -> None:
    extras = {"reference_checkpoint": reference_checkpoint} if method == "doremi" else None
    s, probe = _train(make_cfg, tmp_path / method, *METHODS[method], "train.grad_clip=0.5", extras=extras)
    assert probe.fused and probe.precision == "bf16-mixed"
    steps = s["steps"]
    assert steps == int(METHODS[method][-1 if method == "stratified" else 1].split("=")[1])
    assert len(probe.post) == steps and max(probe.post) <= 0.5 * (1 + 1e-4)  # clipped where above 0.5
    first, last = _group_losses(tmp_path / method, 0), _group_losses(tmp_path / method, -1)
    assert torch.isfinite(torch.tensor(first + last)).all()
    # per-group train loss (DoGE/DoReMi backpropagate a reweighted loss): ~5.7 nats untrained
    assert sum(last) / len(last) < sum(first) / len(first) - 0.3, (first, last)
    assert all(v < 5.6 for v in s["test_loss"].values()), s["test_loss"]
