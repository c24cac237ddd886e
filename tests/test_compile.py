"""torch.compile of the decoder (train.compile=true): static shapes, one graph per batch shape, no
recompilation per step. Dynamo's tracing and guards decide recompiles whatever the backend, so the
test compiles with the "eager" backend (no code generation) to stay fast on a CPU; the compiled-vs-eager
losses on real kernels are checked on a GPU (tests/test_gpu.py) and by `make gpu-check`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch._dynamo.utils import counters

from aioli_repro.training.run import run_training


class GraphCount(L.Callback):
    """Dynamo's count of compiled graphs after every step."""

    def __init__(self) -> None:
        self.after_step: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.after_step[trainer.global_step] = counters["stats"]["unique_graphs"]


@pytest.fixture
def eager_backend(monkeypatch) -> list[dict]:
    calls = []
    real = torch.compile

    def compile_(model, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append(kwargs)
        return real(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    counters.clear()
    yield calls
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> str:
    """DoReMi's reference: a 4-step stratified run's final weights."""
    from conftest import compose_config

    run_dir = tmp_path_factory.mktemp("reference")
    base = ["scale=tiny", f"cache_dir={cache_dir}", "progress=false", "logger=none", "train.max_steps=4"]
    run_training(compose_config(*base, "train.checkpoint_every=0"), run_dir)
    return str(run_dir / "checkpoints" / "final.ckpt")


@pytest.mark.parametrize("method", ["stratified", "doge", "doremi"])
def test_no_recompile_per_step(method, eager_backend, make_cfg, tmp_path: Path, reference) -> None:
    cfg = make_cfg(
        "train.compile=true", f"method={method}", "train.max_steps=12", "train.val_every=4",
        "train.checkpoint_every=0", "train.val_max_seqs=40",  # 80 val sequences: batches of 32, 32, 16
    )  # fmt: skip
    counts = GraphCount()
    extras = {"reference_checkpoint": reference} if method == "doremi" else None
    s = run_training(cfg, tmp_path, callbacks=[counts], extras=extras)
    # static shapes; DoReMi compiles its reference model too (a second compile call)
    assert eager_backend == [{"dynamic": False}] * (2 if method == "doremi" else 1)
    assert s["steps"] == 12
    # a graph per shape, each compiled once: train (8 rows), eval (32) and its 16-row tail; DoGE adds its
    # 2-row val batch and one graph with a dynamic batch dimension for all its per-group forwards; DoReMi
    # its reference's no-grad forward
    graphs = counts.after_step
    assert graphs[12] == graphs[5] <= {"stratified": 3, "doge": 5, "doremi": 4}[method], graphs
