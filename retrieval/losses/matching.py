"""Image-text matching (ITM): binary classification of (image, text) pairs from the fusion encoder's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def itm_loss(pos_logits: Tensor, neg_logits: Tensor) -> dict[str, Tensor]:
    """Cross-entropy over matched (label 1) and mismatched (label 0) pairs.

    pos_logits: (N, 2), neg_logits: (M, 2); class 1 means "match", as in ALBEF/BLIP.
    Returns {"itm": mean loss over all N + M pairs, "itm_acc": detached accuracy}.
    """
    for name, t in (("pos_logits", pos_logits), ("neg_logits", neg_logits)):
        if t.dim() != 2 or t.shape[1] != 2:
            raise ValueError(f"{name} must be (N, 2), got {tuple(t.shape)}")
    logits = torch.cat([pos_logits, neg_logits], dim=0)  # (N + M, 2)
    labels = torch.cat(
        [
            torch.ones(pos_logits.shape[0], dtype=torch.long, device=logits.device),
            torch.zeros(neg_logits.shape[0], dtype=torch.long, device=logits.device),
        ]
    )  # (N + M,)
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return {"itm": loss, "itm_acc": acc}


def pairwise_rank_loss(true_scores: Tensor, false_scores: Tensor) -> dict[str, Tensor]:
    """The true caption must outscore its false twin on the same image: -log sigmoid(true - false), per pair.

    true_scores, false_scores: (N,) scores of an image with its caption and with one false version of it (ITM
    match log-odds). Unlike one more "no match" in ITM's cross-entropy beside in-batch negatives, this asks only
    for the order of the two, which is what binding is (on synth scenes, frozen towers: a relation's direction
    stayed at chance for 600 steps as an ITM negative, and reached 0.93 in 400 as a ranked pair).
    Returns {"rank": mean loss, "rank_acc": detached share of pairs ordered right}; both 0 for N = 0.
    """
    if true_scores.dim() != 1 or true_scores.shape != false_scores.shape:
        raise ValueError(
            f"true_scores and false_scores must both be (N,); got {tuple(true_scores.shape)} and "
            f"{tuple(false_scores.shape)}"
        )
    margin = true_scores.float() - false_scores.float()  # (N,)
    if margin.numel() == 0:  # no pair in this batch: a zero that still belongs to the graph
        return {"rank": margin.sum(), "rank_acc": margin.detach().sum()}
    return {"rank": F.softplus(-margin).mean(), "rank_acc": (margin.detach() > 0).float().mean()}
