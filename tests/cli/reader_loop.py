"""A search loop in its own process, as another user's searches run while `retrieval index` writes: one JSON line
per query with the result sizes and paths, or the error. Stops when the stop file appears.

    python -m tests.cli.reader_loop DB OUT STOP_FILE K
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from indexes.collection import Collection


def main(db: str, out: str, stop: str, k: int) -> None:
    queries = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with open(out, "w") as f:
        while not Path(stop).exists():
            start = time.time()
            try:
                hits = Collection.open(db).search(queries, k)  # opened afresh, as a CLI call would
                record = {
                    "t": start,
                    "sizes": [len(h) for h in hits],
                    "paths": [h["path"] for q in hits for h in q],
                }
            except Exception as e:  # noqa: BLE001 - every failure is what the test looks for
                record = {"t": start, "error": f"{type(e).__name__}: {e}"}
            f.write(json.dumps(record) + "\n")
            f.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
