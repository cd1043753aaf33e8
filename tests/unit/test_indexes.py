import json

import numpy as np
import pytest

from indexes.collection import Collection
from indexes.errors import CollectionError, ModelMismatch
from indexes.manifest import read_manifest
from indexes.store import ImageStore, path_id

MODEL = {
    "arch": "a",
    "weights": "random-init:seed=0",
    "embed_dim": 8,
    "image_size": 32,
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "resize": "x",
}


def rows_for(paths):
    return [
        {
            "id": path_id(p),
            "path": p,
            "size": 1,
            "mtime_ns": 2,
            "hash": "h" + p,
            "width": 3,
            "height": 4,
            "meta": "{}",
        }
        for p in paths
    ]


def unit(n, dim=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_path_id_is_stable_and_positive():
    assert path_id("/a/b.jpg") == path_id("/a/b.jpg") != path_id("/a/c.jpg")
    assert 0 <= path_id("/x") < 2**63


def test_upsert_replaces_rows_by_id_and_streams_vectors(tmp_path):
    store = ImageStore(tmp_path, dim=8)
    paths = [f"/img/{i}.jpg" for i in range(30)]
    store.upsert(rows_for(paths), unit(30))
    store.upsert(rows_for(paths[:10]), unit(10, seed=1))  # a re-run over the same files
    assert store.count() == 30
    ids = np.concatenate([i for i, _ in store.iter_vectors(batch_rows=7)])
    assert sorted(ids.tolist()) == sorted(path_id(p) for p in paths)
    got = store.fetch([path_id(paths[0])], vectors=True)[path_id(paths[0])]
    np.testing.assert_allclose(got["vector"], unit(10, seed=1)[0], rtol=1e-6)


def test_paths_with_quotes_never_reach_a_filter(tmp_path):
    store = ImageStore(tmp_path, dim=8)
    nasty = ["/a/it's.jpg", '/a/"q".jpg', "/a/x') OR 1=1 --.jpg"]
    store.upsert(rows_for(nasty), unit(3))
    store.delete([path_id(nasty[2])])
    assert sorted(store.stats()) == sorted(nasty[:2])


def test_collection_search_returns_nearest_first_and_rebuilds_stale_index(tmp_path):
    with Collection.open_for_write(tmp_path / "db", MODEL) as col:
        vecs = unit(50)
        col.store.upsert(rows_for([f"/p/{i}" for i in range(50)]), vecs)
        col.rebuild_index()
        hits = col.search(vecs[7:8], k=5)[0]
        assert hits[0]["path"] == "/p/7" and abs(hits[0]["score"] - 1.0) < 1e-5
        assert [h["score"] for h in hits] == sorted([h["score"] for h in hits], reverse=True)
        # rows committed after the last index build (an interrupted run) are still found
        col.store.upsert(rows_for(["/p/new"]), unit(1, seed=9))
    reopened = Collection.open(tmp_path / "db")
    assert not reopened.index_is_fresh()
    assert reopened.search(unit(1, seed=9), k=1)[0][0]["path"] == "/p/new"


def test_other_model_is_refused_and_changes_nothing(tmp_path):
    with Collection.open_for_write(tmp_path, MODEL) as col:
        col.store.upsert(rows_for(["/p/1"]), unit(1))
        col.rebuild_index()
    before = json.dumps(read_manifest(tmp_path), sort_keys=True)
    with pytest.raises(ModelMismatch, match="--reembed"):
        Collection.open_for_write(tmp_path, {**MODEL, "weights": "other"})
    assert json.dumps(read_manifest(tmp_path), sort_keys=True) == before
    assert ImageStore(tmp_path).count() == 1
    with Collection.open_for_write(
        tmp_path, {**MODEL, "weights": "other", "embed_dim": 4}, reembed=True
    ) as col:
        assert col.store.count() == 0 and col.store.dim == 4


def test_second_writer_is_refused(tmp_path):
    with Collection.open_for_write(tmp_path, MODEL):
        with pytest.raises(CollectionError, match="another"):
            Collection.open_for_write(tmp_path, MODEL)


def test_opening_a_missing_collection_is_a_clear_error(tmp_path):
    with pytest.raises(CollectionError, match="no collection"):
        Collection.open(tmp_path / "nope")
