"""Search latency: in-process (collection and model loaded once, then text encode + FAISS + row lookup per
query) against a cold CLI call (`retrieval search --json` in a fresh process: imports, model load, collection
open, one query), on a collection that `benchmarks/index_throughput.py` built or one this script builds.

    python benchmarks/search_latency.py --db /tmp/retrieval-bench/db-10000-...      # an existing collection
    python benchmarks/search_latency.py --images 2000 --arch test-micro             # build a small one first

Figures are from one run on one machine: compare the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERIES = [
    "a red circle",
    "dog + beach - night",
    "a small blue square above a large green cross",
    "2:sunset + sea",
]


def build(images: int, arch: str, work: Path) -> Path:
    from benchmarks.index_throughput import make_folder
    from retrieval.config import EncoderConfig, IndexRunConfig
    from retrieval.pipelines.index_folder import index_folder

    folder = work / f"images-{images}"
    make_folder(folder, images)
    db = work / f"search-db-{arch}-{images}"
    if not db.exists():
        index_folder(
            [str(folder)], db, EncoderConfig(arch=arch, pretrained="none"), IndexRunConfig(), progress=False
        )
    return db


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", type=Path, help="An existing collection (default: build one)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--arch", default="ViT-S-32-alt")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retrieval-bench")
    args = parser.parse_args()
    db = args.db or build(args.images, args.arch, args.work)

    from indexes.collection import Collection
    from retrieval.models.encoders import load_encoder
    from retrieval.pipelines.search import encoder_config_for, parse_query, query_vector

    t0 = time.perf_counter()
    collection = Collection.open(db)
    encoder = load_encoder(encoder_config_for(collection, "cpu"))
    load_s = time.perf_counter() - t0
    collection.search(
        query_vector(encoder, parse_query(QUERIES[0]))[None], 10
    )  # warm: builds/loads the index
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        hits = collection.search(query_vector(encoder, parse_query(QUERIES[i % len(QUERIES)]))[None], 10)[0]
        times.append(time.perf_counter() - t)
    assert hits, f"{db}: the collection returned nothing; index some images first"
    warm_ms = statistics.median(times) * 1000

    cold = []
    for q in QUERIES[:3]:
        t = time.perf_counter()
        subprocess.run(
            ["retrieval", "search", q, "--db", str(db), "--json", "--device", "cpu"],
            check=True,
            capture_output=True,
        )
        cold.append(time.perf_counter() - t)
    cold_ms = statistics.median(cold) * 1000
    print(f"collection {db} ({encoder.identity.get('arch', '?')})")
    print(
        f"in-process: open + model load {load_s * 1000:.0f} ms once, then {warm_ms:.1f} ms per query (median of "
        f"{args.repeats}: text encode + FAISS top-10 + row lookup)"
    )
    print(
        f"cold CLI `retrieval search --json`: {cold_ms:.0f} ms per call (median of {len(cold)}); "
        f"{cold_ms / warm_ms:.0f}x an in-process query"
    )


if __name__ == "__main__":
    main()
