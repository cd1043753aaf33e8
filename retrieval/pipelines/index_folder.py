"""`retrieval index`: scan folders, embed only what is new or changed, commit in batches, rebuild the index.

Incremental (rclip-style): a file whose size and mtime match its row is not read at all; one whose stats moved
but whose content hash is the same only has its stats refreshed. Resumable: rows are committed every
`commit_every` images, and a re-run skips everything already committed, so after any interruption (kill -9
included) the next run finishes the job with every image in the collection exactly once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from indexes.collection import Collection
from indexes.store import path_id
from retrieval.config import EncoderConfig, IndexRunConfig
from retrieval.data.scan import FileEntry, ScanProblem, scan_images
from retrieval.models.encoders import Encoder, describe_weights, load_encoder
from retrieval.pipelines.embed import Decoded, decoded_batches


@dataclass
class IndexSummary:
    db: str
    model: str
    scanned: int = 0
    new: int = 0
    changed: int = 0
    touched: int = 0  # stats moved, content identical: not re-embedded
    unchanged: int = 0
    removed: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    total: int = 0  # rows in the collection at the end
    seconds: float = 0.0
    embedded_per_s: float = 0.0
    index: dict[str, Any] = field(default_factory=dict)


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


class _Writer:
    """Buffers rows and commits them to the store every `every` rows (one atomic Lance commit each)."""

    def __init__(self, collection: Collection, every: int):
        self.collection, self.every = collection, every
        self.rows: list[dict[str, Any]] = []
        self.vectors: list[np.ndarray] = []

    def add(self, rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
        self.rows.extend(rows)
        self.vectors.append(vectors)
        if len(self.rows) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.collection.store.upsert(self.rows, np.concatenate(self.vectors))
            self.rows, self.vectors = [], []


def _row(entry: FileEntry, d: Decoded) -> dict[str, Any]:
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


def _plan(roots: list[str], known: dict, summary: IndexSummary, problems: list[ScanProblem]):
    """Split the scan into files to read and rows to delete. Returns (todo entries, ids to remove)."""
    todo: list[FileEntry] = []
    seen: set[str] = set()
    for entry in scan_images(roots, problems=problems):
        summary.scanned += 1
        seen.add(entry.path)
        old = known.get(entry.path)
        if old is not None and old[1] == entry.size and old[2] == entry.mtime_ns:
            summary.unchanged += 1
        else:
            todo.append(entry)
    gone = [row[0] for path, row in known.items() if path not in seen and _under(path, roots)]
    return todo, gone


def index_folder(
    paths: Sequence[str | os.PathLike],
    db: str | os.PathLike,
    encoder_cfg: EncoderConfig,
    run: IndexRunConfig = IndexRunConfig(),
    progress: bool = True,
    encoder: Encoder | None = None,
) -> IndexSummary:
    start = time.perf_counter()
    roots = [os.path.abspath(p) for p in paths]
    for root in roots:
        if not os.path.exists(root):
            from retrieval.errors import UserError

            raise UserError(f"{root}: no such file or directory")
    encoder = encoder or load_encoder(encoder_cfg)
    with Collection.open_for_write(
        db, encoder.identity, reembed=run.reembed, index_settings=run.index_settings()
    ) as collection:
        summary = IndexSummary(db=str(db), model=describe_weights(encoder.identity))
        known = collection.store.stats()
        problems: list[ScanProblem] = []
        todo, gone = _plan(roots, known, summary, problems)
        summary.skipped.update({p.path: p.reason for p in problems})
        collection.store.delete(gone)
        summary.removed = len(gone)

        writer = _Writer(collection, run.commit_every)
        bar = tqdm(
            total=len(todo),
            unit="img",
            desc="embedding",
            file=sys.stderr,
            disable=not progress,
            smoothing=0.1,
        )
        embed_seconds, embedded = 0.0, 0
        try:
            batches = decoded_batches(todo, encoder.image_size, run.batch_size, run.workers, run.max_pixels)
            for batch in batches:
                broken = []
                for d in batch.failures:
                    summary.skipped[todo[d.index].path] = d.error
                    broken.append(todo[d.index].path)
                # a file that was indexed before and is now unreadable leaves the collection
                collection.store.delete(known[p][0] for p in broken if p in known)
                fresh, same = [], []
                for j, d in enumerate(batch.items):
                    old = known.get(todo[d.index].path)
                    (same if old is not None and old[3] == d.hash else fresh).append(j)
                if same:
                    _refresh_stats(
                        collection, writer, [todo[batch.items[j].index] for j in same], batch, same
                    )
                    summary.touched += len(same)
                if fresh:
                    t0 = time.perf_counter()
                    vectors = encoder.encode_images(batch.pixels[fresh]).numpy()
                    embed_seconds += time.perf_counter() - t0
                    embedded += len(fresh)
                    rows = [_row(todo[batch.items[j].index], batch.items[j]) for j in fresh]
                    for row in rows:
                        if row["path"] in known:
                            summary.changed += 1
                        else:
                            summary.new += 1
                    writer.add(rows, vectors)
                bar.update(len(batch.items) + len(batch.failures))
        finally:
            writer.flush()  # on Ctrl-C too: what was embedded is kept
            bar.close()
        if (
            summary.new
            or summary.changed
            or summary.touched
            or summary.removed
            or not collection.index_is_fresh()
        ):
            collection.store.optimize()
            summary.index = collection.finish()  # in place, or rebuilt beside and swapped in
        else:
            summary.index = collection.manifest.get("index", {})
        summary.total = collection.store.count()
    summary.seconds = time.perf_counter() - start
    summary.embedded_per_s = embedded / embed_seconds if embed_seconds else 0.0
    return summary


def _refresh_stats(
    collection: Collection, writer: _Writer, entries: list[FileEntry], batch, idx: list[int]
) -> None:
    """Same content under new stats: keep the stored vector, refresh size and mtime."""
    stored = collection.store.fetch((path_id(e.path) for e in entries), vectors=True)
    rows, vectors = [], []
    for entry, j in zip(entries, idx, strict=True):
        old = stored.get(path_id(entry.path))
        if old is None:
            continue
        rows.append(_row(entry, batch.items[j]))
        vectors.append(np.asarray(old["vector"], np.float32))
    if rows:
        writer.add(rows, np.stack(vectors))
