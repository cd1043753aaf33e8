"""In-place updates of a big collection against its full rebuild: add N vectors, remove N rows, and check that no
removed row comes back (each removed vector is searched for itself: it would be its own top hit).

    nice -n 5 python benchmarks/collection_updates.py /tmp/db [--n 10000]

Run on a collection built by `retrieval index --embeddings` (benchmarks/embedding_mixture.py makes one); it is
changed: N synthetic rows stay added and N of its rows stay removed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.embedding_mixture import Mixture  # noqa: E402
from indexes.collection import Collection  # noqa: E402
from indexes.store import path_id  # noqa: E402


def timed(col: Collection, change, what: str, rebuild: float) -> dict:
    """Run a table change, then the index update; print both times against the rebuild's."""
    start = time.perf_counter()
    change()
    commit = time.perf_counter() - start
    card = col.finish()
    total = time.perf_counter() - start
    print(
        f"{what}: table commit {commit:.1f}s + index update {card['update_seconds']}s = {total:.1f}s "
        f"= {100 * total / rebuild:.2f}% of the rebuild",
        flush=True,
    )
    return card


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("db", type=Path)
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    model = Collection.open(args.db).model
    with Collection.open_for_write(args.db, model) as col:
        card = col.manifest["index"]
        rebuild = card["build_seconds"]
        print(f"{col.store.count()} rows; index {card['factory']}, built in {rebuild}s", flush=True)

        fresh = Mixture(col.store.dim).sample(args.n, np.random.default_rng(123))
        names = [f"added/{i}.jpg" for i in range(args.n)]
        rows = [{"id": path_id(p), "path": p, "meta": "{}"} for p in names]
        added = timed(col, lambda: col.store.upsert(rows, fresh), f"add {args.n}", rebuild)
        print(f"  the index is still the one built at {added['built_at']} ({added['type']})")

        gone = np.random.default_rng(5).choice(col.store.ids(), args.n, replace=False)
        vectors = col.store.fetch(gone[:200].tolist(), vectors=True)
        timed(col, lambda: col.store.delete(gone.tolist()), f"remove {args.n}", rebuild)

    reader = Collection.open(args.db)
    queries = np.stack([np.asarray(r["vector"], np.float32) for r in vectors.values()])
    hits = reader.search(queries, 10)
    removed_ids = set(gone.tolist())
    back = sum(h["id"] in removed_ids for q in hits for h in q)
    print(
        f"searched for {len(queries)} removed vectors themselves: {back} removed rows returned; "
        f"{sum(len(q) == 10 for q in hits)}/{len(hits)} full results"
    )


if __name__ == "__main__":
    main()
