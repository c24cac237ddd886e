"""SlimPajama-6B (`DKYoon/SlimPajama-6B`) or local files of the same schema, as seven groups.

Schema: one row per document with `text` and `meta.redpajama_set_name` (e.g. "RedPajamaArXiv").
The HF dataset has splits train (5,489,000 docs), validation (9,347) and test (9,346).

Splits per group:
- train: the HF `train` split filtered to the group (optionally the first `max_train_docs`, in file
  order, for smoke runs; the cache shuffles training documents afterwards).
- held-out, `heldout="paper"` (default): the paper builds val/test from SlimPajama-6B's
  **validation** split: the group's validation documents are shuffled with `split_seed`
  (`np.random.default_rng(split_seed).permutation`, which is exactly what HF `Dataset.shuffle(seed)`
  does) and the first half (ceil(n/2) docs) is val, the second half test.
- held-out, `heldout="official"`: the official code instead uses the HF **test** split: filter to the
  group, shuffle with seed 42 (here `split_seed`, default 42), even positions -> val, odd -> test.
  The HF validation split is then never used.

Filtering: instead of one `Dataset.filter` pass per group (the official code re-reads the whole
train split for each group), one batched arrow pass computes the row indices of every group, and a
group is `Dataset.select(indices)`. With `streaming=True` a lazy batched `filter` is used instead.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from aioli_repro.data.hub import offline_if_unreachable
from aioli_repro.data.listing import file_signature
from aioli_repro.data.source import SLIMPAJAMA_GROUPS, SPLITS, DataError, GroupSource

#: group name -> `meta.redpajama_set_name`
SET_NAMES: dict[str, str] = {
    "arxiv": "RedPajamaArXiv",
    "book": "RedPajamaBook",
    "c4": "RedPajamaC4",
    "commoncrawl": "RedPajamaCommonCrawl",
    "github": "RedPajamaGithub",
    "stackexchange": "RedPajamaStackExchange",
    "wikipedia": "RedPajamaWikipedia",
}
#: accepted alternative group names (the official code calls commoncrawl "cc")
ALIASES: dict[str, str] = {"cc": "commoncrawl"}
_GROUP_OF_SET = {v: k for k, v in SET_NAMES.items()}
HELDOUT_MODES = ("paper", "official")
_FILE_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# HF split names as they appear in file / folder names
_HF_SPLIT_PREFIXES = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}


def canonical_group(group: str) -> str:
    """'cc' -> 'commoncrawl'; other names unchanged."""
    return ALIASES.get(group, group)


def _classify(path: Path) -> str | None:
    """HF split a data file belongs to, from its file name or any parent folder name."""
    for part in [path.name, *[p.name for p in path.parents]]:
        low = part.lower()
        for split, prefixes in _HF_SPLIT_PREFIXES.items():
            if any(
                low == p or low.startswith(p + "-") or low.startswith(p + "_") or low.startswith(p + ".")
                for p in prefixes
            ):
                return split
    return None


class SlimPajamaSource(GroupSource):
    """The seven SlimPajama groups from the HF hub or local jsonl/json/parquet files."""

    name = "slimpajama"

    def __init__(
        self,
        path: str = "DKYoon/SlimPajama-6B",
        heldout: str = "paper",
        split_seed: int = 42,
        max_train_docs: int | None = None,
        streaming: bool = False,
        hf_cache_dir: str | None = None,
    ) -> None:
        if heldout not in HELDOUT_MODES:
            raise DataError(f"data.source.heldout: must be one of {list(HELDOUT_MODES)}, got {heldout!r}")
        if max_train_docs is not None and (not isinstance(max_train_docs, int) or max_train_docs < 1):
            raise DataError(
                f"data.source.max_train_docs: must be null or an integer >= 1, got {max_train_docs!r}"
            )
        if not path or not str(path).strip():
            raise DataError("data.source.path: empty; give an HF dataset name or a local folder/file")
        self.path = str(path)
        self.heldout = heldout
        self.split_seed = int(split_seed)
        self.max_train_docs = max_train_docs
        self.streaming = bool(streaming)
        self.hf_cache_dir = hf_cache_dir
        self.local_files: dict[str, list[Path]] | None = self._find_local_files()
        self._datasets: dict[str, object] = {}
        self._indices: dict[str, dict[str, np.ndarray]] = {}

    # --- locating data ------------------------------------------------------------------------
    def _find_local_files(self) -> dict[str, list[Path]] | None:
        """HF split -> data files, or None when `path` names a hub dataset."""
        p = Path(os.path.expanduser(self.path))
        if glob.has_magic(self.path):
            candidates = [Path(f) for f in sorted(glob.glob(os.path.expanduser(self.path), recursive=True))]
            if not candidates:
                raise DataError(f"data.source.path: the pattern {self.path!r} matches no files")
        elif p.is_file():
            candidates = [p]
        elif p.is_dir():
            candidates = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif self.path.startswith(("/", ".", "~")) or os.sep in self.path.strip("/").replace("/", "", 1):
            raise DataError(f"data.source.path: {self.path} does not exist")
        else:
            return None  # an HF hub name such as "DKYoon/SlimPajama-6B"
        data = [f for f in candidates if f.suffix in _FILE_EXTS]
        if not data:
            raise DataError(
                f"data.source.path: {self.path} holds no data files ({sorted(_FILE_EXTS)}); expected e.g. "
                "train.jsonl, validation.jsonl, test.jsonl or train/ validation/ test/ folders"
            )
        out: dict[str, list[Path]] = {}
        for f in data:
            split = _classify(f.relative_to(p) if p.is_dir() else Path(f.name))
            if split is None and len(data) == 1:
                split = "train"
            if split is None:
                raise DataError(
                    f"data.source.path: cannot tell which split {f} belongs to; name files or folders "
                    "train*, validation*, test*"
                )
            out.setdefault(split, []).append(f)
        for split, files in out.items():
            kinds = {_FILE_EXTS[f.suffix] for f in files}
            if len(kinds) > 1:
                raise DataError(f"data.source.path: split {split!r} mixes json and parquet files: {files}")
        return out

    def _hf_split(self, split: str) -> str:
        if split == "train":
            return "train"
        return "validation" if self.heldout == "paper" else "test"

    def _load(self, hf_split: str):
        if hf_split in self._datasets:
            return self._datasets[hf_split]
        import datasets

        # an offline node uses the HF cache at once (or fails at once) instead of retrying the hub for minutes
        offline = self.local_files is None and offline_if_unreachable()
        try:
            if self.local_files is None:
                ds = datasets.load_dataset(
                    self.path, split=hf_split, streaming=self.streaming, cache_dir=self.hf_cache_dir
                )
            else:
                files = self.local_files.get(hf_split)
                if not files:
                    raise DataError(
                        f"data.source.path: {self.path} has no {hf_split!r} files (heldout={self.heldout!r} "
                        f"needs it); found splits {sorted(self.local_files)}"
                    )
                builder = _FILE_EXTS[files[0].suffix]
                ds = datasets.load_dataset(
                    builder,
                    data_files={hf_split: [str(f) for f in files]},
                    split=hf_split,
                    streaming=self.streaming,
                    cache_dir=self.hf_cache_dir,
                )
        except DataError:
            raise
        except Exception as e:
            if offline:
                raise DataError(
                    f"data.source.path: {self.path!r} split {hf_split!r} is not in the HF datasets cache and "
                    "the HF hub is unreachable from this node; run `make prepare` (with the run's data, "
                    "scale and groups overrides) once on a node with network, or point data.source.path at "
                    "local files of the same schema"
                ) from e
            where = (
                "the HF hub is unreachable or the dataset name is wrong (if it is meant as a local path, it "
                "does not exist)"
                if self.local_files is None
                else "the files could not be read"
            )
            raise DataError(
                f"data.source.path: loading {self.path!r} split {hf_split!r} failed "
                f"({type(e).__name__}: {e}); "
                f"{where}. Offline, point data.source.path at local files of the same schema"
            ) from e
        self._check_schema(ds, hf_split)
        self._datasets[hf_split] = ds
        return ds

    def _check_schema(self, ds, hf_split: str) -> None:
        feats = ds.features
        if feats is None:  # streaming datasets may not know their features; checked per row instead
            return
        meta = feats.get("meta")
        if "text" not in feats or not isinstance(meta, dict) or "redpajama_set_name" not in meta:
            raise DataError(
                f"data.source.path: {self.path!r} split {hf_split!r} lacks the fields `text` and "
                f"`meta.redpajama_set_name`; found {dict(feats)}"
            )

    def _group_indices(self, hf_split: str) -> dict[str, np.ndarray]:
        """set name -> row indices, in one vectorised pass over the `meta` column."""
        if hf_split in self._indices:
            return self._indices[hf_split]
        import pyarrow as pa
        import pyarrow.compute as pc

        ds = self._load(hf_split)
        names = []
        for batch in ds.with_format("arrow").select_columns(["meta"]).iter(batch_size=100_000):
            names.append(pc.struct_field(batch.column("meta"), "redpajama_set_name"))
        col = pa.chunked_array([c for n in names for c in n.chunks], type=pa.string())
        codes = col.dictionary_encode().combine_chunks()
        keys = codes.dictionary.to_pylist()
        idx = codes.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(idx, kind="stable")  # stable: rows of a group stay in file order
        bounds = np.searchsorted(idx[order], np.arange(len(keys) + 1))
        out = {k: order[bounds[i] : bounds[i + 1]] for i, k in enumerate(keys) if k is not None}
        self._indices[hf_split] = out
        return out

    # --- GroupSource ----------------------------------------------------------------------------
    def available_groups(self) -> list[str]:
        return [*SLIMPAJAMA_GROUPS, *ALIASES]

    def check_groups(self, groups: list[str]) -> None:
        super().check_groups(groups)
        canon = [canonical_group(g) for g in groups]
        if len(set(canon)) != len(canon):
            raise DataError(f"groups: {groups} names the same group twice (cc is an alias of commoncrawl)")

    def _present_groups(self, hf_split: str) -> list[str]:
        idx = self._group_indices(hf_split)
        return sorted(_GROUP_OF_SET.get(k, k) for k, v in idx.items() if len(v))

    def _no_rows(self, group: str, hf_split: str, present: list[str] | None) -> DataError:
        present_s = f"groups present: {present}" if present is not None else "no rows at all"
        return DataError(
            f"data.source: no documents of group {group!r} (meta.redpajama_set_name={SET_NAMES[group]!r}) in "
            f"{self.path!r} split {hf_split!r}; {present_s}"
        )

    def split_indices(self, group: str, split: str) -> np.ndarray:
        """Row indices (into the HF split used for `split`) of one group's documents, in yield order."""
        group = canonical_group(group)
        if group not in SET_NAMES:
            raise DataError(
                f"groups: unknown group {group!r} for source 'slimpajama'; allowed: {self.available_groups()}"
            )
        if split not in SPLITS:
            raise DataError(f"split: must be one of {list(SPLITS)}, got {split!r}")
        hf_split = self._hf_split(split)
        rows = self._group_indices(hf_split).get(SET_NAMES[group], np.zeros(0, dtype=np.int64))
        if len(rows) == 0:
            raise self._no_rows(group, hf_split, self._present_groups(hf_split))
        if split == "train":
            return rows[: self.max_train_docs] if self.max_train_docs else rows
        # HF Dataset.shuffle(seed) is rows[default_rng(seed).permutation(n)]
        shuffled = rows[np.random.default_rng(self.split_seed).permutation(len(rows))]
        if self.heldout == "official":
            return shuffled[0::2] if split == "val" else shuffled[1::2]
        half = (len(shuffled) + 1) // 2
        return shuffled[:half] if split == "val" else shuffled[half:]

    def documents(self, group: str, split: str) -> Iterator[str]:
        if self.streaming:
            yield from self._documents_streaming(canonical_group(group), split)
            return
        ds = self._load(self._hf_split(split))
        rows = self.split_indices(group, split)
        sub = ds.select_columns(["text"])
        for start in range(0, len(rows), 1024):
            yield from sub[rows[start : start + 1024]]["text"]

    def _documents_streaming(self, group: str, split: str) -> Iterator[str]:
        if group not in SET_NAMES:
            raise DataError(
                f"groups: unknown group {group!r} for source 'slimpajama'; allowed: {self.available_groups()}"
            )
        hf_split = self._hf_split(split)
        target = SET_NAMES[group]
        stream = self._load(hf_split).filter(
            lambda metas: [m is not None and m.get("redpajama_set_name") == target for m in metas],
            batched=True,
            input_columns=["meta"],
        )
        if split == "train":
            n = 0
            for row in stream:
                yield row["text"]
                n += 1
                if self.max_train_docs and n >= self.max_train_docs:
                    break
            if n == 0:
                raise self._no_rows(group, hf_split, None)
            return
        # held-out splits are small (~9k docs in all): materialise the group and split like the map-style path
        docs = [row["text"] for row in stream]
        if not docs:
            raise self._no_rows(group, hf_split, None)
        order = np.random.default_rng(self.split_seed).permutation(len(docs))
        if self.heldout == "official":
            pick = order[0::2] if split == "val" else order[1::2]
        else:
            half = (len(docs) + 1) // 2
            pick = order[:half] if split == "val" else order[half:]
        for i in pick:
            yield docs[i]

    def fingerprint(self) -> dict:
        fp: dict = {
            "source": self.name,
            "path": self.path,
            "heldout": self.heldout,
            "split_seed": self.split_seed,
            "max_train_docs": self.max_train_docs,
        }
        if self.local_files is not None:
            # content signatures, not paths: a moved or copied dataset keeps its cache
            fp["path"] = "<local>"
            fp["files"] = {
                split: [file_signature(f) for f in files] for split, files in sorted(self.local_files.items())
            }
        return fp
