"""Index types on the same vectors: build time, memory, size, queries/s single and batched, recall@10 against exact
search; the automatic choice among them, and LanceDB's own IVF_PQ index beside them.

    python benchmarks/embedding_mixture.py /tmp/emb --n 1000000                 # 1M x 512, clip-retrieval layout
    python benchmarks/embedding_mixture.py /tmp/q.npy --n 1000 --seed 99 --npy  # held-out queries
    nice -n 5 python benchmarks/index_types.py /tmp/emb --queries /tmp/q.npy [--types flat,auto,...] [--lancedb]

Each type is tuned the way `retrieval index` tunes its own choice: nprobe raised until recall@10 on held-out vectors
of the collection reaches the target; the recall printed is measured on the separate query file. Figures are from
one run on one machine: compare ratios.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexes import faiss_index  # noqa: E402
from indexes.build import build_index, exact_neighbours, recall_at_k  # noqa: E402
from indexes.choose import GiB, IndexConfig, IndexPlan, choose_index, nlist_for  # noqa: E402

K = 10


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def load(folder: Path, limit: int | None) -> np.ndarray:
    """Every shard into one float32 array, filled in place (no second copy), normalised."""
    files = sorted((folder / "img_emb").glob("img_emb_*.npy"))
    sizes = [np.load(f, mmap_mode="r").shape for f in files]
    n = min(sum(s[0] for s in sizes), limit or 1 << 62)
    x = np.empty((n, sizes[0][1]), np.float32)
    start = 0
    for f, (rows, _) in zip(files, sizes, strict=True):
        take = min(rows, n - start)
        x[start : start + take] = np.load(f, mmap_mode="r")[:take]
        start += take
        if start == n:
            break
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed_queries(search, queries: np.ndarray, singles: int = 200) -> tuple[float, float]:
    """(single-query queries/s, batched queries/s)."""
    search(queries[:1])
    start = time.perf_counter()
    for q in queries[:singles]:
        search(q[None])
    single = singles / (time.perf_counter() - start)
    start = time.perf_counter()
    search(queries)
    return single, len(queries) / (time.perf_counter() - start)


def plans(dim: int, n: int, cfg: IndexConfig) -> dict[str, IndexPlan]:
    auto = choose_index(n, dim, cfg)
    nlist = auto.nlist or nlist_for(n, cfg)
    return {
        "flat": IndexPlan("flat", "IDMap2,Flat"),
        "ivf-hnsw-sq8": IndexPlan("ivf", f"IVF{nlist}_HNSW32,SQ8", nlist, "SQ8", True),
        "ivf-hnsw-pq": IndexPlan("ivf", f"IVF{nlist}_HNSW32,PQ{dim // 8}", nlist, f"PQ{dim // 8}", True),
        "ivf-flatq-sq8": IndexPlan("ivf", f"IVF{nlist},SQ8", nlist, "SQ8", False),
        "auto": auto,
    }


def run_type(name: str, plan: IndexPlan, x: np.ndarray, queries, truth, cfg: IndexConfig) -> dict:
    ids = np.arange(len(x), dtype=np.int64)
    batches = lambda: ((ids[i : i + 65536], x[i : i + 65536]) for i in range(0, len(x), 65536))  # noqa: E731
    before = rss_mb()
    index, card = build_index(batches, len(x), x.shape[1], cfg, plan=plan)  # the same build and tuning
    memory = rss_mb() - before
    with tempfile.TemporaryDirectory() as tmp:
        size = faiss_index.save(index, Path(tmp) / "i.index")
    _, found = faiss_index.search(index, queries, K)
    single, batched = timed_queries(lambda q: faiss_index.search(index, q, K), queries)
    row = {
        "type": name,
        "factory": plan.factory,
        "build_s": card["build_seconds"],
        "rss_mb": round(memory),
        "size_mb": round(size / 2**20),
        "nprobe": (card.get("search_params") or {}).get("nprobe", "-"),
        "tuned_recall": card["recall@10"],
        "recall@10": round(recall_at_k(found, truth), 4),
        "qps_single": round(single, 1),
        "qps_batch": round(batched, 1),
    }
    return row  # the index is freed here, before the next type is built


def run_lancedb(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, work: Path) -> list[dict]:
    import lancedb
    import pyarrow as pa

    db = lancedb.connect(work / "lance-bench")
    dim = x.shape[1]
    start = time.perf_counter()
    table = db.create_table(
        "v", schema=pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim))])
    )
    for i in range(0, len(x), 100_000):
        part = x[i : i + 100_000]
        vec = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), dim)
        table.add(pa.table({"id": np.arange(i, i + len(part)), "vector": vec}))
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    partitions = int(min(1024, max(8, np.sqrt(len(x)))))  # lance recommends about sqrt(n)
    table.create_index(metric="dot", index_type="IVF_PQ", num_partitions=partitions, num_sub_vectors=dim // 8)
    build_s = time.perf_counter() - start
    rows = []
    for nprobes, refine in ((20, None), (50, None), (50, 10)):

        def search(q, nprobes=nprobes, refine=refine):
            out = []
            for v in q:
                s = table.search(v).metric("dot").nprobes(nprobes).limit(K)
                if refine:
                    s = s.refine_factor(refine)
                out.append(s.select(["id"]).to_arrow()["id"].to_numpy())
            return out

        found = np.stack([np.pad(f, (0, K - len(f)), constant_values=-1) for f in search(queries)])
        start = time.perf_counter()
        search(queries[:200])
        single = 200 / (time.perf_counter() - start)
        rows.append(
            {
                "type": f"lancedb IVF_PQ nprobes={nprobes} refine={refine}",
                "factory": f"IVF{partitions},PQ{dim // 8} (lance)",
                "build_s": round(build_s + write_s, 1),
                "rss_mb": "-",
                "size_mb": "-",
                "nprobe": nprobes,
                "tuned_recall": "-",
                "recall@10": round(recall_at_k(found, truth), 4),
                "qps_single": round(single, 1),
                "qps_batch": "-",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--types", default="flat,auto,ivf-hnsw-pq,ivf-flatq-sq8")
    parser.add_argument("--max-memory", type=float, default=2.0, help="GiB")
    parser.add_argument("--lancedb", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    x = load(args.folder, args.limit)
    queries = np.load(args.queries).astype(np.float32)
    print(f"{len(x)} x {x.shape[1]} vectors, {len(queries)} held-out queries", flush=True)
    start = time.perf_counter()
    ids = np.arange(len(x), dtype=np.int64)
    truth = exact_neighbours(
        lambda: ((ids[i : i + 65536], x[i : i + 65536]) for i in range(0, len(x), 65536)), queries, K
    )
    print(f"exact top-10 by numpy: {time.perf_counter() - start:.1f}s", flush=True)
    cfg = IndexConfig(max_memory=int(args.max_memory * GiB))
    table = plans(x.shape[1], len(x), cfg)
    rows = []
    for name in args.types.split(","):
        rows.append(run_type(name, table[name], x, queries, truth, cfg))
        print(rows[-1], flush=True)
        gc.collect()
    if args.lancedb:
        rows += run_lancedb(x, queries, truth, args.work)
    flat = next((r for r in rows if r["type"] == "flat"), None)
    print(
        "\n| index | factory | build s | RSS MB | size MB | nprobe | recall@10 | q/s single | vs exact | q/s batch |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['qps_single'] / flat['qps_single']:.1f}x" if flat else "-"
        print(
            f"| {r['type']} | {r['factory']} | {r['build_s']} | {r['rss_mb']} | {r['size_mb']} | {r['nprobe']} | "
            f"{r['recall@10']} | {r['qps_single']} | {ratio} | {r['qps_batch']} |"
        )


if __name__ == "__main__":
    main()
