"""`retrieval index PATH --db DIR --watch`: index, then keep the collection in step with the folders.

File notifications (the `watchdog` package: inotify, FSEvents, ReadDirectoryChangesW) only say *that*
something changed; each burst of them triggers one incremental pass (scan, compare, embed what is new,
delete what is gone, rebuild the index), the same pass a plain `index` run makes. That keeps one code path
for adds, edits, moves and deletions, of files and whole folders alike, and a missed or coalesced event costs
nothing: the next pass sees the folder as it is. A full rescan every `rescan_s` is the fallback where
notifications do not reach (network filesystems, a watch limit hit), and the only mechanism if the observer
cannot start. SIGINT/SIGTERM stop it cleanly: what was embedded is committed and the index rebuilt; exit 0.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

from retrieval.config import EncoderConfig, IndexRunConfig, WatchConfig
from retrieval.data.scan import IMAGE_EXTENSIONS
from retrieval.pipelines.folder_state import IndexSummary, check_roots
from retrieval.pipelines.indexer import FolderIndexer, open_collection


class Changes:
    """What the observer thread tells the main loop: when the current burst of events began and last moved."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.first: float | None = None  # monotonic time of the burst's first event, None when quiet
        self.last = 0.0

    def note(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.first = self.first if self.first is not None else now
            self.last = now

    def due(self, cfg: WatchConfig, now: float) -> bool:
        """A burst is due once quiet for settle_s, or once it has lasted max_wait_s."""
        with self._lock:
            if self.first is None:
                return False
            return now - self.last >= cfg.settle_s or now - self.first >= cfg.max_wait_s

    def take(self) -> None:
        with self._lock:
            self.first = None


def relevant(path: str, is_directory: bool) -> bool:
    """Events that can change the collection: image files, and folders (a folder moved or deleted takes its
    images along). Hidden names are skipped, as the scan skips them."""
    name = os.path.basename(path.rstrip(os.sep))
    if name.startswith("."):
        return False
    return is_directory or os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def start_observer(roots: Sequence[str], changes: Changes):
    """A running watchdog observer feeding `changes`, or None (with the reason on stderr) when none can run."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        print("watch: the watchdog package is missing; rescanning periodically instead", file=sys.stderr)
        return None

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event) -> None:
            if event.event_type in ("opened", "closed_no_write"):
                return  # reads (our own decoders among them) change nothing
            if event.is_directory and event.event_type == "modified":
                return  # a folder's mtime moves with each file event, which arrives on its own
            paths = [event.src_path, getattr(event, "dest_path", "") or ""]
            if any(p and relevant(os.fsdecode(p), event.is_directory) for p in paths):
                changes.note()

    observer = Observer()
    try:
        for root in roots:
            if os.path.isdir(root):
                observer.schedule(Handler(), root, recursive=True)
            else:  # a single file given as a root: watch its folder, the scan keeps to the file
                observer.schedule(Handler(), os.path.dirname(root) or ".", recursive=False)
        observer.start()
    except OSError as e:  # e.g. the inotify watch limit (fs.inotify.max_user_watches)
        print(f"watch: file notifications unavailable ({e}); rescanning periodically", file=sys.stderr)
        return None
    return observer


def watch_folder(
    paths: Sequence[str | os.PathLike],
    db: str | os.PathLike,
    encoder_cfg: EncoderConfig,
    run: IndexRunConfig = IndexRunConfig(),
    cfg: WatchConfig = WatchConfig(),
    progress: bool = True,
    report: Callable[[IndexSummary], None] = lambda summary: None,
    ready: Callable[[], None] = lambda: None,
) -> IndexSummary:
    """Index `paths` into `db`, then follow their changes until SIGINT/SIGTERM. `report` gets the summary of
    the first pass and of every pass that changed something; `ready` is called once the observer is watching.
    Returns the summary of the last pass."""
    roots = check_roots(paths)
    collection, models = open_collection(db, encoder_cfg, run.reembed, index_settings=run.index_settings())
    changes = Changes()
    observer = None
    with collection:
        indexer = FolderIndexer(roots, collection, models, run, progress)
        last = IndexSummary(db=str(db), model=collection.model["arch"])
        try:
            # watching starts before the first pass, so nothing that lands during it is missed
            observer = start_observer(roots, changes)
            last = indexer.update()
            report(last)
            ready()
            last_pass = time.monotonic()
            while True:
                time.sleep(0.2)
                now = time.monotonic()
                if changes.due(cfg, now) or now - last_pass >= cfg.rescan_s:
                    changes.take()
                    skipped = set(last.skipped)
                    last = indexer.update()
                    last_pass = time.monotonic()
                    if last.changes or set(last.skipped) != skipped:
                        report(last)
        except KeyboardInterrupt:
            if not collection.index_is_fresh():  # stopped mid-pass: make the committed rows searchable
                collection.finish()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
        last.total = collection.store.count()
    return last
