"""One incremental pass of `retrieval index` over an open collection, and the model it loads on first need.

Incremental (rclip-style): a file whose size and mtime match its row is not read at all; one whose stats moved
but whose content hash is the same only has its stats refreshed. The scan and the comparison come first and the
model is loaded only when an image needs embedding. Resumable: rows are committed after the first batch that
ends `commit_seconds` after the last commit, and a re-run skips everything committed, so after any
interruption (kill -9 included) the next run finishes the job with every image in the collection exactly once,
and the work lost is the last few seconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexes.collection import Collection
from indexes.manifest import check_model, describe_model, read_manifest, write_manifest
from indexes.store import ImageStore, path_id
from retrieval.config import EncoderConfig, IndexRunConfig
from retrieval.data.scan import FileEntry, ScanProblem, scan_images
from retrieval.models.source import same_source
from retrieval.pipelines.decode import Batch, decoded_batches
from retrieval.pipelines.folder_state import IndexSummary, add_to_digest, new_digest
from retrieval.progress import progress_bar

if TYPE_CHECKING:  # torch and open_clip load only when an image needs embedding
    from retrieval.models.encoders import Encoder

COMPACT_EVERY = 200  # commits between compactions within a run: keeps each commit's cost flat on long runs


@dataclass
class Models:
    """The collection's encoder, loaded on first need (and then checked against the collection's model)."""

    cfg: EncoderConfig
    built_with: dict[str, Any]  # the manifest's model: what the loaded encoder must match
    db: str
    encoder: Encoder | None = None

    def get(self) -> Encoder:
        if self.encoder is None:
            from retrieval.models.encoders import load_encoder

            self.encoder = load_encoder(self.cfg)
            check_model(self.db, self.built_with, self.encoder.identity)
        return self.encoder

    @property
    def image_size(self) -> int:
        return int(self.built_with["image_size"])


def open_collection(
    db: str | os.PathLike,
    cfg: EncoderConfig,
    reembed: bool = False,
    encoder: Encoder | None = None,
    index_settings: dict | None = None,
) -> tuple[Collection, Models]:
    """Open `db` for writing. The model is loaded now only when the collection cannot vouch for it: a new
    collection, --reembed, or flags naming other weights than the manifest records (then the full identity
    check refuses a mismatch before anything is written)."""
    built_with = None
    if not reembed and Path(db).is_dir():
        manifest = read_manifest(db)
        built_with = manifest["model"] if manifest else None
    if encoder is None and (built_with is None or not same_source(built_with, cfg)):
        from retrieval.models.encoders import load_encoder

        encoder = load_encoder(cfg)
    identity = encoder.identity if encoder is not None else built_with
    collection = Collection.open_for_write(db, identity, reembed=reembed, index_settings=index_settings)
    return collection, Models(cfg, collection.model, str(db), encoder)


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


class _Writer:
    """Buffers rows; one atomic Lance commit once `every` rows are buffered or `seconds` passed since the last."""

    def __init__(self, store: ImageStore, every: int, seconds: float):
        self.store, self.every, self.seconds = store, every, seconds
        self.rows: list[dict[str, Any]] = []
        self.vectors: list[np.ndarray] = []
        self.last = time.monotonic()
        self.committed = self.commits = 0

    def add(self, rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
        self.rows.extend(rows)
        self.vectors.append(vectors)
        if len(self.rows) >= self.every or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.rows:
            return
        # take the buffer first: an interrupt between here and the commit loses rows, never commits them twice
        rows, vectors = self.rows, np.concatenate(self.vectors)
        self.rows, self.vectors = [], []
        self.store.upsert(rows, vectors)
        self.committed += len(rows)
        self.commits += 1
        if self.commits % COMPACT_EVERY == 0:
            self.store.optimize()


def _row(entry: FileEntry, d) -> dict[str, Any]:
    return {
        "id": path_id(entry.path),
        "path": entry.path,
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
        "hash": d.hash,
        "width": d.width,
        "height": d.height,
        "meta": json.dumps({}),
    }


def _plan(roots: list[str], known: dict, summary: IndexSummary, problems: list[ScanProblem], h):
    """Split the scan into files to read and rows to delete. Returns (todo entries, ids to remove)."""
    todo: list[FileEntry] = []
    seen: set[str] = set()
    for entry in scan_images(roots, problems=problems):
        summary.scanned += 1
        seen.add(entry.path)
        add_to_digest(entry, h)
        old = known.get(entry.path)
        if old is not None and old[1] == entry.size and old[2] == entry.mtime_ns:
            summary.unchanged += 1
        else:
            todo.append(entry)
    gone = [row[0] for path, row in known.items() if path not in seen and _under(path, roots)]
    return todo, gone


class FolderIndexer:
    """Keeps one open collection in step with a set of folders; `update()` is one incremental pass."""

    def __init__(
        self, roots: list[str], collection: Collection, models: Models, run: IndexRunConfig, progress
    ):
        self.roots, self.collection, self.models, self.run = roots, collection, models, run
        self.progress = progress
        self.committed = 0  # embedded rows committed by this indexer's passes

    @property
    def store(self) -> ImageStore:
        return self.collection.store

    def update(self) -> IndexSummary:
        start = time.perf_counter()
        model = self.collection.model
        summary = IndexSummary(db=str(self.collection.directory), model=describe_model(model))
        known = self.store.stats()
        problems: list[ScanProblem] = []
        h = new_digest()
        todo, gone = _plan(self.roots, known, summary, problems, h)
        summary.skipped.update({p.path: p.reason for p in problems})
        if todo or gone:
            self._set_scan_record(None)  # the table is about to change: the last record no longer vouches
        self.store.delete(gone)
        summary.removed = len(gone)
        embedded, embed_seconds = self._embed(todo, known, summary)
        if summary.changes or not self.collection.index_is_fresh():
            self.store.optimize()
            summary.index = self.collection.finish()  # in place, or rebuilt beside and swapped in
        else:
            summary.index = self.collection.manifest.get("index", {})
        summary.total = self.store.count()
        if self.models.encoder is not None:
            from retrieval.models.text_numpy import export_quietly

            export_quietly(self.models.encoder)  # text searches of this collection then need no torch
        self._set_scan_record(
            {
                "roots": self.roots,
                "digest": h.hexdigest(),
                "store_version": self.store.version,
                "skipped": {p: r for p, r in summary.skipped.items() if p not in {q.path for q in problems}},
            }
        )
        summary.seconds = time.perf_counter() - start
        summary.embedded_per_s = embedded / embed_seconds if embed_seconds else 0.0
        summary.model_loaded = self.models.encoder is not None
        return summary

    def _set_scan_record(self, record: dict[str, Any] | None) -> None:
        """The manifest's `scan`: the folder state (a digest of every file's path, size and mtime) that the
        table and index at `store_version` fully reflect. What lets an unchanged folder's run skip even
        opening the table (quick_pass)."""
        manifest = {k: v for k, v in self.collection.manifest.items() if k != "scan"}
        if record is None and "scan" not in self.collection.manifest:
            return
        self.collection.manifest = {**manifest, **({"scan": record} if record else {})}
        write_manifest(self.collection.directory, self.collection.manifest)

    def _embed(self, todo: list[FileEntry], known: dict, summary: IndexSummary) -> tuple[int, float]:
        """Read, hash and (when the content is new) encode `todo`, committing as it goes."""
        if not todo:
            return 0, 0.0
        writer = _Writer(self.store, self.run.commit_every, self.run.commit_seconds)
        meter = progress_bar(desc="embedding", unit="img", enabled=self.progress, total=len(todo))
        run = self.run
        batches = decoded_batches(todo, self.models.image_size, run.batch_size, run.workers, run.max_pixels)
        embedded, embed_seconds = 0, 0.0
        try:
            for batch in batches:
                self._drop_broken(batch, todo, known, summary)
                fresh, same = [], []
                for j, d in enumerate(batch.items):
                    old = known.get(todo[d.index].path)
                    (same if old is not None and old[3] == d.hash else fresh).append(j)
                if same:
                    writer.add(*self._same_content(todo, batch, same))
                    summary.touched += len(same)
                if fresh:
                    t0 = time.perf_counter()
                    vectors = self._encode(batch.pixels[fresh])  # (F, D)
                    embed_seconds += time.perf_counter() - t0
                    embedded += len(fresh)
                    rows = [_row(todo[batch.items[j].index], batch.items[j]) for j in fresh]
                    summary.changed += sum(row["path"] in known for row in rows)
                    summary.new += sum(row["path"] not in known for row in rows)
                    writer.add(rows, vectors)
                meter.update(len(batch.items) + len(batch.failures))
        finally:
            batches.close()  # stops the decode workers now, not whenever the generator is collected
            writer.flush()  # on Ctrl-C too: what was embedded is kept
            meter.close()
            self.committed += writer.committed
        return embedded, embed_seconds

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        from retrieval.pipelines.embed import encode_pixels

        return encode_pixels(self.models.get(), pixels)

    def _drop_broken(self, batch: Batch, todo, known: dict, summary: IndexSummary) -> None:
        broken = []
        for d in batch.failures:
            summary.skipped[todo[d.index].path] = d.error
            broken.append(todo[d.index].path)
        # a file that was indexed before and is now unreadable leaves the collection
        self.store.delete(known[p][0] for p in broken if p in known)

    def _same_content(self, todo, batch: Batch, idx: list[int]) -> tuple[list[dict[str, Any]], np.ndarray]:
        """Same content under new stats: keep the stored vector, refresh size and mtime."""
        entries = [todo[batch.items[j].index] for j in idx]
        stored = self.store.fetch((path_id(e.path) for e in entries), vectors=True)
        rows, vectors = [], []
        for entry, j in zip(entries, idx, strict=True):
            old = stored.get(path_id(entry.path))
            if old is not None:
                rows.append(_row(entry, batch.items[j]))
                vectors.append(np.asarray(old["vector"], np.float32))
        return rows, np.stack(vectors) if vectors else np.zeros((0, self.store.dim), np.float32)
