"""Where a collection keeps its files, and the two small files a writer uses to survive a kill -9.

A collection's table and index form a generation: `images.lance` + `faiss.index` for the first, then
`images-<n>.lance` + `faiss.images-<n>.index` after each `--reembed`, which builds the next generation beside the
live one and swaps by rewriting the manifest (one atomic rename). `reembed.json` names a generation being built, so
a killed re-embed resumes into it. `<index>.pending` lists ids written to the table since the index was saved.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from indexes.store import TABLE

REEMBED = "reembed.json"


def index_file(table: str) -> str:
    return "faiss.index" if table == TABLE else f"faiss.{table}.index"


def new_table_name() -> str:
    return f"{TABLE}-{os.getpid()}-{os.urandom(3).hex()}"


def read_reembed(directory: Path) -> dict | None:
    try:
        data = json.loads((directory / REEMBED).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("table"), str) else None


def write_reembed(directory: Path, table: str, model: dict) -> None:
    tmp = directory / (REEMBED + ".tmp")
    tmp.write_text(json.dumps({"table": table, "model": model}))
    os.replace(tmp, directory / REEMBED)


def drop_generations(directory: Path, keep: set[str]) -> None:
    """Remove every table (and its index files) whose name is not in keep."""
    for path in directory.glob("*.lance"):
        table = path.name[: -len(".lance")]
        if table in keep or not table.startswith(TABLE):
            continue
        shutil.rmtree(path, ignore_errors=True)
        for leftover in (index_file(table), index_file(table) + ".pending", index_file(table) + ".tmp"):
            (directory / leftover).unlink(missing_ok=True)


class Journal:
    """Ids written to the table since the index file was saved: appended (and fsynced) before each write, so
    after a kill the next run knows which vectors of the index to replace. Cleared once the index is saved."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, ids: np.ndarray) -> None:
        with open(self.path, "ab") as f:
            f.write(np.ascontiguousarray(ids, np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> np.ndarray:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return np.zeros(0, np.int64)
        data = data[: len(data) - len(data) % 8]  # a write cut short by a kill: its ids were never committed
        return np.unique(np.frombuffer(data, np.int64))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
