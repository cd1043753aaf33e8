"""Embeddings in and out: `retrieval index --embeddings PATH` and `retrieval export --db DIR`.

In: the layout clip-retrieval's inference writes and LAION's released embeddings use (`img_emb/img_emb_N.npy`
beside `metadata/metadata_N.parquet`, whose `image_path` or `url` names each row), or parquet files with an
`embedding` column. Vectors are L2-normalised; non-finite or zero ones are skipped and counted. Each source file is
committed in chunks keyed by id (a re-run re-writes, never duplicates) and recorded in the manifest once complete,
so a killed import resumes at the first file not recorded. The model is named for later text queries.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexes.collection import Collection
from indexes.store import path_id
from retrieval.config import EncoderConfig, IndexRunConfig
from retrieval.errors import UserError

KEY_COLUMNS = ("image_path", "url", "path")  # what names a row, in order of preference (path: our export)
OWN_COLUMNS = ("id", "width", "height", "meta")  # columns of an export that are not extra metadata
EXPORT_COLUMNS = ["id", "path", "width", "height", "meta", "vector"]
CHUNK = 50_000  # rows per commit: bounded memory whatever the file size


@dataclass(frozen=True)
class Source:
    name: str  # what the manifest records once the file is imported
    vectors: Path  # .npy, or the parquet file itself
    metadata: Path | None  # the parquet beside an .npy


@dataclass
class ImportSummary:
    db: str
    model: str
    sources: int = 0
    already: int = 0  # sources recorded as imported by an earlier run
    imported: int = 0  # rows written by this run
    bad_vectors: int = 0  # non-finite or zero vectors, skipped
    total: int = 0
    seconds: float = 0.0
    index: dict[str, Any] = field(default_factory=dict)


def find_sources(path: str | os.PathLike) -> list[Source]:
    path = Path(path)
    if (path / "img_emb").is_dir():
        found = []
        for npy in sorted((path / "img_emb").glob("img_emb_*.npy"), key=_shard_number):
            meta = path / "metadata" / f"metadata_{_shard_number(npy)}.parquet"
            if not meta.exists():
                raise UserError(
                    f"{npy}: no {meta} beside it; every img_emb_N.npy needs its metadata_N.parquet"
                )
            found.append(Source(npy.name, npy, meta))
        if not found:
            raise UserError(f"{path / 'img_emb'}: no img_emb_N.npy files")
        return found
    if path.is_file() and path.suffix == ".parquet":
        return [Source(path.name, path, None)]
    if path.is_dir() and (files := sorted(path.glob("*.parquet"))):
        return [Source(f.name, f, None) for f in files]
    raise UserError(
        f"{path}: not an embeddings folder (img_emb/ + metadata/) nor parquet with an `embedding` column"
    )


def _shard_number(path: Path) -> int:
    match = re.search(r"_(\d+)\.(npy|parquet)$", path.name)
    return int(match.group(1)) if match else -1


def _key_column(names: list[str], where: Path) -> str:
    for key in KEY_COLUMNS:
        if key in names:
            return key
    raise UserError(
        f"{where}: no {' or '.join(KEY_COLUMNS)} column to name the rows (columns: {', '.join(names)})"
    )


def read_source(source: Source) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """(metadata batch, vectors (n, dim) float32) chunks, in file order."""
    if source.metadata is None:
        table = pq.ParquetFile(source.vectors)
        if "embedding" not in table.schema_arrow.names:
            raise UserError(f"{source.vectors}: no `embedding` column")
        for batch in table.iter_batches(CHUNK):
            column = batch.column("embedding")
            flat = column.flatten().to_numpy(zero_copy_only=False)
            yield batch.drop_columns(["embedding"]), flat.reshape(len(batch), -1).astype(np.float32)
        return
    try:
        vectors = np.load(source.vectors, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise UserError(f"{source.vectors}: not a readable .npy ({e})") from e
    meta = pq.ParquetFile(source.metadata)
    if vectors.ndim != 2 or meta.metadata.num_rows != len(vectors):
        raise UserError(
            f"{source.vectors}: shape {vectors.shape} does not match {meta.metadata.num_rows} rows of {source.metadata}"
        )
    start = 0
    for batch in meta.iter_batches(CHUNK):
        yield batch, np.asarray(vectors[start : start + len(batch)], dtype=np.float32)
        start += len(batch)


def to_rows(batch: pa.RecordBatch, vectors: np.ndarray, where: Path) -> tuple[list[dict], np.ndarray, int]:
    """Rows for the store (one per distinct key, the last wins) and their normalised vectors; bad ones counted."""
    columns = batch.to_pydict()
    key = _key_column(list(columns), where)
    norms = np.linalg.norm(vectors, axis=1)
    good = np.isfinite(norms) & (norms > 0)
    rows: dict[int, tuple[dict, int]] = {}
    extra = [c for c in columns if c != key and c not in OWN_COLUMNS]
    blank = [None] * len(vectors)
    widths, heights, metas = (columns.get(c, blank) for c in ("width", "height", "meta"))
    for i in np.flatnonzero(good).tolist():
        name = str(columns[key][i])
        meta = _exported_meta(metas[i])
        meta.update({c: columns[c][i] for c in extra})
        row = {
            "id": path_id(name),
            "path": name,
            "width": widths[i],
            "height": heights[i],
            "meta": json.dumps(meta, default=str),
        }
        rows[row["id"]] = (row, i)
    picked = [i for _, i in rows.values()]
    return [r for r, _ in rows.values()], vectors[picked] / norms[picked, None], int((~good).sum())


def _exported_meta(text: str | None) -> dict[str, Any]:
    """The `meta` column of an export (a JSON object), so that export -> import keeps it."""
    try:
        value = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return {"meta": text}
    return value if isinstance(value, dict) else {"meta": value}


def import_embeddings(
    path: str | os.PathLike,
    db: str | os.PathLike,
    encoder_cfg: EncoderConfig,
    run: IndexRunConfig = IndexRunConfig(),
    progress: bool = True,
) -> ImportSummary:
    from retrieval.models.encoders import load_encoder

    start = time.perf_counter()
    sources = find_sources(path)
    identity = load_encoder(encoder_cfg).identity  # for text queries later; the vectors must be its size
    with Collection.open_for_write(
        db, identity, reembed=run.reembed, index_settings=run.index_settings()
    ) as collection:
        summary = ImportSummary(
            db=str(db), model=f"{identity['arch']} ({identity['weights']})", sources=len(sources)
        )
        done = dict(collection.manifest.get("imported") or {})
        for source in sources:
            if source.name in done:
                summary.already += 1
                continue
            for batch, vectors in read_source(source):
                if vectors.shape[1] != collection.store.dim:
                    raise UserError(
                        f"{source.vectors}: vectors of dimension {vectors.shape[1]}, but {identity['arch']} "
                        f"embeds to {collection.store.dim}; name the model that made them (--model/--checkpoint)"
                    )
                rows, unit, bad = to_rows(batch, vectors, source.metadata or source.vectors)
                collection.store.upsert(rows, unit)
                summary.imported += len(rows)
                summary.bad_vectors += bad
            done[source.name] = True
            collection.record("imported", done)
            if progress:
                print(f"imported {source.name}: {summary.imported} rows so far", file=sys.stderr, flush=True)
        summary.index = collection.finish()
        summary.total = collection.store.count()
    summary.seconds = time.perf_counter() - start
    return summary


def export_collection(db: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write every row (id, path, width, height, meta, embedding) to one parquet file, streaming. Returns rows."""
    collection = Collection.open(db)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    rows = 0
    schema = collection.store.arrow_schema(EXPORT_COLUMNS)
    schema = pa.schema([f.with_name("embedding") if f.name == "vector" else f for f in schema])
    with pq.ParquetWriter(tmp, schema) as writer:
        for batch in collection.store.iter_batches(EXPORT_COLUMNS):
            writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))
            rows += len(batch)
    os.replace(tmp, out)
    return rows
