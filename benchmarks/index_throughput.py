"""Indexing throughput of the whole pipeline against the model alone, and peak memory as the folder grows.

    python benchmarks/index_throughput.py --arch ViT-S-32-alt --sizes 1000 10000

Model alone: forward passes (normalisation included) on batches already decoded to uint8 tensors, same
architecture, batch size and threads. Pipeline: `index_folder` on a fresh collection (scan, read, hash, decode in
decode workers, encode, LanceDB commits, compaction, FAISS build), model loading excluded. Each pipeline run
is its own process so its peak RSS is its own. Figures are from one run on one machine: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_folder(folder: Path, n: int, size: tuple[int, int] = (480, 360)) -> None:
    """Photo-sized JPEGs with smooth gradients and blobs (decode cost like a small photo, not a flat colour)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    for i in range(n):
        path = folder / f"{i // 1000:03d}" / f"img_{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(exist_ok=True)
        base = rng.integers(0, 255, 3)
        arr = (base + (xx[..., None] * rng.normal(0, 0.2, 3)) + (yy[..., None] * rng.normal(0, 0.2, 3))) % 255
        cy, cx, r = rng.integers(0, size[1]), rng.integers(0, size[0]), rng.integers(20, 120)
        arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
        arr += rng.normal(0, 8, arr.shape)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)


def model_alone(arch: str, batch: int, folder: Path, batches: int) -> float:
    import torch

    from retrieval.config import EncoderConfig
    from retrieval.data.images import load_for_model
    from retrieval.models.encoders import load_encoder

    enc = load_encoder(EncoderConfig(arch=arch, device="cpu"))
    files = sorted(folder.rglob("*.jpg"))[:batch]
    pixels = torch.from_numpy(np.stack([load_for_model(str(f), enc.image_size)[0] for f in files])).permute(
        0, 3, 1, 2
    )
    enc.encode_images(pixels)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        enc.encode_images(pixels)
    return batches * len(files) / (time.perf_counter() - start)


PIPELINE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from retrieval.config import EncoderConfig, IndexRunConfig
from retrieval.models.encoders import load_encoder
from retrieval.pipelines.index_folder import index_folder
cfg = EncoderConfig(arch={arch!r}, device="cpu")
enc = load_encoder(cfg)
rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
s = index_folder([{folder!r}], {db!r}, cfg, IndexRunConfig(batch_size={batch}, workers={workers}), progress=False, encoder=enc)
wall = time.perf_counter() - start
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({{"n": s.new, "skipped": len(s.skipped), "wall": wall, "rss_after_model_mb": rss_model / 1024,
                  "peak_rss_mb": peak / 1024}}))
"""


def pipeline(arch: str, batch: int, workers: int, folder: Path, db: Path) -> dict:
    code = PIPELINE.format(
        root=str(ROOT), arch=arch, folder=str(folder), db=str(db), batch=batch, workers=workers
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="ViT-S-32-alt")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retrieval-bench")
    args = parser.parse_args()

    print(
        f"machine: {os.cpu_count()} cores; arch {args.arch}, batch {args.batch_size}, workers {args.workers}"
    )
    rows = []
    for n in args.sizes:
        folder = args.work / f"images-{n}"
        t0 = time.perf_counter()
        make_folder(folder, n)
        print(f"folder of {n} images ready ({time.perf_counter() - t0:.0f}s)", flush=True)
        alone = model_alone(
            args.arch, args.batch_size, folder, batches=max(3, min(20, n // args.batch_size // 4))
        )
        db = args.work / f"db-{n}-{time.time_ns()}"
        result = pipeline(args.arch, args.batch_size, args.workers, folder, db)
        rate = result["n"] / result["wall"]
        rows.append((n, alone, rate, result))
        print(
            f"n={n:>6}: model alone {alone:7.1f} img/s | pipeline {rate:7.1f} img/s "
            f"({rate / alone:.0%} of model alone) | peak RSS {result['peak_rss_mb']:.0f} MB "
            f"(after model load {result['rss_after_model_mb']:.0f} MB)",
            flush=True,
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(
            f"memory growth {first[0]} -> {last[0]} images: peak RSS x{last[3]['peak_rss_mb'] / first[3]['peak_rss_mb']:.2f}"
        )


if __name__ == "__main__":
    main()
