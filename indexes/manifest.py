"""The collection manifest: a small JSON file naming the model and describing the derived FAISS index."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from indexes.errors import CollectionError, ModelMismatch

FORMAT = "retrieval-collection"
VERSION = 1
FILENAME = "manifest.json"

# the fields that decide whether two sets of vectors live in one space
MODEL_KEYS = ("arch", "weights", "embed_dim", "image_size", "mean", "std", "resize")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(directory) / FILENAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CollectionError(f"{path}: unreadable manifest ({e}); re-run `retrieval index --reembed`") from e
    if data.get("format") != FORMAT:
        raise CollectionError(
            f"{directory}: not a retrieval collection (manifest format {data.get('format')!r})"
        )
    return data


def write_manifest(directory: str | os.PathLike, data: dict[str, Any]) -> None:
    """Atomic: write a temporary file, fsync, rename. A reader never sees half a manifest."""
    path = Path(directory) / FILENAME
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, **data}, f, indent=2, sort_keys=True)
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
