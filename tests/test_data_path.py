"""The training data path: tokens gathered into a reused host buffer of the packed dtype (pinned on CUDA),
copied without blocking, widened to int64 on the device (datamodule.py).

- the batches the model sees are bitwise those of the old path (`np.stack(rows).astype(np.int64)`),
  for uint16 and uint32 storage and for one rank's slice of a DDP batch;
- the host buffer is one fixed tensor of the storage dtype on CPU, and a draw allocates less host
  memory than one batch of tokens (the old path allocated five such batches: stack + int64);
- a 10-step CPU run's losses are bitwise those recorded before the change;
- on CUDA (skipped without): two pinned buffers taking turns, each refilled only after the event of its
  last copy, so a copy still queued behind GPU work is never overwritten.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from aioli_repro import world
from aioli_repro.data.datamodule import Batch, MixtureDataModule
from aioli_repro.data.sampler import MixtureSampler
from aioli_repro.training.run import run_training

GROUPS = ("a", "b", "c")
B, T, SEED = 8, 64, 3


def _packed(dtype: np.dtype, t: int = T) -> SimpleNamespace:
    """Random token windows over the dtype's whole range (high bits set: a sign slip would show)."""
    rng = np.random.default_rng(0)
    hi = np.iinfo(dtype).max
    train = {
        g: rng.integers(0, hi, size=(11 + 7 * i, t), endpoint=True).astype(dtype)
        for i, g in enumerate(GROUPS)
    }
    return SimpleNamespace(groups=list(GROUPS), train=train, val=train, test=train, manifest={})


def _old_batches(
    packed: SimpleNamespace, n: int, proportions: list[np.ndarray]
) -> list[tuple[np.ndarray, ...]]:
    """The path before the change, on its own sampler: (int64 tokens, int64 group ids) per draw."""
    arrays = [packed.train[g] for g in GROUPS]
    sampler = MixtureSampler([len(a) for a in arrays], B, SEED)
    out = []
    for i in range(n):
        sampler.set_proportions(proportions[i])
        gids, sidx = sampler.next_batch()
        per, r = B // world.size(), world.rank()
        gids, sidx = gids[r * per : (r + 1) * per], sidx[r * per : (r + 1) * per]
        out.append(
            (np.stack([arrays[g][s] for g, s in zip(gids, sidx)]).astype(np.int64), gids.astype(np.int64))
        )
    return out


def _proportions(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.dirichlet(np.ones(len(GROUPS))) for _ in range(n)]


def _new_batches(
    dm: MixtureDataModule, n: int, proportions: list[np.ndarray], device: str, pin: bool
) -> list[Batch]:
    out = []
    for i in range(n):
        dm.sampler.set_proportions(proportions[i])
        out.append(dm.transfer_batch_to_device(dm.draw_batch(pin=pin), torch.device(device), 0))
    return out


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("ranks", [1, 2])
def test_batches_are_bitwise_the_old_paths(dtype, ranks: int, monkeypatch) -> None:
    if ranks > 1:  # rank 1 of 2 keeps the second half of every global batch
        monkeypatch.setattr(world, "size", lambda: ranks)
        monkeypatch.setattr(world, "rank", lambda: 1)
    packed, props = _packed(np.dtype(dtype)), _proportions(20)
    old = _old_batches(packed, 20, props)
    new = _new_batches(MixtureDataModule(packed, B, SEED), 20, props, "cpu", pin=False)
    for (tokens, gids), batch in zip(old, new, strict=True):
        assert batch.tokens.dtype == torch.int64 and batch.tokens.shape == (B // ranks, T)
        assert torch.equal(batch.tokens, torch.from_numpy(tokens))
        assert torch.equal(batch.group_ids, torch.from_numpy(gids))
    assert int(old[0][0].max()) > np.iinfo(np.int16).max  # the values a signed 16-bit view would break


def test_the_host_buffer_is_reused_in_the_storage_dtype() -> None:
    t = 4096  # one batch: 64 KiB of uint16, 256 KiB as int64
    dm = MixtureDataModule(_packed(np.dtype(np.uint16), t), B, SEED)
    dm.draw_batch()  # allocates the buffer
    tracemalloc.start()
    try:
        drawn = [dm.draw_batch() for _ in range(20)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert {b.tokens.data_ptr() for b in drawn} == {dm._staging.buffers[0].data_ptr()}  # one buffer on CPU
    assert all(b.tokens.dtype == torch.uint16 for b in drawn) and dm.token_dtype == np.uint16
    assert len(dm._staging.buffers) == 1 and dm._staging.events == [None]  # CPU: never pinned, no events
    assert peak < B * t * 2, f"a draw allocated {peak} bytes on the host"  # less than one uint16 batch
    # the device batch is a copy: the next draw does not change it
    moved = dm.transfer_batch_to_device(drawn[-1], torch.device("cpu"), 0)
    before = moved.tokens.clone()
    dm.draw_batch()
    assert torch.equal(moved.tokens, before) and moved.tokens.data_ptr() != drawn[-1].tokens.data_ptr()


class _LossProbe(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.dtypes: set[torch.dtype] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))
        self.dtypes.add(batch.tokens.dtype)


# losses of the same run with main before this change (stack + astype(int64) on the host)
OLD_LOSSES = [
    5.803007125854492,
    5.8006696701049805,
    5.53981876373291,
    5.434226989746094,
    5.317268371582031,
    5.197437763214111,
    5.1289520263671875,
    5.0344414710998535,
    5.039854049682617,
    5.061488151550293,
]


def test_cpu_run_losses_are_bitwise_those_before_the_change(make_cfg, tmp_path: Path) -> None:
    probe = _LossProbe()
    cfg = make_cfg(
        "train.max_steps=10",
        "train.checkpoint_every=0",
        "train.val_every=0",
        "train.val_max_seqs=8",
        "train.test_max_seqs=8",
        "train.warmup_steps=2",
    )
    run_training(cfg, tmp_path / "run", callbacks=[probe])
    assert probe.losses == OLD_LOSSES
    assert probe.dtypes == {torch.int64}


# -- CUDA ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pinned_double_buffer_waits_for_each_copy(monkeypatch) -> None:
    packed, props = _packed(np.dtype(np.uint16)), _proportions(20)
    old = _old_batches(packed, 20, props)
    dm = MixtureDataModule(packed, B, SEED)
    waits = []
    synchronize = torch.cuda.Event.synchronize
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda ev: (waits.append(ev), synchronize(ev))[1])
    torch.cuda._sleep(int(5e8))  # queue ~0.25 s of GPU work ahead of the first copies
    new = _new_batches(dm, 20, props, "cuda", pin=True)
    ptrs = [b.data_ptr() for b in dm._staging.buffers]
    assert len(set(ptrs)) == 2 and all(b.is_pinned() for b in dm._staging.buffers)
    assert len(waits) == 18  # every draw after the first two waited on its buffer's last copy
    for (tokens, gids), batch in zip(old, new, strict=True):  # no buffer was refilled under its copy
        assert batch.tokens.is_cuda and batch.tokens.dtype == torch.int64
        assert torch.equal(batch.tokens.cpu(), torch.from_numpy(tokens))
        assert torch.equal(batch.group_ids.cpu(), torch.from_numpy(gids))
