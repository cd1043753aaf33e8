"""Cold `retrieval search --json` (a fresh process: imports, model load, collection open, one query) of two code
trees side by side: runs alternate, so a change in the machine's load hits both alike. Each tree searches its own
collection of the same images with the same model (a collection's format may differ between trees).

    git worktree add --detach /tmp/before <commit>
    PYTHONPATH=/tmp/before retrieval index photos --db db_before --model ViT-B-32 --pretrained weights.pt
    retrieval index photos --db db_after --model ViT-B-32 --pretrained weights.pt
    python benchmarks/cold_search.py /tmp/before:db_before .:db_after --runs 5

Prints each run's wall and CPU seconds, the medians, and after/before ratios. Figures are from one run on one
machine: quote the ratio.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time


def cold_search(tree: str, db: str, query: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one cold search."""
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "search", query, "--db", db, "-k", "10", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.abspath(tree),
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{tree}: search failed: {result.stderr.strip()[-300:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="TREE:DB, the baseline")
    ap.add_argument("after", help="TREE:DB, the change")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--query", default="a red square")
    args = ap.parse_args()
    trees = {"before": args.before.split(":", 1), "after": args.after.split(":", 1)}
    times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    cold_search(
        *trees["before"], args.query
    )  # warm the page cache for both: every run then reads from memory
    cold_search(*trees["after"], args.query)
    for i in range(args.runs):
        for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
            wall, cpu = cold_search(*trees[name], args.query)
            times[name].append((wall, cpu))
            print(f"run {i + 1} {name:6s} wall {wall:6.2f} s  cpu {cpu:6.2f} s", flush=True)
    med = {
        n: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for n, t in times.items()
    }
    for name, (wall, cpu) in med.items():
        print(f"median {name:6s} wall {wall:6.2f} s  cpu {cpu:6.2f} s")
    print(
        f"after/before: wall {med['after'][0] / med['before'][0]:.2f}, cpu {med['after'][1] / med['before'][1]:.2f}"
    )


if __name__ == "__main__":
    main()
