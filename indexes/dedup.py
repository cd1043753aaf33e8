"""Near-duplicates: groups of vectors within a cosine threshold of each other, found by range search on the
collection's own index, and the collapse of a ranked hit list to one hit per group."""

from __future__ import annotations

from typing import Any

import numpy as np

from indexes.collection import Collection

DEFAULT_THRESHOLD = (
    0.95  # cosine: re-encodes, resizes and crops of one photo; distinct shots of a scene score lower
)


class _Groups:
    """Union-find over ids."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = self.parent.setdefault(x, x)
        while root != self.parent[root]:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return [g for g in out.values() if len(g) > 1]


def near_duplicate_groups(
    collection: Collection, threshold: float = DEFAULT_THRESHOLD
) -> list[list[dict[str, Any]]]:
    """Every group of two or more rows linked by cosine >= threshold (transitively), each group's rows sorted by
    path, the groups largest first. Range search runs on the CPU copy of the index (GPU FAISS has none for IVF)."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold}: a cosine, between -1 and 1")
    index = collection.cpu_index()
    groups = _Groups()
    for ids, vectors in collection.store.iter_vectors(batch_rows=8192):
        lims, _, found = index.range_search(np.ascontiguousarray(vectors, np.float32), threshold)
        for q, me in enumerate(ids.tolist()):
            for other in found[lims[q] : lims[q + 1]].tolist():
                if other != me and other >= 0:
                    groups.union(me, other)
    members = groups.groups()
    rows = collection.store.fetch(i for g in members for i in g)
    out = [sorted((rows[i] for i in g if i in rows), key=lambda r: r["path"]) for g in members]
    out = [g for g in out if len(g) > 1]
    return sorted(out, key=lambda g: (-len(g), g[0]["path"]))


def collapse(hits: list[dict[str, Any]], threshold: float = DEFAULT_THRESHOLD) -> list[dict[str, Any]]:
    """Keep each hit unless it is within threshold of a better one already kept (hits best first, each with
    its "vector"): one hit per group of near-duplicates, its best."""
    kept: list[dict[str, Any]] = []
    kept_vectors: list[np.ndarray] = []
    for hit in hits:
        v = np.asarray(hit["vector"], np.float32)
        if kept_vectors and float(np.max(np.stack(kept_vectors) @ v)) >= threshold:
            continue
        kept.append(hit)
        kept_vectors.append(v)
    return kept
