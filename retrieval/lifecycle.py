"""How a command's processes live and stop: children die with their parent, signals stop work cleanly.

- `die_with_parent` runs first thing in every child process (decode workers): on Linux the kernel kills the
  child when its parent dies (PR_SET_PDEATHSIG), kill -9 included; everywhere a thread also watches the
  parent's pid and exits within a second. Children must be started with "spawn" so that their parent is the
  command itself, not a forkserver that would outlive it.
- `stop_signals` turns SIGTERM into the KeyboardInterrupt that Ctrl-C raises, so one `except`/`finally` path
  commits what is done whichever signal came; a second signal while that cleanup runs exits at once (every
  commit is atomic, so nothing committed is lost).
- `Interrupted` carries the one line a stopped command prints about what it kept.
- `children_ignore_sigint` starts children deaf to the terminal's Ctrl-C, which is the parent's to handle.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Interrupted(Exception):
    """Stopped by a signal after committing what was done; str() says what was kept."""


def die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Make this (child) process end when `parent_pid`, its parent, ends, however the parent dies."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (odd libc): the thread below still does the job
            pass
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:  # a dead parent's children are re-parented to init or a reaper
            threading.Event().wait(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread; a second one exits."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    stopping = False

    def handler(signum: int, _frame) -> None:
        nonlocal stopping
        if stopping:
            print("stopped again: exiting without further cleanup", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        stopping = True
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM wait: a signal that comes is delivered to the handler that was in
    place when the block ends, so a short section (an optimizer step) is never left half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: pending.append(signum)) for sig in STOP_SIGNALS
    }
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if pending:
            old = previous[pending[0]]
            if callable(old):
                old(pending[0], None)  # stop_signals' handler or Python's default_int_handler: raises
            elif old != signal.SIG_IGN:
                os.kill(os.getpid(), pending[0])


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started within the block ignore SIGINT from their first instruction (an ignored signal stays
    ignored across exec), so Ctrl-C in a terminal, which reaches the whole process group, stops the command
    alone and no half-started child prints a traceback. The parent ignores SIGINT only while they start."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
