"""The collection manifest: a small JSON file naming the model and describing the derived FAISS index."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from indexes.errors import CollectionError, ModelMismatch

FORMAT = "retrieval-collection"
VERSION = 1
FILENAME = "manifest.json"
BACKUP = "manifest.backup.json"  # the same content, written first: a damaged manifest.json falls back to it

log = logging.getLogger(__name__)

# the fields that decide whether two sets of vectors live in one space
MODEL_KEYS = ("arch", "weights", "embed_dim", "image_size", "mean", "std", "resize")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest, or None when there is none. A damaged manifest.json falls back to the backup copy
    (and is rewritten from it); when both are damaged the error names the command that rebuilds it."""
    directory = Path(directory)
    path = directory / FILENAME
    if not path.exists() and not (directory / BACKUP).exists():
        return None
    data, problem = _parse(path)
    if data is None:
        data, _ = _parse(directory / BACKUP)
        if data is None:
            raise CollectionError(
                f"{path}: unreadable manifest ({problem}) and no usable backup; rebuild the collection with "
                f"`retrieval index PATH --db {directory} --reembed` (or `--embeddings DIR ... --reembed`)"
            )
        log.warning("%s: unreadable (%s); using %s", path, problem, BACKUP)
        try:
            _write(path, data)
        except OSError:
            pass  # a read-only reader still gets the backup's content
    if data.get("format") != FORMAT:
        raise CollectionError(
            f"{directory}: not a retrieval collection (manifest format {data.get('format')!r})"
        )
    return data


def _parse(path: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return None, "not a manifest object"
    return data, ""


def write_manifest(directory: str | os.PathLike, data: dict[str, Any]) -> None:
    """Atomic (temporary file, fsync, rename), then the backup copy: a reader never sees half a manifest."""
    data = {**data, "format": FORMAT, "version": VERSION}
    _write(Path(directory) / FILENAME, data)
    _write(Path(directory) / BACKUP, data)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def describe_model(model: dict[str, Any]) -> str:
    weights = str(model.get("weights"))
    if weights.startswith("random-init"):  # the encoder's mark for --pretrained none: say it plainly
        weights = f"RANDOM weights, untrained, {weights}"
    return f"{model.get('arch')} ({weights}, {model.get('embed_dim')}-d)"


def check_model(directory: str | os.PathLike, built_with: dict[str, Any], asked: dict[str, Any]) -> None:
    """Refuse to mix vectors of two models. Raises ModelMismatch with a one-line message."""
    diff = [k for k in MODEL_KEYS if built_with.get(k) != asked.get(k)]
    if diff:
        raise ModelMismatch(
            f"{directory} was built with {describe_model(built_with)} but this run uses "
            f"{describe_model(asked)} (differs in {', '.join(diff)}); use the collection's model, "
            "or re-embed everything with `retrieval index ... --reembed`"
        )
