"""A collection directory (DESIGN.md): the LanceDB table (truth), a FAISS index derived from it, a manifest.

DIR/images.lance/   the table: id, path, size, mtime_ns, hash, width, height, meta, vector
DIR/faiss.index     derived; rebuilt whenever it is older than the table (manifest index.store_version)
DIR/manifest.json   the model that made the vectors, and the index's type, size, recall and build time
DIR/.lock           held by a writer so two index runs never interleave
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import numpy as np

from indexes import faiss_index
from indexes.errors import CollectionError
from indexes.manifest import check_model, now, read_manifest, write_manifest
from indexes.store import TABLE, ImageStore


class Collection:
    def __init__(self, directory: Path, store: ImageStore, manifest: dict[str, Any]):
        self.directory = directory
        self.store = store
        self.manifest = manifest
        self._lock_fd: int | None = None
        self._index = None

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    # ---- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | os.PathLike) -> Collection:
        """Open an existing collection for reading."""
        directory = Path(directory)
        manifest = read_manifest(directory) if directory.is_dir() else None
        if manifest is None:
            raise CollectionError(
                f"{directory}: no collection here; build one with `retrieval index PATH --db {directory}`"
            )
        return cls(directory, ImageStore(directory), manifest)

    @classmethod
    def open_for_write(
        cls, directory: str | os.PathLike, model: dict[str, Any], reembed: bool = False
    ) -> Collection:
        """Open (or create) for indexing with `model`. A different model is refused unless `reembed`, which
        starts the table afresh. The refusal happens before anything is written."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise CollectionError(f"{directory}: exists and is not a directory; choose another --db")
        manifest = read_manifest(directory) if directory.is_dir() else None
        if manifest is not None and not reembed:
            check_model(directory, manifest["model"], model)
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(directory)
        if manifest is None or reembed:
            _drop_table(directory)
            manifest = {"model": model, "created_at": now(), "index": {}}
            write_manifest(directory, manifest)
        collection = cls(directory, ImageStore(directory, dim=int(model["embed_dim"])), manifest)
        collection._lock_fd = lock_fd
        return collection

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the derived index -----------------------------------------------------------------------------------
    def index_is_fresh(self) -> bool:
        info = self.manifest.get("index") or {}
        return (
            info.get("store_version") == self.store.version
            and (self.directory / faiss_index.FILENAME).exists()
        )

    def rebuild_index(self) -> dict[str, Any]:
        """Rebuild the FAISS index from the table, save it, and record it in the manifest."""
        index, info = faiss_index.build_flat_ip(self.store.dim, self.store.iter_vectors())
        faiss_index.save(index, self.directory)
        info.update(store_version=self.store.version, built_at=now())
        self.manifest = {**self.manifest, "index": info, "updated_at": now()}
        write_manifest(self.directory, self.manifest)
        self._index = None
        return info

    def _search_index(self):
        if self._index is None:
            if self.index_is_fresh():
                index = faiss_index.load(self.directory)
            else:
                # stale (an index run was interrupted after its last commit): rebuild in memory, don't write
                index, _ = faiss_index.build_flat_ip(self.store.dim, self.store.iter_vectors())
            self._index = faiss_index.to_search_device(index)
        return self._index

    def search(self, queries: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """queries (Q, dim) normalised -> per query, up to k rows (path, score, width, ...) best first."""
        if queries.ndim != 2 or queries.shape[1] != self.store.dim:
            raise ValueError(f"queries must be (Q, {self.store.dim}), got {queries.shape}")
        index = self._search_index()
        if index.ntotal == 0:
            return [[] for _ in range(len(queries))]
        scores, ids = faiss_index.search(index, queries, k)
        rows = self.store.fetch(int(i) for i in ids.reshape(-1) if i >= 0)
        results = []
        for q_scores, q_ids in zip(scores, ids, strict=True):
            hits = []
            for score, i in zip(q_scores, q_ids, strict=True):
                if i >= 0 and int(i) in rows:
                    hits.append({**rows[int(i)], "score": float(score)})
            results.append(hits)
        return results


def _lock(directory: Path) -> int:
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CollectionError(
            f"{directory}: another `retrieval index` is writing this collection; wait for it"
        ) from None
    return fd


def _drop_table(directory: Path) -> None:
    import shutil

    for path in (directory / f"{TABLE}.lance", directory / faiss_index.FILENAME):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
