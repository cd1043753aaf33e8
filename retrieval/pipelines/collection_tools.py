"""Commands on a collection that need no model: `info`, `search --vectors`, `dedup`."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from indexes.collection import Collection
from indexes.dedup import collapse, near_duplicate_groups
from retrieval.errors import UserError

UNIQUE_DEPTH = 4  # --unique looks this many times deeper than k, so that collapsing groups still leaves k


def info(db: str | os.PathLike) -> dict[str, Any]:
    """The manifest's model and index card, the table's row count, and the index file as it is on disk now."""
    collection = Collection.open(db)
    card = dict(collection.manifest.get("index") or {})
    path = collection.index_path
    return {
        "db": str(db),
        "model": collection.model,
        "rows": collection.store.count(),
        "table": collection.table,
        "index": card,
        "index_file": {
            "path": str(path),
            "bytes_on_disk": path.stat().st_size if path.exists() else None,
            "up_to_date": collection.index_is_fresh(),
        },
        "index_settings": collection.manifest.get("index_settings") or {},
    }


def load_query_vectors(path: str | os.PathLike, dim: int) -> np.ndarray:
    """(Q, dim) float32, L2-normalised, from a .npy of shape (dim,) or (Q, dim)."""
    try:
        queries = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .npy file ({e})") from e
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or queries.shape[1] != dim or not np.issubdtype(queries.dtype, np.number):
        raise UserError(f"{path}: shape {queries.shape}, the collection needs (Q, {dim}) numbers")
    queries = queries.astype(np.float32)
    norms = np.linalg.norm(queries, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise UserError(f"{path}: row {int(bad[0])} is zero or not finite; every query needs a direction")
    return queries / norms[:, None]


def unique_hits(collection: Collection, queries: np.ndarray, k: int, threshold: float | None):
    """Top-k per query; with a threshold, near-duplicates of a better hit are dropped first."""
    if threshold is None:
        return collection.search(queries, k)
    results = collection.search(queries, k * UNIQUE_DEPTH, vectors=True)
    return [[_without_vector(h) for h in collapse(hits, threshold)[:k]] for hits in results]


def _without_vector(hit: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in hit.items() if key != "vector"}


def search_vectors(
    db: str | os.PathLike, path: str | os.PathLike, k: int = 10, unique: float | None = None
) -> list[list[dict[str, Any]]]:
    """One result list per query vector in the .npy file, best first."""
    if k < 1:
        raise UserError(f"-k {k}: must be at least 1")
    collection = Collection.open(db)
    return unique_hits(collection, load_query_vectors(path, collection.store.dim), k, unique)


def dedup(db: str | os.PathLike, threshold: float) -> list[list[dict[str, Any]]]:
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"--threshold {threshold}: a cosine similarity in (0, 1]")
    return near_duplicate_groups(Collection.open(db), threshold)
