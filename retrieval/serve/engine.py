"""What the server computes: a collection and its model loaded once, and batched answers to many queries.

`answer` takes a batch of queries (text terms, an uploaded image, a vector, or a mix) and answers them with
one text-tower call for every text term in the batch, one image-tower call for every upload, and one FAISS
search for every query vector: the micro-batcher hands it whatever requests arrived together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from indexes.collection import Collection
from indexes.manifest import check_model, describe_model
from indexes.paths import display, json_fields
from retrieval.config import EncoderConfig
from retrieval.errors import UserError
from retrieval.models.encoders import load_encoder
from retrieval.pipelines.model_choice import collection_encoder
from retrieval.pipelines.rerank import load_reranker, rerank_hits
from retrieval.pipelines.search import QueryTerm
from retrieval.serve.config import ServeConfig


@dataclass
class SearchQuery:
    k: int
    terms: list[QueryTerm] = field(default_factory=list)  # text terms only (parse_query(files=False))
    pixels: np.ndarray | None = None  # (S, S, 3) uint8: an uploaded image, preprocessed for the model
    vector: np.ndarray | None = None  # (D,) a client's own query vector


def public_hit(hit: dict[str, Any]) -> dict[str, Any]:
    """A hit as the API answers it: the name in its reversible JSON form (indexes/paths.py), the row id as a
    decimal string (ids use 63 bits; JavaScript numbers hold 53), then the figures. A name that does not
    print as it is (bytes not UTF-8, tabs, newlines) also carries "display", the one-line form to show."""
    keys = ("score", "itm", "rerank", "width", "height", "size")
    shown = display(hit["path"])
    extra = {"display": shown} if shown != hit["path"] else {}
    return {
        **json_fields(hit["path"]),
        **extra,
        "id": str(hit["id"]),
        **{k: hit[k] for k in keys if k in hit},
    }


class Engine:
    def __init__(self, db: str | os.PathLike, cfg: ServeConfig, encoder_cfg: EncoderConfig | None = None):
        self.cfg = cfg
        self.collection = Collection.open(db)
        own = collection_encoder(db, self.collection.model)
        self.encoder = load_encoder(encoder_cfg or own)
        if encoder_cfg is not None:
            check_model(db, self.collection.model, self.encoder.identity)
        checkpoint = (encoder_cfg or own).checkpoint
        self.reranker = load_reranker(checkpoint, self.encoder.model) if cfg.rerank else None
        self.collection.search(np.zeros((1, self.dim), np.float32), 1)  # load the index now, not on a query

    @property
    def dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    def describe(self) -> dict[str, Any]:
        return {"count": self.collection.store.count(), "model": describe_model(self.collection.model)}

    def answer(self, queries: list[SearchQuery]) -> list[list[dict[str, Any]] | Exception]:
        """One result list (best first) or one exception per query, computed with batched model calls."""
        vectors = np.zeros((len(queries), self.dim), np.float32)
        texts = [(i, t) for i, q in enumerate(queries) for t in q.terms]
        if texts:
            feats = self.encoder.encode_texts([t.text for _, t in texts])  # (T, D)
            for (i, t), f in zip(texts, feats.numpy(), strict=True):
                vectors[i] += t.weight * f
        uploads = [i for i, q in enumerate(queries) if q.pixels is not None]
        if uploads:
            pixels = torch.from_numpy(np.stack([queries[i].pixels for i in uploads])).permute(0, 3, 1, 2)
            vectors[uploads] += self.encoder.encode_images(pixels).numpy()  # (U, D)
        for i, q in enumerate(queries):
            if q.vector is not None:
                vectors[i] += q.vector / max(float(np.linalg.norm(q.vector)), 1e-12)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # (Q, 1)
        live = [i for i in range(len(queries)) if norms[i, 0] > 1e-6]
        out: list[Any] = [UserError("the query terms cancel out; change the weights")] * len(queries)
        if live:
            k = max(queries[i].k for i in live)
            hits = self.collection.search(vectors[live] / norms[live], k)
            for i, found in zip(live, hits, strict=True):
                out[i] = found[: queries[i].k]
        return out

    def rerank(self, hits: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
        ranked, _ = rerank_hits(
            hits, text, self.reranker, self.encoder.tokenizer, self.cfg.rerank, self.encoder.device
        )
        return ranked

    def row(self, image_id: int) -> dict[str, Any] | None:
        return self.collection.store.fetch([image_id]).get(image_id)

    def neighbours(self, image_id: int, k: int) -> list[dict[str, Any]] | None:
        """The k nearest images to one in the collection (itself excluded), or None if there is no such id."""
        row = self.collection.store.fetch([image_id], vectors=True).get(image_id)
        if row is None:
            return None
        vector = np.asarray(row["vector"], np.float32)[None]  # (1, D)
        hits = self.collection.search(vector, k + 1)[0]
        return [h for h in hits if h["id"] != image_id][:k]
