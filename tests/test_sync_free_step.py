"""The steady-state training step never reads a device value on the host (the GPU path, on CPU).

A host read (`.item()`, `.cpu()`, `.tolist()`, `.numpy()`, `float(t)`, `int(t)`, `bool(t)`) makes the
CPU wait for the GPU; in the step it stalls the launch queue every step. These tests train the GPU
configuration (`trainer=gpu` on CPU, bf16-mixed, fused AdamW, clipping, `settings.sync_free`) and make
every such read raise inside each training step from step 2 on: batch drawing and transfer, forward,
the method's loss, backward, clipping, the optimizer step and the method's between-step work.

Allowed, and so let through: what runs every `log_every` steps (`MixingLM.finish_step` at log points:
the train metrics and the deferred non-finite check), the evaluations a method asks for (their losses
are what the method needs on the host: Aioli's LearnParams at probe boundaries), checkpoints, and the
DoReMi/DoGE weights' log points (`AveragedWeightsMethod.log_metrics` every `log_every` updates: the
one place their device weights are read back during training).
"""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path

import lightning as L
import pytest
import torch

from aioli_repro.mixing.averaged_weights import AveragedWeightsMethod
from aioli_repro.training.module import MixingLM
from aioli_repro.training.run import run_training

READS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__")


class HostReadInStep(AssertionError):
    pass


class ForbidHostReads(L.Callback):
    """Host reads raise between on_train_batch_start and on_train_batch_end of steps >= `start`."""

    def __init__(self, start: int = 2) -> None:
        self.start, self.forbidden, self.steps_checked = start, False, 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.settings = dataclasses.replace(pl_module.settings, sync_free=True)  # the CUDA path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.forbidden = trainer.global_step >= self.start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.steps_checked += self.forbidden
        self.forbidden = False

    def on_exception(self, trainer, pl_module, exception) -> None:  # noqa: ANN001
        self.forbidden = False  # Lightning's teardown moves the model to the CPU

    def allowed(self, fn):  # noqa: ANN001, ANN201
        """Let `fn` read freely (restoring the window after it)."""

        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            was, self.forbidden = self.forbidden, False
            try:
                return fn(*args, **kwargs)
            finally:
                self.forbidden = was

        return wrapped


@pytest.fixture
def guard(monkeypatch) -> ForbidHostReads:
    g = ForbidHostReads()
    for name in READS:
        real = getattr(torch.Tensor, name)

        def check(self, *args, _real=real, _name=name, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if g.forbidden:
                where = "".join(traceback.format_stack(limit=6)[:-1])
                raise HostReadInStep(f"Tensor.{_name} inside a training step, at:\n{where}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, check)
    monkeypatch.setattr(MixingLM, "evaluate", g.allowed(MixingLM.evaluate))
    finish = MixingLM.finish_step

    def finish_step(self: MixingLM, step: int) -> None:
        at_log_point = step % self.log_every == 0 or step == self.max_steps
        return (g.allowed(finish) if at_log_point else finish)(self, step)

    monkeypatch.setattr(MixingLM, "finish_step", finish_step)
    log_metrics = AveragedWeightsMethod.log_metrics

    def method_log_metrics(self: AveragedWeightsMethod) -> dict[str, float]:
        at_log_point = self.n_updates % self.log_every == 0
        return (g.allowed(log_metrics) if at_log_point else log_metrics)(self)

    monkeypatch.setattr(AveragedWeightsMethod, "log_metrics", method_log_metrics)
    return g


@pytest.fixture(scope="module")
def doremi_reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> str:
    """DoReMi's reference: a 4-step stratified run's final weights."""
    from conftest import compose_config

    run_dir = tmp_path_factory.mktemp("reference")
    base = ["scale=tiny", f"cache_dir={cache_dir}", "progress=false", "logger=none", "num_threads=2"]
    run_training(compose_config(*base, "train.max_steps=4", "train.checkpoint_every=0"), run_dir)
    return str(run_dir / "checkpoints" / "final.ckpt")


GPU_ON_CPU = ["trainer=gpu", "trainer.accelerator=cpu", "train.val_every=0", "train.checkpoint_every=10"]
METHODS = {
    "stratified": [],
    "static": ["method=static", "method.mixer.proportions=[0.3,0.7]"],
    # 2 rounds of 10 steps: LearnParams probes in steps 1-4 and 11-14, exploitation in between
    "aioli": [
        "method=aioli",
        "method.mixer.update_steps=10",
        "method.mixer.lp_rounds=1",
        "method.mixer.lp_steps=2",
    ],
    # the weights' log points every 5 updates; mu large enough that alpha moves in 20 steps
    "doremi": ["method=doremi", "hp.doremi.log_every=5", "hp.doremi.mu=1.0"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_host_read_in_a_steady_state_step(method, guard, make_cfg, tmp_path: Path, request) -> None:
    cfg = make_cfg(*GPU_ON_CPU, "train.max_steps=20", "train.log_every=5", *METHODS[method])
    extras = (
        {"reference_checkpoint": request.getfixturevalue("doremi_reference")} if method == "doremi" else None
    )
    s = run_training(cfg, tmp_path, callbacks=[guard], extras=extras)
    assert s["steps"] == 20 and guard.steps_checked == 18  # steps 3..20 (global_step 2..19 at their start)
    if method == "doremi":  # the weights moved on the device and reached the summary
        learned = list(s["learned_proportions"].values())
        assert sum(learned) == pytest.approx(1.0) and abs(learned[0] - 0.5) > 1e-4, learned
    if method == "aioli":  # both kinds of steps ran under the guard, and the probes were evaluated
        assert s["method_evals"] >= 4 and any(t["probe"] for t in s["trajectory"])
        assert any(not t["probe"] and t["step"] > 2 for t in s["trajectory"])


def test_the_guard_catches_a_host_read(guard, make_cfg, tmp_path: Path) -> None:
    """The check can fail: a method that reads its loss back every step is stopped at step 3."""
    from aioli_repro.mixing.static import Stratified

    class Reads(Stratified):
        def training_loss(self, batch, seq_loss, step):  # noqa: ANN001, ANN201
            self.last = seq_loss.mean().item()
            return seq_loss.mean()

    cfg = make_cfg(*GPU_ON_CPU, "train.max_steps=6")
    with pytest.raises(HostReadInStep, match="Tensor.item"):
        run_training(cfg, tmp_path, method=Reads(), callbacks=[guard])
