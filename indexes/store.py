"""The source of truth of a collection: one LanceDB table of images, their file stats and their vectors.

Every write is one Lance commit (atomic: a reader or a killed writer never sees a half-written batch), so a run
killed at any point leaves the table as of its last commit. Filters are built only from integers this module
computes (ids); paths and other user strings never enter a filter expression.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa

from indexes.errors import CollectionError
from indexes.paths import from_stored, to_stored

TABLE = "images"
STAT_COLUMNS = ["id", "path", "size", "mtime_ns", "hash", "meta"]  # meta: a non-UTF-8 name's bytes
ROW_COLUMNS = ["id", "path", "size", "mtime_ns", "hash", "width", "height", "meta"]
_ID_CHUNK = 1000  # ids per IN (...) filter: keeps each predicate small


def path_id(path: str) -> int:
    """A stable int64 id per path (FAISS ids are int64). 63 bits: collisions are negligible below 10^9 rows."""
    digest = hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("size", pa.int64()),
            pa.field("mtime_ns", pa.int64()),
            pa.field("hash", pa.string()),  # content hash: tells a touched file from a changed one
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("meta", pa.string()),  # JSON of whatever metadata the source gave
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ]
    )


def _id_filter(ids: Iterable[int]) -> str:
    return "id IN (" + ",".join(str(int(i)) for i in ids) + ")"


class ImageStore:
    def __init__(self, directory: str | os.PathLike, dim: int | None = None, table: str = TABLE):
        """Open `table` in `directory`; create it when `dim` is given and there is none yet."""
        self.directory = str(directory)
        self.name = table
        self.before_write: Callable[[np.ndarray], None] | None = None  # told the ids of each write first
        # every read sees the latest commit, also one another process made after this store was opened
        self._db = lancedb.connect(self.directory, read_consistency_interval=timedelta(0))
        if table in self._db.list_tables().tables:
            self._table = self._db.open_table(table)
        elif dim is not None:
            self._table = self._db.create_table(table, schema=schema(dim))
        else:
            raise CollectionError(f"{directory}: no collection here; create one with `retrieval index`")

    @property
    def dim(self) -> int:
        return self._table.schema.field("vector").type.list_size

    @property
    def version(self) -> int:
        return int(self._table.version)

    def count(self) -> int:
        return int(self._table.count_rows())

    def stats(self) -> dict[str, tuple[int, int, int, str]]:
        """path -> (id, size, mtime_ns, hash), reading only those columns (no vectors): cheap for 10^6 rows."""
        out: dict[str, tuple[int, int, int, str]] = {}
        for batch in self._table.search().select(STAT_COLUMNS).to_batches(65536):
            cols = [batch.column(c).to_pylist() for c in STAT_COLUMNS]
            for i, path, size, mtime, digest, meta in zip(*cols, strict=True):
                out[from_stored(path, meta)] = (i, size, mtime, digest)
        return out

    def upsert(self, rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
        """Insert or replace rows (keyed by id) with their vectors (N, dim) float32, in one commit."""
        if not rows:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(rows), self.dim):
            raise ValueError(f"expected vectors of shape {(len(rows), self.dim)}, got {vectors.shape}")
        columns = {name: [r.get(name) for r in rows] for name in ROW_COLUMNS}
        # any file name: the stored path is valid UTF-8, the exact bytes of other names go into meta (paths.py)
        stored = [to_stored(p, m) for p, m in zip(columns["path"], columns["meta"], strict=True)]
        columns["path"], columns["meta"] = [s[0] for s in stored], [s[1] for s in stored]
        columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dim)
        table = pa.table(columns, schema=schema(self.dim))
        self._announce(columns["id"])
        (
            self._table.merge_insert("id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(table)
        )

    def _announce(self, ids: list[int]) -> None:
        if self.before_write is not None and len(ids):
            self.before_write(np.asarray(ids, np.int64))

    def delete(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        self._announce(ids)
        for start in range(0, len(ids), _ID_CHUNK):
            self._table.delete(_id_filter(ids[start : start + _ID_CHUNK]))

    def fetch(self, ids: Iterable[int], vectors: bool = False) -> dict[int, dict[str, Any]]:
        """id -> row (without the vector unless asked)."""
        ids = list(dict.fromkeys(int(i) for i in ids))
        columns = ROW_COLUMNS + (["vector"] if vectors else [])
        out: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), _ID_CHUNK):
            chunk = ids[start : start + _ID_CHUNK]
            table = self._table.search().where(_id_filter(chunk)).select(columns).limit(len(chunk)).to_arrow()
            for row in table.to_pylist():
                row["path"] = from_stored(row["path"], row["meta"])
                out[row["id"]] = row
        return out

    def arrow_schema(self, columns: list[str]) -> pa.Schema:
        return pa.schema([self._table.schema.field(c) for c in columns])

    def iter_batches(self, columns: list[str], batch_rows: int = 65536) -> Iterator[pa.RecordBatch]:
        """The table's rows as Arrow batches of the named columns, streaming."""
        yield from self._table.search().select(columns).to_batches(batch_rows)

    def ids(self) -> np.ndarray:
        """Every id in the table (int64), reading that column only."""
        parts = [b.column("id").to_numpy() for b in self._table.search().select(["id"]).to_batches(262144)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def iter_vectors(self, batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids (n,) int64, vectors (n, dim) float32): bounded memory whatever the table size."""
        for batch in self._table.search().select(["id", "vector"]).to_batches(batch_rows):
            ids = batch.column("id").to_numpy().astype(np.int64)
            flat = batch.column("vector").values.to_numpy(zero_copy_only=False)
            yield ids, flat.astype(np.float32, copy=False).reshape(len(ids), -1)

    def optimize(self) -> None:
        """Compact the small per-batch fragments and drop versions older than 10 minutes."""
        self._table.optimize(cleanup_older_than=timedelta(minutes=10))  # a concurrent search keeps working
