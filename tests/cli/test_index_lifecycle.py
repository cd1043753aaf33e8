"""The life of an index: runs with nothing to embed load no model, SIGTERM stops a run with what it embedded
committed, and `--watch` keeps a collection in step with a folder until SIGTERM ends it with exit 0."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from indexes.store import ImageStore
from retrieval.errors import UserError
from tests.cli.conftest import committed_versions, invoke, make_images, wait_until_gone

MODEL = ["--model", "test-micro", "--pretrained", "none", "--device", "cpu"]


def index_json(runner, folder, db, *extra):
    result = invoke(runner, "index", folder, "--db", db, *MODEL, "--json", "-q", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_runs_with_nothing_to_embed_load_no_model(runner, tmp_path, monkeypatch):
    folder, db = tmp_path / "photos", tmp_path / "db"
    paths = make_images(folder, 20)
    assert index_json(runner, folder, db)["model_loaded"]

    def no_model(cfg):
        raise UserError("the model was loaded")

    monkeypatch.setattr("retrieval.models.encoders.load_encoder", no_model)
    same = index_json(runner, folder, db)
    assert (same["unchanged"], same["total"], same["model_loaded"]) == (20, 20, False)

    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: read and hashed, not embedded
    paths[1].unlink()
    touched = index_json(runner, folder, db)
    assert (touched["touched"], touched["removed"], touched["total"]) == (1, 1, 19)
    assert not touched["model_loaded"]

    # other weights than the collection's: the model is loaded to be checked, even with nothing to embed
    other = invoke(runner, "index", folder, "--db", db, *MODEL, "--seed", "1", "-q")
    assert other.exit_code == 2 and "the model was loaded" in other.stderr

    monkeypatch.undo()
    make_images(folder, 1, seed=7, start=900)
    added = index_json(runner, folder, db)
    assert (added["new"], added["total"], added["model_loaded"]) == (1, 20, True)
    assert not index_json(runner, folder, db)["model_loaded"]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,  # its session id is its pid: how its children are found after it ends
    )


@pytest.mark.slow
def test_sigterm_mid_run_commits_what_was_embedded_and_exits_130(tmp_path):
    folder, db = tmp_path / "photos", tmp_path / "db"
    make_images(folder, 300)
    # ViT-B-32 (random weights): slow enough per image that the run is stopped with rows committed and more to come
    proc = start("index", folder, "--db", db, "--model", "ViT-B-32", "--pretrained", "none", "--device", "cpu", "--batch-size", "8",
                 "--commit-seconds", "0.5")  # fmt: skip
    deadline = time.time() + 600  # a loaded 2-core box can take minutes to the first commits
    seen = 0
    while time.time() < deadline and proc.poll() is None:
        versions = committed_versions(db)
        if versions != seen:  # count rows only when a commit landed
            seen = versions
            if ImageStore(db).count() > 0:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be stopped; make the folder bigger"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "run the same command to finish" in last
    kept = ImageStore(db).count()
    assert 0 < kept < 300 and f", {kept} in {db}" in last
    assert wait_until_gone(proc.pid, 10) == []


class Lines(threading.Thread):
    """Collects a pipe's lines as they come, so a test can wait for one."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.lines = pipe, []

    def run(self):
        for line in self.pipe:
            self.lines.append(line)

    def wait_for(self, text: str, seconds: float) -> bool:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.1)
        return False


def searchable_paths(db) -> set[str]:
    """What a search from another process returns (the collection's own model, the index on disk)."""
    from retrieval.pipelines.search import search

    return {hit["path"] for hit in search(db, "anything", k=1000, device="cpu")}


def wait_for(condition, seconds: float) -> float:
    """Seconds until condition() held; fails after `seconds`."""
    t0 = time.time()
    while not condition():
        assert time.time() - t0 < seconds, f"not within {seconds} s"
        time.sleep(0.5)
    return time.time() - t0


@pytest.mark.slow
def test_watch_follows_adds_and_deletes_and_sigterm_exits_0(tmp_path):
    folder, db, incoming = tmp_path / "photos", tmp_path / "db", tmp_path / "incoming"
    first = make_images(folder, 10)
    new = make_images(incoming, 20, seed=3, start=500)
    proc = start("index", folder, "--db", db, *MODEL, "--watch", "--json", "-q")
    err, out = Lines(proc.stderr), Lines(proc.stdout)
    err.start(), out.start()
    assert err.wait_for("watching for changes", 300), "".join(err.lines)
    assert {str(p) for p in first} == searchable_paths(db)

    shutil.copytree(incoming, folder / "new-album")
    copied = {str(folder / "new-album" / p.relative_to(incoming)) for p in new}
    seconds = wait_for(lambda: copied <= searchable_paths(db), 120)
    print(f"20 copied images searchable after {seconds:.1f} s")

    gone = sorted(copied)[:5]
    for path in gone:
        os.unlink(path)
    seconds = wait_for(lambda: not set(gone) & searchable_paths(db), 120)
    print(f"5 deleted images gone from results after {seconds:.1f} s")

    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    err.join(5), out.join(5)
    assert proc.returncode == 0, "".join(err.lines)
    assert not any("Traceback" in line for line in err.lines)
    assert "stopped watching: 25 images" in err.lines[-1]
    passes = [json.loads(line) for line in out.lines]  # --json: one summary per pass that changed something
    assert passes[0]["new"] == 10 and passes[-1]["total"] == 25
    assert sum(p["new"] for p in passes) == 30 and sum(p["removed"] for p in passes) == 5
    assert ImageStore(db).count() == 25 == len(searchable_paths(db))
    assert wait_until_gone(proc.pid, 10) == []
