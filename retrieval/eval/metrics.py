"""Retrieval metrics as pure functions on score matrices: recall@K, re-ranking of the top K, binding accuracy.

Nothing here knows about models or data: the evaluation pipeline (evaluate.py) builds the matrices and the ITM
scorer, so each metric is one tested function (STYLE rule 5) that training and `retrieval eval` share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def recall_at_k(sim: Tensor, positive: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Fraction of queries with at least one positive among their top K candidates, for each K in ks.

    sim: (Q, G) scores, higher is better. positive: (Q, G) bool, every candidate that counts as a hit (a
    caption shared by several images lists all of them). A K larger than G is clipped to G (every query with a
    positive is then a hit). Queries with no positive are left out of the average; ValueError if no query
    has one.

    Ties count against the query: a negative scoring exactly as high as the best positive ranks above it. A
    collapsed model that scores everything alike therefore gets chance-level recall, not whatever the gallery
    order happens to give.
    """
    _check_pair(sim, positive)
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {list(ks)}")
    has_positive = positive.any(dim=1)  # (Q,)
    if not bool(has_positive.any()):
        raise ValueError(f"none of the {sim.shape[0]} queries has a positive candidate; recall is undefined")
    s = sim.to(torch.promote_types(sim.dtype, torch.float32))  # (Q, G) floats, so -inf can mask
    best = s.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1) best positive score
    # How many negatives sit at or above the best positive: the first hit is at 1-based position rank + 1.
    rank = ((s >= best) & ~positive).sum(dim=1)[has_positive]  # (Q_valid,)
    g, n = sim.shape[1], rank.numel()
    # integer counts over n: exact fractions (0.001, not float32's 0.0010000000474974513)
    return {f"R@{k}": int((rank < min(int(k), g)).sum()) / n for k in ks}


# ITM's share of the re-ranking score. Its log-odds come out overconfident after the refinement's ranking terms:
# on every run measured (synth scenes and two draws of the reworded benchmark) a quarter of them beat equal
# weights (synth t2i 0.806 -> 0.835, reworded 0.609 -> 0.622 and 0.563 -> 0.584; docs/training.md).
ITM_WEIGHT = 0.25


def rerank_score(
    cosine: Tensor, itm_prob: Tensor, logit_scale: float, itm_weight: float = ITM_WEIGHT
) -> Tensor:
    """What ITM re-ranking sorts the top K by: the contrastive logit (cosine x the learned 1 / temperature) plus
    `itm_weight` x ITM's match log-odds, each a log-scale evidence of the same match, added as a product of
    experts (BLIP re-ranks by ITM score + similarity too; ALBEF by ITM alone). The two fail differently: ITC tells
    held-out shapes apart better, ITM the direction and axis of a relation, so their sum ranks better than either.
    cosine, itm_prob: (P,) -> (P,) float32. Probabilities are clipped to [1e-6, 1 - 1e-6]: a saturated head
    gives large finite log-odds, never inf."""
    if cosine.shape != itm_prob.shape:
        raise ValueError(
            f"cosine and itm_prob must have one shape; got {tuple(cosine.shape)} and {tuple(itm_prob.shape)}"
        )
    p = itm_prob.float().clamp(1e-6, 1 - 1e-6)
    return cosine.float() * logit_scale + itm_weight * (torch.log(p) - torch.log1p(-p))  # (P,)


def rerank_top_k(sim: Tensor, k: int, score: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Re-order each query's top k candidates (by sim) with a second scorer, e.g. the ITM head.

    score(query_idx (P,), cand_idx (P,)) -> (P,) is called once with all P = Q * k pairs, query-major
    (it batches internally). Returns a new (Q, G) matrix, float32 or sim's dtype if wider. Outside the
    top k it holds the original sim. The top k get distinct values above every other entry of their row,
    ordered by the new score; ties in the new score keep their original (sim) order. Ranks, not the raw new
    scores, are written, so those ties stay broken in the matrix itself and recall_at_k's tie rule cannot
    reorder them. k larger than G is clipped to G.
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be (Q, G), got {tuple(sim.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not bool(torch.isfinite(sim).all()):
        raise ValueError("sim must be finite to re-rank: the top k are placed just above the row's maximum")
    q, g = sim.shape
    k = min(k, g)
    # stable: among equal sims the lower index ranks first, the same order every run
    top = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]  # (Q, k)
    query_idx = torch.arange(q, device=sim.device).repeat_interleave(k)  # (Q*k,)
    new = score(query_idx, top.reshape(-1))
    if new.shape != (q * k,):
        raise ValueError(f"score must return ({q * k},) scores for {q * k} pairs, got {tuple(new.shape)}")
    if torch.isnan(new).any():
        raise ValueError("score returned NaN; the re-ranking scorer is broken upstream")
    new = new.to(sim.device).reshape(q, k)  # (Q, k) in sim order
    order = torch.sort(new, dim=1, descending=True, stable=True).indices  # (Q, k) stable: ties keep sim order
    # at least float32: ceiling + 1..k stay distinct while |sim| + k < 2^23; half precision would merge them
    out = sim.to(torch.promote_types(sim.dtype, torch.float32)).clone()  # (Q, G)
    ceiling = out.amax(dim=1, keepdim=True)  # (Q, 1)
    # position j of the new order gets ceiling + (k - j): above every sim in the row, strictly decreasing
    values = ceiling + torch.arange(k, 0, -1, device=sim.device, dtype=out.dtype)  # (Q, k)
    out.scatter_(1, top.gather(1, order), values)
    return out


def binding_accuracy(true_scores: Tensor, negative_scores: Tensor) -> float:
    """Fraction of (row, negative) comparisons in which the true caption scores strictly higher.

    true_scores: (N,) score of each image with its own caption. negative_scores: (N, M) its scores with hard
    negative captions, NaN where a row has fewer than M negatives. Each comparison weighs the same, so a row
    with four negatives counts four times. ValueError if there is no comparison at all.
    """
    if (
        true_scores.dim() != 1
        or negative_scores.dim() != 2
        or negative_scores.shape[0] != true_scores.shape[0]
    ):
        raise ValueError(
            f"need true_scores (N,) and negative_scores (N, M); got {tuple(true_scores.shape)} and "
            f"{tuple(negative_scores.shape)}"
        )
    if torch.isnan(true_scores).any():
        raise ValueError("true_scores contains NaN; only negative_scores may be NaN-padded")
    present = ~torch.isnan(negative_scores)  # (N, M)
    n = int(present.sum())
    if n == 0:
        raise ValueError("no negative scores (all NaN or empty): binding accuracy is undefined")
    wins = (true_scores.unsqueeze(1) > negative_scores) & present  # (N, M); NaN compares False anyway
    return int(wins.sum()) / n


def _check_pair(sim: Tensor, positive: Tensor) -> None:
    if sim.dim() != 2 or sim.shape != positive.shape:
        raise ValueError(
            f"sim and positive must both be (Q, G); got {tuple(sim.shape)} and {tuple(positive.shape)}"
        )
    if positive.dtype != torch.bool:
        raise ValueError(f"positive must be a bool tensor, got {positive.dtype}")
    if torch.isnan(sim).any():
        raise ValueError("sim contains NaN; ranks would be meaningless")
