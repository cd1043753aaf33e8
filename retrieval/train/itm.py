"""ITM in training: one call scores the batch's positive pairs and mined negatives with the fusion encoder and
returns its losses (ITM cross-entropy and the ranking terms). It lives with training, not with the model: the
model only scores pairs (models/fusion.py), the losses only take scores (losses/matching.py), and this joins them,
so models never import losses."""

from __future__ import annotations

import torch
from torch import Tensor

from retrieval.losses.matching import itm_loss, pairwise_rank_loss
from retrieval.losses.mining import sample_negatives
from retrieval.models.fusion import FusionEncoder


def itm_forward(
    fusion: FusionEncoder,
    text_tokens: Tensor,
    text_mask: Tensor,
    image_tokens: Tensor,
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    positive_mask: Tensor,
    *,
    hard: bool = True,
    uniform: float = 0.0,
    generator: torch.Generator | None = None,
    negative_tokens: Tensor | None = None,
    negative_mask: Tensor | None = None,
    negative_valid: Tensor | None = None,
    ranked: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
    scored: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    compared: dict[str, tuple[tuple[str, Tensor], tuple[str, Tensor]]] | None = None,
    image_global: Tensor | None = None,
) -> dict[str, Tensor]:
    """ITM on B positives, B hard-negative texts (one per image) and B hard-negative images (one per text).

    Row i of text_tokens / text_mask / image_tokens is a matched pair. sim_i2t, sim_t2i: (B, B) in-batch sims
    (use `contrastive.local_block` on clip_loss's (B, B_global) output). positive_mask: (B, B) bool, True where
    image i and text j are a positive pair (same image id / same caption); the diagonal is always positive.
    negative_tokens / negative_mask (B, L, Dt) / (B, L): token states of a generated false caption per image
    (train/negatives.py), one more negative pair (image i, negative i) for each row where negative_valid.
    ranked: name -> (tokens (V, L, Dt), mask (V, L), image (V,) long, owner (V,) long): false pairs kept out
    of ITM's cross-entropy, each only to score below the positive pair of row owner (`matching.pairwise_rank_loss`):
    a false caption of image owner (image = owner), or text owner with another image (image_tokens may hold
    more than B images; rows past B are only used here).
    scored: name -> (tokens (V, L, Dt), mask (V, L), image (V,) long): more true pairs, scored in the same pass
    with no loss of their own, for `compared` to name.
    compared: name -> ((true group, rows (V,)), (false group, rows (V,))): row k of the first must outscore row
    k of the second; a group is "positive" (the B matched pairs) or a ranked or scored group's name.
    image_global: (rows of image_tokens, D) the images' pooled features, for a fusion that reads them
    (FusionConfig.global_token).
    Returns `matching.itm_loss`'s dict, plus "rank_<name>" and "rank_<name>_acc" per ranked or compared group.
    """
    b = text_tokens.shape[0]
    for name, t in (("sim_i2t", sim_i2t), ("sim_t2i", sim_t2i), ("positive_mask", positive_mask)):
        if t.shape != (b, b):
            raise ValueError(
                f"{name} must be ({b}, {b}), the in-batch block; got {tuple(t.shape)} "
                "(slice gathered sims with contrastive.local_block)"
            )
    eye = torch.eye(b, dtype=torch.bool, device=positive_mask.device)
    positives = positive_mask | eye  # (B, B): image i, text j
    with torch.no_grad():
        neg_text = sample_negatives(
            sim_i2t, positives, hard=hard, uniform=uniform, generator=generator
        )  # (B,) per image
        neg_image = sample_negatives(
            sim_t2i, positives.T, hard=hard, uniform=uniform, generator=generator
        )  # (B,) per text
    # One fused pass over [positives; (image i, negative text); (negative image, text i)]; a row whose every
    # in-batch candidate is a positive (-1) has no mined negative
    rows = torch.arange(b, device=text_tokens.device)
    has_t, has_i = neg_text >= 0, neg_image >= 0  # (B,), (B,)
    texts = [text_tokens, text_tokens[neg_text[has_t]], text_tokens[has_i]]
    masks = [text_mask, text_mask[neg_text[has_t]], text_mask[has_i]]
    images = [rows, rows[has_t], neg_image[has_i]]  # which of the B images each row attends to
    if negative_tokens is not None:
        keep = rows if negative_valid is None else negative_valid.nonzero().flatten()  # (V,)
        texts.append(negative_tokens[keep])
        masks.append(negative_mask[keep])
        images.append(keep)
    n_itm = sum(len(i) for i in images)
    start = {"positive": 0}  # group -> its first row among the scored ones
    for name, (tokens, mask, image, *_) in [*(ranked or {}).items(), *(scored or {}).items()]:
        start[name] = sum(len(i) for i in images)
        texts.append(tokens)
        masks.append(mask)
        images.append(image)
    # (3B [+ V] [+ ranked + scored], 2); each image's keys/values are projected once, not once per row
    logits = fusion.itm_logits(
        torch.cat(texts), torch.cat(masks), image_tokens, torch.cat(images), image_global
    )
    out = itm_loss(logits[:b], logits[b:n_itm])
    log_odds = logits[:, 1] - logits[:, 0]  # (rows,)
    pairs = {
        name: (owner, start[name] + torch.arange(len(owner), device=owner.device))
        for name, (_, _, _, owner) in (ranked or {}).items()
    }
    for name, ((true, true_rows), (false, false_rows)) in (compared or {}).items():
        pairs[name] = (start[true] + true_rows, start[false] + false_rows)
    for name, (true_rows, false_rows) in pairs.items():
        found = pairwise_rank_loss(log_odds[true_rows], log_odds[false_rows])
        out.update({f"rank_{name}": found["rank"], f"rank_{name}_acc": found["rank_acc"]})
    return out
