"""A collection directory (DESIGN.md): the LanceDB table (truth), a FAISS index derived from it, a manifest.

DIR/images.lance/   the table: id, path, size, mtime_ns, hash, width, height, meta, vector
DIR/faiss.index     derived: updated in place after each write run, rebuilt when outgrown, missing or corrupt
DIR/manifest.json   the model that made the vectors, the live table, and the index card (measured figures)
DIR/.lock           held by a writer so two index runs never interleave; the manifest is read under it
(indexes/layout.py: the generations a --reembed builds beside the live one, and the write journal)
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from indexes import faiss_index, layout
from indexes.build import build_index
from indexes.choose import IndexConfig, outgrown
from indexes.errors import CollectionError
from indexes.manifest import MODEL_KEYS, check_model, now, read_manifest, write_manifest
from indexes.store import TABLE, ImageStore

log = logging.getLogger(__name__)
REBUILD_SHARE = 0.1  # more changed rows than this share of the collection: rebuild rather than patch


class Collection:
    def __init__(self, directory: Path, manifest: dict[str, Any], table: str, dim: int | None = None):
        self.directory = directory
        self.manifest = manifest
        self.table = table
        self.store = ImageStore(directory, dim=dim, table=table)
        self._lock_fd: int | None = None
        self._index = None  # what searches run on (the GPU copy when there is a GPU)
        self._cpu_index = None
        self._swap_on_finish = False  # a --reembed: the manifest names the new generation only when complete
        self._swapped_out = TABLE  # the live generation a --reembed replaces

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def index_path(self) -> Path:
        return self.directory / layout.index_file(self.table)

    @property
    def index_config(self) -> IndexConfig:
        return IndexConfig.from_settings(self.manifest.get("index_settings"))

    # ---- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | os.PathLike) -> Collection:
        """Open an existing collection for reading."""
        directory = Path(directory)
        manifest = read_manifest(directory) if directory.is_dir() else None
        if manifest is None:
            raise CollectionError(
                f"{directory}: no collection here; build one with `retrieval index PATH --db {directory}`"
            )
        return cls(directory, manifest, manifest.get("table", TABLE))

    @classmethod
    def open_for_write(
        cls,
        directory: str | os.PathLike,
        model: dict[str, Any],
        reembed: bool = False,
        index_settings: dict[str, Any] | None = None,
    ) -> Collection:
        """Open (or create) for indexing with `model`, holding the writer's lock. A different model is refused
        before anything is written, unless `reembed`: then a new table is built beside the live one (which
        stays searchable) and swapped in by `finish()`. A re-embed killed before that resumes when re-run."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise CollectionError(f"{directory}: exists and is not a directory; choose another --db")
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(directory)
        try:
            collection = cls._open_locked(directory, model, reembed, index_settings or {})
        except BaseException:
            os.close(lock_fd)
            raise
        collection._lock_fd = lock_fd
        collection.store.before_write = layout.Journal(Path(str(collection.index_path) + ".pending")).append
        return collection

    @classmethod
    def _open_locked(cls, directory: Path, model: dict, reembed: bool, settings: dict) -> Collection:
        try:
            manifest = read_manifest(directory)
        except CollectionError:
            if not reembed:
                raise
            manifest = None  # a damaged manifest: --reembed is the way out, it needs nothing from it
        if manifest is not None and not reembed:
            check_model(directory, manifest["model"], model)
        settings = {**((manifest or {}).get("index_settings") or {}), **settings}
        IndexConfig.from_settings(settings)  # bad settings fail before anything is written
        dim = int(model["embed_dim"])
        fresh = {"model": model, "created_at": now(), "index": {}, "index_settings": settings}
        if manifest is None and not (directory / f"{TABLE}.lance").exists():
            write_manifest(directory, {**fresh, "table": TABLE})
            return cls(directory, {**fresh, "table": TABLE}, TABLE, dim)
        if manifest is None and not reembed:
            raise CollectionError(
                f"{directory}: a table but no manifest naming its model; rebuild it with "
                f"`retrieval index PATH --db {directory} --reembed`"
            )
        if not reembed:
            layout.drop_generations(directory, {manifest.get("table", TABLE)})  # a swapped-out generation
            (directory / layout.REEMBED).unlink(missing_ok=True)
            manifest = {**manifest, "index_settings": settings}
            return cls(directory, manifest, manifest.get("table", TABLE), dim)
        pending = layout.read_reembed(directory)
        same = pending is not None and all(pending["model"].get(k) == model.get(k) for k in MODEL_KEYS)
        table = pending["table"] if same else layout.new_table_name()
        keep = {table} | ({manifest.get("table", TABLE)} if manifest else {TABLE})
        layout.drop_generations(directory, keep)  # an abandoned re-embed with another model
        layout.write_reembed(directory, table, model)
        collection = cls(directory, {**fresh, "table": table}, table, dim)
        collection._swap_on_finish = True
        collection._swapped_out = manifest.get("table", TABLE) if manifest else TABLE
        return collection

    def record(self, key: str, value: Any) -> None:
        """Keep a writer's note in the manifest (e.g. which embedding files are imported). During a --reembed it
        waits in memory for the swap: the live manifest describes the live generation."""
        self.manifest = {**self.manifest, key: value}
        if not self._swap_on_finish:
            write_manifest(self.directory, self.manifest)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the derived index (writers) --------------------------------------------------------------------
    def index_is_fresh(self) -> bool:
        info = self.manifest.get("index") or {}
        return info.get("store_version") == self.store.version and self.index_path.exists()

    def finish(self) -> dict[str, Any]:
        """Bring the index up to date with the table (in place when it still suits the collection), and
        for a --reembed swap the new generation in. Returns the index card."""
        card = self.refresh_index()
        if self._swap_on_finish:
            # the generation just swapped out stays until the next writer opens the collection: a search that
            # read the old manifest a moment ago is still reading it
            layout.drop_generations(self.directory, {self.table, self._swapped_out})
            (self.directory / layout.REEMBED).unlink(missing_ok=True)
            self._swap_on_finish = False
        return card

    def refresh_index(self) -> dict[str, Any]:
        card = self.manifest.get("index") or {}
        index = faiss_index.load(self.index_path, self.store.dim) if card else None
        if index is None:
            return self.rebuild_index()
        n = self.store.count()
        patched = self._patch(index, card)
        if patched is None or outgrown(patched, n, self.store.dim, self.index_config):
            return self.rebuild_index()  # the patched index (if any) serves searches meanwhile
        return patched

    def _patch(self, index, card: dict[str, Any], save: bool = True) -> dict[str, Any] | None:
        """Apply the table's changes since the index was saved: removed ids out, new ids in, ids the journal
        names (changed vectors) replaced. No retraining. None when so much changed that a rebuild is cheaper.
        save=False (a reader meeting a stale index): the patch lives in this process only."""
        start = time.perf_counter()
        journal = layout.Journal(Path(str(self.index_path) + ".pending"))
        table_ids, held = self.store.ids(), faiss_index.ids_in(index)
        gone = np.setdiff1d(held, table_ids)
        changed = np.intersect1d(journal.read(), np.intersect1d(held, table_ids))
        new = np.union1d(np.setdiff1d(table_ids, held), changed)
        if len(new) + len(gone) > REBUILD_SHARE * max(len(table_ids), 1) + 1000:
            return None
        if len(gone) or len(new):
            faiss_index.remove(index, np.union1d(gone, changed))
            self._add_rows(index, new)
            card = {
                **card,
                "count": int(index.ntotal),
                "added_since_build": int(card.get("added_since_build", 0)) + len(new),
                "removed_since_build": int(card.get("removed_since_build", 0)) + len(gone) + len(changed),
                "updated_at": now(),
            }
            if save:
                card["size_bytes"] = faiss_index.save(index, self.index_path)
                card["update_seconds"] = round(time.perf_counter() - start, 3)  # the last in-place update
        if save:
            card = {**card, "store_version": self.store.version}
            self._publish(card)
            journal.clear()
        return card

    def _add_rows(self, index, ids: np.ndarray, chunk: int = 50_000) -> None:
        for start in range(0, len(ids), chunk):
            rows = self.store.fetch(ids[start : start + chunk].tolist(), vectors=True)
            if rows:
                vectors = np.stack([np.asarray(r["vector"], np.float32) for r in rows.values()])
                faiss_index.add(index, np.fromiter(rows, np.int64, len(rows)), vectors)

    def rebuild_index(self) -> dict[str, Any]:
        """Build from the table beside the live index, then swap it in atomically; record the card."""
        n, dim = self.store.count(), self.store.dim
        index, card = build_index(
            self.store.iter_vectors, n, dim, self.index_config, faiss_index.gpu_count() > 0
        )
        card["size_bytes"] = faiss_index.save(index, self.index_path)
        card.update(store_version=self.store.version, built_at=now(), file=self.index_path.name)
        self._publish(card)
        layout.Journal(Path(str(self.index_path) + ".pending")).clear()
        return card

    def _publish(self, card: dict[str, Any]) -> None:
        self.manifest = {**self.manifest, "index": card, "updated_at": now()}
        write_manifest(self.directory, self.manifest)
        self._index = self._cpu_index = None

    # ---- search (readers) ---------------------------------------------------------------------------------
    def cpu_index(self):
        """The index as saved (host memory), patched in memory with rows a writer committed since; rebuilt
        from the table when the file is missing or unreadable."""
        if self._cpu_index is None:
            index = faiss_index.load(self.index_path, self.store.dim)
            if index is None:
                index = self._rebuild_for_reader()
            elif not self.index_is_fresh():
                self._patch(index, self.manifest.get("index") or {}, save=False)
            self._cpu_index = index
        return self._cpu_index

    def _search_index(self):
        if self._index is None:
            self._index = faiss_index.to_search_device(self.cpu_index())
        return self._index

    def _rebuild_for_reader(self):
        """The index file is missing or unreadable: it is derived data, so rebuild it from the table. Saved when
        no writer holds the collection; otherwise built in memory for this process (the writer saves its own)."""
        log.warning("%s: index missing or unreadable; rebuilding it from the table", self.directory)
        try:
            fd = _lock(self.directory)
        except (CollectionError, OSError):  # a writer holds it, or the directory is read-only
            n = self.store.count()
            index, _ = build_index(self.store.iter_vectors, n, self.store.dim, self.index_config)
            return index
        try:
            self.manifest = read_manifest(self.directory) or self.manifest
            self.rebuild_index()
            return faiss_index.load(self.index_path, self.store.dim)
        finally:
            os.close(fd)

    def reopen(self) -> None:
        """Re-read the manifest and the live table (after a writer swapped generations)."""
        fresh = Collection.open(self.directory)
        self.manifest, self.table, self.store = fresh.manifest, fresh.table, fresh.store
        self._index = self._cpu_index = None

    def search(self, queries: np.ndarray, k: int, vectors: bool = False) -> list[list[dict[str, Any]]]:
        """queries (Q, dim) normalised -> per query, up to k rows (path, score, width, ...) best first. Rows
        deleted since the index was saved are skipped and made up for from further down the ranking."""
        if queries.ndim != 2 or queries.shape[1] != self.store.dim:
            raise ValueError(f"queries must be (Q, {self.store.dim}), got {queries.shape}")
        try:
            return self._search(queries, k, vectors)
        except Exception as e:  # noqa: BLE001 - retried once; a second failure propagates
            # a writer swapped in a new generation and removed the files this reader had open (Lance reports
            # that with several exception types)
            log.info("%s: re-reading the collection (%s)", self.directory, e)
            self.reopen()
            return self._search(queries, k, vectors)

    def _search(self, queries: np.ndarray, k: int, vectors: bool) -> list[list[dict[str, Any]]]:
        index = self._search_index()
        total = int(index.ntotal)
        if total == 0:
            return [[] for _ in range(len(queries))]
        fetch_k = min(total, k + max(8, k // 2))
        while True:
            scores, ids = faiss_index.search(index, queries, fetch_k)
            rows = self.store.fetch((int(i) for i in ids.reshape(-1) if i >= 0), vectors=vectors)
            results = [
                [{**rows[int(i)], "score": float(s)} for s, i in zip(qs, qi, strict=True) if int(i) in rows][
                    :k
                ]
                for qs, qi in zip(scores, ids, strict=True)
            ]
            # short only because rows were deleted since the index was saved: look further down the ranking
            deeper = any(len(r) < k and (qi >= 0).all() for r, qi in zip(results, ids, strict=True))
            if fetch_k >= total or not deeper:
                return results
            fetch_k = min(total, fetch_k * 4)


def _lock(directory: Path) -> int:
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CollectionError(
            f"{directory}: another `retrieval index` is writing this collection; wait for it"
        ) from None
    return fd
