"""Peak memory of a streamed training run as the dataset grows: the same steps on 10,000 and 100,000 pairs.

    python benchmarks/stream_memory.py PAIRS.jsonl OUT [--sizes 10000 100000] [--steps 30] [--workers 2]

PAIRS.jsonl's rows (repeated as often as needed, each repeat a new sample key) are written as 20 WebDataset shards
per size; `retrieval train` streams each set for --steps joint steps (no refinement stage), and the peak resident
memory of the whole process tree (trainer + DataLoader workers, sampled every 0.2 s from /proc) is printed with
its ratio to the smallest size. Flat memory means the ratio stays near 1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def write_shards(rows: list[dict], base: Path, n: int, out: Path, shards: int = 20) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tars = [tarfile.open(out / f"shard-{s:03d}.tar", "w") for s in range(shards)]
    for k in range(n):
        row = rows[k % len(rows)]
        for ext, data in (("jpg", (base / row["image"]).read_bytes()), ("txt", row["caption"].encode())):
            info = tarfile.TarInfo(f"{k:09d}.{ext}")
            info.size = len(data)
            tars[k % shards].addfile(info, io.BytesIO(data))
    for tar in tars:
        tar.close()


def _tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def peak_rss(cmd: list[str]) -> tuple[int, float, int]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.2)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return peak, time.perf_counter() - start, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pairs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.pairs.read_text().splitlines()]
    results = []
    for n in args.sizes:
        shards = args.out / f"shards-{n}"
        if not shards.exists():
            write_shards(rows, args.pairs.parent, n, shards)
        run = args.out / f"run-{n}"
        cmd = [
            sys.executable,
            "-m",
            "cli.main",
            "train",
            str(shards),
            "--out",
            str(run),
            "-q",
            "--set",
            f"steps={args.steps}",
            "--set",
            "refine.steps=0",
            "--set",
            "objectives.itm=false",
            "--set",
            f"workers={args.workers}",
            "--set",
            f"save_every={args.steps}",
        ]
        if run.exists():
            subprocess.run(["rm", "-rf", str(run)], check=True)
        peak, seconds, code = peak_rss(cmd)
        results.append((n, peak, seconds, code))
        print(
            f"{n:>9,} pairs: peak RSS {peak / 2**20:,.0f} MiB (trainer + workers), {seconds:.0f} s, exit {code}"
        )
    base = results[0][1]
    for n, peak, _, _ in results[1:]:
        print(f"{n:,} vs {results[0][0]:,} pairs: peak memory x{peak / base:.2f}")


if __name__ == "__main__":
    main()
