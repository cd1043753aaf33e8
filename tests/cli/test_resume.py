"""kill -9 in the middle of `retrieval index`: no process of the run survives it, and a re-run ends with every
image in the collection exactly once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from indexes.store import ImageStore
from tests.cli.conftest import (
    committed_versions,
    invoke,
    make_images,
    session_processes,
    wait_until_gone,
)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume(runner, tmp_path):
    folder, db = tmp_path / "photos", tmp_path / "db"
    good = make_images(folder, 300)
    model = ["--model", "tiny-vit-64", "--pretrained", "none", "--device", "cpu"]
    args = ["index", folder, "--db", db, *model, "-q"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *map(str, args), "--batch-size", "8", "--commit-every", "16"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its session id is its pid: how its children are found after it dies
    )
    deadline = time.time() + 600  # generous: on a loaded 2-core box the first commits took over 2 minutes
    while committed_versions(db) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make the folder bigger"
    assert committed_versions(db) >= 4, "no commit within 10 minutes: the machine is too loaded for this test"
    assert len(session_processes(proc.pid)) >= 2, "no decode worker was running: the test proves nothing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_until_gone(proc.pid, 10) == [], "processes of the killed run still alive after 10 s"

    partial = ImageStore(db).count()
    assert 0 < partial < len(good)

    out = invoke(runner, *args, "--json")  # the re-run, in process
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert summary["unchanged"] == partial and summary["new"] == len(good) - partial
    stats = ImageStore(db).stats()
    assert len(stats) == ImageStore(db).count() == len(good)
    assert sorted(stats) == sorted(str(p) for p in good)
    # and the index answers over all of them
    hits = json.loads(invoke(runner, "search", "x", "--db", db, "-k", "1000", "--json").stdout)
    assert len(hits) == len(good) and len({h["path"] for h in hits}) == len(good)
