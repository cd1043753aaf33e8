"""FAISS indexes derived from the store: create, move to a GPU, save/load, ids, search knobs, search.

They can be rebuilt from the LanceDB table at any time. The GPU path runs only when the installed FAISS has GPU
support (faiss-gpu: `StandardGpuResources`) and sees a device; faiss-cpu never loads a CUDA library.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

try:
    import faiss
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "FAISS is missing: pip install 'retrieval[cpu]' (or 'retrieval[gpu]' on a CUDA machine)"
    ) from e

from indexes.choose import IndexPlan

FILENAME = "faiss.index"
log = logging.getLogger(__name__)
_gpu_resources = None


def gpu_count() -> int:
    """GPUs FAISS can use; 0 with faiss-cpu (checked without touching CUDA)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def _resources():
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Clone to GPU 0 with fp16 storage for flat data and fp16 lookup tables for PQ: half the memory
    traffic, and recall is tuned afterwards on the GPU index itself (SQ8 codes are unchanged)."""
    wrapped = faiss.downcast_index(index)
    if isinstance(wrapped, faiss.IndexIDMap2 | faiss.IndexIDMap):
        # the GPU cloner has no IDMap: move the exact index inside and keep the id map on the host
        inner = to_gpu(wrapped.index)
        gpu = faiss.IndexIDMap(inner)
        faiss.copy_array_to_vector(faiss.vector_to_array(wrapped.id_map), gpu.id_map)
        gpu.ntotal = wrapped.ntotal
        gpu.referenced_objects = [inner]  # the wrapper does not own it: keep it alive
        return gpu
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True  # flat/IVFFlat: fp16 storage; IVFPQ: fp16 lookup tables
    return faiss.index_cpu_to_gpu(_resources(), 0, index, options)


def to_cpu(index: faiss.Index) -> faiss.Index:
    """IVF indexes are built on the GPU and saved from the host (flat ones are always built on the host)."""
    return faiss.index_gpu_to_cpu(index) if _on_gpu(index) else index


def _on_gpu(index: faiss.Index) -> bool:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap2 | faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
    return "Gpu" in type(index).__name__


def to_search_device(index: faiss.Index, use_gpu: bool | None = None) -> faiss.Index:
    """On the GPU when one is present, else the index itself."""
    if use_gpu is None:
        use_gpu = gpu_count() > 0
    if not use_gpu:
        return index
    log.info("searching on the GPU (fp16)")
    return to_gpu(index)


def new_index(plan: IndexPlan, dim: int, gpu: bool = False, kmeans_iters: int = 10) -> faiss.Index:
    """An empty host index for the plan (inner product: vectors are normalised, so this is cosine). With gpu,
    k-means runs on the GPU and the coarse quantizer is exact (GPU FAISS has no HNSW quantizer), so that the
    trained index can be cloned there for adding and searching (`to_gpu`)."""
    factory = plan.factory.replace("_HNSW32", "") if gpu else plan.factory
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = kmeans_iters
        ivf.cp.seed = 1234
        if gpu:  # spherical k-means for inner product: L2 assignment to normalised centroids
            ivf.clustering_index = faiss.index_cpu_to_gpu(_resources(), 0, faiss.IndexFlatL2(dim))
    return index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """The search-time knob of an IVF index; an HNSW quantizer searches 2*nprobe candidates to return them."""
    if _on_gpu(index):
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        return
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return  # flat: nothing to tune
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(32, 2 * nprobe)


def add(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, np.int64))


def remove(index: faiss.Index, ids: np.ndarray) -> int:
    if len(ids) == 0:
        return 0
    return int(index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, np.int64))))


def ids_in(index: faiss.Index) -> np.ndarray:
    """Every id the index holds (int64), for comparing it with the table."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap2 | faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
        for i in range(ivf.nlist)
        if lists.list_size(i)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def save(index: faiss.Index, path: str | os.PathLike) -> int:
    """Atomic (temporary file, fsync, rename): a reader loads the old index or the new one. Returns bytes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(to_cpu(index), str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def load(path: str | os.PathLike, dim: int) -> faiss.Index | None:
    """The saved index, or None when it is missing, truncated, corrupt or of another dimension."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:  # FAISS reports truncated or garbled files this way
        log.warning("%s: unreadable index (%s)", path, str(e).splitlines()[0][:120])
        return None
    if index.d != dim:
        log.warning("%s: index of dimension %d, the table has %d", path, index.d, dim)
        return None
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k) float32, ids (Q, k) int64); ids are -1 where fewer than k vectors exist."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, int(index.ntotal), 2048 if _on_gpu(index) else 1 << 30)) if index.ntotal else 1
    return index.search(queries, k)
