"""Lightning DataModule: packed groups + the mixture sampler.

The train dataloader yields only step tickets; the batch itself is drawn from the sampler in
`on_before_batch_transfer`, which Lightning calls for the batch it is about to train on (after
the previous step's callbacks ran). Lightning's one-batch prefetch therefore never sees a stale
mixture, and a method's new proportions apply to the very next step.

A batch's tokens are gathered into a reused host buffer in the packed arrays' own dtype (uint16 or
uint32; pinned on CUDA), copied to the device without blocking, and widened to int64 there
(`transfer_batch_to_device`): no per-step host token array, and a quarter (uint16) of int64's bytes
cross the bus.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from aioli_repro import world
from aioli_repro.data.cache import PackedGroups
from aioli_repro.data.sampler import MixtureSampler
from aioli_repro.data.source import DataError


@dataclass
class Batch:
    """One training batch: token windows and the group of each row."""

    # (B, T): from `draw_batch`, a view of a reused host buffer in the packed arrays' dtype, valid until
    # the next draw; after `transfer_batch_to_device`, int64 on the device (what the model sees)
    tokens: torch.Tensor
    group_ids: torch.Tensor  # (B,) int64, index into the run's groups
    # sequences per group in the whole (global) batch, counted on the host when it was drawn, so a
    # method that needs them (Aioli's probe mixtures) never reads them back from the device
    group_counts: np.ndarray | None = None


class _StepTickets(IterableDataset):
    """An endless stream of step numbers; Lightning stops at trainer.max_steps."""

    def __iter__(self) -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1


class _HostStaging:
    """The reused host buffers a batch's tokens are gathered into, in the packed arrays' dtype.

    Pinned (CUDA), a buffer's copy to the device is a true asynchronous DMA that may still be reading it
    when the next batch is drawn: the sync-free step lets the host run ahead of the GPU. So two buffers
    take turns, and an event recorded after each copy is waited on before that buffer is refilled: the
    host waits only when it is two steps ahead of the GPU (with one buffer, already at one step).
    Pageable (CPU), the copy is done before `transfer_batch_to_device` returns: one buffer is enough.
    """

    def __init__(self, shape: tuple[int, int], dtype: np.dtype, pin: bool) -> None:
        self.key = (shape, dtype, pin)
        torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        self.buffers = [torch.empty(shape, dtype=torch_dtype, pin_memory=pin) for _ in range(2 if pin else 1)]
        self.events: list[torch.cuda.Event | None] = [None] * len(self.buffers)
        self._next = 0

    def take(self) -> torch.Tensor:
        """The next buffer to fill, once the last copy that read it has finished."""
        i, self._next = self._next, (self._next + 1) % len(self.buffers)
        event = self.events[i]
        if event is not None:
            event.synchronize()
        return self.buffers[i]

    def copy_queued(self, buffer: torch.Tensor, device: torch.device) -> None:
        """Mark `buffer`'s asynchronous copy (just queued on `device`'s current stream) as in flight."""
        for i, b in enumerate(self.buffers):
            if b is buffer and device.type == "cuda":
                self.events[i] = self.events[i] or torch.cuda.Event()
                self.events[i].record(torch.cuda.current_stream(device))


class MixtureDataModule(L.LightningDataModule):
    def __init__(
        self,
        packed: PackedGroups,
        batch_size: int,
        seed: int,
        composition: str = "multinomial",
        val_max_seqs: int | None = None,
        test_max_seqs: int | None = None,
    ) -> None:
        super().__init__()
        self.packed = packed
        self.groups = list(packed.groups)
        self.batch_size = batch_size
        self.val_max_seqs = val_max_seqs
        self.test_max_seqs = test_max_seqs
        self.train_arrays = [packed.train[g] for g in self.groups]
        self.sampler = MixtureSampler([len(a) for a in self.train_arrays], batch_size, seed, composition)
        self.token_dtype = np.result_type(*self.train_arrays)  # the packed (storage) dtype
        self._staging: _HostStaging | None = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_StepTickets(), batch_size=None, num_workers=0)

    def draw_batch(self, pin: bool = False) -> Batch:
        """This rank's rows of the next global batch under the sampler's current proportions.

        Every rank draws the same global batch (same sampler state and proportions) and keeps its own
        contiguous slice, so N devices train on exactly the batches, and group compositions, of one.
        The tokens are a reused host buffer (pinned if `pin`: only for a copy to a CUDA device).
        """
        gids, sidx = self.sampler.next_batch()
        counts = np.bincount(gids, minlength=len(self.groups)).astype(np.float64)
        n, r = world.size(), world.rank()
        if n > 1:
            if len(gids) % n:
                raise DataError(f"train.batch_size {len(gids)} does not split over {n} devices")
            per = len(gids) // n
            gids, sidx = gids[r * per : (r + 1) * per], sidx[r * per : (r + 1) * per]
        tokens = self._buffer((len(gids), self.train_arrays[0].shape[1]), pin)
        np.stack([self.train_arrays[g][s] for g, s in zip(gids, sidx)], out=tokens.numpy())
        return Batch(tokens, torch.from_numpy(gids.astype(np.int64)), counts)

    def _buffer(self, shape: tuple[int, int], pin: bool) -> torch.Tensor:
        key = (shape, self.token_dtype, pin)
        if self._staging is None or self._staging.key != key:  # allocated once per batch shape
            self._staging = _HostStaging(shape, self.token_dtype, pin)
        return self._staging.take()

    def on_before_batch_transfer(self, batch: object, dataloader_idx: int) -> object:
        if isinstance(batch, (int, torch.Tensor)) and self.trainer is not None and self.trainer.training:
            # pinning needs CUDA: a CPU run, even on a GPU node, keeps a pageable buffer
            pin = torch.cuda.is_available() and self.trainer.strategy.root_device.type == "cuda"
            return self.draw_batch(pin=pin)
        return batch

    def transfer_batch_to_device(self, batch: object, device: torch.device, dataloader_idx: int) -> object:
        """A drawn Batch: tokens copied without blocking, then widened to int64 on the device.

        Here rather than in the module: the datamodule owns the staging buffers, and the event that
        guards a buffer's reuse has to be recorded right after the copy that reads it.
        """
        if not isinstance(batch, Batch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        # copy=True: on a CPU run `.to` returns the reused buffer itself, which `.long()` of an int64
        # buffer would pass on; the batch must not change under the step when the next one is drawn
        tokens = batch.tokens.to(device, non_blocking=True, copy=True)
        if self._staging is not None:
            self._staging.copy_queued(batch.tokens, device)
        group_ids = batch.group_ids.to(device, non_blocking=True)
        return Batch(tokens.long(), group_ids, batch.group_counts)

    def eval_sequences(self, split: str) -> tuple[list[np.ndarray], int | None]:
        """Held-out arrays per group (in group order) and the configured cap on sequences per group."""
        if split == "val":
            return [self.packed.val[g] for g in self.groups], self.val_max_seqs
        if split == "test":
            return [self.packed.test[g] for g in self.groups], self.test_max_seqs
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")

    def _data_key(self) -> str | None:
        return (getattr(self.packed, "manifest", None) or {}).get("key_hash")

    def state_dict(self) -> dict:
        # the cache key pins the exact packed data: a resume on other data would silently train on it
        return {"sampler": self.sampler.state_dict(), "data_key": self._data_key()}

    def load_state_dict(self, state_dict: dict) -> None:
        saved, now = state_dict.get("data_key"), self._data_key()
        if saved is not None and now is not None and saved != now:
            raise DataError(
                f"resume: the checkpoint was trained on data cache {saved}, this run's data is cache {now} "
                "(the source, tokenizer, context length or data seed changed); use a new run directory"
            )
        try:
            self.sampler.load_state_dict(state_dict["sampler"])
        except ValueError as e:  # group sizes differ: the data changed under the run
            raise DataError(f"resume: {e}") from e
