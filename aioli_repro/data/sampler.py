"""Mixture sampler: which group and which packed sequence fills each slot of the next batch.

Two compositions:
- ``multinomial``: each sequence's group is drawn i.i.d. from p (the paper and official code);
  a batch's composition is Multinomial(B, p), exact only in expectation.
- ``exact``: counts per batch by largest remainder on p·B plus a carried deficit, so the
  cumulative count of every group stays within one sequence of p·(sequences so far). Aioli's
  probe intervals use it so their mixtures are realised for every m (the official m=7 probes are not).

Proportions can change between any two steps: the sampler draws at the moment a batch is
requested, never ahead. Its whole state (RNG, per-group cursors, carried deficit) is a small
dict that checkpoints save and restore, so a resumed run draws the same batches.
"""

from __future__ import annotations

import math

import numpy as np

COMPOSITIONS = ("multinomial", "exact")


class ProportionError(ValueError):
    """Proportions that are not a distribution over the configured groups."""


def validate_proportions(p: object, m: int, field: str = "proportions", atol: float = 1e-6) -> np.ndarray:
    """Return p as a float64 array, or raise naming the field: length m, finite, >= 0, sums to 1."""
    try:
        arr = np.asarray(p, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ProportionError(f"{field}: not a list of numbers: {p!r}") from e
    if arr.shape[0] != m:
        raise ProportionError(
            f"{field}: expected {m} values (one per group), got {arr.shape[0]}: {arr.tolist()}"
        )
    if not np.all(np.isfinite(arr)):
        raise ProportionError(f"{field}: values must be finite, got {arr.tolist()}")
    if np.any(arr < 0):
        raise ProportionError(f"{field}: values must be >= 0, got {arr.tolist()}")
    total = float(arr.sum())
    if not math.isclose(total, 1.0, abs_tol=atol):
        raise ProportionError(f"{field}: values must sum to 1 (within {atol}), got sum {total:.6g}")
    return arr / total


def largest_remainder(target: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` that round ``target`` (summing to ``total``) by largest remainder.

    Ties break towards the lower group index, so the result is deterministic.
    """
    base = np.floor(target + 1e-9).astype(np.int64)
    short = int(total - base.sum())
    if short > 0:
        frac = target - base
        order = np.lexsort((np.arange(len(target)), -frac))
        base[order[:short]] += 1
    elif short < 0:  # only from float noise: take back from the smallest remainders
        frac = target - base
        order = np.lexsort((np.arange(len(target)), frac))
        for i in order:
            if short == 0:
                break
            if base[i] > 0:
                base[i] -= 1
                short += 1
    return base


class MixtureSampler:
    """Draws (group, sequence index) pairs for each training batch from the current proportions."""

    def __init__(
        self,
        group_sizes: list[int],
        batch_size: int,
        seed: int,
        composition: str = "multinomial",
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if any(n <= 0 for n in group_sizes):
            raise ValueError(f"every group needs at least one training sequence, got sizes {group_sizes}")
        self.group_sizes = [int(n) for n in group_sizes]
        self.m = len(group_sizes)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.composition = self._check_composition(composition)
        self.proportions = np.full(self.m, 1.0 / self.m)
        self.rng = np.random.default_rng(self.seed)
        # per group: pass over the data (epoch) and position within that pass's permutation
        self.epoch = np.zeros(self.m, dtype=np.int64)
        self.pos = np.zeros(self.m, dtype=np.int64)
        self.deficit = np.zeros(self.m)  # exact mode: p·n minus what was delivered so far
        self.delivered = np.zeros(self.m, dtype=np.int64)  # sequences drawn per group, all time
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    @staticmethod
    def _check_composition(c: str) -> str:
        if c not in COMPOSITIONS:
            raise ValueError(f"composition: unknown value {c!r}; allowed: {list(COMPOSITIONS)}")
        return c

    def set_proportions(self, p: object, composition: str | None = None) -> None:
        """Use p (validated) from the next batch on; optionally switch composition mode."""
        new = validate_proportions(p, self.m)
        if composition is not None:
            composition = self._check_composition(composition)
            if composition != self.composition:
                self.deficit[:] = 0.0
            self.composition = composition
        if not np.array_equal(new, self.proportions):
            self.deficit[:] = 0.0  # a new target starts a fresh exact-count ledger
        self.proportions = new

    def _counts(self) -> np.ndarray:
        b = self.batch_size
        if self.composition == "multinomial":
            return self.rng.multinomial(b, self.proportions)
        target = self.proportions * b + self.deficit
        target = np.clip(target, 0.0, None)
        target = target * (b / target.sum()) if target.sum() > 0 else self.proportions * b
        counts = largest_remainder(target, b)
        self.deficit = self.deficit + self.proportions * b - counts
        return counts

    def _permutation(self, g: int) -> np.ndarray:
        # Each pass over a group has its own seeded permutation: the state needs only (epoch, pos).
        epoch = int(self.epoch[g])
        cached = self._perm_cache.get(g)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, g, epoch]).permutation(self.group_sizes[g])
            self._perm_cache[g] = (epoch, perm)
            return perm
        return cached[1]

    def _take(self, g: int, k: int) -> np.ndarray:
        out = np.empty(k, dtype=np.int64)
        filled = 0
        while filled < k:
            perm = self._permutation(g)
            n = min(k - filled, self.group_sizes[g] - int(self.pos[g]))
            out[filled : filled + n] = perm[self.pos[g] : self.pos[g] + n]
            filled += n
            self.pos[g] += n
            if self.pos[g] == self.group_sizes[g]:  # pass finished: a fresh permutation next time
                self.epoch[g] += 1
                self.pos[g] = 0
        return out

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (group ids, sequence indices), each of length batch_size, shuffled within the batch."""
        counts = self._counts()
        groups = np.repeat(np.arange(self.m), counts)
        seqs = np.concatenate([self._take(g, int(c)) for g, c in enumerate(counts) if c > 0])
        order = self.rng.permutation(self.batch_size)
        self.delivered += counts
        return groups[order], seqs[order]

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "epoch": self.epoch.tolist(),
            "pos": self.pos.tolist(),
            "deficit": self.deficit.tolist(),
            "delivered": self.delivered.tolist(),
            "proportions": self.proportions.tolist(),
            "composition": self.composition,
            "group_sizes": self.group_sizes,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["group_sizes"]) != self.group_sizes:
            raise ValueError(
                f"sampler checkpoint was made for group sizes {state['group_sizes']}, data now has "
                f"{self.group_sizes}: the data cache changed since the checkpoint"
            )
        self.rng.bit_generator.state = state["rng"]
        self.epoch = np.asarray(state["epoch"], dtype=np.int64)
        self.pos = np.asarray(state["pos"], dtype=np.int64)
        self.deficit = np.asarray(state["deficit"], dtype=np.float64)
        self.delivered = np.asarray(state["delivered"], dtype=np.int64)
        self.proportions = np.asarray(state["proportions"], dtype=np.float64)
        self.composition = state["composition"]
        self._perm_cache.clear()
