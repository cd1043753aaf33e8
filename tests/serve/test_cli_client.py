"""`retrieval search --db DIR` goes through a running server, and searches in-process when there is none."""

import json
import os

from retrieval.serve import discovery
from tests.cli.conftest import invoke


def served_queries(http) -> float:
    line = next(ln for ln in http.get("/metrics").text.splitlines() if ln.startswith("retrieval_batched"))
    return float(line.split()[1])


def test_search_uses_the_running_server(runner, live, http, collection):
    assert discovery.find(collection.db) == live.url
    before = served_queries(http)
    result = invoke(runner, "search", "a red square", "--db", collection.db, "-k", "4", "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 4 and served_queries(http) == before + 1

    by_image = invoke(
        runner, "search", "--image", collection.paths[2], "--db", collection.db, "-k", "1", "--json"
    )
    assert json.loads(by_image.stdout)[0]["path"] == collection.paths[2]

    odd = invoke(runner, "search", "x", "--db", collection.db, "-k", "100", "--json")
    assert {os.fsencode(h["path"]) for h in json.loads(odd.stdout)} == {
        os.fsencode(p) for p in collection.paths
    }
    bad = invoke(runner, "search", "x", "--db", collection.db, "-k", "100000", "--json")
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1


def test_a_dead_servers_file_falls_back_in_process(runner, tmp_path, collection):
    import shutil

    db = tmp_path / "copy"
    shutil.copytree(collection.db, db)
    (db / discovery.FILENAME).write_text(json.dumps({"host": "127.0.0.1", "port": 1, "pid": 2**22 + 7}))
    assert discovery.find(db) is None
    result = invoke(runner, "search", "a red square", "--db", db, "-k", "3", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 3
