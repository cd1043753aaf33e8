"""`retrieval search --rerank K`: the top K hits of the contrastive index re-ordered by a checkpoint's ITM head.

The index answers with dual-encoder similarities; the fusion encoder then reads the query's tokens against each
candidate image's patch tokens and scores the match (`itm_match_prob`), and the top K are re-ordered by that
match's weighted log-odds plus the contrastive logit (`eval.metrics.rerank_score`, `rerank_top_k`): what
`retrieval eval --rerank` measures as "rerank.*". Only the top K images are decoded and
encoded again, so the cost is K image passes and one fusion pass, whatever the size of the collection.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.errors import UserError
from retrieval.eval.metrics import rerank_score, rerank_top_k
from retrieval.models.albef import (
    AlbefModel,
    encode_image_tokens,
    encode_text_tokens,
    itm_match_prob,
    text_mask,
)
from retrieval.models.encoders import normalize


def rerank_hits(
    hits: list[dict[str, Any]], text: str, model: AlbefModel, tokenizer, k: int, device: torch.device
) -> tuple[list[dict[str, Any]], int]:
    """(hits with the first k re-ordered, each given its "itm" match probability and the "rerank" score it was
    sorted by; how many images could not be read again). Those keep their place below the re-ranked ones."""
    if k < 1:
        raise UserError(f"--rerank {k}: must be at least 1")
    top, rest = hits[:k], hits[k:]
    size = model.clip.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    preprocess = model.clip.visual.preprocess_cfg
    pixels, readable, unreadable = [], [], []
    for hit in top:
        try:
            array, _, _ = load_for_model(str(hit["path"]), size)  # (S, S, 3) uint8
        except (ImageDecodeError, OSError):
            unreadable.append(hit)
            continue
        pixels.append(torch.from_numpy(array).permute(2, 0, 1))  # (3, S, S)
        readable.append(hit)
    if not readable:
        return hits, len(unreadable)
    with torch.inference_mode():
        x = normalize(torch.stack(pixels), preprocess["mean"], preprocess["std"], device)  # (K, 3, S, S)
        pooled, image_tokens = encode_image_tokens(model.clip, x)  # (K, D), (K, N, Wv)
        ids = tokenizer([text]).to(device)  # (1, L)
        _, text_tokens = encode_text_tokens(model.clip, ids)  # (1, L, Wt)
        n = len(readable)
        probs = (
            itm_match_prob(
                model,
                text_tokens.expand(n, -1, -1),
                text_mask(model.clip, ids).expand(n, -1),
                image_tokens,
                torch.arange(n, device=device),
                pooled,
            )
            .float()
            .cpu()
        )  # (K,)
        scale = float(model.logit_scale.exp())  # read without autograd: no graph, no requires_grad warning
    cosine = torch.tensor([float(h["score"]) for h in readable])  # (K,) the index's similarities
    fused = rerank_score(cosine, probs, scale)  # (K,)
    order = rerank_top_k(cosine[None], n, lambda _, image: fused[image]).argsort(dim=1, descending=True)[0]
    ranked = [
        {**readable[int(i)], "itm": float(probs[int(i)]), "rerank": float(fused[int(i)])} for i in order
    ]
    return ranked + unreadable + rest, len(unreadable)


def rerank_text(query: str | None, image: str | None) -> str:
    """The one text ITM can score: a plain text query (no arithmetic, no image)."""
    from retrieval.pipelines.search import parse_query  # search imports this module

    if image or not query:
        raise UserError("--rerank needs a text query: ITM scores a caption against each image")
    terms = parse_query(query)
    if len(terms) != 1 or terms[0].text is None or terms[0].weight != 1.0:
        raise UserError(f"--rerank needs a plain text query; {query!r} is arithmetic or names an image")
    return terms[0].text


def load_reranker(checkpoint: str | os.PathLike | None, clip: torch.nn.Module) -> AlbefModel:
    """The ITM model of `checkpoint` (the one the search encoder was loaded from) on that encoder's towers."""
    from retrieval.models.albef import with_fusion

    if not checkpoint:
        raise UserError("--rerank needs a trained checkpoint with an ITM head: pass --checkpoint DIR")
    return with_fusion(checkpoint, clip)
