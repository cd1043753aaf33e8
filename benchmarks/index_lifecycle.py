"""The life of an index, timed as a user sees it (`retrieval index` in a fresh process each time):

    python benchmarks/index_lifecycle.py --sizes 1000 10000 --kill-model ViT-B-32

1. No-op: a re-run on the unchanged folder (the quick pass: scan + digest, no LanceDB, no model), then a run
   after touching one file (full pass without a model), then after adding 10 images (full pass + model load).
2. Loss after kill -9: a run of --kill-model (random init) is killed --kill-after seconds into embedding;
   the images committed are compared with the images done at the kill, estimated from the rate the run
   itself reported on stderr (a line every 5 s without a terminal), and the loss is given in seconds of work.
3. Orphans: the processes of the killed run (its session) still alive 10 s after the kill.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.index_throughput import make_folder  # noqa: E402
from indexes.store import ImageStore  # noqa: E402
from tests.cli.conftest import session_processes, wait_until_gone  # noqa: E402

PROGRESS = re.compile(r"embedding: (\d+)/\d+ img \(([\d.]+) img/s\)")


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "cli.main", *map(str, args)]


def timed(args: list[str], repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(args, check=True, cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def no_op(folder: Path, db: Path, model: list[str]) -> dict[str, float]:
    index = cli("index", folder, "--db", db, *model, "-q")
    t0 = time.perf_counter()
    subprocess.run(index, check=True, cwd=ROOT, capture_output=True)
    first = time.perf_counter() - t0
    out = {"first run": first, "no-op": timed(index, repeat=3)}
    touched = sorted(folder.rglob("*.jpg"))[0]
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    out["one file touched"] = timed(index)
    extra = folder / "zz-added"
    make_folder(extra, 10, size=(128, 96))
    out["10 images added"] = timed(index)
    shutil.rmtree(extra)
    timed(index)  # back to the folder as it was
    return out


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def killed_run(folder: Path, db: Path, arch: str, after: float, batch: int) -> dict[str, float]:
    proc = subprocess.Popen(
        cli("index", folder, "--db", db, "--model", arch, "--device", "cpu", "--batch-size", batch),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[tuple[float, int, float]] = []  # (time, images done, rate) per progress line

    def read() -> None:
        for line in proc.stderr:
            if m := PROGRESS.search(line):
                lines.append((time.perf_counter(), int(m.group(1)), float(m.group(2))))

    threading.Thread(target=read, daemon=True).start()
    while not lines and proc.poll() is None:
        time.sleep(0.1)
    # the first line comes 5 s into embedding; its rate covers that span
    started = lines[0][0] - lines[0][1] / lines[0][2]
    while time.perf_counter() - started < after and proc.poll() is None:
        time.sleep(0.1)
    children = [pid for pid in session_processes(proc.pid) if pid != proc.pid]
    child_rss = max((rss_mb(pid) for pid in children), default=0.0)
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.perf_counter()
    proc.wait()
    alive = wait_until_gone(proc.pid, 10)
    t, done, rate = lines[-1]
    done_at_kill = done + rate * (killed_at - t)
    committed = ImageStore(db).count()
    return {
        "embedding seconds at kill": killed_at - started,
        "rate img/s": rate,
        "done at kill (est.)": done_at_kill,
        "committed": committed,
        "lost seconds of work": max(0.0, done_at_kill - committed) / rate,
        "children at kill": len(children),
        "largest child RSS MB": child_rss,
        "processes alive 10 s after": len(alive),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--model", default="test-micro", help="model of the no-op collections")
    parser.add_argument("--kill-model", default="ViT-B-32")
    parser.add_argument("--kill-after", type=float, default=30.0)
    parser.add_argument("--kill-batch", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retrieval-bench")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    for n in args.sizes:
        folder = args.work / f"small-{n}"  # what a no-op costs does not depend on the pixels: small JPEGs
        make_folder(folder, n, size=(128, 96))
        db = args.work / f"lifecycle-db-{n}-{time.time_ns()}"
        for what, seconds in no_op(folder, db, ["--model", args.model, "--device", "cpu"]).items():
            print(f"n={n:>6}: {what:<18} {seconds:6.2f} s", flush=True)
        shutil.rmtree(db)
    if args.kill_after > 0:
        folder = args.work / "images-1000"  # 480x360 JPEGs, as benchmarks/index_throughput.py makes them
        make_folder(folder, 1000)
        db = args.work / f"lifecycle-kill-{time.time_ns()}"
        result = killed_run(folder, db, args.kill_model, args.kill_after, args.kill_batch)
        print(f"kill -9 of `index --model {args.kill_model} --batch-size {args.kill_batch}`:")
        for what, value in result.items():
            print(f"  {what:<28} {value:8.1f}")
        shutil.rmtree(db)


if __name__ == "__main__":
    main()
