"""A search loop in another process while `index` updates the collection, re-embeds it, and is killed -9 in the
middle of a re-embed: no error, no removed item, no short result; the re-run ends with every image once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from indexes.collection import Collection
from indexes.layout import read_reembed
from indexes.manifest import read_manifest
from tests.cli.conftest import invoke, make_images

K = 5
MODEL = ["--model", "test-micro", "--pretrained", "none", "--device", "cpu", "-q"]


def new_table_rows(db) -> int:
    pending = read_reembed(db)
    versions = db / f"{pending['table']}.lance" / "_versions" if pending else None
    return len(list(versions.iterdir())) if versions is not None and versions.is_dir() else 0


@pytest.mark.slow
def test_searches_never_fail_during_updates_reembeds_and_kills(runner, tmp_path):
    folder, db = tmp_path / "photos", tmp_path / "db"
    images = make_images(folder, 120)
    assert invoke(runner, "index", folder, "--db", db, *MODEL).exit_code == 0
    log, stop = tmp_path / "reads.jsonl", tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    reader = subprocess.Popen(
        [sys.executable, "-m", "tests.cli.reader_loop", str(db), str(log), str(stop), str(K)], env=env
    )
    try:
        while not log.exists() or log.stat().st_size == 0:
            time.sleep(0.1)
        # an update: 15 files deleted, 10 added
        removed = {str(p) for p in images[:15]}
        for path in images[:15]:
            path.unlink()
        make_images(folder, 10, seed=3, start=500)
        assert invoke(runner, "index", folder, "--db", db, *MODEL).exit_code == 0
        updated_at = time.time()

        # a re-embed with another model, killed -9 after some of its commits, then run again to the end
        args = [
            "index",
            folder,
            "--db",
            db,
            "--model",
            "test-micro",
            "--pretrained",
            "none",
            "--seed",
            "1",
            "--device",
            "cpu",
            "-q",
        ]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli.main",
                *map(str, args),
                "--reembed",
                "--batch-size",
                "8",
                "--commit-every",
                "8",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.time() + 600
        while new_table_rows(db) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the re-embed finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert (
            read_manifest(db)["model"]["weights"] == "random-init:seed=0"
        )  # the live collection is the old one
        time.sleep(1.0)  # let the reader query the collection left by the kill
        done = invoke(runner, *args, "--reembed")
        assert done.exit_code == 0, done.output
    finally:
        stop.touch()
        reader.wait(timeout=120)

    reads = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(reads) > 10
    assert [r["error"] for r in reads if "error" in r] == []
    assert all(size == K for r in reads for size in r["sizes"])
    after = [r for r in reads if r["t"] > updated_at]
    assert after and not any(p in removed for r in after for p in r["paths"])

    final = Collection.open(db)
    assert final.model["weights"] == "random-init:seed=1"
    paths = sorted(final.store.stats())
    expected = sorted(str(p) for p in folder.rglob("*") if p.suffix in (".jpg", ".png"))
    assert paths == expected and final.store.count() == len(expected) == 115
    # the live generation, and the swapped-out one kept for searches in flight until the next writer opens it
    assert sorted(p.name for p in db.glob("*.lance")) == sorted({f"{final.table}.lance", "images.lance"})
