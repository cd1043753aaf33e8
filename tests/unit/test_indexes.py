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


# ---- the derived index: in place, rebuilt, damaged; re-embeds beside the live table -----------------------------
from indexes import faiss_index  # noqa: E402
from indexes.layout import index_file  # noqa: E402

SMALL_IVF = {"flat_max": 300, "tune_queries": 100, "latency_queries": 20}


def clustered(n, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(5).normal(size=(20, dim))
    v = (centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def filled(path, n, settings=SMALL_IVF, model=MODEL):
    col = Collection.open_for_write(path, model, index_settings=settings)
    paths = [f"/p/{i}" for i in range(n)]
    vecs = clustered(n)
    col.store.upsert(rows_for(paths), vecs)
    col.finish()
    return col, paths, vecs


def test_updates_go_into_the_index_in_place_and_removed_rows_never_come_back(tmp_path):
    col, paths, vecs = filled(tmp_path, 3000)
    built = col.manifest["index"]
    assert built["type"] == "ivf" and built["count"] == 3000
    col.store.delete([path_id(p) for p in paths[:100]])
    col.store.upsert(rows_for(["/new/a", "/new/b"]), clustered(2, seed=4))
    card = col.finish()
    assert (
        card["built_at"] == built["built_at"] and card["train_seconds"] == built["train_seconds"]
    )  # not retrained
    assert card["count"] == 2902 and card["added_since_build"] == 2 and card["removed_since_build"] == 100
    index = faiss_index.load(tmp_path / "faiss.index", 8)
    held = set(faiss_index.ids_in(index).tolist())
    assert path_id("/new/a") in held and not held & {path_id(p) for p in paths[:100]}
    col.close()
    reader = Collection.open(tmp_path)
    for hits in reader.search(vecs[:100], k=10):
        assert len(hits) == 10 and not {h["path"] for h in hits} & set(paths[:100])


def test_a_changed_vector_is_replaced_even_after_a_kill(tmp_path):
    col, paths, vecs = filled(tmp_path, 500)
    moved = -vecs[7]
    col.store.upsert(rows_for([paths[7]]), moved[None])  # same id, new vector; then the run dies
    col.close()
    with Collection.open_for_write(tmp_path, MODEL) as again:
        again.finish()  # the journal names the id: its old vector leaves the index
    hit = Collection.open(tmp_path).search(moved[None], k=1)[0][0]
    assert hit["path"] == paths[7]  # the old vector (its opposite) would rank last


def test_the_index_is_rebuilt_when_the_collection_outgrows_it(tmp_path):
    col, _, _ = filled(tmp_path, 200)
    assert col.manifest["index"]["type"] == "flat"
    col.store.upsert(rows_for([f"/q/{i}" for i in range(800)]), clustered(800, seed=2))
    card = col.finish()
    assert card["type"] == "ivf" and card["count"] == 1000 and card["count_at_build"] == 1000
    col.close()


def test_searches_skip_rows_deleted_after_the_index_was_saved_and_still_return_k(tmp_path):
    col, paths, vecs = filled(tmp_path, 1000)
    reader = Collection.open(tmp_path)
    reader.search(vecs[:1], k=5)  # the reader holds the index in memory
    col.store.delete([path_id(p) for p in paths[:300]])  # a writer, before its index update
    for hits in reader.search(vecs[:50], k=20):
        assert len(hits) == 20 and not {h["path"] for h in hits} & set(paths[:300])
    col.close()


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage"])
def test_a_damaged_index_file_is_rebuilt_from_the_table(tmp_path, damage):
    col, paths, vecs = filled(tmp_path, 1000)
    col.close()
    path = tmp_path / "faiss.index"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"not an index at all")
    hits = Collection.open(tmp_path).search(vecs[3:4], k=3)[0]
    assert hits[0]["path"] == paths[3] and len(hits) == 3
    assert faiss_index.load(path, 8) is not None  # saved again for the next reader


def test_a_garbage_manifest_falls_back_to_its_backup_and_then_names_the_way_out(tmp_path):
    col, paths, vecs = filled(tmp_path, 400)
    col.close()
    (tmp_path / "manifest.json").write_text("{garbage")
    assert Collection.open(tmp_path).search(vecs[:1], k=1)[0][0]["path"] == paths[0]
    assert read_manifest(tmp_path)["model"] == MODEL  # rewritten from the backup
    (tmp_path / "manifest.json").write_text("{garbage")
    (tmp_path / "manifest.backup.json").write_text("")
    with pytest.raises(CollectionError, match="--reembed"):
        Collection.open(tmp_path)
    with Collection.open_for_write(tmp_path, MODEL, reembed=True) as again:  # the way out works
        again.store.upsert(rows_for(paths), vecs)
        again.finish()
    assert Collection.open(tmp_path).search(vecs[:1], k=1)[0][0]["path"] == paths[0]


def test_a_reembed_builds_beside_the_live_collection_and_resumes_after_a_kill(tmp_path):
    col, paths, vecs = filled(tmp_path, 400)
    col.close()
    other = {**MODEL, "weights": "other"}
    first = Collection.open_for_write(tmp_path, other, reembed=True)
    first.store.upsert(rows_for(paths[:150]), clustered(150, seed=8))
    first.close()  # killed before the swap: the old collection is untouched and searchable
    live = Collection.open(tmp_path)
    assert live.model == MODEL and live.store.count() == 400
    assert live.search(vecs[:1], k=1)[0][0]["path"] == paths[0]
    with pytest.raises(ModelMismatch):
        Collection.open_for_write(tmp_path, other)
    with Collection.open_for_write(tmp_path, other, reembed=True) as again:
        assert again.store.count() == 150  # resumed into the same new table
        again.store.upsert(rows_for(paths), clustered(400, seed=8))
        table = again.table
        again.finish()
    swapped = Collection.open(tmp_path)
    assert swapped.model == other and swapped.table == table and swapped.store.count() == 400
    # the swapped-out generation stays for searches that read the old manifest a moment ago, until the next
    # writer opens the collection
    assert sorted(p.name for p in tmp_path.glob("*.lance")) == sorted([f"{table}.lance", "images.lance"])
    Collection.open_for_write(tmp_path, other).close()
    assert sorted(p.name for p in tmp_path.glob("*.lance")) == [f"{table}.lance"]
    assert (tmp_path / index_file(table)).exists() and not (tmp_path / "faiss.index").exists()


def test_a_table_without_any_manifest_names_the_way_out(tmp_path):
    col, paths, vecs = filled(tmp_path, 50)
    col.close()
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.backup.json").unlink()
    with pytest.raises(CollectionError, match="--reembed"):
        Collection.open_for_write(tmp_path, MODEL)
    with Collection.open_for_write(tmp_path, MODEL, reembed=True) as again:
        again.store.upsert(rows_for(paths), vecs)
        again.finish()
    assert Collection.open(tmp_path).store.count() == 50
