"""One streaming reader for image-text pairs: tables (JSONL, CSV, TSV, parquet), sidecar folders, WebDataset tars.

Bad rows (missing image file, empty caption, malformed line) are skipped and counted in PairStats, never fatal: a
web-scale dataset always has some. Structural problems (unknown format, a missing column) are UserErrors, because
no row of such a source could be read. Images are not decoded here; the image decoder rejects broken ones later.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import UserError

TABLE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the WebDataset convention
FOLDER_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_COLUMNS = ("caption", "text")  # the first one present wins
ACCEPTED = "a .jsonl/.csv/.tsv/.parquet file, a .tar shard, a brace pattern of shards, or a folder"
_MAX_EXAMPLES = 5  # enough to find the culprit, few enough for a one-screen summary
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass
class Pair:
    key: str  # a stable id: the image path, or "shard.tar/key" for tar members (repeats if an image has 2 captions)
    image: str | bytes  # a path, or the raw bytes of a tar member / binary parquet cell
    caption: str
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # the row's other columns (noisy, clean_caption, objects...)


@dataclass
class PairStats:
    read: int = 0  # pairs yielded
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few keys or "file:line"

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _MAX_EXAMPLES:
            shown.append(example)

    def summary(self) -> str:
        """One line for a log: 'read 998 pairs; skipped 2: missing image file 2 (e.g. a.jpg, b.jpg)'."""
        if not self.skipped:
            return f"read {self.read} pairs"
        parts = [
            f"{r} {n} (e.g. {', '.join(self.examples.get(r, []))})" for r, n in sorted(self.skipped.items())
        ]
        return f"read {self.read} pairs; skipped {sum(self.skipped.values())}: " + "; ".join(parts)


def expand_braces(pattern: str) -> list[str]:
    """'shards-{000..009}.tar' -> 10 names (zero padding kept); '{a,b}' lists too; several braces multiply."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [head + o + rest for o in options for rest in expand_braces(tail)]


def _is_pattern(source: str) -> bool:
    return bool(_BRACE.search(source)) and not os.path.exists(source)


def detect_format(source: str | os.PathLike) -> str:
    """'jsonl' | 'csv' | 'tsv' | 'parquet' | 'folder' | 'tar', from the suffix (or, for a folder, its contents)."""
    text = os.fspath(source)
    if _is_pattern(text):
        if all(name.endswith(".tar") for name in expand_braces(text)):
            return "tar"
        raise UserError(f"{text}: a brace pattern must name .tar shards; accepted: {ACCEPTED}")
    path = Path(text)
    if not path.exists():
        raise UserError(f"{text}: no such file or folder; pass {ACCEPTED}")
    if path.is_dir():
        return "tar" if any(p.suffix == ".tar" and p.is_file() for p in path.iterdir()) else "folder"
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return "tar"
    if suffix in TABLE_SUFFIXES:
        return TABLE_SUFFIXES[suffix]
    raise UserError(f"{text}: unknown pairs format {suffix or '(no suffix)'!r}; accepted: {ACCEPTED}")


def iter_pairs(
    source: str | os.PathLike, stats: PairStats | None = None, check_files: bool = True
) -> Iterator[Pair]:
    """Stream the pairs of any supported source; skipped rows are counted in stats (pass one to see them).

    The format and the shards are checked at the call (UserError before any work); a table's columns are checked
    when the first pair is drawn. check_files: skip rows whose image path is not a file.
    """
    stats = stats if stats is not None else PairStats()
    fmt = detect_format(source)
    text = os.fspath(source)
    if fmt == "tar":
        pairs = _tar_pairs(_shards(text), stats)
    elif fmt == "folder":
        pairs = _folder_pairs(Path(text), stats)
    else:
        rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "tsv": _csv_rows, "parquet": _parquet_rows}[fmt]
        pairs = _table_pairs(Path(text), rows(Path(text), fmt, stats), stats, check_files)
    return _counted(pairs, stats)


def load_pairs(source: str | os.PathLike, stats: PairStats | None = None) -> list[Pair]:
    """Every pair of a source in memory; a source without one usable pair is a UserError."""
    pairs = list(iter_pairs(source, stats))
    if not pairs:
        raise UserError(f"{source}: no usable image-text pairs")
    return pairs


def _counted(pairs: Iterator[Pair], stats: PairStats) -> Iterator[Pair]:
    for pair in pairs:
        stats.read += 1
        yield pair


# --- tables ---------------------------------------------------------------------------------------------------


def _columns(path: Path, found: Iterable[str]) -> tuple[str, str]:
    found = list(found)
    caption = next((c for c in CAPTION_COLUMNS if c in found), None)
    if "image" not in found or caption is None:
        raise UserError(
            f"{path}: columns {found} lack 'image' and/or 'caption' (or 'text'); rename them to 'image' and 'caption'"
        )
    return "image", caption


def _jsonl_rows(path: Path, fmt: str, stats: PairStats) -> Iterator[tuple[str, dict[str, Any]]]:
    checked = False
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                stats.skip("bad row", where)
                continue
            if not isinstance(row, dict):
                stats.skip("bad row", where)
                continue
            if not checked:  # JSONL has no header: the first row stands for the file's columns
                _columns(path, row)
                checked = True
            yield where, row


