"""Process lifecycle: children die with their parent, signals stop commands cleanly, commits come every few
seconds, bursts of file events become one pass."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import typer

from cli.errors import handle_errors
from retrieval.config import WatchConfig
from retrieval.lifecycle import EXIT_INTERRUPTED, Interrupted, deferred_stop, stop_signals
from retrieval.pipelines import indexer
from retrieval.pipelines.watch import Changes, relevant

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"  # a zombie has died, only not been reaped
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_dies_within_seconds_of_its_parents_kill_9(tmp_path):
    parent = textwrap.dedent(
        """
        import multiprocessing, os, sys, time
        from retrieval.lifecycle import die_with_parent

        def child(parent_pid):
            die_with_parent(parent_pid)
            time.sleep(120)

        if __name__ == "__main__":
            p = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),))
            p.start()
            time.sleep(1.0)  # let the child arm its death signal
            print(p.pid, flush=True)
            time.sleep(120)
        """
    )
    script = tmp_path / "parent.py"  # a file, so that the spawned child can import its __main__
    script.write_text(parent)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    child = int(proc.stdout.readline())
    assert alive(child)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 5
    while alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the child outlived its killed parent by 5 s"


def test_sigterm_stops_a_command_like_ctrl_c_with_one_line_and_exit_130(capsys):
    @handle_errors
    def command():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not stop the command")

    with pytest.raises(typer.Exit) as exit_info:
        command()
    assert exit_info.value.exit_code == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted:")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler does not outlive the command


def test_an_interrupted_command_says_what_it_kept(capsys):
    @handle_errors
    def command():
        raise Interrupted("12 images committed")

    with pytest.raises(typer.Exit) as exit_info:
        command()
    assert exit_info.value.exit_code == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted: 12 images committed\n"


class FakeStore:
    def __init__(self):
        self.commits: list[tuple[float, int]] = []  # (clock, rows)

    def upsert(self, rows, vectors):
        assert len(rows) == len(vectors)
        self.commits.append((clock[0], len(rows)))

    def optimize(self):
        pass


clock = [0.0]


@pytest.mark.parametrize("batch_seconds", [0.3, 0.7, 5.0])
def test_commits_bound_the_loss_to_commit_seconds_plus_one_batch(monkeypatch, batch_seconds):
    """At every moment, the work not yet committed is at most commit_seconds plus the batch being encoded: what
    a kill -9 can lose. A batch slower than commit_seconds is committed on its own."""
    monkeypatch.setattr(indexer.time, "monotonic", lambda: clock[0])
    clock[0] = 0.0
    store = FakeStore()
    writer = indexer._Writer(store, every=10_000, seconds=2.0)
    last_commit = 0.0
    for _ in range(40):
        clock[0] += batch_seconds  # one batch encoded
        writer.add([{"id": 0}] * 8, np.zeros((8, 4), np.float32))
        if store.commits and store.commits[-1][0] == clock[0]:
            last_commit = clock[0]
        # a kill now loses everything since the last commit, and the next batch adds batch_seconds more
        assert clock[0] - last_commit + batch_seconds <= 2.0 + batch_seconds + 1e-9
    writer.flush()
    assert sum(rows for _, rows in store.commits) == 40 * 8  # exactly once, nothing lost at the end
    if batch_seconds >= 2.0:
        assert len(store.commits) == 40


def test_rows_cap_commits_even_within_the_time_budget(monkeypatch):
    monkeypatch.setattr(indexer.time, "monotonic", lambda: 0.0)
    store = FakeStore()
    writer = indexer._Writer(store, every=16, seconds=60.0)
    for _ in range(5):
        writer.add([{"id": 0}] * 8, np.zeros((8, 4), np.float32))
    assert [rows for _, rows in store.commits] == [16, 16]


def test_a_burst_of_events_becomes_one_pass_once_quiet_or_too_long():
    cfg = WatchConfig(settle_s=1.0, max_wait_s=5.0)
    changes = Changes()
    now = time.monotonic()
    assert not changes.due(cfg, now)
    changes.note()
    assert not changes.due(cfg, time.monotonic() + 0.5)  # still settling
    assert changes.due(cfg, time.monotonic() + 1.1)  # quiet for settle_s
    changes.first = time.monotonic() - 6.0  # a burst that never settles
    changes.note()
    assert changes.due(cfg, time.monotonic())
    changes.take()
    assert not changes.due(cfg, time.monotonic() + 100)


def test_relevant_events_are_images_and_folders_not_hidden_files():
    assert relevant("/p/a/IMG_1.JPG", False)
    assert relevant("/p/a/new-album", True)
    assert not relevant("/p/a/notes.txt", False)
    assert not relevant("/p/a/.IMG_1.jpg.part", False)


def test_a_stop_signal_waits_for_the_end_of_a_deferred_section():
    finished = []
    with pytest.raises(KeyboardInterrupt), stop_signals():
        with deferred_stop():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the signal has arrived: the section still runs to its end
            finished.append(True)
        finished.append(False)  # but nothing after it
    assert finished == [True]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # both handlers restored
