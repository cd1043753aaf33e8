"""FAISS indexes derived from the store. They can be rebuilt from the LanceDB table at any time."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

try:
    import faiss
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "FAISS is missing: pip install 'retrieval[cpu]' (or 'retrieval[gpu]' on a CUDA machine)"
    ) from e

FILENAME = "faiss.index"


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def build_flat_ip(dim: int, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[faiss.Index, dict]:
    """Exact inner-product search over normalised vectors (= cosine). Returns (index, description)."""
    start = time.perf_counter()
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    for ids, vectors in batches:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    info = {
        "type": "flat-ip",
        "params": {},
        "count": int(index.ntotal),
        "recall@10": 1.0,  # exact search: recall against exact search is 1 by construction
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    return index, info


def save(index: faiss.Index, directory: str | os.PathLike) -> None:
    path = Path(directory) / FILENAME
    tmp = path.with_suffix(".index.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def load(directory: str | os.PathLike) -> faiss.Index | None:
    path = Path(directory) / FILENAME
    return faiss.read_index(str(path)) if path.exists() else None


def to_search_device(index: faiss.Index, use_gpu: bool | None = None) -> faiss.Index:
    """Move to the GPU when one is present (faiss-gpu installed and a device visible), else keep it on the CPU."""
    if use_gpu is None:
        use_gpu = gpu_count() > 0
    if not use_gpu:
        return index
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k) float32, ids (Q, k) int64); ids are -1 where fewer than k vectors exist."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, int(index.ntotal))) if index.ntotal else 1
    return index.search(queries, k)
