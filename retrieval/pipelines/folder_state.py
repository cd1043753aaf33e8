"""What an index run knows before it opens the table: the roots, the summary it reports, and the quick pass.

Light on purpose (no LanceDB, no torch): a run over an unchanged folder scans it, finds the digest of every
file's path, size and mtime equal to the one the manifest recorded after the last complete pass, and ends
there, in the time of the scan.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexes.manifest import describe_model, read_manifest
from retrieval.config import EncoderConfig
from retrieval.data.scan import FileEntry, ScanProblem, scan_images
from retrieval.errors import UserError
from retrieval.models.source import same_source


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
    model_loaded: bool = False  # False when nothing needed embedding: the run never loaded the model
    index: dict[str, Any] = field(default_factory=dict)

    @property
    def changes(self) -> int:
        return self.new + self.changed + self.touched + self.removed


def check_roots(paths: Sequence[str | os.PathLike]) -> list[str]:
    roots = [os.path.abspath(p) for p in paths]
    for root in roots:
        if not os.path.exists(root):
            raise UserError(f"{root}: no such file or directory")
    return roots


def new_digest():
    return hashlib.blake2b(digest_size=16)


def add_to_digest(entry: FileEntry, h) -> None:
    h.update(f"{entry.path}\0{entry.size}\0{entry.mtime_ns}\n".encode("utf-8", "surrogatepass"))


def quick_pass(db: str | os.PathLike, roots: list[str], cfg: EncoderConfig) -> IndexSummary | None:
    """The summary of a run with nothing to do, found without opening the table (no LanceDB, no model): the
    folder's scan digest equals the manifest's record, whose table version the index was built from. None
    when a full pass is needed (anything changed, another model asked for, an interrupted run since)."""
    manifest = read_manifest(db) if Path(db).is_dir() else None
    record = (manifest or {}).get("scan")
    index = (manifest or {}).get("index") or {}
    if (
        not record
        or record.get("roots") != roots
        or record.get("store_version") != index.get("store_version")
    ):
        return None
    if not same_source(manifest["model"], cfg):
        return None
    problems: list[ScanProblem] = []
    h = new_digest()
    scanned = 0
    for entry in scan_images(roots, problems=problems):
        scanned += 1
        add_to_digest(entry, h)
    if h.hexdigest() != record["digest"]:
        return None
    model = manifest["model"]
    skipped = {**record.get("skipped", {}), **{p.path: p.reason for p in problems}}
    return IndexSummary(
        db=str(db),
        model=describe_model(model),
        scanned=scanned,
        unchanged=scanned - len(record.get("skipped", {})),
        skipped=skipped,
        total=int(index.get("count", 0)),
        index=index,
    )
