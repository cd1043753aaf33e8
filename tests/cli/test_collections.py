"""Collections of precomputed vectors end to end: import, info, search by vectors, in-place growth, export,
near-duplicates, damaged files and the commands their messages name."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexes.build import recall_at_k
from indexes.manifest import read_manifest
from tests.cli.conftest import invoke

MODEL = ["--model", "test-micro", "--pretrained", "none", "--device", "cpu"]  # 32-d
SMALL = ["--flat-max", "500"]  # an approximate index already at a few thousand vectors


def clustered(n, seed, dim=32):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(11).normal(size=(30, dim)) * np.linspace(1.5, 0.3, dim)
    x = centers[rng.integers(0, 30, n)] + rng.normal(size=(n, dim)) * 0.3
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_shard(folder, i, vectors, names=None):
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    np.save(folder / "img_emb" / f"img_emb_{i}.npy", vectors.astype(np.float16))  # as clip-retrieval writes
    names = names or [f"s{i}/{j:05d}.jpg" for j in range(len(vectors))]
    pq.write_table(
        pa.table({"image_path": names, "caption": [f"c{j}" for j in range(len(vectors))]}),
        folder / "metadata" / f"metadata_{i}.parquet",
    )
    return names


def ok(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if result.stdout.strip() else None


def import_json(runner, source, db, *extra):
    return ok(
        invoke(runner, "index", "--embeddings", source, "--db", db, *MODEL, *SMALL, "--json", "-q", *extra)
    )


def test_import_search_by_vectors_and_grow_in_place(runner, tmp_path):
    src, db = tmp_path / "emb", tmp_path / "db"
    shards = [clustered(1500, seed=s) for s in (1, 2)]
    names = sum((write_shard(src, i, v) for i, v in enumerate(shards)), [])
    first = import_json(runner, src, db)
    assert first["total"] == 3000 and first["imported"] == 3000 and first["index"]["type"] == "ivf"

    card = ok(invoke(runner, "info", "--db", db, "--json"))["index"]
    assert card["recall@10"] >= 0.95 and card["search_params"]["nprobe"] < card["params"]["nlist"]
    assert card["size_bytes"] > 0 and card["latency_ms"]["p99"] >= card["latency_ms"]["p50"] > 0

    # an independent check: numpy's exact top-10 of fresh queries against what the CLI answers
    queries = clustered(200, seed=9)
    np.save(tmp_path / "q.npy", queries)
    answers = ok(invoke(runner, "search", "--vectors", tmp_path / "q.npy", "--db", db, "-k", "10", "--json"))
    assert len(answers) == 200 and all(len(a) == 10 for a in answers)
    stored = np.concatenate(shards).astype(np.float16).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    truth = np.argsort(-(queries @ stored.T), axis=1)[:, :10]
    position = {name: i for i, name in enumerate(names)}
    found = np.array([[position[h["path"]] for h in a] for a in answers])
    assert recall_at_k(found, truth) >= 0.9

    # a new shard goes into the index in place; a re-run imports nothing
    write_shard(src, 2, clustered(100, seed=3))
    grown = import_json(runner, src, db)
    assert (grown["imported"], grown["already"], grown["total"]) == (100, 2, 3100)
    assert grown["index"]["built_at"] == card["built_at"] and grown["index"]["count"] == 3100
    assert import_json(runner, src, db)["imported"] == 0


def test_export_then_import_round_trips(runner, tmp_path):
    src, db = tmp_path / "emb", tmp_path / "db"
    names = write_shard(src, 0, clustered(300, seed=1))
    import_json(runner, src, db)
    ok(invoke(runner, "export", "--db", db, "--out", tmp_path / "all.parquet"))
    table = pq.read_table(tmp_path / "all.parquet")
    assert sorted(table["path"].to_pylist()) == sorted(names) and "embedding" in table.column_names
    assert json.loads(table["meta"][0].as_py())["caption"].startswith("c")
    again = import_json(runner, tmp_path / "all.parquet", tmp_path / "db2")
    assert again["total"] == 300
    q = np.asarray(table["embedding"][5].as_py(), np.float32)
    np.save(tmp_path / "one.npy", q)
    hit = ok(
        invoke(
            runner, "search", "--vectors", tmp_path / "one.npy", "--db", tmp_path / "db2", "-k", "1", "--json"
        )
    )
    assert hit[0][0]["path"] == table["path"][5].as_py()


def test_bad_inputs_are_one_line_errors(runner, tmp_path):
    src, db = tmp_path / "emb", tmp_path / "db"
    write_shard(src, 0, clustered(50, seed=1))
    (src / "metadata" / "metadata_0.parquet").unlink()
    result = invoke(runner, "index", "--embeddings", src, "--db", db, *MODEL)
    assert result.exit_code == 2 and "metadata_0.parquet" in result.stderr and result.stderr.count("\n") == 1

    write_shard(src, 0, clustered(50, seed=1, dim=64))
    result = invoke(runner, "index", "--embeddings", src, "--db", db, *MODEL)
    assert result.exit_code == 2 and "dimension 64" in result.stderr and "--model" in result.stderr

    write_shard(src, 0, clustered(50, seed=1))
    import_json(runner, src, db)
    np.save(tmp_path / "bad.npy", np.zeros((2, 16), np.float32))
    result = invoke(runner, "search", "--vectors", tmp_path / "bad.npy", "--db", db, "--json")
    assert result.exit_code == 2 and "(Q, 32)" in result.stderr and result.stdout == ""


def test_dedup_groups_near_copies_and_unique_search_keeps_one_of_each(runner, tmp_path):
    src, db = tmp_path / "emb", tmp_path / "db"
    base = clustered(400, seed=1)
    rng = np.random.default_rng(0)
    copies = base[:20] + rng.normal(size=(20, 32)).astype(np.float32) * 0.01  # re-encodes of 20 images
    names = write_shard(src, 0, np.concatenate([base, copies]))
    import_json(runner, src, db)
    groups = ok(invoke(runner, "dedup", "--db", db, "--threshold", "0.99", "--json"))
    pairs = {frozenset(m["path"] for m in g) for g in groups}
    assert {frozenset((names[i], names[400 + i])) for i in range(20)} <= pairs

    np.save(tmp_path / "q.npy", base[:5])
    plain = ok(invoke(runner, "search", "--vectors", tmp_path / "q.npy", "--db", db, "-k", "5", "--json"))
    unique = ok(
        invoke(
            runner,
            "search",
            "--vectors",
            tmp_path / "q.npy",
            "--db",
            db,
            "-k",
            "5",
            "--json",
            "--unique",
            "--threshold",
            "0.99",
        )
    )
    for i, (p, u) in enumerate(zip(plain, unique, strict=True)):
        assert {names[i], names[400 + i]} <= {h["path"] for h in p}  # the copy ranks next to its original
        got = {h["path"] for h in u}
        assert len(u) == 5 and len(got & {names[i], names[400 + i]}) == 1


def test_damaged_files_rebuild_or_name_a_command_that_works(runner, tmp_path):
    src, db = tmp_path / "emb", tmp_path / "db"
    write_shard(src, 0, clustered(800, seed=1))
    import_json(runner, src, db)
    np.save(tmp_path / "q.npy", clustered(3, seed=5))
    search = ["search", "--vectors", tmp_path / "q.npy", "--db", db, "-k", "4", "--json"]
    expected = ok(invoke(runner, *search))

    index = db / "faiss.index"
    index.write_bytes(index.read_bytes()[:1000])  # truncated
    assert ok(invoke(runner, *search)) == expected
    index.unlink()
    assert [len(a) for a in ok(invoke(runner, *search))] == [4, 4, 4]

    (db / "manifest.json").write_text("garbage")
    assert ok(invoke(runner, *search))  # the backup copy answers
    (db / "manifest.json").write_text("garbage")
    (db / "manifest.backup.json").write_text("garbage")
    result = invoke(runner, *search)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--reembed" in result.stderr
    import_json(runner, src, db, "--reembed")  # the command the message names
    assert [len(a) for a in ok(invoke(runner, *search))] == [4, 4, 4]
    assert read_manifest(db)["model"]["arch"] == "test-micro"
    shutil.rmtree(db)
