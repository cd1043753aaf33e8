"""Load test of `retrieval serve` on loopback: bounded, mixed text and image queries at several concurrencies.

    python benchmarks/serve_load.py --db DIR                       # a collection built by `retrieval index`
    python benchmarks/serve_load.py --db DIR --levels 1 8 64 --requests 2000 --image-share 0.25

Starts the server in a subprocess (port 0; the port is read from DIR/server.json), then prints, each from this
one run: the in-process search call against the same text query over HTTP (ratio), `retrieval search --json`
through the server (p50 of a few fresh processes), and per concurrency level the p50/p99 latency, throughput
and errors of `--requests` requests, a share of them image uploads (multipart, images of the collection).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = [
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "cross",
    "small",
    "large",
    "left of",
    "above",
    "dog",
    "beach",
]


def start_server(db: Path) -> tuple[subprocess.Popen, str]:
    info = db / "server.json"
    info.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cli.main", "serve", "--db", str(db), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not info.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start: {proc.stderr.read()}")
        time.sleep(0.2)
    port = json.loads(info.read_text())["port"]
    return proc, f"http://127.0.0.1:{port}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def one_request(client, rng: random.Random, images: list[bytes], image_share: float) -> tuple[float, bool]:
    start = time.perf_counter()
    try:
        if images and rng.random() < image_share:
            response = client.post(
                "/search", files={"image": ("q.jpg", rng.choice(images))}, data={"k": "10"}
            )
        else:
            query = " ".join(rng.sample(WORDS, 3))
            response = client.get("/search", params={"q": query, "k": 10})
        ok = response.status_code == 200 and isinstance(response.json(), list)
    except Exception:  # noqa: BLE001 - a load test counts failures, whatever they are
        ok = False
    return time.perf_counter() - start, ok


def load_level(url: str, concurrency: int, requests: int, images: list[bytes], share: float) -> dict:
    import httpx

    clients = [httpx.Client(base_url=url, timeout=120) for _ in range(concurrency)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(
            pool.map(
                lambda i: one_request(clients[i % concurrency], random.Random(i), images, share),
                range(requests),
            )
        )
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    latencies = [t for t, _ in results]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": sum(not ok for _, ok in results),
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "per_s": requests / wall,
    }


def in_process_vs_http(db: Path, url: str, repeats: int) -> tuple[float, float]:
    import httpx

    from indexes.collection import Collection
    from retrieval.models.encoders import load_encoder
    from retrieval.pipelines.search import encoder_config_for, parse_query, query_vector

    collection = Collection.open(db)
    encoder = load_encoder(encoder_config_for(collection, "cpu"))
    query = "a small red circle left of a blue square"

    def local() -> None:
        collection.search(query_vector(encoder, parse_query(query, files=False))[None], 10)

    local()
    times_local, times_http = [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        client.get("/search", params={"q": query, "k": 10})
        for _ in range(repeats):  # interleaved, so both see the same machine load
            t = time.perf_counter()
            local()
            times_local.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert client.get("/search", params={"q": query, "k": 10}).status_code == 200
            times_http.append(time.perf_counter() - t)
    return statistics.median(times_local), statistics.median(times_http)


def cli_through_server(db: Path, repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "cli.main", "search", "a red circle", "--db", str(db), "--json"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        times.append(time.perf_counter() - t)
        assert json.loads(out.stdout)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=2000, help="per level (bounded)")
    parser.add_argument("--image-share", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if any(not 1 <= c <= 64 for c in args.levels):
        raise SystemExit("--levels: concurrency between 1 and 64")

    from indexes.store import ImageStore

    paths = [p for p, _ in zip(ImageStore(args.db).stats(), range(32), strict=False)]
    images = [Path(p).read_bytes() for p in paths]
    proc, url = start_server(args.db)
    try:
        local, http = in_process_vs_http(args.db, url, args.repeats)
        print(
            f"text query: in-process {1000 * local:.1f} ms, HTTP {1000 * http:.1f} ms ({http / local:.2f}x)"
        )
        cli = cli_through_server(args.db, max(3, args.repeats // 4))
        print(f"`retrieval search --json` through the server: p50 {1000 * cli:.0f} ms")
        print("concurrency | requests | errors | p50 ms | p99 ms | req/s")
        for level in args.levels:
            r = load_level(url, level, args.requests, images, args.image_share)
            print(
                f"{r['concurrency']:>11} | {r['requests']:>8} | {r['errors']:>6} | {r['p50_ms']:>6.1f} | "
                f"{r['p99_ms']:>6.1f} | {r['per_s']:.1f}"
            )
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
