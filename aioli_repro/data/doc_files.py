"""Documents of a list of files (plain text, JSON lines, parquet), addressed by a global index."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from aioli_repro.data.source import DataError


class DocFiles:
    """Documents of a list of files, addressed by a global index (file order, then position in file)."""

    def __init__(self, files: list[Path], text_field: str) -> None:
        self.files = files
        self.text_field = text_field
        self._counts: list[int] | None = None

    def counts(self) -> list[int]:
        if self._counts is None:
            self._counts = [self._count(p) for p in self.files]
        return self._counts

    def __len__(self) -> int:
        return int(sum(self.counts()))

    def _count(self, p: Path) -> int:
        ext = p.suffix.lower()
        if ext == ".jsonl":
            with open(p, "rb") as f:
                return sum(1 for line in f if line.strip())
        if ext == ".parquet":
            import pyarrow.parquet as pq

            try:
                return int(pq.ParquetFile(p).metadata.num_rows)
            except Exception as e:  # pyarrow raises several types for a damaged file
                raise DataError(f"{p}: not a readable parquet file ({e})") from e
        return 1

    def _iter_jsonl(self, p: Path) -> Iterator[str]:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: not valid JSON ({e})") from e
                if not isinstance(obj, dict) or self.text_field not in obj:
                    keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise DataError(
                        f"{p}:{lineno}: no field {self.text_field!r} (data.source.text_field); found {keys}"
                    )
                yield str(obj[self.text_field])

    def _iter_parquet(self, p: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        if self.text_field not in pf.schema_arrow.names:
            raise DataError(
                f"{p}: no column {self.text_field!r} (data.source.text_field); found {pf.schema_arrow.names}"
            )
        for batch in pf.iter_batches(batch_size=1024, columns=[self.text_field]):
            for t in batch.column(0).to_pylist():
                yield "" if t is None else str(t)

    def _iter_file(self, p: Path) -> Iterator[str]:
        ext = p.suffix.lower()
        if ext == ".jsonl":
            yield from self._iter_jsonl(p)
        elif ext == ".parquet":
            yield from self._iter_parquet(p)
        else:
            yield p.read_text(encoding="utf-8", errors="replace")

    def iter_docs(self, keep: np.ndarray | None = None) -> Iterator[str]:
        """Documents in file order; with `keep` (a bool mask over global indices) only those."""
        i = 0
        for p in self.files:
            for doc in self._iter_file(p):
                if keep is None or keep[i]:
                    yield doc
                i += 1
