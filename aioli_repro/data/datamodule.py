"""Lightning DataModule: packed groups + the mixture sampler.

The train dataloader yields only step tickets; the batch itself is drawn from the sampler in
`on_before_batch_transfer`, which Lightning calls for the batch it is about to train on (after
the previous step's callbacks ran). Lightning's one-batch prefetch therefore never sees a stale
mixture, and a method's new proportions apply to the very next step.
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

    tokens: torch.Tensor  # (B, T) int64
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

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_StepTickets(), batch_size=None, num_workers=0)

    def draw_batch(self) -> Batch:
        """This rank's rows of the next global batch under the sampler's current proportions.

        Every rank draws the same global batch (same sampler state and proportions) and keeps its own
        contiguous slice, so N devices train on exactly the batches, and group compositions, of one.
        """
        gids, sidx = self.sampler.next_batch()
        counts = np.bincount(gids, minlength=len(self.groups)).astype(np.float64)
        n, r = world.size(), world.rank()
        if n > 1:
            if len(gids) % n:
                raise DataError(f"train.batch_size {len(gids)} does not split over {n} devices")
            per = len(gids) // n
            gids, sidx = gids[r * per : (r + 1) * per], sidx[r * per : (r + 1) * per]
        rows = np.stack([self.train_arrays[g][s] for g, s in zip(gids, sidx)]).astype(np.int64)
        return Batch(torch.from_numpy(rows), torch.from_numpy(gids.astype(np.int64)), counts)

    def on_before_batch_transfer(self, batch: object, dataloader_idx: int) -> object:
        if isinstance(batch, (int, torch.Tensor)) and self.trainer is not None and self.trainer.training:
            return self.draw_batch()
        return batch

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
