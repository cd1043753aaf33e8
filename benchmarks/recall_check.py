"""Independent check of a collection imported with `index --embeddings` (issue 17's acceptance): recall@10 of
`retrieval search --vectors --json` against exact top-10 computed here with numpy over the imported vectors, and
single-query latency of the collection's own FAISS index against exact search (faiss IndexFlatIP over the same
vectors, float32), both timed in this one process, one after the other.

    python benchmarks/embedding_mixture.py /tmp/emb --n 1000000 --shard 100000 --seed 1
    python benchmarks/embedding_mixture.py /tmp/queries.npy --n 1000 --seed 99 --npy
    retrieval index --embeddings /tmp/emb --db /tmp/db --model ViT-B-32 --pretrained none --max-memory 2G
    python benchmarks/recall_check.py /tmp/db /tmp/emb /tmp/queries.npy

The collection's paths are the metadata's `image_path` (embedding_mixture.py writes `shardSSS/IIIIIII.jpg`: shard
S, row I), which is how a hit is matched to its vector here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def shards(emb: Path) -> list[Path]:
    return sorted((emb / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))


def exact_top(emb: Path, queries: np.ndarray, k: int) -> list[set[str]]:
    """Exact top-k paths per query: a streaming scan of the shards, a running top-k (bounded memory)."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_names = np.full((len(queries), k), "", dtype=object)
    for path in shards(emb):
        shard = int(re.findall(r"\d+", path.stem)[-1])
        x = np.load(path).astype(np.float32)
        scores = queries @ x.T  # (Q, n)
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        names = np.array([f"shard{shard:03d}/{i:07d}.jpg" for i in range(len(x))], dtype=object)
        cand_s = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], 1)
        cand_n = np.concatenate([best_names, names[top]], 1)
        keep = np.argsort(-cand_s, axis=1)[:, :k]
        best_scores, best_names = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_n, keep, 1)
    return [set(row) for row in best_names]


def cli_answers(db: str, queries_file: str, k: int) -> tuple[list[set[str]], float, int]:
    """(paths per query, wall seconds, peak RSS in MiB of the search process)."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "cli.main", "search", "--vectors", queries_file, "--db", db, "-k", str(k)]
            + ["--json"],
            stdout=out,
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        wall = time.perf_counter() - t0
        out.seek(0)
        answers = json.load(out)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    return [{h["path"] for h in hits} for hits in answers], wall, peak


def single_query_ms(index, queries: np.ndarray, k: int) -> list[float]:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db")
    ap.add_argument("emb", type=Path)
    ap.add_argument("queries")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--timed", type=int, default=200, help="single queries timed on the collection's index")
    ap.add_argument("--timed-exact", type=int, default=30, help="single queries timed on exact search")
    args = ap.parse_args()
    import faiss

    queries = np.load(args.queries).astype(np.float32)
    got, wall, peak = cli_answers(args.db, args.queries, args.k)
    print(f"search --vectors: {len(queries)} queries in {wall:.1f} s (one process), peak RSS {peak} MiB")
    truth = exact_top(args.emb, queries, args.k)
    recall = statistics.mean(len(g & t) / args.k for g, t in zip(got, truth, strict=True))
    print(f"recall@{args.k} against exact (numpy, {len(queries)} held-out queries): {recall:.4f}")

    index = faiss.read_index(str(Path(args.db) / "faiss.index"))
    try:
        ivf = faiss.extract_index_ivf(index)  # through the id map
    except RuntimeError:
        ivf = None  # a flat index
    card = json.loads((Path(args.db) / "manifest.json").read_text()).get("index", {})
    nprobe = (card.get("search_params") or card.get("params") or {}).get("nprobe")
    if ivf is not None and nprobe:
        ivf.nprobe = int(nprobe)
        print(f"collection index: {card.get('factory')}, nprobe {ivf.nprobe}")
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    approx = single_query_ms(index, queries[: args.timed], args.k)
    flat = faiss.IndexFlatIP(queries.shape[1])
    for path in shards(args.emb):
        flat.add(np.load(path).astype(np.float32))
    exact = single_query_ms(flat, queries[: args.timed_exact], args.k)
    a, e = statistics.median(approx), statistics.median(exact)
    print(f"single query, collection index (nprobe {nprobe}): p50 {a:.2f} ms over {len(approx)}")
    print(
        f"single query, exact IndexFlatIP over {flat.ntotal} float32 vectors: p50 {e:.2f} ms over {len(exact)}"
    )
    print(f"speed-up over exact: {e / a:.1f}x")


if __name__ == "__main__":
    main()
