"""`retrieval search`: text, image, or rclip-style query arithmetic ("dog + beach - night", "2:beach") over a
collection, with the collection's own model unless another is named (then it must be the same model)."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import torch

from indexes.collection import Collection
from indexes.manifest import check_model
from retrieval.config import EncoderConfig
from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.errors import UserError
from retrieval.models import text_numpy
from retrieval.models.encoders import Encoder, load_encoder
from retrieval.pipelines.collection_tools import unique_hits
from retrieval.pipelines.model_choice import collection_encoder
from retrieval.pipelines.query import QueryTerm, combine, parse_query
from retrieval.pipelines.rerank import load_reranker, rerank_hits, rerank_text


def encode_image_file(encoder: Encoder, path: str) -> torch.Tensor:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such image file")
    try:
        pixels, _, _ = load_for_model(path, encoder.image_size)
    except ImageDecodeError as e:
        raise UserError(f"{path}: cannot read image ({e})") from e
    return encoder.encode_images(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0]  # (D,)


def query_vector(encoder: Encoder, terms: list[QueryTerm]) -> np.ndarray:
    """Weighted sum of normalised term embeddings, normalised again: (D,) float32 (query.combine)."""
    texts = [t for t in terms if t.text is not None]
    images = [t for t in terms if t.image is not None]
    feats = [encoder.encode_texts([t.text for t in texts])] if texts else []  # (T, D)
    feats += [encode_image_file(encoder, t.image)[None] for t in images]  # (1, D) each
    return combine([t.weight for t in texts + images], torch.cat(feats).numpy())


def encoder_config_for(collection: Collection, device: str = "auto") -> EncoderConfig:
    """The collection's own model, rebuilt from its manifest."""
    return collection_encoder(collection.directory, collection.model, device)


def search(
    db: str | os.PathLike,
    query: str | None = None,
    image: str | None = None,
    k: int = 10,
    encoder_cfg: EncoderConfig | None = None,
    device: str = "auto",
    rerank: int = 0,
    unique: float | None = None,
) -> list[dict[str, Any]]:
    """Top-k rows (path, score, width, height, ...) best first. rerank=K: the index's top max(K, k) with the
    first K re-ordered by the ITM head of the checkpoint (encoder_cfg's, else the collection's), each given its
    "itm" match probability and "rerank" score (pipelines/rerank.py). unique=F: near-duplicates (cosine >= F) of
    a better hit are left out (pipelines/collection_tools.py)."""
    if k < 1:
        raise UserError(f"-k {k}: must be at least 1")
    if rerank < 0:
        raise UserError(f"--rerank {rerank}: must be 0 (off) or at least 1")
    text = rerank_text(query, image) if rerank else None
    terms = parse_query(query) if query else []
    if image:
        terms.append(QueryTerm(1.0, image=image))
    if not terms:
        raise UserError("nothing to search for: give a text query, or --image FILE")
    # a text query without re-ranking never runs the image tower: its weights are not even read
    text_only = not rerank and all(t.image is None for t in terms)
    collection = Collection.open(db)
    if encoder_cfg is None:
        encoder_cfg = encoder_config_for(collection, device)
        encoder = load_encoder(encoder_cfg, text_only=text_only)
        if text_only:
            text_numpy.export_quietly(encoder)  # the next text search of this collection needs no torch
    else:
        encoder = load_encoder(encoder_cfg, text_only=text_only)
        check_model(db, collection.model, encoder.identity)
    hits = unique_hits(collection, query_vector(encoder, terms)[None], max(k, rerank), unique)[0]
    if not rerank:
        return hits
    model = load_reranker(encoder_cfg.checkpoint, encoder.model).to(encoder.device)
    hits, unreadable = rerank_hits(hits, text, model, encoder.tokenizer, rerank, encoder.device)
    if unreadable:
        print(
            f"re-ranking: {unreadable} image(s) could not be read again; kept in index order", file=sys.stderr
        )
    return hits[:k]
