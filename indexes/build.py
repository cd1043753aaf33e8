"""Build a collection's index from its table and measure it: the index card.

One pass over the table gathers a training sample and a disjoint set of held-out query vectors; a second adds
every vector; a third computes exact neighbours of the held-out queries. nprobe is then raised until recall@10
against exact search reaches the target, and single-query latency is timed at that setting. Every figure on the
card comes from these measurements.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from indexes import faiss_index
from indexes.choose import IndexConfig, IndexPlan, choose_index

Batches = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # a fresh stream of (ids, vectors) per call
K = 10
log = logging.getLogger(__name__)


def sample_positions(n: int, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Disjoint random row positions, one sorted array per requested size (sizes clipped to what n allows)."""
    order = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for size in sizes:
        size = min(size, n - start)
        out.append(np.sort(order[start : start + size]))
        start += size
    return out


def gather(batches: Batches, positions: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (ids, vectors) at each array of positions, in one streaming pass over the table."""
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in positions]
    offset = 0
    for ids, vectors in batches():
        end = offset + len(ids)
        for want, part in zip(positions, parts, strict=True):
            lo, hi = np.searchsorted(want, [offset, end])
            local = want[lo:hi] - offset
            if len(local):
                part.append((ids[local], vectors[local]))
        offset = end
    out = []
    for part in parts:
        if part:
            out.append((np.concatenate([p[0] for p in part]), np.concatenate([p[1] for p in part])))
        else:
            out.append((np.zeros(0, np.int64), np.zeros((0, 0), np.float32)))
    return out


def exact_neighbours(batches: Batches, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top-k by inner product for each query (Q, k), streaming over the table."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for ids, vectors in batches():
        scores = queries @ vectors.T  # (Q, n_batch)
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]  # the batch's own top-k first: (Q, kk)
        all_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
        all_i = np.concatenate([best_i, ids[part]], axis=1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(all_s, top, 1)
        best_i = np.take_along_axis(all_i, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def without_self(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's ids minus the query's own id, first k: a held-out query is a member of the collection."""
    return np.stack([row[row != me][:k] for row, me in zip(found, own, strict=True)])


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k that the index returned in its top-k."""
    k = truth.shape[1]
    hits = [len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / k


def measure_recall(index, queries: np.ndarray, own: np.ndarray, truth: np.ndarray) -> float:
    _, found = faiss_index.search(index, queries, K + 1)
    return recall_at_k(without_self(found, own, K), truth)


def tune_nprobe(
    index, plan: IndexPlan, held: tuple, truth: np.ndarray, cfg: IndexConfig
) -> tuple[int, float]:
    """Smallest nprobe whose recall@10 reaches target + margin (doubling, then bisection). Returns
    (nprobe, recall); when even every list falls short, the best nprobe found and its recall."""
    own, queries = held
    want = min(1.0, cfg.target_recall + cfg.margin)
    measured: dict[int, float] = {}

    def recall(nprobe: int) -> float:
        if nprobe not in measured:
            faiss_index.set_nprobe(index, nprobe)
            measured[nprobe] = measure_recall(index, queries, own, truth)
        return measured[nprobe]

    hi = 1
    while recall(hi) < want and hi < plan.nlist:
        hi = min(plan.nlist, hi * 2)
    if recall(hi) < want:
        best = max(measured, key=lambda p: (measured[p], -p))
        faiss_index.set_nprobe(index, best)
        return best, measured[best]
    lo = hi // 2  # recall(lo) < want, or lo == 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if recall(mid) >= want:
            hi = mid
        else:
            lo = mid
    faiss_index.set_nprobe(index, hi)
    log.info("nprobe %d: recall@10 %.4f (measured %s)", hi, measured[hi], sorted(measured))
    return hi, measured[hi]


def time_queries(index, queries: np.ndarray) -> dict[str, float]:
    """p50/p99 of single queries (ms), and queries/s of the same queries as one batch."""
    faiss_index.search(index, queries[:1], K)  # warm caches
    times = []
    for q in queries:
        start = time.perf_counter()
        faiss_index.search(index, q[None], K)
        times.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    faiss_index.search(index, queries, K)
    batch = time.perf_counter() - start
    return {
        "p50": round(float(np.percentile(times, 50)), 3),
        "p99": round(float(np.percentile(times, 99)), 3),
        "batch_qps": round(len(queries) / batch, 1),
    }


def build_index(
    batches: Batches, n: int, dim: int, cfg: IndexConfig, gpu: bool = False, plan: IndexPlan | None = None
):
    """Choose (unless a plan is given: benchmarks compare types), train, fill, tune and measure.
    Returns (index, card)."""
    start = time.perf_counter()
    plan = plan or choose_index(n, dim, cfg)
    use_gpu = gpu and plan.kind == "ivf"
    log.info("index for %d x %d: %s on the %s", n, dim, plan.factory, "GPU" if use_gpu else "CPU")
    n_train = plan.nlist * cfg.train_per_list if plan.kind == "ivf" else 0
    n_held = min(cfg.tune_queries, max(n // 10, 1)) if n > 1 else 0
    held_pos, train_pos = sample_positions(n, [n_held, n_train], cfg.seed)
    held, train = gather(batches, [held_pos, train_pos])
    index = faiss_index.new_index(plan, dim, gpu=use_gpu, kmeans_iters=cfg.kmeans_iters)
    if plan.kind == "ivf":
        log.info("training %d lists on %d vectors", plan.nlist, len(train[0]))
        index.train(np.ascontiguousarray(train[1], np.float32))
    del train
    if use_gpu:
        index = faiss_index.to_gpu(index)  # adding and tuning on the GPU too
    train_seconds = time.perf_counter() - start
    log.info("adding %d vectors", n)
    for ids, vectors in batches():
        faiss_index.add(index, ids, vectors)
    card: dict[str, Any] = {
        "type": plan.kind,
        "factory": plan.factory.replace("_HNSW32", "") if use_gpu else plan.factory,
        "params": plan.params(),
        "count": int(index.ntotal),
        "count_at_build": int(index.ntotal),
        "dim": dim,
        "device": "gpu" if use_gpu else "cpu",
        "max_memory": cfg.max_memory,
        "target_recall": cfg.target_recall,
        "train_seconds": round(train_seconds, 3),
    }
    card.update(_measure(index, plan, batches, held, cfg))
    card["build_seconds"] = round(time.perf_counter() - start, 3)
    return index, card


def _measure(index, plan: IndexPlan, batches: Batches, held: tuple, cfg: IndexConfig) -> dict[str, Any]:
    own, queries = held
    if len(own) == 0 or index.ntotal <= K:
        return {"recall@10": None, "recall_queries": 0}
    log.info("exact neighbours of %d held-out vectors, then tuning", len(own))
    truth = without_self(exact_neighbours(batches, queries, K + 1), own, K)
    if plan.kind == "ivf":
        nprobe, recall = tune_nprobe(index, plan, held, truth, cfg)
        params = {"nprobe": nprobe}
    else:
        recall, params = measure_recall(index, queries, own, truth), {}
    timing = time_queries(index, queries[: cfg.latency_queries])
    return {
        "search_params": params,
        "recall@10": round(recall, 4),
        "recall_queries": int(len(own)),
        "target_reached": recall >= cfg.target_recall,
        "latency_ms": {"p50": timing["p50"], "p99": timing["p99"]},
        "batch_qps": timing["batch_qps"],
    }
