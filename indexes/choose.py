"""Which FAISS index a collection gets, from its size, its dimension and a memory budget (autofaiss's way).

Exact search while it is fast enough; beyond, an inverted file (IVF) over about 4 * sqrt(n) lists, with an HNSW
coarse quantizer once the lists are many, storing 8-bit scalar codes (SQ8, one byte per dimension) when they fit the
budget and product-quantizer codes (PQ, m bytes per vector, the largest m that fits) when they don't. HNSW alone is
not offered: FAISS's HNSW cannot remove vectors, and a collection must drop deleted files in place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from indexes.errors import CollectionError

GiB = 2**30
ID_BYTES = 8  # an int64 id per vector, in the IVF lists or the IDMap


@dataclass(frozen=True)
class IndexConfig:
    max_memory: int = 2 * GiB  # bytes the index may take in RAM: decides flat vs codes, SQ8 vs PQ
    flat_max: int = 100_000  # exact search up to here: 100k x 512 scans in ~10 ms on 2 cores, no recall lost
    target_recall: float = 0.95  # recall@10 against exact search that nprobe is tuned to reach
    margin: float = 0.005  # tune to target + margin: the estimate from 1,000 queries moves by about that
    tune_queries: int = 1000  # held-out vectors recall is measured on (never in the training sample)
    latency_queries: int = 200  # single queries timed for the card's p50/p99
    lists_per_sqrt: float = (
        4.0  # nlist ~ this * sqrt(n), a power of two (autofaiss: 4 to 16; k-means pays the rest)
    )
    train_per_list: int = 40  # training vectors per list (FAISS warns below 39)
    kmeans_iters: int = 10  # k-means iterations: the lists' quality saturates early, training time does not
    hnsw_quantizer_from: int = 2048  # lists at which an HNSW32 graph replaces the exact coarse quantizer
    seed: int = 0  # which vectors train and which measure: the same collection gets the same index

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None) -> IndexConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings or {}) - known)
        if unknown:
            raise CollectionError(
                f"unknown index setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        cfg = cls(**(settings or {}))
        if not 0.0 < cfg.target_recall <= 1.0:
            raise CollectionError(f"target recall {cfg.target_recall}: must be in (0, 1]")
        return cfg


@dataclass(frozen=True)
class IndexPlan:
    kind: str  # "flat" or "ivf"
    factory: str  # the FAISS index_factory string (inner product metric)
    nlist: int = 0
    code: str = "flat"  # flat (float32), SQ8 or PQ{m}
    hnsw_quantizer: bool = False

    def params(self) -> dict[str, Any]:
        return {"nlist": self.nlist, "code": self.code, "hnsw_quantizer": self.hnsw_quantizer}


def flat_bytes(n: int, dim: int) -> int:
    return n * (4 * dim + ID_BYTES)


def ivf_bytes(n: int, dim: int, nlist: int, code_bytes: int, hnsw: bool) -> int:
    """RAM of an IVF index: codes + ids per vector, centroids, and the quantizer graph's links."""
    quantizer = nlist * 4 * dim + (nlist * 64 * 4 if hnsw else 0)  # HNSW32: ~2*M int32 links per node
    return n * (code_bytes + ID_BYTES) + quantizer


def nlist_for(n: int, cfg: IndexConfig) -> int:
    target = cfg.lists_per_sqrt * math.sqrt(max(n, 1))
    nlist = 2 ** max(4, round(math.log2(target)))
    while nlist > 16 and nlist * cfg.train_per_list > n:  # every list needs training points
        nlist //= 2
    return nlist


def pq_sizes(dim: int) -> list[int]:
    """Product-quantizer code sizes (bytes per vector), largest first; m must divide the dimension."""
    return [m for m in (dim // 2, 128, 96, 64, 48, 32, 24, 16, 8, 4) if m and dim % m == 0 and m < dim][:8]


def choose_index(n: int, dim: int, cfg: IndexConfig = IndexConfig()) -> IndexPlan:
    """The index for n vectors of dimension dim within cfg.max_memory bytes. Raises CollectionError if none fits."""
    if n <= cfg.flat_max and flat_bytes(n, dim) <= cfg.max_memory:
        return IndexPlan("flat", "IDMap2,Flat")
    nlist = nlist_for(n, cfg)
    hnsw = nlist >= cfg.hnsw_quantizer_from
    quantizer = f"IVF{nlist}_HNSW32" if hnsw else f"IVF{nlist}"
    for code, size in [("SQ8", dim)] + [(f"PQ{m}", m) for m in pq_sizes(dim)]:
        if ivf_bytes(n, dim, nlist, size, hnsw) <= cfg.max_memory:
            return IndexPlan("ivf", f"{quantizer},{code}", nlist, code, hnsw)
    smallest = ivf_bytes(n, dim, nlist, pq_sizes(dim)[-1] if pq_sizes(dim) else dim, hnsw)
    raise CollectionError(
        f"{n} vectors of dimension {dim} need at least {smallest / GiB:.2f} GiB of index memory; "
        f"raise --max-memory (now {cfg.max_memory / GiB:.2f} GiB)"
    )


def outgrown(card: dict[str, Any], n: int, dim: int, cfg: IndexConfig) -> bool:
    """True when the built index no longer suits n vectors: another kind or code would be chosen, or the count
    has doubled or halved since the build (IVF lists drift from the length nprobe was tuned for)."""
    now = choose_index(n, dim, cfg)
    built = card.get("params") or {}
    if card.get("type") != now.kind or built.get("code", "flat") != now.code:
        return True
    if now.kind == "flat":
        return False
    at_build = int(card.get("count_at_build") or 0)
    return n > 2 * at_build or 2 * n < at_build
