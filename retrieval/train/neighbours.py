"""Lexical caption neighbours, so that training batches hold hard negatives.

A random batch of 96 almost never holds two captions one word apart ("a red circle above a blue square" and
"... to the left of a blue square"), so the contrastive loss never has to tell them apart and the ITM head's
"hard" negatives, mined inside the batch, are not hard. Filling part of each batch with the nearest captions of
the rest fixes both (the same idea as NegCLIP's hard negatives, without writing any captions).

Nearness is the cosine of TF-IDF vectors over word unigrams and bigrams (bigrams keep word order: "red circle"
vs "circle red"), reduced to `dim` dimensions by a seeded Gaussian projection, which keeps cosines to about
1/sqrt(dim). The search is exact inside shards of `shard` captions: O(N * shard * dim) work, a few seconds for
100k captions on 2 cores, linear in N beyond that (a neighbour is then the nearest within its shard).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

_WORD = re.compile(r"[\w']+")


def _terms(caption: str) -> list[str]:
    words = _WORD.findall(caption.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


def caption_vectors(
    captions: list[str], dim: int = 256, seed: int = 0, max_terms: int = 100_000
) -> torch.Tensor:
    """(N, dim) L2-normalised projected TF-IDF vectors of unigrams + bigrams (zero rows for empty captions)."""
    docs = [_terms(c) for c in captions]
    df = Counter(t for terms in docs for t in set(terms))
    vocab = {t: i for i, (t, _) in enumerate(df.most_common(max_terms))}  # rarest terms past the cap ignored
    n = len(captions)
    idf = torch.tensor([math.log((1 + n) / (1 + df[t])) + 1.0 for t in vocab])  # (V,) smoothed, as sklearn
    rows, cols, vals = [], [], []
    for r, terms in enumerate(docs):
        for t, count in Counter(terms).items():
            if t in vocab:
                rows.append(r)
                cols.append(vocab[t])
                vals.append(float(count))
    if not vocab:
        return torch.zeros(n, dim)
    tf = torch.sparse_coo_tensor(
        torch.tensor([rows, cols], dtype=torch.long),
        torch.tensor(vals),
        (n, len(vocab)),
        check_invariants=True,
    )  # (N, V)
    g = torch.Generator().manual_seed(seed)
    projection = torch.randn(len(vocab), dim, generator=g) * idf[:, None]  # (V, dim): idf folded in
    return torch.nn.functional.normalize(torch.sparse.mm(tf, projection), dim=1)  # (N, dim)


def caption_neighbours(
    captions: list[str], k: int = 16, shard: int = 50_000, dim: int = 256, seed: int = 0
) -> torch.Tensor:
    """(N, k) indices of each caption's k nearest other captions, by lexical cosine; -1 where there are fewer.

    Captions equal to the query (case and spacing aside) are not neighbours: they are positives, not negatives.
    """
    n = len(captions)
    out = torch.full((n, k), -1, dtype=torch.long)
    if n < 2 or k < 1:
        return out
    vectors = caption_vectors(captions, dim, seed)  # (N, dim)
    key = caption_ids(captions)  # (N,) equal captions share an id
    for start in range(0, n, shard):
        idx = torch.arange(start, min(n, start + shard))  # (S,)
        v, ids = vectors[idx], key[idx]
        kk = min(k, len(idx) - 1)
        if kk < 1:
            continue
        for q in range(0, len(idx), 1024):
            sims = v[q : q + 1024] @ v.T  # (Q, S)
            sims[ids[q : q + 1024, None] == ids[None, :]] = -math.inf  # self and duplicates
            top = sims.topk(kk, dim=1)  # (Q, kk)
            found = idx[top.indices]  # (Q, kk) back to dataset indices
            found[top.values == -math.inf] = -1
            out[idx[q : q + 1024], :kk] = found
    return out


def caption_ids(captions: list[str]) -> torch.Tensor:
    """(N,) ids, equal for captions equal up to case and spacing: such pairs are each other's positives."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(" ".join(c.lower().split()), len(index)) for c in captions])


@torch.no_grad()
def mined_neighbours(
    clip: torch.nn.Module,
    pixels: torch.Tensor,
    valid: torch.Tensor,
    tokens: torch.Tensor,
    ids: torch.Tensor,
    normalize,
    k: int = 16,
    batch: int = 256,
) -> torch.Tensor:
    """(N, k): for each pair's caption, the pairs whose images the model now scores highest for it, other than
    its positives (equal captions) and undecodable images; -1 where there are fewer.

    Lexical neighbours find captions one word apart; they cannot know which differences the model still gets
    wrong ("above" vs "to the left of" is many words apart, yet a young model confuses those scenes most). This
    asks the model, as ANCE does for text retrieval: one forward pass over the training images and captions.
    pixels (N, 3, S, S) uint8, tokens (N, L), ids (N,); normalize(uint8 batch) -> model input on its device.
    """
    n = len(ids)
    was_training = clip.training
    clip.eval()
    try:
        image_feat = torch.cat(
            [
                clip.encode_image(normalize(pixels[s : s + batch]), normalize=True).float().cpu()
                for s in range(0, n, batch)
            ]
        )  # (N, D)
        device = next(clip.parameters()).device
        text_feat = torch.cat(
            [
                clip.encode_text(tokens[s : s + batch].to(device), normalize=True).float().cpu()
                for s in range(0, n, batch)
            ]
        )  # (N, D)
    finally:
        clip.train(was_training)
    out = torch.full((n, k), -1, dtype=torch.long)
    kk = min(k, n - 1)
    rows = max(1, min(1024, 50_000_000 // n))  # bounded (rows, N) similarity block
    for q in range(0, n, rows):
        sims = text_feat[q : q + rows] @ image_feat.T  # (Q, N)
        sims[(ids[q : q + rows, None] == ids[None, :]) | ~valid[None, :]] = -math.inf
        top = sims.topk(kk, dim=1)  # (Q, kk)
        found = top.indices.masked_fill(top.values == -math.inf, -1)
        out[q : q + rows, :kk] = found
    return out
