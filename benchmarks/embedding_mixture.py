"""Vectors that look like image embeddings, for the index benchmarks: a Gaussian mixture, clustered and anisotropic.

CLIP-like embeddings are far from uniform noise (on which every approximate index looks broken): they sit in a
cone around a shared mean direction (random pairs have cosine ~0.2-0.4), their covariance decays like a power law,
and they form many clusters of unequal size (concepts), each spread over a few directions of its own. This mixture
has those four properties. Written in the layout clip-retrieval's inference writes (and LAION's embeddings use):

    OUT/img_emb/img_emb_{i}.npy         float16 (n_i, dim), L2-normalised
    OUT/metadata/metadata_{i}.parquet   image_path, caption (one row per vector, same order)

    python benchmarks/embedding_mixture.py /tmp/emb --n 1000000 --dim 512 --shard 100000
    python benchmarks/embedding_mixture.py /tmp/emb --n 10000 --first-shard 10 --seed 7   # an extra shard
    python benchmarks/embedding_mixture.py /tmp/queries.npy --n 1000 --seed 99 --npy       # held-out queries
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


class Mixture:
    def __init__(self, dim: int = 512, clusters: int = 2000, rank: int = 24, seed: int = 0):
        rng = np.random.default_rng(seed)  # the same seed: the same mixture, whatever is sampled from it
        spectrum = (np.arange(1, dim + 1) ** -0.8).astype(np.float32)  # power-law covariance
        rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        self.basis = (rotation * np.sqrt(spectrum)).astype(np.float32)  # (dim, dim): anisotropic map
        self.mean = rotation[:, 0].astype(np.float32) * 2.5  # the cone: a shared direction
        self.centers = rng.normal(size=(clusters, dim)).astype(np.float32) @ self.basis.T
        self.weights = 1.0 / np.arange(1, clusters + 1) ** 0.7  # concepts of unequal size
        self.weights /= self.weights.sum()
        self.local = rng.normal(size=(clusters, rank, dim)).astype(np.float32) * np.sqrt(2.0 / (rank * dim))
        self.dim, self.rank = dim, rank

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, dim) float32, L2-normalised."""
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        x = self.mean + self.centers[labels]  # (n, dim)
        coeff = rng.normal(size=(n, self.rank)).astype(np.float32)  # (n, rank)
        x += np.einsum("nr,nrd->nd", coeff, self.local[labels])  # each cluster's own directions
        x += rng.normal(size=(n, self.dim)).astype(np.float32) @ self.basis.T * 0.25  # shared noise
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_layout(out: Path, mix: Mixture, n: int, shard: int, first: int, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, start in enumerate(range(0, n, shard), start=first):
        size = min(shard, n - start)
        vectors = np.concatenate([mix.sample(min(4000, size - s), rng) for s in range(0, size, 4000)])
        np.save(out / "img_emb" / f"img_emb_{i}.npy", vectors.astype(np.float16))
        names = [f"shard{i:03d}/{j:07d}.jpg" for j in range(size)]
        pq.write_table(
            pa.table({"image_path": names, "caption": [f"picture {i}-{j}" for j in range(size)]}),
            out / "metadata" / f"metadata_{i}.parquet",
        )
        print(f"wrote shard {i}: {size} vectors", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shard", type=int, default=100_000)
    parser.add_argument("--first-shard", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1, help="Which samples (the mixture itself is fixed)")
    parser.add_argument("--npy", action="store_true", help="One float32 .npy of n vectors (queries)")
    args = parser.parse_args()
    mix = Mixture(args.dim)
    if args.npy:
        np.save(args.out, mix.sample(args.n, np.random.default_rng(args.seed)))
    else:
        write_layout(args.out, mix, args.n, args.shard, args.first_shard, args.seed)


if __name__ == "__main__":
    main()
