"""The bootstrap's files: finished shards as JSONL parts (written to a temporary name, fsynced, renamed: a part
that exists is complete), and the output dataset in the input's format (JSONL, CSV, TSV, parquet, or WebDataset
tar shards), every write atomic, every byte a function of the rows, so a resumed run writes the same files.

A row is a dict: the input row's columns (the image path rewritten relative to the output, so `retrieval train`
reads it as it is), then the provenance columns PROVENANCE.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from retrieval.errors import UserError

PROVENANCE = ("source", "score", "kept", "input_image", "captioner", "filter")
TABLES = {"jsonl": ".jsonl", "csv": ".csv", "tsv": ".tsv", "parquet": ".parquet"}


def atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync and rename into place: after a crash the file is either whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_part(path: Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def read_part(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def output_names(fmt: str) -> tuple[str, str]:
    """(kept, dropped) names under the output directory: files for tables, folders of shards for tars."""
    if fmt == "tar":
        return "pairs", "dropped"
    suffix = TABLES.get(fmt, ".jsonl")  # a folder of sidecar .txt files becomes JSONL
    return f"pairs{suffix}", f"dropped{suffix}"


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def table_bytes(rows: Sequence[dict[str, Any]], fmt: str) -> bytes:
    """The rows in a table format; every row gets every column (None where it has none)."""
    columns = _columns(rows)
    full = [{c: r.get(c) for c in columns} for r in rows]
    if fmt in ("jsonl", "folder"):
        return "".join(json.dumps(r) + "\n" for r in full).encode()
    if fmt in ("csv", "tsv"):
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_cell(r[c]) for c in columns] for r in full)
        return buf.getvalue().encode()
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        table = (
            pa.Table.from_pylist(full) if full else pa.table({c: [] for c in columns or ["image", "caption"]})
        )
        pq.write_table(table, buf)
        return buf.getvalue()
    raise UserError(f"cannot write pairs in format {fmt!r}")


def _image_ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def tar_bytes(samples: Sequence[tuple[str, bytes, str, dict[str, Any]]]) -> bytes:
    """A WebDataset shard: per sample (key, image bytes, caption, metadata) -> key.<ext>, key.txt, key.json.
    Member times and owners are fixed, so the same samples give the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, caption, meta in samples:
            for name, data in (
                (f"{key}.{_image_ext(image)}", image),
                (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_output(
    out: Path, fmt: str, parts: Sequence[list[dict[str, Any]]], images: dict[str, bytes]
) -> None:
    """The kept rows to pairs.*, the dropped web rows to dropped.*; for tars one shard per part in each folder.
    images: raw bytes by pair key, for inputs whose images are bytes (tars, binary parquet cells)."""
    kept_name, dropped_name = output_names(fmt)
    if fmt != "tar":
        for name, want in ((kept_name, True), (dropped_name, False)):
            rows = [_materialise(r, images) for p in parts for r in p if _wanted(r, want)]
            atomic_write(out / name, table_bytes(rows, fmt))
        return
    for name, want in ((kept_name, True), (dropped_name, False)):
        for k, part in enumerate(parts):
            samples = []
            for j, record in enumerate(r for r in part if _wanted(r, want)):
                row = dict(record["row"])
                image, caption = images[record["key"]], row.pop("caption")
                row.pop("image", None)
                samples.append((f"{k:05d}{j:06d}", image, caption, row))
            atomic_write(out / name / f"{name}-{k:05d}.tar", tar_bytes(samples))


def _wanted(record: dict[str, Any], kept: bool) -> bool:
    """Kept rows of either source go to pairs; only web rows are listed among the dropped."""
    row = record["row"]
    return row["kept"] if kept else (not row["kept"] and row["source"] == "web")


def _materialise(record: dict[str, Any], images: dict[str, bytes]) -> dict[str, Any]:
    row = record["row"]
    if row.get("image") is None and record["key"] in images:  # a binary image cell
        return {**row, "image": images[record["key"]]}
    return row
