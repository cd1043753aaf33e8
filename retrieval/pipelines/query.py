"""Queries without torch: rclip-style query arithmetic ("dog + beach - night", "2:beach") parsed into terms, and
the fast path of a text search, which answers with the collection's model's text tower in numpy
(models/text_numpy.py) when one is cached, never importing torch, open_clip or the model's image side."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retrieval.data.scan import IMAGE_EXTENSIONS
from retrieval.errors import UserError

if TYPE_CHECKING:
    import numpy as np

_SPLIT = re.compile(r"\s+([+-])\s+")  # operators need spaces around them, so "t-shirt" stays one term
_WEIGHT = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*:\s*(.+)$")


@dataclass(frozen=True)
class QueryTerm:
    weight: float
    text: str | None = None
    image: str | None = None  # a path: a term naming an existing image file is an image query


def parse_query(query: str, files: bool = True) -> list[QueryTerm]:
    """files=False: every term is text, even one naming an image file (a server must not read its own files
    on a client's say-so)."""
    query = query.strip()
    if not query:
        raise UserError("empty query: give some text, or --image FILE")
    sign, rest = 1.0, query
    if rest.startswith("- "):
        sign, rest = -1.0, rest[2:]
    parts = _SPLIT.split(rest)
    terms, signs = parts[0::2], [sign] + [1.0 if op == "+" else -1.0 for op in parts[1::2]]
    out = []
    for term, s in zip(terms, signs, strict=True):
        weight = 1.0
        if m := _WEIGHT.match(term):
            weight, term = float(m.group(1)), m.group(2)
        term = term.strip()
        if not term:
            raise UserError(f"query {query!r}: an operator has nothing after it")
        is_image = files and os.path.isfile(term) and os.path.splitext(term)[1].lower() in IMAGE_EXTENSIONS
        out.append(QueryTerm(s * weight, image=term) if is_image else QueryTerm(s * weight, text=term))
    return out


def text_search(
    db: str | os.PathLike, query: str, k: int, unique: float | None
) -> list[dict[str, Any]] | None:
    """The hits of a text-only query (no image terms) with the collection's own model, computed by its cached
    numpy text tower; None when there is no such tower (then search.py loads the model, and caches the tower
    for next time)."""
    if k < 1:
        raise UserError(f"-k {k}: must be at least 1")
    terms = parse_query(query)
    if any(t.image is not None for t in terms):
        return None
    from indexes.collection import Collection
    from retrieval.models import text_numpy
    from retrieval.pipelines.collection_tools import unique_hits

    collection = Collection.open(db)
    tower = text_numpy.load(collection.model)
    if tower is None:
        return None
    vector = combine([t.weight for t in terms], tower.encode([t.text for t in terms]))
    return unique_hits(collection, vector[None], k, unique)[0]


def combine(weights: list[float], feats) -> np.ndarray:
    """Weighted sum of normalised term embeddings (T, D), normalised again: the query's (D,) float32 vector."""
    import numpy as np

    total = (np.asarray(weights, np.float32)[:, None] * np.asarray(feats, np.float32)).sum(0)
    norm = float(np.linalg.norm(total))
    if norm == 0:
        raise UserError("the query terms cancel out; change the weights")
    return (total / norm).astype(np.float32)
