import os
import subprocess
import sys

import numpy as np
import pytest

from indexes.build import build_index, exact_neighbours, recall_at_k
from indexes.choose import GiB, IndexConfig, choose_index, nlist_for, outgrown
from indexes.errors import CollectionError


def mixture(n, dim=32, clusters=40, seed=0):
    """Clustered, anisotropic unit vectors (the shape of real embeddings, small)."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(1.5, 0.2, dim)
    centers = np.random.default_rng(123).normal(size=(clusters, dim)) * scales
    x = centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim)) * scales * 0.35
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def batches_of(ids, vectors, size=700):
    return lambda: ((ids[i : i + size], vectors[i : i + size]) for i in range(0, len(ids), size))


def test_exact_while_small_then_ivf_with_codes_that_fit_the_budget():
    assert choose_index(50_000, 512).kind == "flat"
    big = choose_index(1_000_000, 512, IndexConfig(max_memory=2 * GiB))
    assert (big.kind, big.code, big.nlist, big.hnsw_quantizer) == ("ivf", "SQ8", 4096, True)
    assert big.factory == "IVF4096_HNSW32,SQ8"
    tight = choose_index(1_000_000, 512, IndexConfig(max_memory=GiB // 4))
    assert tight.code.startswith("PQ") and 1_000_000 * (int(tight.code[2:]) + 8) < GiB // 4
    # a small collection over the budget as float32 gets codes instead of exact search
    assert choose_index(50_000, 512, IndexConfig(max_memory=50 * 2**20)).kind == "ivf"
    with pytest.raises(CollectionError, match="--max-memory"):
        choose_index(10_000_000, 512, IndexConfig(max_memory=2**20))


def test_nlist_follows_sqrt_n_and_keeps_enough_training_points():
    assert nlist_for(1_000_000, IndexConfig()) == 4096
    assert nlist_for(10_000, IndexConfig()) == 128  # 4 * 100 = 400 -> 512, but 512 * 40 > 10,000
    for n in (2_000, 30_000, 300_000):
        assert nlist_for(n, IndexConfig()) * 40 <= n


def test_outgrown_when_the_kind_changes_or_the_count_doubles():
    cfg = IndexConfig(flat_max=1000)
    flat = {"type": "flat", "params": {"code": "flat"}, "count_at_build": 900}
    assert not outgrown(flat, 950, 32, cfg) and outgrown(flat, 1001, 32, cfg)
    ivf = {"type": "ivf", "params": {"code": "SQ8"}, "count_at_build": 5000}
    assert (
        not outgrown(ivf, 5100, 32, cfg) and outgrown(ivf, 10_001, 32, cfg) and outgrown(ivf, 2000, 32, cfg)
    )


def test_ivf_is_tuned_to_the_target_recall_and_the_card_holds_what_was_measured():
    n = 8000
    x = mixture(n)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    cfg = IndexConfig(flat_max=1000, target_recall=0.9, tune_queries=300, latency_queries=50)
    index, card = build_index(batches_of(ids, x), n, 32, cfg)
    assert card["type"] == "ivf" and card["count"] == n
    nprobe = card["search_params"]["nprobe"]
    assert 1 <= nprobe < card["params"]["nlist"]  # approximate, yet on target
    assert card["recall@10"] >= 0.9 and card["target_reached"]
    assert card["latency_ms"]["p50"] > 0 and card["build_seconds"] >= card["train_seconds"] > 0

    # an independent check on fresh queries from the same distribution, never seen by the build
    queries = mixture(300, seed=7)
    truth = exact_neighbours(batches_of(ids, x), queries, 10)
    _, found = index.search(queries, 10)
    assert recall_at_k(found, truth) >= 0.85


def test_a_flat_index_measures_recall_one():
    x = mixture(600)
    _, card = build_index(batches_of(np.arange(600), x), 600, 32, IndexConfig(tune_queries=50))
    assert card["type"] == "flat" and card["recall@10"] == 1.0 and "nprobe" not in card["search_params"]


def test_cpu_runs_never_load_cuda_or_torch():
    code = (
        "import numpy as np, sys\n"
        "from indexes import faiss_index\n"
        "from indexes.build import build_index\n"
        "from indexes.choose import IndexConfig\n"
        "x = np.random.default_rng(0).normal(size=(3000, 16)).astype('float32')\n"
        "ids = np.arange(3000)\n"
        "index, _ = build_index(lambda: iter([(ids, x)]), 3000, 16, IndexConfig(flat_max=100, tune_queries=50))\n"
        "faiss_index.search(faiss_index.to_search_device(index), x[:3], 5)\n"
        "assert faiss_index.gpu_count() == 0\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('cuda' in maps.lower(), 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