def _csv_rows(path: Path, fmt: str, stats: PairStats) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
        _columns(path, reader.fieldnames or [])
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:  # a NUL byte or an oversized field: lose the row, not the file
                stats.skip("bad row", f"{path.name}:{reader.line_num}")
                continue
            where = f"{path.name}:{reader.line_num}"
            if None in row or None in row.values():  # too many or too few fields for the header
                stats.skip("bad row", where)
                continue
            yield where, row


def _parquet_rows(path: Path, fmt: str, stats: PairStats) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq  # only parquet sources pay for the import

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"{path}: not a readable parquet file ({e}); check the file") from e
    _columns(path, pf.schema_arrow.names)
    rowno = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            rowno += 1
            yield f"{path.name}#{rowno}", row


def _table_pairs(
    path: Path, rows: Iterator[tuple[str, dict[str, Any]]], stats: PairStats, check_files: bool
) -> Iterator[Pair]:
    base = path.parent
    image_col = caption_col = None
    for where, row in rows:
        if caption_col is None:
            image_col, caption_col = _columns(path, row.keys())
        if image_col not in row or caption_col not in row:
            stats.skip("bad row", where)
            continue
        image, caption = row[image_col], row[caption_col]
        extra = {k: v for k, v in row.items() if k not in (image_col, caption_col)}
        if isinstance(image, dict):  # Hugging Face image structs: {"bytes": ..., "path": ...}
            image = image.get("bytes") or image.get("path")
        if not isinstance(caption, str) or not caption.strip():
            stats.skip("empty caption" if caption is None or isinstance(caption, str) else "bad row", where)
            continue
        if isinstance(image, bytes):
            yield Pair(where, image, caption.strip(), extra)
            continue
        if not isinstance(image, str) or not image.strip():
            stats.skip("missing image path", where)
            continue
        resolved = os.path.normpath(image if os.path.isabs(image) else base / image)
        if check_files and not os.path.isfile(resolved):
            stats.skip("missing image file", resolved)
            continue
        yield Pair(resolved, resolved, caption.strip(), extra)


# --- folders with sidecar .txt -------------------------------------------------------------------------------


def _folder_pairs(root: Path, stats: PairStats) -> Iterator[Pair]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # a stable order: the same folder always streams the same sequence
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in FOLDER_IMAGE_EXTS:
                continue
            image = os.path.join(dirpath, name)
            sidecar = os.path.join(dirpath, stem + ".txt")
            if not os.path.isfile(sidecar):
                stats.skip("no caption for image", image)
                continue
            with open(sidecar, encoding="utf-8", errors="replace") as f:
                caption = f.read().strip()
            if not caption:
                stats.skip("empty caption", image)
                continue
            yield Pair(image, image, caption, {})


# --- WebDataset tar shards -----------------------------------------------------------------------------------


def _shards(source: str) -> list[str]:
    if _is_pattern(source):
        names = expand_braces(source)
        missing = [n for n in names if not os.path.isfile(n)]
        if missing:
            raise UserError(
                f"{source}: {len(missing)} of {len(names)} shards missing (e.g. {missing[0]}); fix the pattern"
            )
        return names
    if os.path.isdir(source):
        return sorted(str(p) for p in Path(source).iterdir() if p.suffix == ".tar" and p.is_file())
    return [source]


def _split_name(name: str) -> tuple[str, str]:
    # WebDataset: the key is the path up to the first dot of the basename, the rest is the extension
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_members(shard: str, stats: PairStats) -> Iterator[tuple[str, str, bytes]]:
    label = os.path.basename(shard)
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                data = tar.extractfile(member)
                key, ext = _split_name(member.name)
                yield key, ext, data.read() if data else b""
    except (tarfile.TarError, OSError, EOFError) as e:  # a truncated shard loses its tail, not the run
        stats.skip("corrupt shard", f"{label} ({e})")


def _tar_pairs(shards: list[str], stats: PairStats) -> Iterator[Pair]:
    for shard in shards:
        label = os.path.basename(shard)
        # members of one sample are consecutive in a shard, as WebDataset writers guarantee
        for key, group in itertools.groupby(_tar_members(shard, stats), key=lambda m: m[0]):
            parts = {ext: data for _, ext, data in group}
            where = f"{label}/{key}"
            image = next((parts[e] for e in TAR_IMAGE_EXTS if e in parts), None)
            if image is None:
                stats.skip("no image for caption" if "txt" in parts else "no image or caption member", where)
                continue
            if "txt" not in parts:
                stats.skip("no caption for image", where)
                continue
            caption = parts["txt"].decode("utf-8", errors="replace").strip()
            if not caption:
                stats.skip("empty caption", where)
                continue
            yield Pair(where, image, caption, _json_member(parts.get("json")))


def _json_member(data: bytes | None) -> dict[str, Any]:
    # optional metadata beside the sample; unreadable metadata costs the metadata, not the pair
    if not data:
        return {}
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {"json": meta}
